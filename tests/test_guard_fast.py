"""check="fast": the guard's hooks on the first entries, PyTorch's own version check on the others.

The truth is PyTorch's: each loop first runs without the guard, the same entries in the same
order, and must raise PyTorch's in-place error; its message gives the tensor's shape and
versions, and the parameter is the one whose version counter reads them (or, where same-shaped
layers share the versions, the one anomaly mode's forward traceback points at). On an unwatched
entry the guard must name that tensor, as `check="all"` names it on the same entries, with the
facts it can have there, and a correct loop must stay silent and compute exactly the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

from conftest import marked_line
from fxinplace import StaleSavedTensor, StaleSavedTensorError, guard
from test_graph_breaks import Square  # x * y, saving both
from test_guard import CASES, DATA_CASES, _PYTORCH_STALE, Case, Run, _assert_same, _no_names, _state, make_gan


def _entries(run: Run, g: Any, good: int, case: Case) -> None:
    """`good` entries of the correct loop, then one of the bad loop, each an entry of `g`
    (a guard, or `None` for PyTorch alone)."""
    for i in range(good + 1):
        with g if g is not None else contextlib.nullcontext():
            (case.bad if i == good else case.good)(run, g.losses if g is not None else _no_names)


def _pytorch_verdict(case: Case, good: int) -> tuple[list[int], int, int, str, RuntimeError]:
    """PyTorch's error on `good` correct entries then the bad one: shape, versions, the
    parameter of that shape whose version counter reads the version PyTorch saw."""
    run = case.make()
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        _entries(run, None, good, case)
    found = _PYTORCH_STALE.search(str(info.value))
    shape = [int(d) for d in found[1].split(",")] if found[1].strip() else []
    now, saved = int(found[2]), int(found[3])
    hits = [f"{prefix}.{n}" for prefix, m in run.models.items() for n, p in m.named_parameters()
            if (list(p.shape) == shape or (p.dim() == 2 and list(p.shape) == shape[::-1])) and p._version == now]
    assert len(hits) == 1, hits
    return shape, now, saved, hits[0], info.value


def _caught(case: Case, good: int, **kw: Any) -> tuple[StaleSavedTensor, StaleSavedTensorError, guard]:
    run = case.make()
    g = guard({k: run[k] for k in run.models}, optimizers=run.opts, **kw)
    with pytest.raises(StaleSavedTensorError) as info:
        _entries(run, g, good, case)
    assert g.hazards == [info.value.stale]
    return info.value.stale, info.value, g


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_hazard_after_the_watched_entries_is_named_from_pytorchs_own_check(case: Case) -> None:
    # Entries 0 and 1 watched, 2 correct and unwatched, 3 the bad loop, unwatched.
    shape, now, saved, expected, pytorch = _pytorch_verdict(case, good=3)
    full, _, _ = _caught(case, good=3)  # check="all" on the same entries
    fast, error, g = _caught(case, good=3, check="fast", first=2)

    assert not g.checks(3) and not fast.watched and full.watched
    assert (fast.name, list(fast.shape), fast.version_now, fast.version_saved) == (expected, shape, now, saved)
    assert (fast.node, fast.op, fast.backward, fast.backward_at, fast.needed_for) == (
        full.node, full.op, full.backward, full.backward_at, full.needed_for)
    assert type(error.__cause__) is RuntimeError and str(error.__cause__) == str(pytorch)
    if full.writes[0].kind.name == "OPTIMIZER":  # logged on unwatched entries too
        assert fast.writes == full.writes
    else:  # an in-place op in the loop: only the hooks see it
        assert fast.writes == ()
        assert "on this entry the guard logged only optimizer steps" in str(error)
    # The forward's line, as the watched entries saw it, where one line saved that parameter
    # for that node there: a model called from two lines in a step (the GAN's discriminator,
    # the WGAN's critic) names none.
    # The forward's line is not this entry's fact: the watched entries' line is given apart, where
    # one line saved that parameter for that node there (a model called from two lines in a step,
    # the GAN's discriminator, the WGAN's critic, names none).
    assert fast.saved_at is None and fast.called_at is None
    two_lines = case.make in (CASES["gan_disc_step_between_gen_losses"].make, CASES["wgan_clip_after_critic_forward"].make)
    assert (fast.seen_saved_at, fast.seen_called_at) == ((None, None) if two_lines else (full.saved_at, full.called_at))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_correct_loop_stays_silent_and_computes_the_same(case: Case, caplog: pytest.LogCaptureFixture) -> None:
    plain = case.make()
    for _ in range(6):
        case.good(plain, _no_names)
    guarded = case.make()
    g = guard(guarded.models, optimizers=guarded.opts, check="fast", first=2)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="fxinplace"):
        warnings.simplefilter("error")
        for _ in range(6):
            with g:
                case.good(guarded, g.losses)
    assert caplog.records == []  # no bookkeeping failed
    assert g.hazards == [] and [g.checks(i) for i in range(6)] == [True, True, False, False, False, False]
    _assert_same(_state(plain), _state(guarded))


class Trunk(nn.Module):
    """Three layers of one shape: PyTorch's message cannot tell their weights apart."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.a, self.b = nn.Linear(6, 1), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.l1(x))  # <- l1
        h = torch.tanh(self.l2(h))  # <- l2
        h = torch.tanh(self.l3(h))  # <- l3
        return {"a": self.a(h), "b": self.b(h)}


def _trunk_step(model: Trunk, opt: torch.optim.Optimizer, x: torch.Tensor, name: Any, bad: bool) -> None:
    out = model(x)
    losses = name({"a": out["a"].square().mean(), "b": out["b"].square().mean()})
    opt.zero_grad()
    losses["a"].backward(retain_graph=True)
    if bad:
        opt.step()  # <- writes
    losses["b"].backward()
    opt.step()


def _trunk() -> tuple[Trunk, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = Trunk()
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 6)


def test_of_same_shaped_weights_the_one_autograd_stopped_at_is_named() -> None:
    # All three trunk weights are stale at the same versions; anomaly mode's traceback of the
    # failing node's forward says which one the engine stopped at (the last layer: it runs first).
    model, opt, x = _trunk()
    with warnings.catch_warnings(record=True) as caught, torch.autograd.set_detect_anomaly(True):
        warnings.simplefilter("always")
        _trunk_step(model, opt, x, _no_names, bad=False)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _trunk_step(model, opt, x, _no_names, bad=True)
    forward = "\n".join(str(w.message) for w in caught if "Traceback of forward call" in str(w.message))
    lines = {marked_line(Trunk.forward, f"<- {layer}"): layer for layer in ("l1", "l2", "l3")}
    hit = [layer for line, layer in lines.items() if re.search(rf"test_guard_fast\.py\", line {line}\b", forward)]
    assert len(hit) == 1, forward

    model, opt, x = _trunk()
    g = guard(model, optimizers={"opt": opt}, check="fast", first=1)
    with g:
        _trunk_step(model, opt, x, g.losses, bad=False)
    with pytest.raises(StaleSavedTensorError) as info:
        with g:
            _trunk_step(model, opt, x, g.losses, bad=True)
    stale = info.value.stale
    assert stale.name == f"{hit[0]}.weight" and stale.needed_for == "b"
    assert stale.seen_saved_at.line == marked_line(Trunk.forward, f"<- {hit[0]}")
    assert stale.writes[0].source.line == marked_line(_trunk_step, "<- writes")


def test_a_custom_functions_stale_save_is_named() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    model = nn.ParameterDict({"w": w})
    x = torch.randn(3, requires_grad=True)

    def step(bad: bool) -> None:
        y = Square.apply(x, w).sum()
        if bad:
            with torch.no_grad():
                w.mul_(0.5)
        y.backward()

    with pytest.raises(RuntimeError, match=r"\[torch.FloatTensor \[3\]\].*is at version 1; expected version 0"):
        step(bad=True)  # PyTorch's verdict: `w`, stepped once
    w.data.copy_(torch.randn(3))  # reset through .data: the version stays 1
    g = guard(model, check="fast", first=1)
    with g:
        step(bad=False)
    with pytest.raises(StaleSavedTensorError) as info:
        with g:
            step(bad=True)
    stale = info.value.stale
    assert (stale.name, stale.node, stale.version_saved, stale.version_now) == ("w", "SquareBackward", 1, 2)
    assert stale.writes == ()


def test_another_error_on_an_unwatched_entry_passes_through_unchanged() -> None:
    model, opt, x = _trunk()
    g = guard(model, optimizers={"opt": opt}, check="fast", first=1)
    with g:
        _trunk_step(model, opt, x, g.losses, bad=False)
    with pytest.raises(RuntimeError, match="backward through the graph a second time") as info:
        with g:
            loss = model(x)["a"].sum()
            loss.backward()
            loss.backward()
    assert not isinstance(info.value, StaleSavedTensorError) and g.hazards == []


def test_sampled_names_pytorchs_error_on_an_unsampled_entry_without_the_step() -> None:
    # check="sampled" installs nothing on its unsampled entries, not even the step hooks (its
    # target is 1%): the tensor is named, the writer is not.
    case = CASES["gan_disc_step_between_gen_losses"]
    shape, now, saved, expected, _ = _pytorch_verdict(case, good=5)
    stale, error, g = _caught(case, good=5, check="sampled", first=3, every=5)
    assert not g.checks(5) and (stale.name, stale.version_now, stale.version_saved) == (expected, now, saved)
    assert stale.writes == () and "on this entry the guard logged no writes" in str(error)


def test_a_data_write_on_an_unwatched_entry_is_missed() -> None:
    # The limit, stated: `.data` moves no version counter, so PyTorch's check does not see it,
    # and the gradients come out as wrong as without the guard.
    case = DATA_CASES["p.data.clamp_"]
    silent = case.bad(case.make(), _no_names)
    run = case.make()
    g = guard(run.models, optimizers=run.opts, check="fast", first=1)
    with g:
        case.reference(run, g.losses)
    with g:
        missed = case.bad(run, g.losses)
    assert g.hazards == [] and missed.keys() == silent.keys()


def test_a_compiled_models_stale_save_is_named() -> None:
    # A graph compiled by AOTAutograd saves in one `CompiledFunctionBackward` node, a custom
    # Function's: its saves are read together and the stale one told by shape and version.
    case = dataclasses.replace(CASES["gan_disc_step_between_gen_losses"], make=lambda: make_gan("aot_eager"))
    shape, now, saved, expected, _ = _pytorch_verdict(case, good=2)
    stale, _, _ = _caught(case, good=2, check="fast", first=1)
    assert (stale.name, list(stale.shape), stale.version_now, stale.version_saved) == (expected, shape, now, saved)
    assert stale.node == "CompiledFunctionBackward" and stale.writes[0].by == case.by


def _anomaly_forward_line(step: Any, *args: Any) -> str:
    """The forward traceback anomaly mode gives for the node PyTorch's check failed at."""
    with warnings.catch_warnings(record=True) as caught, torch.autograd.set_detect_anomaly(True):
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            step(*args)
    return "\n".join(str(w.message) for w in caught if "Traceback of forward call" in str(w.message))


def test_with_inputs_the_save_named_is_on_the_path_the_engine_ran() -> None:
    # `autograd.grad(loss, [x])` runs only the nodes leading to `x`: `b`'s node, numbered
    # higher and stale in the same words, never runs.
    torch.manual_seed(0)
    m = nn.ModuleDict({"a": nn.Linear(4, 4, bias=False), "b": nn.Linear(4, 4, bias=False)})
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, z = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)

    def step(bad: bool) -> None:
        la = m["a"](x).sum()  # <- a
        lb = m["b"](z).sum()  # <- b
        loss = la + lb
        if bad:
            opt.step()
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        torch.autograd.grad(loss, [x])

    step(False)
    forward = _anomaly_forward_line(step, True)
    hit = [k for k in ("a", "b") if re.search(rf"test_guard_fast\.py\", line {marked_line(step, f'<- {k}')}\b", forward)]
    assert hit == ["a"], forward
    g = guard(m, optimizers={"opt": opt}, check="fast", first=1)
    with g:
        step(False)
    with pytest.raises(StaleSavedTensorError) as info:
        with g:
            step(True)
    assert info.value.stale.name == "a.weight" and info.value.stale.backward == "autograd.grad"


class BufferTimesWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.register_buffer("b", torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Square.apply(self.b, self.w) * x


def test_of_a_functions_same_shaped_saves_the_changed_one_is_named() -> None:
    # `b` and `w` have one shape and, after the write, one version (1); only `w` moved since the
    # save: the counters say which, PyTorch's message cannot.
    torch.manual_seed(0)
    m, x = BufferTimesWeight(), torch.randn(3)
    with torch.no_grad():
        m.b.add_(1)  # the buffer at version 1 before the forward

    def step(bad: bool) -> None:
        y = m(x).sum()
        before = (m.b._version, m.w._version)
        if bad:
            with torch.no_grad():
                m.w.mul_(0.5)
        moved.append((m.b._version - before[0], m.w._version - before[1]))
        y.backward()

    moved: list[tuple[int, int]] = []
    g = guard(m, check="fast", first=1)
    with g:
        step(False)
    with pytest.raises(StaleSavedTensorError) as info:
        with g:
            step(True)
    assert moved[-1] == (0, 1) and (m.b._version, m.w._version) == (1, 1)
    stale = info.value.stale
    assert (stale.name, stale.version_saved, stale.version_now) == ("w", 0, 1)


@pytest.mark.parametrize("head", ["function", "compiled"])
def test_a_function_or_compiled_graph_the_backward_ran_first_leaves_the_walk_intact(head: str) -> None:
    # Their saves are freed by the time the engine stops further down: the walk skips them.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 3)
    square = (lambda h: Square.apply(h, h)) if head == "function" else torch.compile(lambda h: h * h, backend="aot_eager")

    def step(bad: bool) -> None:
        y = square(m(x)).sum()
        if bad:
            opt.step()
        y.backward()

    step(False)
    with pytest.raises(RuntimeError, match=r"\[torch.FloatTensor \[3, 3\]\].*is at version (\d+)") as pytorch:
        step(True)
    now = int(re.search(r"is at version (\d+)", str(pytorch.value))[1])
    assert [n for n, p in m.named_parameters() if p.dim() == 2 and p._version == now] == ["0.weight", "1.weight"]
    g = guard(m, optimizers={"opt": opt}, check="fast", first=1)
    with g:
        step(False)
    with pytest.raises(StaleSavedTensorError) as info:
        with g:
            step(True)
    assert info.value.stale.name == "1.weight"  # the last layer's backward runs first


def test_a_backward_inside_a_functions_backward_is_walked_from_its_own_roots() -> None:
    torch.manual_seed(0)
    inner, outer = nn.Linear(3, 3), nn.Linear(3, 3)
    m = nn.ModuleDict({"inner": inner, "outer": outer})

    class Implicit(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, h: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                hh = h.detach().requires_grad_()
                y = torch.tanh(inner(hh))
            ctx.hh, ctx.y = hh, y
            return y.detach()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(ctx.y, ctx.hh, grad)[0]

    x = torch.randn(2, 3)

    def step(bad: bool) -> None:
        loss = Implicit.apply(outer(x)).sum()
        if bad:
            with torch.no_grad():
                inner.weight.mul_(0.9)
        loss.backward()

    with pytest.raises(RuntimeError, match=r"\[torch.FloatTensor \[3, 3\]\].*is at version (\d+)") as pytorch:
        step(True)  # PyTorch's verdict: the [3, 3] tensor at `inner.weight`'s version
    now = int(re.search(r"is at version (\d+)", str(pytorch.value))[1])
    assert inner.weight._version == now != outer.weight._version
    g = guard(m, check="fast", first=1)
    with g:
        step(False)
    with pytest.raises(StaleSavedTensorError) as info:
        with g:
            step(True)
    assert info.value.stale.name == "inner.weight" and info.value.stale.backward == "autograd.grad"


def test_a_failure_to_name_the_error_leaves_pytorchs_error_and_logs_it(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from fxinplace.training_guard import _unwatched

    def broken(self: Any, error: BaseException) -> None:
        raise KeyError("a bug in the guard")

    monkeypatch.setattr(_unwatched.Unwatched, "explain", broken)
    monkeypatch.setattr("fxinplace.training_guard._failed", set())
    model, opt, x = _trunk()
    g = guard(model, optimizers={"opt": opt}, check="fast", first=1)
    with g:
        _trunk_step(model, opt, x, g.losses, bad=False)
    with caplog.at_level(logging.WARNING, logger="fxinplace"), \
            pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        with g:
            _trunk_step(model, opt, x, g.losses, bad=True)
    assert not isinstance(info.value, StaleSavedTensorError) and g.hazards == []
    assert any("a bug in the guard" in r.getMessage() for r in caplog.records)
