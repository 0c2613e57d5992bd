"""The guard's value check (`check_values=True`): writes no version counter sees, named.

The truth: eager PyTorch computes the gradient from the overwritten values without a word (we
compute the right one from the values the forward used); with the value check the guard names
the tensor, and a correct step stays silent and computes what it computes without the guard.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import fxinplace


class DataWriteInForward(nn.Module):
    """Shrinks its weight through `.data` after using it: the backward of `fc` reads the new values."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        h = self.fc(x)
        self.fc.weight.data.mul_(0.5)  # no version bump: autograd does not notice
        return h.sum()


def _step(model, x, **guard_kwargs):
    x = x.clone().requires_grad_()
    with fxinplace.guard(model, **guard_kwargs):
        model(x).backward()
    return x.grad


def test_a_data_write_in_the_models_forward_is_named_by_the_value_check():
    torch.manual_seed(0)
    model, x = DataWriteInForward(), torch.randn(3, 4)
    weight = model.fc.weight.detach().clone()
    right = torch.ones(3, 2) @ weight  # d(sum(x @ W.T))/dx with the W the forward used
    eager_x = x.clone().requires_grad_()
    model(eager_x).backward()
    torch.testing.assert_close(eager_x.grad, 0.5 * right)  # PyTorch: silently the new weight's
    model.fc.weight.data.copy_(weight)
    silent = _step(model, x)  # the guard without the check: as blind as PyTorch here
    assert not torch.allclose(silent, right)
    torch.testing.assert_close(silent, 0.5 * right)
    model.fc.weight.data.copy_(weight)
    with pytest.raises(fxinplace.StaleSavedTensorError) as raised:
        _step(model, x, check_values=True)
    found = raised.value.stale
    assert found.by_value and found.hidden and found.name == "fc.weight" and found.writes == ()
    assert "the values of a [4, 2] view of parameter `fc.weight` changed after autograd saved it" in str(raised.value)


def test_warn_mode_records_it_and_the_table_says_values():
    torch.manual_seed(0)
    model, x = DataWriteInForward(), torch.randn(3, 4)
    g = fxinplace.guard(model, check_values=True, on_stale="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with g:
            model(x.requires_grad_()).backward()
    (found,) = g.hazards
    assert found.by_value and any(issubclass(w.category, fxinplace.StaleSavedTensorWarning) for w in caught)
    assert "(values)" in g.table()


class TwoTasks(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)})

    def forward(self, x):
        h = self.trunk(x)
        nan = torch.sqrt(h - 2)  # NaN everywhere: saved by sqrt, and equal to itself bit for bit
        return {"a": self.heads["a"](h), "b": self.heads["b"](h) + nan.nan_to_num().sum()}


def test_a_correct_step_is_silent_and_computes_the_same_with_the_value_check():
    torch.manual_seed(0)
    model, x = TwoTasks(), torch.randn(5, 4)
    reference = {n: p.detach().clone() for n, p in model.state_dict().items()}

    def step(**kwargs):
        model.load_state_dict(reference)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        if kwargs:
            with fxinplace.guard(model, optimizers=opt, **kwargs) as g:
                out = model(x)
                (out["a"].sum() + out["b"].sum()).backward()
                opt.step()
            assert g.hazards == []
        else:
            out = model(x)
            (out["a"].sum() + out["b"].sum()).backward()
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    plain, checked = step(), step(check_values=True)
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=0, atol=0, equal_nan=True)


def test_the_version_check_still_comes_first():
    # A step between two backwards moves the version: named as an optimizer step, not by value.
    def loop(model, x, **guard_kwargs):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with fxinplace.guard(model, optimizers=opt, **guard_kwargs) if guard_kwargs else contextlib.nullcontext():
            out = model(x)
            out["a"].sum().backward(retain_graph=True)
            opt.step()  # moves trunk.0.weight, which linear saved for the input's gradient
            out["b"].sum().backward()

    torch.manual_seed(0)
    model, x = TwoTasks(), torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loop(copy.deepcopy(model), x)  # PyTorch's verdict
    with pytest.raises(fxinplace.StaleSavedTensorError) as raised:
        loop(model, x, check_values=True)
    found = raised.value.stale
    assert not found.by_value and found.writes[0].kind is fxinplace.WriteKind.OPTIMIZER and found.name == "trunk.0.weight"


@pytest.mark.parametrize("value", [1, "yes", None])
def test_check_values_must_be_a_bool(value):
    with pytest.raises(TypeError, match="`check_values` must be True or False"):
        fxinplace.guard(check_values=value)


def test_batch_norms_own_update_of_its_running_statistics_is_no_finding():
    # Saved before its kernel updates them, unread by a training backward: PyTorch trains right.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    reference = copy.deepcopy(model)
    reference(x).sum().backward()
    with fxinplace.guard(model, check_values=True) as g:
        model(x).sum().backward()
    assert g.hazards == []
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_a_data_write_to_running_statistics_an_eval_backward_reads_is_named():
    # In eval mode batch norm's backward reads the running statistics: a `.data` write between
    # the forward and the backward changes the gradient (PyTorch: silently), the check names it.
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).eval()
    bn.running_var.data.fill_(2.0)
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(fxinplace.StaleSavedTensorError) as raised:
        with fxinplace.guard(check_values=True):
            y = bn(x)
            bn.running_var.data.mul_(4.0)  # a `.data` write the guard's mode sees: named as such
            y.sum().backward()
    assert raised.value.stale.hidden
