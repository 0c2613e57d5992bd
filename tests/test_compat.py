"""Untested torch releases: the audit warns, functionalize refuses unless asked."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxinplace
from fxinplace import _compat


@pytest.mark.parametrize("version, tested", [
    ("2.13.0", True), ("2.13.0+cpu", True), ("2.13.1+cu128", True), ("2.13.0rc1", True),
    ("2.14.1", True), ("2.14.1+cu130", True), ("2.14.0a0+git1234", True),
    ("2.12.1", False), ("2.15.0", False), ("2.15.0a0+git1234", False), ("3.0.0", False),
])
def test_tested_releases(version, tested):
    assert _compat.torch_is_tested(version) is tested


def test_the_torch_running_the_suite_is_tested():
    # CI must fail, not skip, when it runs on a release the range does not name.
    assert _compat.torch_is_tested(), f"torch {torch.__version__} is not in the tested range {_compat.tested_range()}"


class SavedThenWritten(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        s = torch.sigmoid(self.fc(x))
        s[:, 0] = 1.0  # sigmoid saved s
        return s


@pytest.fixture
def untested(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.15.0")
    monkeypatch.setattr(_compat, "_warned", False)


@pytest.mark.filterwarnings("ignore:Error detected in")
def test_on_an_untested_release_functionalize_compiles_the_graph_unchanged(untested):
    model = SavedThenWritten()
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()  # eager's verdict
    audit = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True)
    with pytest.warns(UserWarning, match=r"torch 2\.15\.0 is outside the tested range \(torch ==2\.13\.\* or ==2\.14\.\*\)"):
        with pytest.raises(Exception, match="the compiler failed with PyTorch's in-place autograd error"):
            torch.compile(model, backend=audit)(x)
    [mutation] = audit.report.mutations
    assert mutation.rewrite == fxinplace.Rewrite(fxinplace.RewriteKind.KEPT_IN_PLACE, fxinplace.KeptReason.UNTESTED_TORCH,
                                                 ("2.15.0", "==2.13.* or ==2.14.*"))
    assert mutation.severity == "error"


def test_on_an_untested_release_the_user_may_opt_in(untested):
    model = SavedThenWritten()
    audit = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True, untested_torch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(model, backend=audit)(torch.randn(2, 4)).sum().backward()
    assert model.fc.weight.grad is not None
    assert audit.report.mutations[0].rewrite.kind is fxinplace.RewriteKind.REWRITTEN


def test_the_untested_warning_comes_once(untested):
    audit = fxinplace.InplaceAudit(compiler="eager", print=False)
    with pytest.warns(UserWarning, match="outside the tested range") as record:
        torch.compile(lambda t: t.add_(1), backend=audit)(torch.randn(3))
        torch._dynamo.reset()
        torch.compile(lambda t: t.mul_(2), backend=audit)(torch.randn(3))
    assert sum("outside the tested range" in str(w.message) for w in record) == 1
