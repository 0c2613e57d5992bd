"""A stale saved tensor written by compiled code: the guard sees no op run, and names the write
with the facts of the graph's audit (`inplace_audit`): the op, the line, the task."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import fxinplace


class RescalesItsGain(nn.Module):
    """Each forward shrinks a gain it multiplies by, in place: a second forward before the
    first one's backward changes what the first saved."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.gain = nn.Parameter(torch.ones(2))

    def forward(self, x):
        out = {"y": self.fc(x) * self.gain}
        with torch.no_grad():
            self.gain.mul_(0.9)  # CULPRIT
        return out


def _two_forwards_then_backward(model, x):
    first, second = model(x), model(x)
    (first["y"].sum() + second["y"].sum()).backward()


def test_a_write_in_a_compiled_graph_is_named_by_its_audit():
    torch.manual_seed(0)
    model, x = RescalesItsGain(), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _two_forwards_then_backward(copy.deepcopy(model), x)  # PyTorch's verdict
    compiled = torch.compile(model, backend=fxinplace.InplaceAudit(compiler="eager", print=False))
    with pytest.raises(fxinplace.StaleSavedTensorError) as raised:
        with fxinplace.guard(compiled):
            _two_forwards_then_backward(compiled, x)
    found = raised.value.stale
    assert found.name == "gain"
    (write,) = found.writes
    line = inspect.getsource(RescalesItsGain).splitlines().index("            self.gain.mul_(0.9)  # CULPRIT")
    assert write.kind is fxinplace.WriteKind.COMPILED and write.op == "mul_"
    assert write.source.file == __file__ and write.source.line == inspect.getsourcelines(RescalesItsGain)[1] + line
    assert "audited by inplace_audit" in write.by and "changed by: `mul_` in graph" in str(raised.value)
