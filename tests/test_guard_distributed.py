"""fxinplace.guard under DistributedDataParallel and FSDP2 (`fully_shard`): 2 processes, gloo, CPU.

One launch of two ranks runs every loop of this file, under DDP and under FSDP2, with and
without the guard, and each rank saves what it saw (the error, the guard's finding, gradients
and parameters) for the tests to read. The truth comes from PyTorch:

- under DDP, a step between two backward calls makes eager raise PyTorch's in-place error on
  each rank; the guard must raise instead, on each rank, naming the parameter at the versions
  PyTorch's message gives;
- under FSDP2, eager raises nothing: the step moves the shard, and the next backward's
  all-gather copies the new values into the unsharded tensor autograd saved without moving its
  version counter. The gradients then equal a single-process reference whose backward reads
  the stepped weight (saved-tensor hooks that skip the version check) and differ from the one
  that reads the weight the forward used (`allow_mutation_on_saved_tensors`): silently wrong,
  so the guard must raise;
- correct loops stay silent and compute, with DDP's reducer and FSDP's hooks running, the
  gradients and parameters of the same loop without the guard.

Run as a script (``python tests/test_guard_distributed.py RANK INIT_FILE OUT_DIR``) it is one rank.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

dist = pytest.importorskip("torch.distributed", reason="torch.distributed is not built in")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # the FSDP2 tests skip, the DDP ones run
    fully_shard = None

from fxinplace import StaleSavedTensorError, StaleSavedTensorWarning, WriteKind, guard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 120
# FSDP2 twice: each layer (trunk) sharded on its own, resharded after forward and backward;
# only the root sharded, which FSDP keeps unsharded from its forward to its backward.
WRAPPERS = ["ddp", "fsdp", "fsdp_root"]
CORRECT = ["sum", "two_backwards"]
HAZARDS = ["step_between", "step_before"]


# --------------------------------------------------------------------------------------------
# What each rank runs


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": _mlp, "multitask": MultiTask}


def _data(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {"x": torch.randn(6, 4, generator=g), "ya": torch.randn(6, 2, generator=g),
            "yb_mlp": torch.randn(6, 2, generator=g), "yb_multitask": torch.randn(6, 3, generator=g)}


def _losses(model_name: str, out: Any, d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if model_name == "mlp":
        return F.mse_loss(out, d["ya"]), F.mse_loss(out, d["yb_mlp"])
    return F.mse_loss(out["a"], d["ya"]), F.mse_loss(out["b"], d["yb_multitask"])


def _step(loop: str, step: int, la: torch.Tensor, lb: torch.Tensor,
          opt: torch.optim.Optimizer) -> None:
    if loop == "sum" or (loop == "step_before" and step == 0):
        (la + lb).backward()
        opt.step()
    elif loop == "two_backwards":
        la.backward(retain_graph=True)
        lb.backward()
        opt.step()
    elif loop == "step_between":  # the classic bug
        la.backward(retain_graph=True)
        opt.step()
        lb.backward()
    else:  # step_before: step 1 steps (on step 0's gradients) between its forward and backward
        opt.step()
        (la + lb).backward()


# Steps per loop, and whether it zeroes the gradients after a step.
STEPS = {"sum": 2, "two_backwards": 2, "step_between": 1, "step_before": 2}
ZERO = {"sum": True, "two_backwards": True, "step_between": True, "step_before": False}


def _wrap(wrapper: str, model: nn.Module) -> nn.Module:
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if wrapper == "fsdp":
        if isinstance(model, MultiTask):
            fully_shard(model.trunk)
        else:
            fully_shard(model[0])
            fully_shard(model[2])
    return fully_shard(model)


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.full_tensor() if hasattr(t, "full_tensor") else t  # collective for DTensors
    return t.detach().clone()


def _run(wrapper: str, model_name: str, loop: str, mode: str, rank: int) -> dict[str, Any]:
    """One loop: `mode` is "eager" (no guard), "guard" or "warn" (`on_stale="warn"`); or
    "fast" (`check="fast", first=1`) and its "eager_warm", the loop after one correct entry."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    wrapped = _wrap(wrapper, model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    check = {"check": "fast", "first": 1} if mode == "fast" else {}
    g = None if mode.startswith("eager") else guard(
        wrapped, optimizers={"opt": opt}, on_stale="warn" if mode == "warn" else "raise", **check)
    if mode in ("fast", "eager_warm"):  # entry 0, watched: correct; the loop runs unwatched
        with g if g is not None else nullcontext():
            d = _data(rank, 0)
            la, lb = _losses(model_name, wrapped(d["x"]), d)
            (la + lb).backward()
            opt.step()
        opt.zero_grad()
    seen: dict[str, Any] = {"error": None, "grads": [], "hazards": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StaleSavedTensorWarning)
        _loop(wrapped, model, model_name, loop, opt, g, rank, seen)
    seen["warnings"] = [str(w.message) for w in caught if issubclass(w.category, StaleSavedTensorWarning)]
    if g is not None:
        seen["hazards"] = len(g.hazards)
        seen["table"] = g.table()
    seen["params"] = {n: _full(p) for n, p in model.named_parameters()}
    return seen


def _loop(wrapped: nn.Module, model: nn.Module, model_name: str, loop: str,
          opt: torch.optim.Optimizer, g: guard | None, rank: int, seen: dict[str, Any]) -> None:
    # The two-backwards loop enters the guard once for both steps (a step's hidden FSDP write
    # must not reach the next step's forward), the others once per step.
    whole = g if g is not None and loop == "two_backwards" else nullcontext()
    each = g if g is not None and loop != "two_backwards" else nullcontext()
    try:
        with whole:
            _steps(wrapped, model, model_name, loop, opt, g, each, rank, seen)
    except Exception as e:
        seen["error"] = (type(e).__name__, str(e))
        stale = getattr(e, "stale", None)
        if stale is not None:
            seen["stale"] = {"name": stale.name, "tensor": stale.tensor, "hidden": stale.hidden,
                             "versions": (stale.version_saved, stale.version_now),
                             "writes": [(w.kind.name, w.by) for w in stale.writes],
                             "needed_for": stale.needed_for, "node": stale.node, "watched": stale.watched}
            seen["grads"].append({n: _full(p.grad) for n, p in model.named_parameters()})


def _steps(wrapped: nn.Module, model: nn.Module, model_name: str, loop: str,
           opt: torch.optim.Optimizer, g: guard | None, each: Any, rank: int,
           seen: dict[str, Any]) -> None:
    for step in range(STEPS[loop]):
        d = _data(rank, step)
        with each:
            out = wrapped(d["x"])
            la, lb = _losses(model_name, out, d)
            if g is not None:
                g.losses({"a": la, "b": lb})
            _step(loop, step, la, lb, opt)
        seen["grads"].append({n: _full(p.grad) for n, p in model.named_parameters()})
        if ZERO[loop]:
            opt.zero_grad()


def _reference(model_name: str, loop: str, check: str) -> dict[str, torch.Tensor]:
    """A hazard loop in one process on both ranks' data (the mean of the ranks' losses, as DDP
    and FSDP average gradients): the gradients when the last backward reads the weights its
    forward used (`saved`) or the stepped ones (`stepped`, a pack hook skips the check)."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    last = STEPS[loop] - 1
    for step in range(STEPS[loop]):
        ctx = (nullcontext() if step < last
               else torch.autograd.graph.allow_mutation_on_saved_tensors() if check == "saved"
               else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
        with ctx:
            pairs = [_losses(model_name, model(d["x"]), d) for d in (_data(r, step) for r in range(WORLD))]
            la = sum(p[0] for p in pairs) / WORLD
            lb = sum(p[1] for p in pairs) / WORLD
            _step(loop, step, la, lb, opt)
        if ZERO[loop] and step < last:
            opt.zero_grad()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"file://{init_file}")
    results: dict[str, Any] = {}
    try:
        for wrapper in WRAPPERS:
            if wrapper == "fsdp" and fully_shard is None:
                continue
            for model_name in MODELS:
                for loop in CORRECT + HAZARDS:
                    modes = ("eager", "guard", "warn", "eager_warm", "fast") if loop == "step_between" else ("eager", "guard")
                    for mode in modes:
                        results[f"{wrapper}/{model_name}/{loop}/{mode}"] = _run(
                            wrapper, model_name, loop, mode, rank)
                dist.barrier()
        for model_name in MODELS:
            for loop in HAZARDS:
                for check in ("saved", "stepped"):
                    results[f"reference/{model_name}/{loop}/{check}"] = _reference(model_name, loop, check)
    except BaseException:
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The launch, once for the module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("guard_distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(tmp / "init"), str(tmp)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for r in range(WORLD)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {WORLD} ranks did not finish in {TIMEOUT_S} s")
    results = []
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{out[-4000:]}"
        got = torch.load(tmp / f"rank{r}.pt", weights_only=False)
        assert "crash" not in got, got["crash"]
        results.append(got)
    return results


def _wrapper_param(wrapper: str) -> Any:
    skip = wrapper == "fsdp" and fully_shard is None
    return pytest.param(wrapper, marks=pytest.mark.skipif(skip, reason="no FSDP2 in this torch"))


wrappers = pytest.mark.parametrize("wrapper", [_wrapper_param(w) for w in WRAPPERS])
models = pytest.mark.parametrize("model", list(MODELS))

_PYTORCH_STALE = re.compile(r"\[torch\.\w+ \[([\d, ]*)\]\].*?is at version (\d+); expected version (\d+)")


def _assert_same_numbers(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert len(a["grads"]) == len(b["grads"])
    for ga, gb in zip(a["grads"], b["grads"]):
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], msg=n)
    for n in a["params"]:
        torch.testing.assert_close(a["params"][n], b["params"][n], msg=n)


# --------------------------------------------------------------------------------------------
# The tests


@wrappers
@models
@pytest.mark.parametrize("loop", ["sum", "two_backwards"])
def test_correct_loop_is_silent_and_computes_the_same(ranks, wrapper: str, model: str, loop: str) -> None:
    for rank, got in enumerate(ranks):
        eager = got[f"{wrapper}/{model}/{loop}/eager"]
        guarded = got[f"{wrapper}/{model}/{loop}/guard"]
        if (wrapper, model, loop) == ("ddp", "multitask", "two_backwards"):
            # DDP's reducer refuses a second backward through parameters the first one marked
            # ready while others (head `b`) were still pending: eager's error, the guard's too.
            assert eager["error"] is not None and "mark a variable ready only once" in eager["error"][1]
            assert guarded["error"] == eager["error"]
        else:
            assert eager["error"] is None and guarded["error"] is None, (rank, guarded["error"])
        assert guarded["hazards"] == 0, guarded["table"]
        assert guarded["table"] == f"[rank {rank}] fxinplace.guard: no stale saved tensors"
        # The reducer's / FSDP's hooks ran: the same averaged gradients, both steps.
        _assert_same_numbers(guarded, eager)


@wrappers
@models
@pytest.mark.parametrize("loop", CORRECT)
def test_gradients_are_averaged_over_the_ranks(ranks, wrapper: str, model: str, loop: str) -> None:
    # What the reducer's all-reduce or FSDP's reduce-scatter gives: each rank's gradient from
    # its own data (they differ) averages to the same tensors on both ranks. Except that DDP
    # syncs once per forward: a second backward through it adds each rank's own gradient (the
    # MLP), or DDP refuses it (the multi-task model); the guard leaves both as they are.
    runs = [got[f"{wrapper}/{model}/{loop}/guard"] for got in ranks]
    if (wrapper, loop) == ("ddp", "two_backwards"):
        if model == "multitask":
            assert all(r["error"] for r in runs)
            return
        first = [r["grads"][0] for r in runs]
        assert any(not torch.allclose(first[0][n], first[1][n]) for n in first[0])
        return
    for step in range(STEPS[loop]):
        for n in runs[0]["grads"][step]:
            torch.testing.assert_close(runs[0]["grads"][step][n], runs[1]["grads"][step][n], msg=n)


def _needed_for(model: str, loop: str) -> str | None:
    # `lb.backward()` is task `b` (`guard.losses`); `(la + lb).backward()` starts from no named
    # loss: the multi-task model's output keys it reaches name it, the MLP's output has none.
    if loop == "step_between":
        return "b"
    return "a, b" if model == "multitask" else None


def _param_saved_as(model: str, shape: list[int]) -> str:
    """The parameter PyTorch's message designates by shape (`nn.Linear` saves ``weight.t()``)."""
    hits = [n for n, p in MODELS[model]().named_parameters() if list(p.shape)[::-1] == shape]
    assert len(hits) == 1, (shape, hits)
    return hits[0]


def _pytorch_stale(error: tuple[str, str] | None, model: str) -> tuple[list[int], int, int, str]:
    """PyTorch's in-place error as a rank saw it: the shape, the versions now and saved, and the
    parameter they designate."""
    assert error is not None and error[0] == "RuntimeError", error
    found = _PYTORCH_STALE.search(error[1])
    assert "modified by an inplace operation" in error[1] and found, error
    shape = [int(s) for s in found[1].split(",")]
    return shape, int(found[2]), int(found[3]), _param_saved_as(model, shape)


@models
@pytest.mark.parametrize("loop", HAZARDS)
def test_ddp_hazard_is_pytorchs_error_named_on_every_rank(ranks, model: str, loop: str) -> None:
    for rank, got in enumerate(ranks):
        eager = got[f"ddp/{model}/{loop}/eager"]
        shape, now, saved, name = _pytorch_stale(eager["error"], model)

        guarded = got[f"ddp/{model}/{loop}/guard"]
        kind, message = guarded["error"]
        assert kind == StaleSavedTensorError.__name__, message
        stale = guarded["stale"]
        # PyTorch's tensor at PyTorch's versions, by the user's name (not DDP's `module.2.weight`).
        assert stale["name"] == name
        assert stale["versions"] == (saved, now) and not stale["hidden"]
        assert stale["tensor"] == f"a {shape} view of parameter `{name}`"
        assert stale["writes"] == [(WriteKind.OPTIMIZER.name, "`opt.step()` (SGD)")]
        assert stale["needed_for"] == _needed_for(model, loop)
        assert message.startswith(
            f"[rank {rank}] fxinplace.guard: one of the variables needed for gradient "
            f"computation has been modified by an inplace operation: a {shape} view of parameter "
            f"`{name}` is at version {now}; expected version {saved} instead.\n")
        assert "  changed by: `opt.step()` (SGD) at " in message
        assert guarded["hazards"] == 1


@models
def test_ddp_hazard_on_an_unwatched_entry_is_pytorchs_error_named_on_every_rank(ranks, model: str) -> None:
    # check="fast" after its one watched entry: DDP's reducer runs with only the step hooks
    # installed, and PyTorch's own error is named, on each rank, as the hooks would name it.
    for rank, got in enumerate(ranks):
        eager = got[f"ddp/{model}/step_between/eager_warm"]
        shape, now, saved, name = _pytorch_stale(eager["error"], model)
        fast = got[f"ddp/{model}/step_between/fast"]
        kind, message = fast["error"]
        assert kind == StaleSavedTensorError.__name__, message
        stale = fast["stale"]
        assert (stale["name"], stale["versions"], stale["watched"]) == (name, (saved, now), False)
        assert stale["writes"] == [(WriteKind.OPTIMIZER.name, "`opt.step()` (SGD)")]
        assert stale["needed_for"] == "b" and fast["hazards"] == 1
        assert message.startswith(f"[rank {rank}] fxinplace.guard: one of the variables needed for gradient "
                                  f"computation has been modified by an inplace operation: a {shape} view of "
                                  f"parameter `{name}` is at version {now}; expected version {saved} instead.\n")


@pytest.mark.parametrize("wrapper", [_wrapper_param(w) for w in WRAPPERS if w != "ddp"])
@models
def test_fsdp_hazard_on_an_unwatched_entry_is_missed(ranks, wrapper: str, model: str) -> None:
    # The limit, stated: FSDP's all-gather keeps the version counter, so PyTorch's check, all
    # an unwatched entry has, sees nothing; eager's gradients are wrong there
    # (`test_fsdp_guard_raises_exactly_where_eager_gradients_are_wrong`) and
    # the guard is as silent as eager.
    for got in ranks:
        assert got[f"{wrapper}/{model}/step_between/eager_warm"]["error"] is None
        fast = got[f"{wrapper}/{model}/step_between/fast"]
        assert fast["error"] is None and fast["hazards"] == 0


# Under FSDP2 the stale tensor is the unsharded weight the backward of the trunk's last layer
# reads for its input gradient: the gradients that flow through it, those of the layers below,
# are the ones eager gets wrong.
FSDP_STALE = {"mlp": ("2.weight", {"0.weight", "0.bias"}),
              "multitask": ("trunk.2.weight", {"trunk.0.weight", "trunk.0.bias"})}
fsdp_wrappers = pytest.mark.parametrize("wrapper", [_wrapper_param(w) for w in WRAPPERS if w != "ddp"])


@fsdp_wrappers
@models
@pytest.mark.parametrize("loop", HAZARDS)
def test_fsdp_guard_raises_exactly_where_eager_gradients_are_wrong(
        ranks, wrapper: str, model: str, loop: str) -> None:
    saved = ranks[0][f"reference/{model}/{loop}/saved"]
    stepped = ranks[0][f"reference/{model}/{loop}/stepped"]
    name, downstream = FSDP_STALE[model]
    # What eager does: FSDP keeps the version counter, so nothing raises; the gradients are
    # the forward's own (`saved`) only where the step found the parameter still unsharded
    # from that forward (the root, stepped between its forward and backward).
    right = (wrapper, loop) == ("fsdp_root", "step_before")
    for rank, got in enumerate(ranks):
        eager = got[f"{wrapper}/{model}/{loop}/eager"]
        assert eager["error"] is None, eager["error"]
        grads = eager["grads"][-1]
        wrong = {n for n in grads if not torch.allclose(grads[n], saved[n])}
        assert wrong == (set() if right else downstream), (rank, wrong)
        if loop == "step_between":  # resharded after the first backward: all re-gathered, stepped
            for n in grads:
                torch.testing.assert_close(grads[n], stepped[n], msg=n)

        guarded = got[f"{wrapper}/{model}/{loop}/guard"]
        if right:
            assert guarded["error"] is None and guarded["hazards"] == 0, guarded["error"]
            _assert_same_numbers(guarded, eager)
            continue
        kind, message = guarded["error"]
        assert kind == StaleSavedTensorError.__name__, message
        stale = guarded["stale"]
        assert stale["name"] == name  # the user's parameter, not FSDP's unsharded tensor
        assert stale["hidden"] and stale["versions"][0] == stale["versions"][1]
        assert stale["writes"] == [(WriteKind.OPTIMIZER.name, "`opt.step()` (SGD)")]
        assert stale["needed_for"] == _needed_for(model, loop)
        rows = 8 if model == "multitask" else 2
        assert message.startswith(
            f"[rank {rank}] fxinplace.guard: a [8, {rows}] view of parameter `{name}` was changed "
            "after autograd saved it: an optimizer step updated its shard and FSDP all-gathered "
            "the new values into the same unsharded tensor without moving its version counter "
            f"(version {stale['versions'][1]}), so PyTorch would not have noticed and would have "
            "computed gradients from the new values.\n")
        assert guarded["hazards"] == 1


@wrappers
@models
def test_warn_mode_reports_on_every_rank_and_lets_the_backward_go_on(ranks, wrapper: str, model: str) -> None:
    for rank, got in enumerate(ranks):
        raised = got[f"{wrapper}/{model}/step_between/guard"]
        warned = got[f"{wrapper}/{model}/step_between/warn"]
        if (wrapper, model) == ("ddp", "multitask"):
            # Let go on, the second backward meets DDP's rule (see the two-backwards loop).
            assert warned["error"] and "mark a variable ready only once" in warned["error"][1]
        else:
            assert warned["error"] is None, warned["error"]
        # The finding the raising guard stops at comes first, headed by the rank.
        assert warned["warnings"] and warned["warnings"][0] == raised["error"][1]
        assert all(w.startswith(f"[rank {rank}] fxinplace.guard: ") for w in warned["warnings"])
        assert warned["hazards"] == len(warned["warnings"])
        if wrapper != "ddp":  # what eager FSDP computes: from the stepped weight, as it would
            _assert_same_numbers(warned, got[f"{wrapper}/{model}/step_between/eager"])


DOC_MARKERS = {"ddp": "With DDP, rank 1 prints:", "fsdp": "With FSDP2, rank 1 prints:"}


@pytest.mark.parametrize("wrapper", [_wrapper_param(w) for w in DOC_MARKERS])
def test_docs_show_the_rank_headed_message(ranks, wrapper: str) -> None:
    text = (ROOT / "docs" / "guard.md").read_text()
    shown = re.search(rf"{re.escape(DOC_MARKERS[wrapper])}\n\n```text\n(.*?)```", text, flags=re.S)
    assert shown, f"docs/guard.md lost the {wrapper} output"
    assert shown.group(1).strip() == ranks[1][f"{wrapper}/multitask/step_between/guard"]["error"][1]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
