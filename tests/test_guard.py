"""fxinplace.guard on the classic training loops that hit the in-place autograd error.

Every hazard test first runs the loop without the guard, so the facts come from PyTorch: the
error it raises (which tensor, which versions) or, for `.data`, gradients that differ from a
correct reference. The guard must then name the same tensor and versions, the write's line and
kind, and the backward that needed it. The correct ordering of each loop must pass silently and
compute exactly what it computes without the guard.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
import weakref
from collections.abc import Callable
from contextlib import nullcontext as does_not_raise
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim.optimizer as optim_hooks

from conftest import close_at_scale, marked_line
from fxinplace import (
    GuardWrite,
    StaleSavedTensor,
    StaleSavedTensorError,
    StaleSavedTensorWarning,
    WriteKind,
    guard,
)
from fxinplace._sources import SourceLocation
from fxinplace.training_guard import render_table

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Helpers


_PYTORCH_STALE = re.compile(
    r"\[torch\.\w+ \[([\d, ]*)\]\].*?is at version (\d+); expected version (\d+) instead"
)


@dataclass
class Run:
    models: dict[str, nn.Module]
    opts: dict[str, torch.optim.Optimizer]
    data: dict[str, torch.Tensor]
    compiled: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.compiled[name] if name in self.compiled else self.models[name]


def _line(fn: Callable[..., Any], marker: str) -> int:
    """The line of `fn` marked ``# <- marker``."""
    return marked_line(fn, f"<- {marker}")


def _pytorch_error(loop: Callable[..., Any], make: Callable[[], Run]) -> tuple[list[int], int, int, str]:
    """Run `loop` without the guard; PyTorch must raise.

    Returns the stale tensor's shape, its version now and when saved, as PyTorch's message
    gives them, and the parameter they designate: the one of that shape (up to transposition:
    `nn.Linear` saves `weight.t()`) whose version counter reads the version PyTorch saw.
    """
    run = make()
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        loop(run, _no_names)
    found = _PYTORCH_STALE.search(str(info.value))
    assert found, str(info.value)
    shape = [int(d) for d in found[1].split(",")] if found[1].strip() else []
    now, saved = int(found[2]), int(found[3])
    hits = [
        f"{prefix}.{n}"
        for prefix, m in run.models.items()
        for n, p in m.named_parameters()
        if (list(p.shape) == shape or (p.dim() == 2 and list(p.shape) == shape[::-1]))
        and p._version == now
    ]
    assert len(hits) == 1, hits
    return shape, now, saved, hits[0]


def _guarded(loop: Callable[..., Any], run: Run, **kw: Any) -> StaleSavedTensor:
    models = {k: run[k] for k in run.models}  # the compiled modules, where compiled
    g = guard(models, optimizers=run.opts, **kw)
    with pytest.raises(StaleSavedTensorError) as info:
        with g:
            loop(run, g.losses)
    assert g.hazards == [info.value.stale]
    return info.value.stale


def _no_names(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return losses


def _state(run: Run) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{n}": t.detach().clone()
        for prefix, m in run.models.items()
        for n, t in [*m.named_parameters(), *m.named_buffers()]
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # Exact on purpose: the guard only watches (its unpack hook hands backward the very tensor
    # autograd saved), so both runs call the same kernels on the same tensors in the same
    # order. Any bit that moved means the guard changed what training computes.
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _restored_state() -> tuple[Any, ...]:
    return (
        torch._C._len_torch_function_stack(),
        torch._C._autograd._top_saved_tensors_default_hooks(False),
        len(optim_hooks._global_optimizer_pre_hooks),
        len(optim_hooks._global_optimizer_post_hooks),
    )


# --------------------------------------------------------------------------------------------
# The models and loops


bce = nn.BCEWithLogitsLoss()


def _gen_and_disc() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    return gen, disc


def make_gan(backend: str | None = None) -> Run:
    gen, disc = _gen_and_disc()
    run = Run(
        models={"gen": gen, "disc": disc},
        opts={"opt_g": torch.optim.Adam(gen.parameters(), 1e-2),
              "opt_d": torch.optim.Adam(disc.parameters(), 1e-2)},
        data={"z": torch.randn(5, 4), "real": torch.randn(5, 6)},
    )
    if backend:
        run.compiled = {k: torch.compile(m, backend=backend) for k, m in run.models.items()}
    return run


def gan_disc_step_between(run: Run, name: Callable) -> None:
    gen, disc, opt_g, opt_d = run["gen"], run["disc"], run.opts["opt_g"], run.opts["opt_d"]
    ones, zeros = torch.ones(5, 1), torch.zeros(5, 1)
    fake = gen(run.data["z"])
    loss_d = bce(disc(run.data["real"]), ones) + bce(disc(fake.detach()), zeros)
    loss_g = bce(disc(fake), ones)  # <- saves
    name({"disc": loss_d, "gen": loss_g})
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()  # <- writes
    opt_g.zero_grad()
    loss_g.backward()  # <- needs
    opt_g.step()


def gan_disc_step_first(run: Run, name: Callable) -> None:
    gen, disc, opt_g, opt_d = run["gen"], run["disc"], run.opts["opt_g"], run.opts["opt_d"]
    ones, zeros = torch.ones(5, 1), torch.zeros(5, 1)
    fake = gen(run.data["z"])
    loss_d = bce(disc(run.data["real"]), ones) + bce(disc(fake.detach()), zeros)
    opt_d.zero_grad()
    name({"disc": loss_d})["disc"].backward()
    opt_d.step()
    loss_g = bce(disc(fake), ones)
    opt_g.zero_grad()
    name({"gen": loss_g})["gen"].backward()
    opt_g.step()


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU())
        self.seg = nn.Linear(10, 3)
        self.depth = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)  # <- saves
        return {"seg": self.seg(h), "depth": self.depth(h)}


def make_multitask(backend: str | None = None) -> Run:
    torch.manual_seed(0)
    model = MultiTask()
    run = Run(
        models={"net": model},
        opts={"opt": torch.optim.SGD(model.parameters(), lr=0.1)},
        data={"x": torch.randn(7, 5), "seg": torch.randint(0, 3, (7,)), "depth": torch.randn(7, 1)},
    )
    if backend:
        run.compiled = {"net": torch.compile(model, backend=backend)}
    return run


def _task_losses(run: Run, name: Callable) -> dict[str, torch.Tensor]:
    out = run["net"](run.data["x"])
    return name({
        "seg": F.cross_entropy(out["seg"], run.data["seg"]),
        "depth": F.mse_loss(out["depth"], run.data["depth"]),
    })


def per_task_grad_step_between(run: Run, name: Callable) -> None:
    opt = run.opts["opt"]
    params = list(run.models["net"].parameters())
    for task, loss in _task_losses(run, name).items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)  # <- needs
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()  # <- writes
        opt.zero_grad()


def per_task_grad_then_step(run: Run, name: Callable) -> None:
    opt = run.opts["opt"]
    params = list(run.models["net"].parameters())
    per_task = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for loss in _task_losses(run, name).values()
    ]
    for p, grads in zip(params, zip(*per_task)):
        p.grad = sum(g for g in grads if g is not None)
    opt.step()
    opt.zero_grad()


def make_wgan() -> Run:
    gen, critic = _gen_and_disc()
    return Run(
        models={"gen": gen, "critic": critic},
        opts={"opt_g": torch.optim.SGD(gen.parameters(), lr=0.1),
              "opt_c": torch.optim.RMSprop(critic.parameters(), lr=5e-3)},
        data={"z": torch.randn(5, 4), "real": torch.randn(5, 6)},
    )


def _critic_step(run: Run, fake: torch.Tensor) -> None:
    critic, opt_c = run["critic"], run.opts["opt_c"]
    loss_c = critic(fake.detach()).mean() - critic(run.data["real"]).mean()
    opt_c.zero_grad()
    loss_c.backward()
    opt_c.step()


def _gen_grads(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in run.models["gen"].named_parameters()}


def wgan_clip_after_critic_forward(run: Run, name: Callable) -> dict[str, torch.Tensor]:
    fake = run["gen"](run.data["z"])
    _critic_step(run, fake)
    loss_g = -run["critic"](fake).mean()  # <- saves
    name({"gen": loss_g})
    with torch.no_grad():
        for p in run.models["critic"].parameters():
            p.clamp_(-0.01, 0.01)  # <- writes
    run.opts["opt_g"].zero_grad()
    loss_g.backward()  # <- needs
    return _gen_grads(run)


def wgan_clip_then_critic_forward(run: Run, name: Callable) -> dict[str, torch.Tensor]:
    fake = run["gen"](run.data["z"])
    _critic_step(run, fake)
    with torch.no_grad():
        for p in run.models["critic"].parameters():
            p.clamp_(-0.01, 0.01)
    loss_g = -run["critic"](fake).mean()
    name({"gen": loss_g})
    run.opts["opt_g"].zero_grad()
    loss_g.backward()
    return _gen_grads(run)


def make_ema() -> Run:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 9), nn.Tanh())
    head = nn.Linear(9, 2)
    ema_head = copy.deepcopy(head).requires_grad_(False)
    return Run(
        models={"enc": enc, "head": head, "ema_head": ema_head},
        opts={"opt": torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1)},
        data={"x": torch.randn(4, 6), "y": torch.randn(4, 2), "y_cons": torch.randn(4, 2)},
    )


def _ema_update(run: Run) -> None:
    with torch.no_grad():
        for pe, p in zip(run.models["ema_head"].parameters(), run.models["head"].parameters()):
            pe.mul_(0.9).add_(p, alpha=0.1)  # <- writes


def _ema_losses(run: Run, name: Callable) -> dict[str, torch.Tensor]:
    h = run["enc"](run.data["x"])
    return name({
        "task": F.mse_loss(run["head"](h), run.data["y"]),
        "consistency": F.mse_loss(run["ema_head"](h), run.data["y_cons"]),  # <- saves
    })


def ema_between_backwards(run: Run, name: Callable) -> None:
    losses = _ema_losses(run, name)
    run.opts["opt"].zero_grad()
    losses["task"].backward(retain_graph=True)
    _ema_update(run)
    losses["consistency"].backward()  # <- needs
    run.opts["opt"].step()


def ema_after_backwards(run: Run, name: Callable) -> None:
    losses = _ema_losses(run, name)
    run.opts["opt"].zero_grad()
    losses["task"].backward(retain_graph=True)
    losses["consistency"].backward()
    run.opts["opt"].step()
    _ema_update(run)


# --------------------------------------------------------------------------------------------
# The classic loops: PyTorch raises without the guard; the guard names the parameter, the step
# and the lines; the correct ordering passes silently with identical results.


@dataclass(frozen=True)
class Case:
    make: Callable[..., Run]
    bad: Callable[..., Any]
    good: Callable[..., Any]
    write_fn: Callable[..., Any]  # the function holding the `# <- writes` line
    save_fn: Callable[..., Any]
    need_fn: Callable[..., Any]
    kind: WriteKind
    op: str
    by: str  # how the guard must name the writer
    task: str  # the task whose backward needed the tensor


CASES = {
    "gan_disc_step_between_gen_losses": Case(
        make_gan, gan_disc_step_between, gan_disc_step_first, gan_disc_step_between,
        gan_disc_step_between, gan_disc_step_between, WriteKind.OPTIMIZER, "step",
        "`opt_d.step()` (Adam)", "gen"),
    "per_task_autograd_grad_step_between": Case(
        make_multitask, per_task_grad_step_between, per_task_grad_then_step,
        per_task_grad_step_between, MultiTask.forward, per_task_grad_step_between,
        WriteKind.OPTIMIZER, "step", "`opt.step()` (SGD)", "depth"),
    "wgan_clip_after_critic_forward": Case(
        make_wgan, wgan_clip_after_critic_forward, wgan_clip_then_critic_forward,
        wgan_clip_after_critic_forward, wgan_clip_after_critic_forward,
        wgan_clip_after_critic_forward, WriteKind.INPLACE, "clamp_", "in-place `clamp_`", "gen"),
    "ema_update_between_backwards": Case(
        make_ema, ema_between_backwards, ema_after_backwards, _ema_update, _ema_losses,
        ema_between_backwards, WriteKind.INPLACE, "mul_", "in-place `mul_`", "consistency"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_classic_loop_is_caught_with_parameter_step_and_lines(case: Case) -> None:
    shape, now, saved, expected = _pytorch_error(case.bad, case.make)

    stale = _guarded(case.bad, case.make())

    assert stale.name == expected
    assert list(stale.shape) == shape
    assert (stale.version_now, stale.version_saved) == (now, saved)
    assert not stale.hidden
    first = stale.writes[0]
    assert (first.kind, first.op, first.by) == (case.kind, case.op, case.by)
    assert first.source.line == _line(case.write_fn, "writes")
    assert (first.source.file, first.source.function) == (__file__, case.write_fn.__name__)
    assert stale.saved_at.line == _line(case.save_fn, "saves")
    assert stale.backward_at.line == _line(case.need_fn, "needs")
    assert stale.needed_for == case.task
    assert stale.node.endswith("Backward0")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_correct_ordering_passes_silently_and_computes_the_same(case: Case) -> None:
    plain = case.make()
    case.good(plain, _no_names)
    guarded = case.make()
    g = guard(guarded.models, optimizers=guarded.opts, on_stale="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with g:
            case.good(guarded, g.losses)
    assert g.hazards == []  # warn mode: every finding is listed here, none raised
    _assert_same(_state(plain), _state(guarded))


def test_error_message_names_everything_and_the_fix() -> None:
    with pytest.raises(StaleSavedTensorError) as info:
        run = make_gan()
        with guard(run.models, optimizers=run.opts) as g:
            gan_disc_step_between(run, g.losses)
    text = str(info.value)
    assert "modified by an inplace operation" in text
    assert f"test_guard.py:{_line(gan_disc_step_between, 'writes')} `opt_d.step()" in text
    assert "`opt_d.step()` (Adam)" in text
    assert "task `gen`" in text
    assert "`retain_graph=True` does not help" in text
    assert "`disc.2.weight`" in text
    assert isinstance(info.value, RuntimeError)


def normalize_for_logging(t: torch.Tensor) -> None:
    t.sub_(t.mean())  # <- writes


def helper_writes_saved_activation(run: Run, name: Callable) -> None:
    out = run["net"](run.data["x"])
    probs = out["seg"].softmax(-1)
    loss = name({"seg": F.nll_loss(probs.log(), run.data["seg"])})["seg"]  # <- saves
    with torch.no_grad():
        normalize_for_logging(probs)
    loss.backward()  # <- needs


def test_activation_written_by_a_logging_helper() -> None:
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        helper_writes_saved_activation(make_multitask(), _no_names)
    found = _PYTORCH_STALE.search(str(info.value))
    shape, now, saved = [int(d) for d in found[1].split(",")], int(found[2]), int(found[3])

    stale = _guarded(helper_writes_saved_activation, make_multitask())

    assert stale.name is None and list(stale.shape) == shape
    assert (stale.version_now, stale.version_saved) == (now, saved)
    # `log` saved its input, `probs`, and its backward runs first.
    assert stale.op == "log" and stale.tensor == f"a {shape} tensor saved by `log`"
    assert stale.saved_at.line == _line(helper_writes_saved_activation, "saves")
    assert [(w.op, w.source.line) for w in stale.writes] == [
        ("sub_", _line(normalize_for_logging, "writes"))]
    assert stale.needed_for == "seg"


# --------------------------------------------------------------------------------------------
# `.data`: PyTorch is silent and wrong; the guard is not


def clip_through_data(p: torch.Tensor) -> None:
    p.data.clamp_(-0.01, 0.01)  # <- writes


def assign_through_data(p: torch.Tensor) -> None:
    p.data = p.data.clamp(-0.01, 0.01)  # <- writes


def wgan_data_write_after_critic_forward(run: Run, name: Callable,
                                         write: Callable[[torch.Tensor], None]
                                         ) -> dict[str, torch.Tensor]:
    fake = run["gen"](run.data["z"])
    _critic_step(run, fake)
    loss_g = -run["critic"](fake).mean()  # <- saves
    name({"gen": loss_g})
    for p in run.models["critic"].parameters():
        write(p)
    run.opts["opt_g"].zero_grad()
    loss_g.backward()  # <- needs
    return _gen_grads(run)


def wgan_data_write_after_gen_backward(run: Run, name: Callable,
                                       write: Callable[[torch.Tensor], None]
                                       ) -> dict[str, torch.Tensor]:
    fake = run["gen"](run.data["z"])
    _critic_step(run, fake)
    loss_g = -run["critic"](fake).mean()
    name({"gen": loss_g})
    run.opts["opt_g"].zero_grad()
    loss_g.backward()
    for p in run.models["critic"].parameters():
        write(p)
    return _gen_grads(run)


class MatCritic(nn.Module):
    """Saves its weights themselves (``x @ w``), not transposed views as `nn.Linear` does."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 16) * 0.5)
        self.w2 = nn.Parameter(torch.randn(16, 1) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x @ self.w1, 0.2) @ self.w2  # <- saves


def make_mat_wgan() -> Run:
    run = make_wgan()
    torch.manual_seed(1)
    critic = MatCritic()
    run.models["critic"] = critic
    run.opts["opt_c"] = torch.optim.RMSprop(critic.parameters(), lr=5e-3)
    return run


@dataclass(frozen=True)
class DataCase:
    make: Callable[[], Run]
    write: Callable[[torch.Tensor], None]  # holds the `# <- writes` line
    save_fn: Callable[..., Any]  # holds the `# <- saves` line
    op: str
    by: str  # how the guard must name the writer

    def bad(self, run: Run, name: Callable) -> dict[str, torch.Tensor]:
        return wgan_data_write_after_critic_forward(run, name, self.write)

    def reference(self, run: Run, name: Callable) -> dict[str, torch.Tensor]:
        return wgan_data_write_after_gen_backward(run, name, self.write)


DATA_CASES = {
    "p.data.clamp_": DataCase(make_wgan, clip_through_data, wgan_data_write_after_critic_forward,
                              "clamp_", "`clamp_` through `.data`"),
    "p.data = ...": DataCase(make_mat_wgan, assign_through_data, MatCritic.forward, "data =",
                             "`.data = ...`"),
}


@pytest.mark.parametrize("case", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_data_write_is_caught_where_pytorch_is_silently_wrong(case: DataCase) -> None:
    make, bad, reference = case.make, case.bad, case.reference
    # PyTorch: no error, and gradients that differ from the same loop with the write after.
    before = make()
    written = {n for n, p in before.models["critic"].named_parameters()
               if not torch.equal(p.detach().clamp(-0.01, 0.01), p.detach())}
    silent = bad(make(), _no_names)
    expected = reference(make(), _no_names)
    assert any(not close_at_scale(silent[n], expected[n]) for n in expected)

    stale = _guarded(bad, make())

    assert stale.hidden
    assert stale.version_now == stale.version_saved
    assert stale.name in {f"critic.{n}" for n in written}
    first = stale.writes[0]
    assert (first.kind, first.op, first.by) == (WriteKind.DATA, case.op, case.by)
    assert first.source.line == _line(case.write, "writes")
    assert (first.source.file, first.source.function) == (__file__, case.write.__name__)
    assert stale.saved_at.line == _line(case.save_fn, "saves")
    assert stale.backward_at.line == _line(wgan_data_write_after_critic_forward, "needs")
    assert stale.needed_for == "gen"
    assert "through `.data`" in str(StaleSavedTensorError(stale))


@pytest.mark.parametrize("case", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_data_write_after_the_backward_passes_silently(case: DataCase) -> None:
    make, reference = case.make, case.reference
    plain = reference(make(), _no_names)
    run = make()
    with guard(run.models, optimizers=run.opts, on_stale="warn") as g:
        guarded = reference(run, g.losses)
    assert g.hazards == []  # warn mode: every finding is listed here, none raised
    _assert_same(plain, guarded)


def test_data_assign_on_a_view_saving_model_is_harmless_and_not_reported() -> None:
    # nn.Linear saves `weight.t()`, a view of the old storage: `p.data = t` leaves it intact.
    # PyTorch's gradients equal the reference, so there is nothing to report.
    def bad(run: Run, name: Callable) -> dict[str, torch.Tensor]:
        fake = run["gen"](run.data["z"])
        loss_g = -run["critic"](fake).mean()
        for p in run.models["critic"].parameters():
            p.data = p.data.clamp(-0.01, 0.01)
        loss_g.backward()
        return _gen_grads(run)

    def reference(run: Run, name: Callable) -> dict[str, torch.Tensor]:
        fake = run["gen"](run.data["z"])
        loss_g = -run["critic"](fake).mean()
        loss_g.backward()
        return _gen_grads(run)

    expected = reference(make_wgan(), _no_names)
    _assert_same(bad(make_wgan(), _no_names), expected)
    run = make_wgan()
    with guard(run.models, on_stale="warn") as g:
        got = bad(run, g.losses)
    assert g.hazards == []  # warn mode: every finding is listed here, none raised
    _assert_same(got, expected)


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize(
    "make, bad, good",
    [
        pytest.param(make_gan, gan_disc_step_between, gan_disc_step_first, id="gan"),
        pytest.param(make_multitask, per_task_grad_step_between, per_task_grad_then_step,
                     id="per_task_autograd_grad"),
    ],
)
def test_compiled_aot_eager(make: Callable[..., Run], bad: Callable, good: Callable) -> None:
    shape, now, saved, expected = _pytorch_error(bad, lambda: make("aot_eager"))

    stale = _guarded(bad, make("aot_eager"))

    assert stale.name == expected
    assert (stale.version_now, stale.version_saved) == (now, saved)
    assert stale.node == "CompiledFunctionBackward"
    assert stale.writes[0].kind is WriteKind.OPTIMIZER
    assert stale.writes[0].source.line == _line(bad, "writes")
    assert stale.backward_at.line == _line(bad, "needs")

    plain, guarded = make("aot_eager"), make("aot_eager")
    good(plain, _no_names)
    g = guard({k: guarded[k] for k in guarded.models}, optimizers=guarded.opts, on_stale="warn")
    with g:
        good(guarded, g.losses)
    assert g.hazards == []  # warn mode: every finding is listed here, none raised
    _assert_same(_state(plain), _state(guarded))


def test_compiled_with_inplace_audit_backend() -> None:
    shape, now, saved, expected = _pytorch_error(gan_disc_step_between,
                                                 lambda: make_gan("inplace_audit"))

    stale = _guarded(gan_disc_step_between, make_gan("inplace_audit"))

    assert stale.name == expected
    assert (stale.version_now, stale.version_saved) == (now, saved)
    assert stale.writes[0].by == "`opt_d.step()` (Adam)"


# --------------------------------------------------------------------------------------------
# Task names


def test_task_names_from_the_model_output_keys() -> None:
    run = make_multitask()
    with pytest.raises(StaleSavedTensorError) as info:
        with guard(run.models["net"], optimizers=run.opts):
            per_task_grad_step_between(run, _no_names)
    assert info.value.stale.needed_for == "depth"
    assert info.value.stale.name == "trunk.2.weight"  # no prefix for a single module


def test_task_block_names_saved_tensors_and_backwards() -> None:
    run = make_gan()
    gen, disc, opt_d = run.models["gen"], run.models["disc"], run.opts["opt_d"]
    g = guard(run.models, optimizers=run.opts)
    with pytest.raises(StaleSavedTensorError) as info:
        with g:
            fake = gen(run.data["z"])
            with g.task("gen"):
                loss_g = bce(disc(fake), torch.ones(5, 1))
            loss_d = bce(disc(fake.detach()), torch.zeros(5, 1))
            with g.task("disc"):
                loss_d.backward()
            opt_d.step()
            with g.task("gen (2nd)"):
                loss_g.backward()
    assert (info.value.stale.saved_for, info.value.stale.needed_for) == ("gen", "gen (2nd)")


# --------------------------------------------------------------------------------------------
# Warn mode and the table


def test_warn_mode_records_every_hazard_and_lets_the_loop_finish() -> None:
    run = make_gan()
    g = guard(run.models, optimizers=run.opts, on_stale="warn")
    with pytest.warns(StaleSavedTensorWarning, match="opt_d.step"):
        with g:
            gan_disc_step_between(run, g.losses)
    # Every parameter of the discriminator that the generator's graph saved: both weights.
    assert sorted(s.name for s in g.hazards) == ["disc.0.weight", "disc.2.weight"]
    table = g.table()
    assert table.splitlines()[0] == "fxinplace.guard: 2 stale saved tensors"
    assert "`opt_d.step()` (Adam)" in table and "`disc.0.weight`" in table


def test_table_rendering_is_exact() -> None:
    at = SourceLocation("/x/train/loop.py", 12, "loss_g = bce(D(fake), ones)", "step")
    stale = StaleSavedTensor(
        tensor="a [16, 1] view of parameter `disc.2.weight`", name="disc.2.weight",
        shape=(16, 1), op="linear", node="AddmmBackward0", saved_at=at, saved_for=None,
        version_saved=1, version_now=2,
        writes=(GuardWrite(WriteKind.OPTIMIZER, "step", "`opt_d.step()` (Adam)",
                           SourceLocation("/x/train/loop.py", 15, "opt_d.step()", "step"),
                           "opt_d"),),
        needed_for="gen", backward="backward",
        backward_at=SourceLocation("/x/train/loop.py", 17, "loss_g.backward()", "step"),
        hidden=False)
    assert render_table([stale]) == "\n".join([
        "fxinplace.guard: 1 stale saved tensor",
        "  #  tensor           saved by    saved at          changed by             changed at  "
        "      needed by       backward at       task    version",
        "---  ---------------  ----------  ----------------  ---------------------  ------------"
        "----  --------------  ----------------  ------  ---------",
        "  0  `disc.2.weight`  linear      train/loop.py:12  `opt_d.step()` (Adam)  train/loop.p"
        "y:15  AddmmBackward0  train/loop.py:17  gen     1 -> 2",
    ])
    assert render_table([]) == "fxinplace.guard: no stale saved tensors"
    assert str(StaleSavedTensorError(stale)) == "\n".join([
        "fxinplace.guard: one of the variables needed for gradient computation has been modified "
        "by an inplace operation: a [16, 1] view of parameter `disc.2.weight` is at version 2; "
        "expected version 1 instead.",
        "  saved by:   `linear` at train/loop.py:12 `loss_g = bce(D(fake), ones)`",
        "  changed by: `opt_d.step()` (Adam) at train/loop.py:15 `opt_d.step()`",
        "  needed by:  AddmmBackward0 in `backward` at train/loop.py:17 `loss_g.backward()`, task `gen`",
        "How to fix: `opt_d.step()` (Adam) updated `disc.2.weight` between the forward that saved "
        "it and this backward. Run every backward that needs that forward before stepping (for "
        "several tasks or losses: call backward or torch.autograd.grad for each, then step once), "
        "or run the forward again after the step. `retain_graph=True` does not help: it keeps the "
        "saved tensors, not their old values. If the backward really needs the old value, clone "
        "the tensor before the write.",
    ])


# --------------------------------------------------------------------------------------------
# Hygiene: hooks restored, nesting, decorator, no leaks, double backward


def test_everything_is_restored_on_exit_and_on_exceptions() -> None:
    run = make_multitask()
    model = run.models["net"]
    before = _restored_state()
    hooks = len(model._forward_hooks)
    with guard(model, optimizers=run.opts):
        assert _restored_state() != before
        assert len(model._forward_hooks) == hooks + 1
    assert _restored_state() == before
    with pytest.raises(ZeroDivisionError):
        with guard(model, optimizers=run.opts):
            1 / 0
    assert _restored_state() == before
    with pytest.raises(StaleSavedTensorError):
        with guard(model, optimizers=run.opts):
            per_task_grad_step_between(run, _no_names)
    assert _restored_state() == before
    assert len(model._forward_hooks) == hooks


def test_nested_guards_each_work_and_unwind() -> None:
    before = _restored_state()
    run = make_gan()
    outer = guard(run.models, optimizers=run.opts, on_stale="warn")
    with pytest.warns(StaleSavedTensorWarning):
        with outer:
            inner = guard(run.models, optimizers=run.opts)
            with pytest.raises(StaleSavedTensorError):
                with inner:
                    gan_disc_step_between(run, inner.losses)
            gan_disc_step_between(run, outer.losses)  # inner is gone: outer warns
    assert [s.name for s in inner.hazards] == ["disc.2.weight"]
    assert {s.name for s in outer.hazards} == {"disc.0.weight", "disc.2.weight"}
    assert _restored_state() == before
    with pytest.raises(RuntimeError, match="already active"):
        with outer:
            with outer:
                pass
    assert _restored_state() == before


def test_decorator() -> None:
    run = make_ema()
    before = _restored_state()

    @guard(run.models, optimizers=run.opts)
    def step() -> None:
        ema_between_backwards(run, _no_names)

    with pytest.raises(StaleSavedTensorError, match="`ema_head.weight`"):
        step()
    assert _restored_state() == before


def test_saved_outputs_do_not_leak_without_a_backward() -> None:
    lin = nn.Linear(3, 3)
    with guard(lin):
        h = lin(torch.randn(2, 3))
        out = h.sigmoid()  # sigmoid saves its own output
        refs = [weakref.ref(h), weakref.ref(out)]
        del h, out
    assert [r() for r in refs] == [None, None]


def test_double_backward_gradient_penalty_is_unchanged() -> None:
    def penalty(critic: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
        ((grad.norm(dim=1) - 1) ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(5, 6)
    expected = penalty(copy.deepcopy(critic), x)
    with guard(critic, on_stale="warn") as g:
        got = penalty(critic, x)
    assert g.hazards == []  # warn mode: every finding is listed here, none raised
    _assert_same(got, expected)


@pytest.mark.parametrize(
    "kwargs, expectation",
    [
        ({}, does_not_raise()),
        ({"on_stale": "warn"}, does_not_raise()),
        ({"on_stale": "ignore"}, pytest.raises(ValueError, match="`on_stale`")),
        ({"model": [nn.Linear(1, 1)]}, pytest.raises(TypeError, match="`model`")),
        ({"model": {"a": 1}}, pytest.raises(TypeError, match=r"`model\['a'\]`")),
        ({"optimizers": "adam"}, pytest.raises(TypeError, match="`optimizers`")),
        ({"optimizers": [object()]}, pytest.raises(TypeError, match="optimizers")),
        ({"check": "sampled"}, does_not_raise()),
        ({"check": "sampled", "first": 1, "every": 0}, does_not_raise()),
        ({"check": "first"}, pytest.raises(ValueError, match="`check` must be 'all', 'fast' or 'sampled', got 'first'")),
        ({"every": 10}, pytest.raises(ValueError, match="`first` and `every`.*check='all'")),
        ({"check": "fast", "first": 2}, does_not_raise()),
        ({"check": "fast", "every": 10}, pytest.raises(ValueError, match="`every` sets the sampling of check='sampled'")),
        ({"check": "sampled", "first": 0}, pytest.raises(ValueError, match="`first` must be an int >= 1, got 0")),
        ({"check": "sampled", "every": -1}, pytest.raises(ValueError, match="`every` must be an int >= 0, got -1")),
        ({"check": "sampled", "every": 2.5}, pytest.raises(ValueError, match="`every` must be an int")),
        ({"check": "sampled", "first": True}, pytest.raises(ValueError, match="`first` must be an int")),
    ],
    ids=["defaults", "warn", "bad_on_stale", "model_list", "model_dict_value", "opt_str",
         "opt_list_value", "sampled", "sampled_first_only", "bad_check", "every_without_sampled", "fast", "fast_every",
         "first_zero", "every_negative", "every_float", "first_bool"],
)
def test_arguments(kwargs: dict[str, Any], expectation: Any) -> None:
    with expectation:
        guard(**kwargs)


def test_losses_must_be_a_mapping_of_tensors() -> None:
    g = guard()
    with pytest.raises(TypeError, match="`losses`"):
        g.losses([torch.ones(())])
    with pytest.raises(TypeError, match=r"`losses\['a'\]`"):
        g.losses({"a": 1.0})


# --------------------------------------------------------------------------------------------
# check="sampled": full checks on the first entries, then one in `every`; nothing installed on
# the others, where PyTorch's own version check is all there is.


def _sampled_loop(run: Run, g: guard, steps: int, bad_from: int, case: Case) -> list[bool]:
    """`steps` entries of `g`, the correct loop before entry `bad_from` and the bad one from it;
    whether the guard checked each entry (read inside it: `g.checks`)."""
    checked = []
    for i in range(steps):
        checked.append(g.checks(g.entries))
        with g:
            (case.bad if i >= bad_from else case.good)(run, g.losses)
    return checked


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sampled_guard_catches_a_bad_loop_on_its_first_step(case: Case) -> None:
    shape, now, saved, expected = _pytorch_error(case.bad, case.make)
    run = case.make()
    g = guard({k: run[k] for k in run.models}, optimizers=run.opts, check="sampled", first=2, every=50)
    with pytest.raises(StaleSavedTensorError) as info:
        _sampled_loop(run, g, steps=1, bad_from=0, case=case)
    stale = info.value.stale
    assert (stale.name, list(stale.shape), stale.version_now, stale.version_saved) == (expected, shape, now, saved)
    assert stale.writes[0].by == case.by and g.hazards == [stale]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sampled_guard_is_silent_on_a_correct_loop_and_computes_the_same(case: Case) -> None:
    plain = case.make()
    for _ in range(9):
        case.good(plain, _no_names)
    guarded = case.make()
    g = guard(guarded.models, optimizers=guarded.opts, check="sampled", first=2, every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checked = _sampled_loop(guarded, g, steps=9, bad_from=9, case=case)
    assert checked == [True, True, False, False, True, False, False, True, False]
    assert g.hazards == [] and g.entries == 9
    _assert_same(_state(plain), _state(guarded))


def test_sampled_guard_leaves_a_hazard_that_starts_on_an_unchecked_step_to_pytorchs_check() -> None:
    # With first=3, every=5 the guard watches entries 0, 1, 2, 7, 12, ...; a loop that turns bad
    # at entry 5 (a discriminator updated every k steps, say) is not watched there. PyTorch's own
    # version check, which the guard's hooks replace only on the watched entries, raises its
    # error, and the guard names it on the way out (tests/test_guard_fast.py); nothing was
    # installed on that entry, not even the step hooks, so the writer is not named.
    case = CASES["gan_disc_step_between_gen_losses"]
    run = case.make()
    g = guard(run.models, optimizers=run.opts, check="sampled", first=3, every=5)
    with pytest.raises(StaleSavedTensorError, match="modified by an inplace operation") as info:
        _sampled_loop(run, g, steps=6, bad_from=5, case=case)
    assert "modified by an inplace operation" in str(info.value.__cause__) and info.value.stale.writes == ()
    assert g.hazards == [info.value.stale] and g.entries == 6 and not g.checks(5) and g.checks(7)
    assert _restored_state() == _before_any_guard  # nothing was installed on the failing entry


def test_sampled_guard_misses_a_data_write_on_an_unchecked_step() -> None:
    # `.data` writes move no version counter: on an unchecked entry nothing sees them and the
    # gradients come out wrong, as without the guard; on a checked entry they are caught.
    case = DATA_CASES["p.data.clamp_"]
    silent = case.bad(case.make(), _no_names)
    run = case.make()
    g = guard(run.models, optimizers=run.opts, check="sampled", first=1, every=2)
    with g:  # entry 0: checked, correct loop
        case.reference(run, g.losses)
    assert not g.checks(1) and g.checks(2)
    with g:  # entry 1: unchecked, the bad loop runs as without the guard
        missed = case.bad(run, g.losses)
    assert g.hazards == []
    assert missed.keys() == silent.keys()
    with pytest.raises(StaleSavedTensorError, match="through `.data`"):
        with g:  # entry 2: checked
            case.bad(run, g.losses)


_before_any_guard = _restored_state()


# --------------------------------------------------------------------------------------------
# A model's own `zero_grad`, and writes through `out=` and `inplace=True`


class _Probed(nn.Sequential):
    """Records the function-mode stack depth each time `zero_grad` asks for its parameters."""

    depths: list[int]

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        self.depths.append(torch._C._len_torch_function_stack())
        return super().parameters(recurse)


def test_model_zero_grad_runs_off_the_mode_and_the_loop_is_still_watched() -> None:
    torch.manual_seed(0)
    model = _Probed(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    model.depths = []
    original = nn.Module.zero_grad
    x = torch.randn(5, 4)

    def loop() -> None:
        model.zero_grad()
        loss = model(x).sum()
        with torch.no_grad():
            model[2].weight.mul_(0.5)  # <- writes
        loss.backward()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loop()  # PyTorch's verdict on the loop
    model.depths.clear()
    with pytest.raises(StaleSavedTensorError) as info:
        with guard(model):
            inside = torch._C._len_torch_function_stack()
            # wrapped on the model's class: a copy made under the guard zeroes its own gradients
            assert "zero_grad" not in vars(model)
            model(x).sum().backward()
            twin = copy.deepcopy(model)
            twin.zero_grad()
            assert all(p.grad is None for p in twin.parameters())
            assert all(p.grad is not None for p in model.parameters())
            model.depths.clear()
            loop()
    assert model.depths == [inside - 1]  # `zero_grad` ran with the guard's mode lifted
    write = info.value.stale.writes[0]
    assert (write.kind, write.by, write.source.line) == (WriteKind.INPLACE, "in-place `mul_`", marked_line(loop, "<- writes"))
    assert nn.Module.zero_grad is original and "zero_grad" not in vars(_Probed) and "zero_grad" not in vars(model)


def test_out_and_inplace_true_writes_of_a_saved_tensor_are_caught_and_named() -> None:
    act = nn.ReLU(inplace=True)  # not given to the guard: it runs under the mode

    def with_out(x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x)  # sigmoid saves its output
        with torch.no_grad():
            torch.mul(x, 2, out=s)  # <- out
        return s.sum()

    def with_inplace(x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x)
        act(s)  # <- inplace
        return s.sum()

    for loop, marker, op in [(with_out, "<- out", "mul"), (with_inplace, "<- inplace", "relu")]:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loop(torch.randn(3, requires_grad=True)).backward()  # PyTorch's verdict
        with pytest.raises(StaleSavedTensorError) as info:
            with guard():
                loop(torch.randn(3, requires_grad=True)).backward()
        stale = info.value.stale
        assert (stale.version_saved, stale.version_now, stale.op) == (0, 1, "sigmoid")
        [write] = stale.writes
        assert (write.kind, write.op, write.by) == (WriteKind.INPLACE, op, f"in-place `{op}`")
        assert write.source.line == marked_line(loop, marker)


# --------------------------------------------------------------------------------------------
# The docs and the example


def test_docs_show_the_examples_real_output() -> None:
    # The doc's snippets run in tests/test_docs.py, with every other doc's.
    result = subprocess.run([sys.executable, "examples/guard_example.py"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shown = re.search(r"Its run prints:\n\n```text\n(.*?)```",
                      (ROOT / "docs" / "guard.md").read_text(), flags=re.S)
    assert shown, "docs/guard.md lost the example's output"
    assert shown.group(1).strip() == result.stdout.strip()
    assert "`disc.2.weight`" in result.stdout and "3 stale saved tensors" in result.stdout
