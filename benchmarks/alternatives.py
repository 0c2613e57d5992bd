"""Section 4: what the run-time ways of finding in-place trouble cost per training step.

Each alternative runs on its own copy of the model in eager mode, the way one would debug
with it, against plain eager. The hooks log as little as possible (a shape, a version
number), so their figures are a lower bound on real logging. The audit has no run-time part:
its row repeats section 2 (audited compiled step against Inductor alone).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from models import make_batch, make_model, make_train_step
from table import Row
from timing import StepTimes, fmt_time, interleaved_steps, paired_ratio

__all__ = ["measure_alternatives", "alternative_rows", "DESCRIPTIONS"]

DESCRIPTIONS = {
    "detect_anomaly": "torch.autograd.detect_anomaly() around the step",
    "tensor hooks": "register_hook on every parameter and every intermediate tensor",
    "module hooks": "forward hook on every module, logging tensor versions",
    "saved-tensor check": "saved_tensors_hooks comparing _version at pack/unpack",
}


class _HookEveryIntermediate(TorchFunctionMode):
    """`register_hook` on every tensor an op returns that requires grad."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, name=func.__name__: self.log.append((name, grad.shape)))
        return out


def _eager(depth: int, width: int, device: torch.device) -> Callable:
    model = make_model(depth, width, device)
    return make_train_step(model, model, make_batch(width, device=device))


def _detect_anomaly(depth: int, width: int, device: torch.device) -> Callable:
    step = _eager(depth, width, device)

    def anomaly_step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Anomaly Detection has been enabled" on every entry
            with torch.autograd.detect_anomaly():
                return step()

    return anomaly_step


def _tensor_hooks(depth: int, width: int, device: torch.device) -> Callable:
    model = make_model(depth, width, device)
    log: list = []
    for name, p in model.named_parameters():
        p.register_hook(lambda grad, name=name: log.append((name, grad.shape)))

    def forward(x):
        with _HookEveryIntermediate(log):
            return model(x)

    step = make_train_step(forward, model, make_batch(width, device=device))

    def hooked_step():
        log.clear()
        return step()

    return hooked_step


def _module_hooks(depth: int, width: int, device: torch.device) -> Callable:
    model = make_model(depth, width, device)
    log: list = []

    def versions(values):
        return [t._version for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor)]

    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, args, out, name=name: log.append((name, versions(args), versions(out))))
    step = make_train_step(model, model, make_batch(width, device=device))

    def hooked_step():
        log.clear()
        return step()

    return hooked_step


def _saved_tensor_check(depth: int, width: int, device: torch.device) -> Callable:
    step = _eager(depth, width, device)
    stale: list = []

    def pack(t):
        return t, t._version

    def unpack(packed):
        t, version = packed
        if t._version != version:
            stale.append(t.shape)
        return t

    def checked_step():
        stale.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return step()

    return checked_step


_BUILDERS = {
    "eager": _eager,
    "detect_anomaly": _detect_anomaly,
    "tensor hooks": _tensor_hooks,
    "module hooks": _module_hooks,
    "saved-tensor check": _saved_tensor_check,
}


def measure_alternatives(depth: int, width: int, device: torch.device, rounds: int, per_round: int) -> dict[str, StepTimes]:
    steps = {name: build(depth, width, device) for name, build in _BUILDERS.items()}
    for step in steps.values():
        step()  # first-call allocations
    return interleaved_steps(steps, device, rounds, per_round)


def alternative_rows(depth: int, times: dict[str, StepTimes], compiled: dict[str, StepTimes], device: torch.device) -> list[Row]:
    base = times["eager"]
    rows = []
    for name, description in DESCRIPTIONS.items():
        extra, ratio = times[name].median - base.median, paired_ratio(base, times[name])
        rows.append(Row(
            "4 alternatives", f"run-time {name}: {description}", f"depth {depth}", device.type,
            f"eager {base}", f"{name} {times[name]}",
            f"{extra * 1e3:+.2f} ms/step, ratio {ratio:.2f} (base/cand)", "—", "info", ratio,
        ))
    if "inductor" in compiled and "audit+inductor" in compiled:
        ours, ref = compiled["audit+inductor"], compiled["inductor"]
        extra, ratio = ours.median - ref.median, paired_ratio(ref, ours)
        rows.append(Row(
            "4 alternatives", "ours: inplace_audit (all work at compile time; = section 2)", f"depth {depth}",
            device.type, f"inductor {fmt_time(ref.median)}", f"audit+inductor {fmt_time(ours.median)}",
            f"{extra * 1e3:+.3f} ms/step, ratio {ratio:.3f} (base/cand)", "0 at run time", "info", ratio,
        ))
    return rows
