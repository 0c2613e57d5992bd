"""Hazard prediction against eager PyTorch, on models written after public bug reports.

Each model has an in-place version and an out-of-place twin computing the same forward
values (`oop=True`). PyTorch decides what is hazardous: the in-place version's eager
backward raises the version-counter error, or its gradients silently differ from the
twin's. Exactly those models must get an error-level hazard at the culprit line (marked
`# CULPRIT`); every twin, and every safe in-place model, must get none.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxinplace
from fxinplace import Detail
from conftest import close_at_scale, eager_backward_error, eager_effects, eager_grads, marked_line, quiet_audit

AUTOGRAD_ERROR = "modified by an inplace operation"


class FPNLateral(nn.Module):
    """FPN: `lateral += upsample(top)` on a LeakyReLU(inplace=True) output."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.lateral = nn.Conv2d(3, 4, 1)
        self.top = nn.Conv2d(3, 4, 1, stride=2)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.seg = nn.Conv2d(4, 2, 1)
        self.cls = nn.Linear(4, 3)

    def forward(self, x):
        lat = self.act(self.lateral(x))
        up = F.interpolate(self.top(x), scale_factor=2.0)
        if self.oop:
            lat = lat + up
        else:
            lat += up  # CULPRIT
        return {"seg": self.seg(lat), "cls": self.cls(lat.mean((2, 3)))}


class ReluTwice(nn.Module):
    """The same ReLU(inplace=True) module applied twice."""

    def __init__(self, oop=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.act = nn.ReLU(inplace=not oop)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = self.act(h)  # CULPRIT
        return self.fc2(h)


class SigmoidSlice(nn.Module):
    """Slice assignment on a sigmoid output."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        s = torch.sigmoid(self.fc(x))
        if self.oop:
            s = s.clone()
        s[:, 0] = 1.0  # CULPRIT
        return s


class SoftmaxMask(nn.Module):
    """`masked_fill_` after softmax (attention)."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.q = nn.Linear(4, 4)

    def forward(self, x):
        p = torch.softmax(self.q(x) @ x.t(), dim=-1)
        mask = torch.eye(p.shape[0], dtype=torch.bool, device=p.device)
        if self.oop:
            p = p.masked_fill(mask, 0.0)
        else:
            p.masked_fill_(mask, 0.0)  # CULPRIT
        return p @ x


class MemoryBank(nn.Module):
    """MoCo-style queue: the buffer is used by `q @ queue`, then enqueued in place."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.enc = nn.Linear(4, 4)
        self.register_buffer("queue", torch.randn(4, 6))

    def forward(self, x):
        q = self.enc(x)
        logits = q @ (self.queue.clone() if self.oop else self.queue)
        self.queue[:, : x.shape[0]] = q.detach().t()  # CULPRIT
        return logits


class ClipInForward(nn.Module):
    """WGAN weight clipping under no_grad inside forward, after the weight was used."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.trunk = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        h = self.trunk(x)
        y = h @ (self.w.clone() if self.oop else self.w)
        with torch.no_grad():
            self.w.clamp_(-0.1, 0.1)  # CULPRIT
        return y


class DataClamp(nn.Module):
    """`p.data.clamp_()` after use: no error, silently wrong trunk gradients."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.trunk = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        h = self.trunk(x)
        y = h @ (self.w.clone() if self.oop else self.w)
        self.w.data.clamp_(-0.1, 0.1)  # CULPRIT
        return y


class DataRebind(nn.Module):
    """`g.data = ...` after `h * g` saved `g` itself: backward raises nothing and uses the new `g`."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.trunk = nn.Linear(4, 4)
        self.g = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        y = self.trunk(x) * (self.g.clone() if self.oop else self.g)
        self.g.data = self.g.data.clamp(0.6, 0.9)  # CULPRIT
        return y


class EmbeddingMaxNorm(nn.Module):
    """nn.Embedding(max_norm=...) renormalises its weight in place after the weight was used."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.emb = nn.Embedding(10, 4, max_norm=0.5)
        self.fc = nn.Linear(4, 4)

    def forward(self, idx, x):
        w = self.emb.weight.clone() if self.oop else self.emb.weight
        scores = self.fc(x) @ w.t()
        tokens = self.emb(idx)  # CULPRIT
        return {"scores": scores, "tokens": tokens}


class Decoder(nn.Module):
    def __init__(self, oop):
        super().__init__()
        self.oop = oop
        self.bias = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, z):
        if self.oop:
            z = z + self.bias
        else:
            z += self.bias  # CULPRIT
        return self.fc(z)


class SharedLatent(nn.Module):
    """A decoder does `z += ...` on the latent another decoder already consumed."""

    def __init__(self, oop=False):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec_a = nn.Linear(4, 3)
        self.dec_b = Decoder(oop)

    def forward(self, x):
        z = self.enc(x)
        return {"a": self.dec_a(z), "b": self.dec_b(z)}


class OtherRegion(nn.Module):
    """A write to a different region of a storage whose view autograd saved: still an error."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x):
        h = self.fc(x)
        y = h[:, :2] * self.w
        if self.oop:
            h = h.clone()
        h[:, 2:] = 0  # CULPRIT
        return {"y": y, "h": h}


class SavedInput(nn.Module):
    """The caller's input is saved by `mul` and then incremented in place."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        y = (x.clone() if self.oop else x) * self.w
        x += 1  # CULPRIT
        return y


HAZARDOUS = {
    "FPN lateral += on LeakyReLU(inplace)": (FPNLateral, lambda: (torch.randn(2, 3, 4, 4),)),
    "ReLU(inplace) twice": (ReluTwice, lambda: (torch.randn(3, 4),)),
    "slice assignment on sigmoid": (SigmoidSlice, lambda: (torch.randn(3, 4),)),
    "masked_fill_ after softmax": (SoftmaxMask, lambda: (torch.randn(3, 4),)),
    "memory bank enqueue": (MemoryBank, lambda: (torch.randn(3, 4),)),
    "weight clipping in forward": (ClipInForward, lambda: (torch.randn(3, 4),)),
    "p.data.clamp_()": (DataClamp, lambda: (torch.randn(3, 4),)),
    "p.data = ... after use": (DataRebind, lambda: (torch.randn(3, 4),)),
    "Embedding(max_norm)": (EmbeddingMaxNorm, lambda: (torch.tensor([1, 2, 3]), torch.randn(3, 4))),
    "x += on a shared latent": (SharedLatent, lambda: (torch.randn(3, 4),)),
    "other region of a saved view": (OtherRegion, lambda: (torch.randn(3, 4),)),
    "saved caller input": (SavedInput, lambda: (torch.randn(3, 4),)),
}


def _pytorch_says_hazardous(model, twin, args) -> bool:
    """Eager backward raises the version-counter error, or gradients silently differ."""
    error = eager_backward_error(model, *args)
    if error is not None:
        assert AUTOGRAD_ERROR in error, error
        return True
    ours, theirs = eager_grads(model, args), eager_grads(twin, args)
    return any(not close_at_scale(ours[n], theirs[n]) for n in theirs if theirs[n] is not None)


@pytest.mark.parametrize("cls, make_args", HAZARDOUS.values(), ids=HAZARDOUS.keys())
def test_hazardous_models_get_an_error_at_the_culprit_line(cls, make_args):
    torch.manual_seed(0)
    model, args = cls(), make_args()
    twin = cls(oop=True)
    twin.load_state_dict(model.state_dict())
    assert _pytorch_says_hazardous(model, twin, args)

    errors = quiet_audit(copy.deepcopy(model), *[a.clone() for a in args]).hazards("error")
    assert errors, "PyTorch says this model is hazardous, the audit found no error"
    culprit = marked_line(cls if cls is not SharedLatent else Decoder, "CULPRIT")
    assert culprit in {h.source.line for h in errors}


@pytest.mark.parametrize("cls, make_args", HAZARDOUS.values(), ids=HAZARDOUS.keys())
def test_out_of_place_twins_get_no_error(cls, make_args):
    torch.manual_seed(0)
    twin, args = cls(oop=True), make_args()
    assert eager_backward_error(twin, *args) is None
    assert quiet_audit(twin, *args).hazards("error") == []


class ReluThenAdd(nn.Module):
    """In-place ops PyTorch accepts (clipping before use, a slice write after a scalar mul, buffer
    updates), and one it refuses: `relu_` saves its result, which `add_` then overwrites."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True))
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)
        self.w = nn.Parameter(torch.ones(8))
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        with torch.no_grad():
            self.w.clamp_(0, 2)  # clipping before use
        h = self.trunk(x) * 0.5
        h[:, 0] = 0  # mul by a scalar saved nothing
        h.relu_()
        h.add_(1)  # relu_ saved its result: `add_` does not need it... but relu's backward does
        with torch.no_grad():
            self.ema.mul_(0.9).add_(h.mean(0), alpha=0.1)
        return {"a": self.a(h * self.w), "b": self.b(h)}


class DataWriteOtherRegion(nn.Module):
    """`.data` write to a region of a parameter that no saved view covers: gradients are right."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.trunk = nn.Linear(4, 2)
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        y = self.trunk(x) * (self.w[:2].clone() if self.oop else self.w[:2])
        self.w.data[2:] = 0
        return y


class DataWriteOtherColumn(nn.Module):
    """`.data` write to a column between saved columns: the ranges interleave, no element is shared."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.trunk = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        w = self.w.clone() if self.oop else self.w
        y = self.trunk(x) * w[:, 0] + self.trunk(x) * w[:, 2]
        self.w.data[:, 1] = 0
        return y


def test_safe_in_place_models_get_no_error():
    torch.manual_seed(0)
    for cls in (DataWriteOtherRegion, DataWriteOtherColumn):
        model, twin = cls(), cls(oop=True)
        twin.load_state_dict(model.state_dict())
        x = torch.randn(3, 4)
        assert not _pytorch_says_hazardous(model, twin, (x,))
        assert quiet_audit(model, x).hazards("error") == []


def test_relu_then_add_is_an_error_exactly_when_pytorch_says_so():
    torch.manual_seed(0)
    model, x = ReluThenAdd().train(), torch.randn(4, 4)
    assert eager_backward_error(model, x) is not None
    errors = quiet_audit(copy.deepcopy(model), x).hazards("error")
    assert [(e.code, e.mutated_by.op, e.saved_by.op) for e in errors] == [("saved-then-mutated", "add_", "relu_")]


def test_compiler_failure_is_replaced_by_our_explanation():
    torch.manual_seed(0)
    model, x = SharedLatent(), torch.randn(3, 4)
    with pytest.raises(Exception) as info:
        torch.compile(model, backend="aot_eager")(x)
    assert AUTOGRAD_ERROR in str(info.value)  # what PyTorch says without us ("Good luck!")

    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(model, backend="inplace_audit", options={"compiler": "aot_eager", "print": False})(x)
    error = info.value
    while not isinstance(error, fxinplace.HazardError):
        error = error.__cause__ or getattr(error, "inner_exception", None)
        assert error is not None, "no HazardError in the chain"
    text = str(error)
    line = marked_line(Decoder, "CULPRIT")
    assert f"test_hazards.py:{line}" in text and "saved-then-mutated" in text
    assert "functionalize" in text and "out of place" in text  # the fix
    assert any(h.code == "saved-then-mutated" for h in error.hazards)


class ClipBeforeUse(nn.Module):
    """Weight clipping before the weight is used: a parameter-write warning, nothing saved it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        with torch.no_grad():
            self.w.clamp_(-0.1, 0.1)
        return x @ self.w


class RunningMean(nn.Module):
    """A buffer update under no_grad: an info note only."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return self.lin(x)


@pytest.mark.parametrize("cls, worst", [(ClipInForward, "error"), (ClipBeforeUse, "warning"), (RunningMean, "info")])
def test_the_models_of_the_threshold_test_are_what_pytorch_says(cls, worst):
    torch.manual_seed(0)
    assert (eager_backward_error(cls(), torch.randn(3, 4)) is not None) == (worst == "error")
    report = quiet_audit(cls(), torch.randn(3, 4))
    assert max((h.severity.rank for h in report.hazards()), default=-1) == fxinplace.SEVERITIES.index(worst)


@pytest.mark.parametrize("cls, severity, raises", [
    (ClipInForward, "error", True), (ClipInForward, None, False),
    (ClipBeforeUse, "error", False), (ClipBeforeUse, "warning", True), (ClipBeforeUse, "info", True),
    (RunningMean, "warning", False), (RunningMean, "info", True),
])
def test_raise_on_severity(cls, severity, raises):
    model = cls()
    compiled = torch.compile(
        model, backend="inplace_audit", options={"compiler": "eager", "print": False, "raise_on": severity}
    )
    if raises:
        with pytest.raises(Exception, match="HazardError.*raise_on"):
            compiled(torch.randn(3, 4))
    else:
        compiled(torch.randn(3, 4))


def test_assert_no_hazards_helper():
    torch.manual_seed(0)
    quiet_audit(SharedLatent(oop=True), torch.randn(3, 4)).assert_no_hazards()
    report = quiet_audit(SharedLatent(), torch.randn(3, 4))
    with pytest.raises(fxinplace.HazardError, match="saved-then-mutated"):
        report.assert_no_hazards()
    with pytest.raises(ValueError, match="`min_severity` must be one of"):
        report.assert_no_hazards("fatal")


class Heads(nn.Module):
    """Head `b` writes the trunk feature in place; does head `a` see it? It depends on order."""

    def __init__(self, b_first=False, oop=False):
        super().__init__()
        self.b_first, self.oop = b_first, oop
        self.trunk = nn.Linear(4, 4)
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def head_b(self, h):
        with torch.no_grad():
            if self.oop:
                h = h * 0
            else:
                h.mul_(0)
        return self.b(h.detach())

    def forward(self, x):
        h = self.trunk(x)
        a_in = h.sum(1, keepdim=True) * 1.0
        if self.b_first:
            b = self.head_b(h)
            a = self.a(h) + a_in
        else:
            a = self.a(h) + a_in
            b = self.head_b(h)
        return {"a": a, "b": b}


@pytest.mark.parametrize("oop", [False, True], ids=["in place", "out of place"])
def test_cross_task_write_is_a_warning_exactly_when_order_matters(oop):
    torch.manual_seed(0)
    first, x = Heads(oop=oop), torch.randn(3, 4)
    second = Heads(b_first=True, oop=oop)
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        order_matters = not close_at_scale(first(x.clone())["a"], second(x.clone())["a"])
    codes = {h.code for h in quiet_audit(first, x).hazards("warning")}
    assert ("cross-task-write" in codes) == order_matters
    if order_matters:
        report = quiet_audit(Heads(), x)
        (hazard,) = [h for h in report.hazards() if h.code == "cross-task-write"]
        graph = report.graph_of(hazard)
        assert graph.tasks_of(hazard.mutated_by) == ("b",) and graph.tasks_of(hazard.other_tasks) == ("a",)
        assert "task 'b' writes" in graph.message(hazard) and "task 'a' reads it" in graph.message(hazard)


class LeafInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        self.w.mul_(2)  # CULPRIT
        return x * self.w


class UnbindInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        a, b = self.fc(x).unbind(0)
        a.add_(1)  # CULPRIT
        return a + b


@pytest.mark.parametrize("cls, code", [(LeafInPlace, "leaf-inplace"), (UnbindInPlace, "view-inplace")])
def test_tracing_failures_become_report_entries(cls, code):
    with pytest.raises(RuntimeError):
        cls()(torch.randn(2, 3))  # eager PyTorch refuses this too
    report = quiet_audit(cls(), torch.randn(2, 3))
    (hazard,) = report.hazards("error")
    assert hazard.code == code
    assert hazard.source is not None and hazard.source.line == marked_line(cls, "CULPRIT")


class OutIntoSaved(nn.Module):
    """`op(..., out=...)` overwrites a buffer that `h @ m` saved for backward."""

    def __init__(self, write, oop=False):
        super().__init__()
        self.write, self.oop = write, oop
        self.trunk = nn.Linear(4, 4)
        self.register_buffer("m", torch.randn(4, 4))

    def forward(self, x):
        h = self.trunk(x)
        y = h @ (self.m.clone() if self.oop else self.m)
        self.write(self.m, x.detach())
        return y


OUT_WRITES = {
    "max(out=)": lambda m, x: torch.max(x[:1].expand(4, 4), 1, out=(m[0], torch.empty(4, dtype=torch.long))),
    "split_with_sizes_copy(out=)": lambda m, x: torch.split_with_sizes_copy(x.flatten()[:8], [4, 4], out=[m[0], m[1]]),
    "unbind_copy(out=)": lambda m, x: torch.unbind_copy(x[:2, :4], out=[m[2], m[3]]),
    "kron(out=)": lambda m, x: torch.kron(x[:2, :2], x[1:3, 2:4], out=m),
}


@pytest.mark.parametrize("write", OUT_WRITES.values(), ids=OUT_WRITES.keys())
def test_out_writes_into_a_saved_tensor_are_classed_as_eager_behaves(write):
    torch.manual_seed(0)
    model, x = OutIntoSaved(write), torch.randn(3, 4)
    twin = OutIntoSaved(write, oop=True)
    twin.load_state_dict(model.state_dict())
    assert _pytorch_says_hazardous(model, twin, (x,))
    raises = eager_backward_error(model, x) is not None

    report = quiet_audit(copy.deepcopy(model), x.clone())
    errors = [h for h in report.hazards("error") if h.source.line == write.__code__.co_firstlineno]
    # Eager raises exactly when the out write bumped the version counter autograd checks;
    # otherwise backward silently reads the new values.
    assert {h.code for h in errors} == {"saved-then-mutated" if raises else "hidden-write-to-saved"}
    (mutation,) = [m for m in report.mutations if m.target.name == "m"]
    assert mutation.autograd_visible == raises


class DataRebindAfterLinear(nn.Module):
    """`w.data = normalize(w.data)` after `F.linear` saved `w.t()`, a view of the old storage."""

    def __init__(self, oop=False):
        super().__init__()
        self.oop = oop
        self.trunk = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        y = F.linear(self.trunk(x), self.w.clone() if self.oop else self.w)
        self.w.data = F.normalize(self.w.data, dim=1)  # REBIND
        return y


class Momentum(nn.Module):
    """MoCo's key encoder: `p_k.data = p_k.data * m + p_q.data * (1 - m)`, p_k requires no grad."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 3), nn.Linear(4, 3)
        self.k.requires_grad_(False)

    def forward(self, x):
        for p_q, p_k in zip(self.q.parameters(), self.k.parameters()):
            p_k.data = p_k.data * 0.9 + p_q.data * 0.1  # MOMENTUM
        return {"q": self.q(x), "k": self.k(x)}


def test_data_rebind_after_a_saved_view_trains_and_is_a_parameter_write_warning():
    torch.manual_seed(0)
    model, x = DataRebindAfterLinear(), torch.randn(3, 4)
    twin = DataRebindAfterLinear(oop=True)
    twin.load_state_dict(model.state_dict())
    # The saved `w.t()` keeps the old storage: eager's gradients are the twin's.
    assert not _pytorch_says_hazardous(model, twin, (x,))
    report = quiet_audit(copy.deepcopy(model), x)
    assert report.hazards("error") == []
    (mutation,) = report.mutations
    assert (mutation.target.kind, mutation.target.name, mutation.op) == ("parameter", "w", ".data = v")
    assert not mutation.autograd_visible and not mutation.under_no_grad
    (hazard,) = mutation.hazards
    assert (hazard.code, hazard.severity) == ("parameter-write", "warning")
    assert hazard.detail is Detail.REBIND and hazard.target == mutation.target
    assert hazard.source.line == marked_line(DataRebindAfterLinear, "REBIND")


def test_momentum_copy_is_one_info_row_per_parameter():
    torch.manual_seed(0)
    model, x = Momentum(), torch.randn(3, 4)
    effects = eager_effects(model, {"x": x})
    key_params = {("parameter", n) for n, p in model.named_parameters() if n.startswith("k.")}
    assert effects.changed == key_params and not effects.version_moved  # `.data =` bumps no counter
    assert eager_backward_error(model, x) is None
    report = quiet_audit(model, x)
    assert sorted((m.target.kind, m.target.name) for m in report.mutations) == sorted(key_params)
    for m in report.mutations:
        assert not m.autograd_visible and m.source.line == marked_line(Momentum, "MOMENTUM")
        assert [(h.code, h.severity) for h in m.hazards] == [("parameter-write", "info")]
        assert m.hazards[0].detail is Detail.NO_GRAD_COPY
    assert report.hazards("warning") == []
