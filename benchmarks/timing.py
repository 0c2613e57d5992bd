"""Clocks, cold compiles and the small statistics the benchmark sections share."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = [
    "Samples",
    "cpu_seconds",
    "synchronize",
    "cold_compile",
    "backend_overhead",
    "StepTimes",
    "interleaved_steps",
    "paired_ratio",
    "loglog_slope",
    "cache_hits",
]


@dataclass
class Samples:
    """Repeated measurements of one quantity, in seconds."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    def __str__(self) -> str:
        return fmt_time(self.median, self.values)


def fmt_time(seconds: float, spread: list[float] | None = None) -> str:
    """`12.3 s`, `4.56 ms` or `78 µs`; with the min-max range when there are several samples."""

    def one(t: float) -> str:
        if math.isnan(t):
            return "n/a"
        if t >= 1:
            return f"{t:.2f} s"
        if t >= 1e-3:
            return f"{t * 1e3:.2f} ms"
        return f"{t * 1e6:.0f} µs"

    text = one(seconds)
    if spread and len(spread) > 1:
        text += f" [{one(min(spread))}–{one(max(spread))}, n={len(spread)}]"
    return text


def cpu_seconds() -> float:
    """CPU time of this process and of the child processes it has waited for (compilers).

    Unlike wall time it does not grow while other processes hold the cores. Inductor's
    compile workers are children that are never waited for; with `compile_threads=1`
    Inductor runs the C++ compiler as a waited-for child instead, and this covers it.
    """
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall clock read after this covers them (CUDA is async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_hits() -> int:
    """Compile-cache hits recorded so far (Inductor's FX graph cache and AOTAutograd's)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


@contextlib.contextmanager
def cold_compile() -> Iterator[None]:
    """A first compile as a new process would see it: Dynamo reset, an empty Inductor cache dir.

    `fresh_cache` points TORCHINDUCTOR_CACHE_DIR (and Triton's) at a new temporary folder and
    clears Inductor's in-memory caches; `torch._dynamo.reset()` drops Dynamo's code caches.
    """
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    gc.collect()
    with fresh_cache():
        yield
    torch._dynamo.reset()


@contextlib.contextmanager
def backend_overhead() -> Iterator[dict[str, float]]:
    """Wall and CPU seconds spent in `InplaceAudit.__call__`, and in its hand-off to the compiler.

    Wraps the two methods on the class (so the registered `inplace_audit` instance is timed
    too) and restores them on exit. `audit_wall` / `audit_cpu` (call minus hand-off) is
    everything the backend does besides compiling: options, the fake run, the analysis, the
    tables. The audit is single-threaded Python in this process, so `time.process_time`
    covers all of its CPU time.
    """
    from fxinplace.backend import InplaceAudit

    spent = {"audit_wall": 0.0, "audit_cpu": 0.0, "graphs": 0}
    call, compile_ = InplaceAudit.__call__, InplaceAudit._compile

    def timed_call(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return call(self, *args, **kwargs)
        finally:
            spent["audit_wall"] += time.perf_counter() - wall
            spent["audit_cpu"] += time.process_time() - cpu
            spent["graphs"] += 1

    def timed_compile(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return compile_(self, *args, **kwargs)
        finally:
            spent["audit_wall"] -= time.perf_counter() - wall
            spent["audit_cpu"] -= time.process_time() - cpu

    InplaceAudit.__call__, InplaceAudit._compile = timed_call, timed_compile
    try:
        yield spent
    finally:
        InplaceAudit.__call__, InplaceAudit._compile = call, compile_


@dataclass
class StepTimes:
    """Single-step wall times of one variant, and the total of each interleaved round."""

    steps: Samples = field(default_factory=Samples)
    rounds: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return str(self.steps)

    @property
    def median(self) -> float:
        return self.steps.median


def interleaved_steps(
    steps: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    per_round: int,
) -> dict[str, StepTimes]:
    """Time each callable in short alternating blocks: A B C, C B A, A B C, ...

    On a shared machine the load comes and goes over seconds; blocks of a few steps, in
    alternating order, expose every variant to the same load, so round-by-round ratios
    (`paired_ratio`) cancel most of it and medians drop the rest.
    """
    times = {name: StepTimes() for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            step, total = steps[name], 0.0
            for _ in range(per_round):
                synchronize(device)
                start = time.perf_counter()
                step()
                synchronize(device)
                elapsed = time.perf_counter() - start
                times[name].steps.add(elapsed)
                total += elapsed
            times[name].rounds.append(total)
    return times


def paired_ratio(baseline: StepTimes, candidate: StepTimes) -> float:
    """Median over rounds of baseline time / candidate time (1.0 equal, 0.99 candidate 1% slower)."""
    return statistics.median(b / c for b, c in zip(baseline.rounds, candidate.rounds))


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): 1.0 is linear, 2.0 quadratic."""
    if len(xs) < 2:
        return math.nan
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx
