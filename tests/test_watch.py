"""`Watch`, what `fxinplace run` and the pytest plugin enter: every torch.compile audited with its own
backend handing off (the numbers are eager's), the guard on, everything given back on exit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxinplace
from conftest import assert_grads_close
from fxinplace._watch import Watch


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_every_way_of_compiling_is_audited_and_computes_what_eager_does():
    eager, x = _model(), torch.randn(5, 4)
    eager(x).pow(2).sum().backward()
    compiled = [_model() for _ in range(4)]
    own = fxinplace.InplaceAudit(compiler="eager", print=False)
    original = torch.compile
    with Watch() as watch:
        assert torch.compile is not original
        compiled[0].compile(backend="aot_eager")  # nn.Module.compile
        runs = [compiled[0],
                torch.compile(compiled[1], backend="eager"),
                torch.compile(backend="aot_eager", mode="default")(compiled[2].forward),  # as a decorator
                torch.compile(compiled[3], backend=own)]
        for run in runs:
            run(x).pow(2).sum().backward()
    assert torch.compile is original
    assert "forward" not in compiled[0].__dict__  # nn.Module.compile's stand-in is gone
    for model in compiled:
        assert_grads_close(_grads(model), _grads(eager))
    assert len(watch.report.graphs) == 4
    assert own in watch.audits and len(own.graphs) == 1  # the user's own audit, collected, not wrapped
    assert [m.op for m in watch.report.mutations] == ["relu(inplace=True)"] * 4


def test_the_named_backend_is_collected_not_audited_twice():
    with Watch() as watch:
        torch.compile(_model(), backend="inplace_audit", options={"compiler": "eager", "print": False})(torch.randn(2, 4))
    assert watch.audits == [] and len(watch.report.graphs) == 1
    assert len(fxinplace.inplace_audit.graphs) == 1


def test_the_guard_names_the_namespace_modules_and_optimizers():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # PyTorch's verdict
        twin = copy.deepcopy(model)
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        a, b = twin(x).sum(), twin(x).pow(2).sum()
        a.backward()
        twin_opt.step()
        b.backward()
    with pytest.raises(fxinplace.StaleSavedTensorError) as info:
        with Watch(namespace={"net": model, "sgd": opt}) as watch:
            a, b = model(x).sum(), model(x).pow(2).sum()
            a.backward()
            opt.step()
            b.backward()
    assert info.value.stale.name.startswith("net.") and "`sgd.step()` (SGD)" in str(info.value)
    assert watch.stale == [info.value.stale]
