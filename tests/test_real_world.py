"""Architectures as real code writes them, under `functionalize` and the audit.

Built from torch.nn's own modules the way torchvision, PyTorch's transformer and
self-supervised codebases use them: torchvision's BasicBlock (`out += identity`, ReLU with
`inplace=True`, batch norm in training), `nn.TransformerEncoder`, attention scores masked in
place with GroupNorm after, and a BYOL/MoCo-style EMA teacher updated in forward under
`no_grad`. Each trains in eager; PyTorch decides what is right: over three SGD steps the
rewritten model's outputs, gradients and final state equal eager's, and the audit finds no
error. One torchvision-style block written with the classic ordering bug (ReLU in place,
then `+=` on its output) crashes in eager and trains under `functionalize` with its
out-of-place twin's gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxinplace
from conftest import assert_close_at_scale, eager_backward_error, marked_line


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock; `buggy` adds the identity after the in-place ReLU."""

    def __init__(self, c, buggy=False, inplace=True):
        super().__init__()
        self.buggy, self.inplace = buggy, inplace
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.buggy:
            out += identity
            return self.relu(out)
        out = self.relu(out) if self.inplace else F.relu(out)  # ReLU saves its output...
        if self.inplace:
            out += identity  # ...which this overwrites
        else:
            out = out + identity
        return out


class ResNetMultiTask(nn.Module):
    def __init__(self, buggy=False, inplace=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer = nn.Sequential(BasicBlock(8), BasicBlock(8, buggy, inplace))
        self.seg, self.cls = nn.Conv2d(8, 3, 1), nn.Linear(8, 5)

    def forward(self, x):
        h = self.layer(self.stem(x))
        return {"seg": self.seg(h), "cls": self.cls(F.adaptive_avg_pool2d(h, 1).flatten(1))}


class TransformerMultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(20, 16), nn.Parameter(torch.randn(1, 6, 16) * 0.1)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.tok, self.cls = nn.Linear(16, 20), nn.Linear(16, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h += self.pos  # safe: the embedding's backward needs the ids, not its output
        h = self.enc(h)
        return {"tok": self.tok(h), "cls": self.cls(h[:, 0])}


class MaskedAttention(nn.Module):
    """Causal attention with the scores masked in place (safe: matmul does not save its output)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 4)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / 8**0.5
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device), 1)
        scores.masked_fill_(causal, float("-inf"))
        h = torch.softmax(scores, -1) @ self.v(x)
        h = F.gelu(self.norm(h.transpose(1, 2)).transpose(1, 2))
        return {"a": self.a(h.mean(1)), "b": self.b(h)}


class EMATeacher(nn.Module):
    """BYOL/MoCo: the teacher follows the student by EMA, in forward, under no_grad."""

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Linear(8, 4))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.predictor = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(0.99).add_(s.detach(), alpha=0.01)
            target = self.teacher(x)
        z = self.predictor(self.student(x))
        return {"byol": F.mse_loss(F.normalize(z, dim=-1), F.normalize(target, dim=-1)).reshape(1), "z": z}


MODELS = {
    "resnet": (ResNetMultiTask, lambda: (torch.randn(2, 3, 8, 8),)),
    "transformer": (TransformerMultiTask, lambda: (torch.randint(0, 20, (2, 6)),)),
    "masked attention": (MaskedAttention, lambda: (torch.randn(2, 5, 8),)),
    "ema teacher": (EMATeacher, lambda: (torch.randn(4, 6),)),
}


def _loss(out):
    return sum((v * torch.linspace(0.5, 1.5, v.numel()).reshape(v.shape)).sum() for v in out.values())


def _train(model, run, inputs):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for args in inputs:
        opt.zero_grad()
        out = run(*args)
        _loss(out).backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        history.append(({k: v.detach().clone() for k, v in out.items()}, grads))
        opt.step()
    return history


def _assert_same(history, expected, model, twin):
    for (outs, grads), (outs_e, grads_e) in zip(history, expected, strict=True):
        for key in outs_e:
            assert_close_at_scale(outs[key], outs_e[key], rtol=1e-4, msg=f"output {key}")
        for name in grads_e:
            # The transformer's gradients reach ~2e3; summing in another order moves them by ~1e-4.
            assert_close_at_scale(grads[name], grads_e[name], rtol=1e-4, msg=f"gradient of {name}")
    for (name, t), (_, e) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert_close_at_scale(t, e, rtol=1e-4, msg=f"state {name}")


@pytest.mark.parametrize("cls, make", MODELS.values(), ids=MODELS.keys())
def test_real_architectures_match_eager_under_functionalize(cls, make):
    torch.manual_seed(0)
    model = cls().train()
    twin = copy.deepcopy(model)
    inputs = [make() for _ in range(3)]
    expected = _train(twin, twin, inputs)

    backend = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True)
    _assert_same(_train(model, torch.compile(model, backend=backend), inputs), expected, model, twin)
    rewrites = [m.rewrite for m in backend.report.mutations]
    assert rewrites and not any(r.kind is fxinplace.RewriteKind.KEPT_IN_PLACE for r in rewrites), rewrites  # it ran
    assert backend.report.hazards("error") == []  # eager trains these: no false alarm


@pytest.mark.filterwarnings("ignore:Error detected in")
def test_torchvision_block_with_the_ordering_bug_trains_like_its_twin():
    torch.manual_seed(0)
    model = ResNetMultiTask(buggy=True).train()
    twin = ResNetMultiTask(buggy=True, inplace=False).train()
    twin.load_state_dict(model.state_dict())
    inputs = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]
    assert "modified by an inplace operation" in eager_backward_error(copy.deepcopy(model), *inputs[0])
    expected = _train(twin, twin, inputs)

    backend = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True)
    _assert_same(_train(model, torch.compile(model, backend=backend), inputs), expected, model, twin)
    (removed,) = [m for m in backend.report.mutations if m.removed == ("saved-then-mutated",)]
    assert removed.source.line == marked_line(BasicBlock, "...which this overwrites")
