"""torchvision's own models as multi-task trunks (needs torchvision: the torch 2.14.1 CI venv).

The truth is eager PyTorch's: a model whose backward runs gets no error, a model whose
backward raises the in-place error gets exactly that error at the user's line, and the
rewrite trains it with the gradients of its out-of-place twin.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxinplace
from conftest import assert_close_at_scale, eager_backward_error, marked_line, quiet_audit, total_loss
from fxinplace._compat import torch_is_tested

torchvision = pytest.importorskip("torchvision")


class ResNetTwoTasks(nn.Module):
    """ResNet-18's trunk (every ReLU in place) with a classification and a dense head."""

    def __init__(self, buggy: bool = False):
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        self.body = nn.Sequential(*list(resnet.children())[:-2])
        self.cls = nn.Linear(512, 10)
        self.dense = nn.Conv2d(512, 3, 1)
        self.buggy = buggy

    def forward(self, x):
        feats = self.body(x)  # ends in BasicBlock's ReLU(inplace=True), which saves its output
        if self.buggy:
            feats.mul_(0.5)  # CULPRIT
        else:
            feats = feats * 0.5
        return {"cls": self.cls(feats.mean((2, 3))), "dense": self.dense(feats)}


class MobileNetTwoTasks(nn.Module):
    """MobileNetV3-small's features (in-place Hardswish and ReLU, squeeze-excitation) with two heads."""

    def __init__(self):
        super().__init__()
        self.features = torchvision.models.mobilenet_v3_small(weights=None).features
        self.cls = nn.Linear(576, 10)
        self.dense = nn.Conv2d(576, 2, 1)

    def forward(self, x):
        feats = self.features(x)
        return {"cls": self.cls(feats.mean((2, 3))), "dense": self.dense(feats)}


def _images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("make", [ResNetTwoTasks, MobileNetTwoTasks], ids=["resnet18", "mobilenet_v3_small"])
def test_torchvision_trunks_that_train_get_no_error(make):
    torch.manual_seed(0)
    model, x = make().train(), _images()
    assert eager_backward_error(copy.deepcopy(model), x) is None
    report = quiet_audit(model, x)
    assert report.hazards("error") == []
    buffers = {name for name, _ in model.named_buffers() if not name.endswith("num_batches_tracked")}
    written = {m.target.name for m in report.mutations if m.target.kind == "buffer"}
    assert buffers <= written  # every running statistic is a write the audit sees
    assert report.graphs[0].tasks == ("cls", "dense")


def test_a_write_after_resnets_last_relu_is_the_error_eager_raises():
    torch.manual_seed(0)
    model, x = ResNetTwoTasks(buggy=True).train(), _images()
    assert "modified by an inplace operation" in eager_backward_error(copy.deepcopy(model), x)
    errors = quiet_audit(model, x).hazards("error")
    assert errors and {(e.code, e.mutated_by.op, e.mutated_by.source.line) for e in errors} == {
        ("saved-then-mutated", "mul_", marked_line(ResNetTwoTasks, "CULPRIT"))}
    assert "relu(inplace=True)" in {e.saved_by.op for e in errors}  # the block's last ReLU saved it


def test_functionalize_trains_the_buggy_resnet_like_its_twin():
    torch.manual_seed(0)
    model, x = ResNetTwoTasks(buggy=True).train(), _images()
    twin = ResNetTwoTasks(buggy=False).train()
    twin.load_state_dict(model.state_dict())
    total_loss(twin(x)).backward()
    backend = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True)
    if not torch_is_tested():  # refused: the graph compiles as written, and fails as eager does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(Exception, match="in-place autograd error"):
                torch.compile(model, backend=backend)(x)
        assert {m.rewrite.reason for m in backend.report.mutations} == {fxinplace.KeptReason.UNTESTED_TORCH}
        return
    total_loss(torch.compile(model, backend=backend)(x)).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close_at_scale(p.grad, q.grad, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        assert_close_at_scale(b.float(), c.float(), msg=name)
    assert backend.report.hazards("error") == []
