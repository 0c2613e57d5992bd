"""`fxinplace.audit`'s arguments: what it accepts, and the errors for what it does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxinplace


def _step(x, w):
    h = x @ w
    h.relu_()
    return h.sum()


@pytest.mark.parametrize("model", [None, 3, "model", torch.randn(2)], ids=["None", "int", "str", "tensor"])
def test_audit_says_what_it_expected_for_a_model_that_is_not_one(model):
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module or a callable, got "):
        fxinplace.audit(model, torch.randn(2, 3), options={"print": False})


def test_audit_takes_a_plain_function_as_well_as_a_module():
    report = fxinplace.audit(_step, torch.randn(2, 3), torch.randn(3, 4, requires_grad=True), options={"print": False})
    assert [m.op for m in report.mutations] == ["relu_"]
    report = fxinplace.audit(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True)), torch.randn(2, 3),
                             options={"print": False})
    assert [m.op for m in report.mutations] == ["relu(inplace=True)"]


def test_audit_rejects_an_unknown_option_by_name():
    with pytest.raises(ValueError, match=r"unknown option\(s\) `colour`"):
        fxinplace.audit(_step, torch.randn(2, 3), torch.randn(3, 4), options={"colour": True})
