"""Modules applied more than once in one forward: task-shared attention, shared experts, Siamese twins.

Training-mode batch norm updates its running statistics without a version bump, and its
autograd node keeps the running statistics of the call that saved them. Whether a later call
overwriting them is a hazard is PyTorch's to say: eager must train, and the gradients must
equal those of a twin whose every call has running statistics of its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxinplace
from conftest import assert_close_at_scale, assert_grads_close, close_at_scale, eager_backward_error, eager_grads, quiet_audit, total_loss


class PerCallStats(nn.Module):
    """Batch norm with the module's parameters, but fresh running statistics on every call."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        bn = self.bn
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        return F.batch_norm(x, mean, var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)


def per_call_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` whose batch norms no longer share running statistics between calls."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, PerCallStats(child))
    return twin


class TwiceBN(nn.Module):
    """The minimal shape: one BatchNorm, two task outputs."""

    def __init__(self):
        super().__init__()
        # No bias before a batch norm (as in real code): its gradient is zero up to rounding.
        self.fc, self.bn = nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.fc(x)
        # A batch norm's output sums to a constant: the heads' tanh gives the trunk a gradient.
        return {"a": self.bn(h).tanh(), "b": self.bn(h * 2).tanh()}


class TaskAttention(nn.Module):
    """MTAN-style: one attention module shared by the tasks, applied once per task."""

    def __init__(self, tasks=("seg", "depth", "normal")):
        super().__init__()
        self.tasks = tasks
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.attend = nn.Sequential(
            nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
            nn.Sigmoid(),
        )
        self.task_embed = nn.Parameter(torch.randn(len(tasks), 8, 1, 1))
        self.heads = nn.ModuleDict({t: nn.Conv2d(8, 2, 1) for t in tasks})

    def forward(self, x):
        h = self.trunk(x)
        out = {}
        for i, task in enumerate(self.tasks):
            mask = self.attend(h * self.task_embed[i])
            out[task] = self.heads[task](h * mask)
        return out


class SharedExperts(nn.Module):
    """PLE/MMoE-style: shared experts run once per task on the task's own gated input."""

    def __init__(self, n_experts=3, tasks=("ctr", "cvr")):
        super().__init__()
        self.tasks = tasks
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True)) for _ in range(n_experts)
        )
        self.gates = nn.ModuleDict({t: nn.Linear(6, n_experts) for t in tasks})
        self.towers = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})
        self.task_scale = nn.ParameterDict({t: nn.Parameter(torch.rand(6) + 0.5) for t in tasks})

    def forward(self, x):
        out = {}
        for task in self.tasks:
            xt = x * self.task_scale[task]
            experts = torch.stack([e(xt) for e in self.experts], dim=1)
            gate = self.gates[task](xt).softmax(-1).unsqueeze(-1)
            out[task] = self.towers[task]((gate * experts).sum(1))
        return out


class SiameseEncoder(nn.Module):
    """SimSiam-style: one encoder with batch norm applied to two views, a predictor, stop-gradient."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.projector = nn.Sequential(nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(inplace=True),
                                       nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False))
        self.predictor = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(inplace=True), nn.Linear(4, 8))

    def forward(self, x1, x2):
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2
        return {"loss": loss}


class FunctionalTwice(nn.Module):
    """`F.batch_norm` called twice on the same running-statistics buffers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        h = self.fc(x)
        a = F.batch_norm(h, self.mean, self.var, training=True)
        b = F.batch_norm(h.exp(), self.mean, self.var, training=True)
        return {"a": a.tanh(), "b": b.tanh()}


SHARED = {
    "one batch norm, two tasks": (TwiceBN, lambda: (torch.randn(8, 4),), 2),
    "task attention (MTAN)": (TaskAttention, lambda: (torch.randn(2, 3, 6, 6),), 3),
    "shared experts (PLE/MMoE)": (SharedExperts, lambda: (torch.randn(8, 6),), 2),
    "siamese encoder (SimSiam)": (SiameseEncoder, lambda: (torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)), 2),
    "functional batch norm twice": (FunctionalTwice, lambda: (torch.randn(8, 4),), 2),
}


@pytest.mark.parametrize("cls, make_args, calls", SHARED.values(), ids=SHARED.keys())
def test_batch_norm_applied_per_task_trains_and_gets_no_error(cls, make_args, calls):
    torch.manual_seed(0)
    model, args = cls().train(), make_args()
    # PyTorch's verdict: eager trains, with the gradients of per-call running statistics.
    assert eager_backward_error(model, *args) is None
    twin = per_call_twin(model)
    ours = eager_grads(model, args)
    theirs = dict(zip(ours, eager_grads(twin, args).values()))  # same parameters, same order, nested names
    assert_grads_close(ours, theirs)

    report = quiet_audit(copy.deepcopy(model), *[a.clone() for a in args])
    assert report.hazards("error") == []
    # The running statistics are still written once per call, and listed.
    running = [m for m in report.mutations if m.target.name.endswith(("running_mean", "mean"))]
    assert len(running) >= calls
    assert {m.target.kind for m in running} == {"buffer"}


class EvalThenDataWrite(nn.Module):
    """Eval-mode batch norm reads the running statistics in backward: a `.data` write after it is silent."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.bn.running_var.fill_(2.0)

    def forward(self, x):
        y = self.bn(self.fc(x))
        if not self.oop:
            self.bn.running_var.data.mul_(4.0)  # CULPRIT
        return {"a": y}


class TrainThenVisibleWrite(nn.Module):
    """Training-mode batch norm still checks the running statistics' versions: a visible write raises."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(self.fc(x))
        if not self.oop:
            with torch.no_grad():
                self.bn.running_mean.mul_(0.5)  # CULPRIT
        return {"a": y}


def test_eval_mode_batch_norm_reads_running_statistics():
    torch.manual_seed(0)
    model, x = EvalThenDataWrite().eval(), torch.randn(8, 4)
    twin = EvalThenDataWrite(oop=True).eval()
    twin.load_state_dict(model.state_dict())
    assert eager_backward_error(model, x) is None
    ours, theirs = eager_grads(model, (x,)), eager_grads(twin, (x,))
    assert not close_at_scale(ours["fc.weight"], theirs["fc.weight"]), "PyTorch: gradients silently change"
    errors = quiet_audit(copy.deepcopy(model), x).hazards("error")
    assert [h.code for h in errors] == ["hidden-write-to-saved"]


def test_training_mode_batch_norm_still_checks_versions():
    torch.manual_seed(0)
    model, x = TrainThenVisibleWrite().train(), torch.randn(8, 4)
    assert "modified by an inplace operation" in (eager_backward_error(model, x) or "")
    assert eager_backward_error(TrainThenVisibleWrite(oop=True).train(), x) is None
    errors = quiet_audit(copy.deepcopy(model), x).hazards("error")
    assert [h.code for h in errors] == ["saved-then-mutated"]


@pytest.mark.parametrize("cls, make_args, calls", SHARED.values(), ids=SHARED.keys())
def test_functionalize_trains_shared_batch_norm_like_eager(cls, make_args, calls):
    torch.manual_seed(0)
    model, args = cls().train(), make_args()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="inplace_audit",
                             options={"compiler": "aot_eager", "functionalize": True, "print": False})
    expected = eager_grads(model, args)
    eager = copy.deepcopy(model)
    eager(*[a.clone() for a in args])
    total_loss(compiled(*[a.clone() for a in args])).backward()
    assert_grads_close({n: p.grad for n, p in compiled_model.named_parameters()}, expected)
    for (name, got), (_, want) in zip(compiled_model.named_buffers(), eager.named_buffers()):
        assert_close_at_scale(got, want, msg=f"buffer {name}")


class AtenBatchNorm(nn.Module):
    """`torch.batch_norm` takes weight and bias before the running statistics."""

    def __init__(self, clip=False):
        super().__init__()
        self.clip = clip
        self.w = nn.Parameter(torch.rand(4) + 0.5)
        self.b = nn.Parameter(torch.zeros(4))
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))

    def forward(self, x):
        y = torch.batch_norm(x * self.w, self.w, self.b, self.rm, self.rv, True, 0.1, 1e-5, False)
        if self.clip:
            self.w.data.mul_(0.5)  # CULPRIT
        return {"y": y}


def test_torch_batch_norm_writes_its_running_statistics_not_its_weight():
    torch.manual_seed(0)
    x = torch.randn(8, 4, requires_grad=True)
    report = quiet_audit(AtenBatchNorm(), x)
    assert {m.target.name for m in report.mutations} == {"rm", "rv"}
    assert eager_backward_error(AtenBatchNorm(), x) is None
    assert report.hazards("error") == []
    # A hidden write to the weight after the call is PyTorch's silent wrong gradient.
    errors = quiet_audit(AtenBatchNorm(clip=True), x).hazards("error")  # `x * w` and batch norm saved `w`
    assert errors and {h.code for h in errors} == {"hidden-write-to-saved"}


class RebindRunningVar(nn.Module):
    def __init__(self, rebind=True):
        super().__init__()
        self.rebind = rebind
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(self.fc(x))
        if self.rebind:
            self.bn.running_var.data = self.bn.running_var.data.clamp(min=0.5)
        return {"y": y}


def test_rebinding_running_statistics_a_training_batch_norm_saved_gets_no_error():
    torch.manual_seed(0)
    model, x = RebindRunningVar().train(), torch.randn(8, 4)
    assert eager_backward_error(model, x) is None
    twin = RebindRunningVar(rebind=False).train()
    twin.load_state_dict(model.state_dict())
    assert_grads_close(eager_grads(model, (x,)), eager_grads(twin, (x,)))  # backward never read them
    assert quiet_audit(model, x).hazards("error") == []


class CountsAcrossBreak(nn.Module):
    """An encoder that bumps a buffer through a view, breaks the graph, and writes the view again."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(2, 2))

    def forward(self, x):
        v = self.seen.t()
        with torch.no_grad():
            v.add_(1)
        torch._dynamo.graph_break()
        with torch.no_grad():
            v.mul_(2)  # eager: reaches `seen` through the view made before the break
        return torch.tanh(self.fc(x))


class SiameseCounts(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = CountsAcrossBreak(), nn.Linear(4, 1)

    def forward(self, a, b):
        return {"sim": self.head(self.enc(a) * self.enc(b))}


class PerTaskCounts(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.ha, self.hb = CountsAcrossBreak(), nn.Linear(4, 2), nn.Linear(4, 1)

    def forward(self, a, b):
        return {"a": self.ha(self.shared(a)), "b": self.hb(self.shared(b))}


@pytest.mark.parametrize("cls", [SiameseCounts, PerTaskCounts], ids=["siamese", "shared per task"])
def test_functionalize_keeps_a_view_of_a_buffer_written_across_a_break(cls):
    # Out of place, the first graph returned the view as a view of the buffer's new value, and
    # the second graph's write never reached the buffer (2.0 where eager has 6.0).
    torch.manual_seed(0)
    model, a, b = cls(), torch.randn(3, 4), torch.randn(3, 4)
    eager = copy.deepcopy(model)
    total_loss(eager(a, b)).backward()
    backend = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True)
    total_loss(torch.compile(model, backend=backend)(a, b)).backward()
    for (name, buf), ref in zip(model.named_buffers(), eager.buffers()):
        assert torch.equal(buf, ref), name
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close_at_scale(p.grad, q.grad, msg=name)
