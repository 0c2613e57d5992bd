"""Section 1: what the audit adds to the first training step, against Inductor alone.

Each sample is a cold start (Dynamo reset, empty Inductor cache dir): build the model,
`torch.compile` it, and time the first training step (forward, backward, SGD step), which
is when Dynamo traces, the backend runs, and Inductor compiles forward and backward.
Baseline and candidate alternate (A B, B A, ...) so a slow phase of the machine hits both.

Each sample is timed twice: wall clock, and CPU time of this process plus its waited-for
children (`timing.cpu_seconds`; complete when Inductor's `compile_threads` is 1, since the
C++ compiler then runs as such a child). On a machine shared with other work, wall time
moves with their load; CPU time does not, and on an idle machine the two agree.

Inductor's own compile time varies by more than the audit costs, so the backend is also
timed from the inside (`timing.backend_overhead`): what it spends besides the hand-off to
Inductor is the audit's exact share, free of Inductor's noise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from models import make_batch, make_model, make_train_step
from table import Row, status
from timing import Samples, backend_overhead, cache_hits, cold_compile, cpu_seconds, fmt_time, synchronize

__all__ = ["measure_compile_time", "compile_rows", "warm_up", "AUDIT_OPTIONS", "RATIO_TARGET"]

AUDIT_OPTIONS = {"compiler": "inductor", "print": False}
RATIO_TARGET = 1.03


@dataclass
class CompileTimes:
    depth: int
    nodes: int = 0
    inductor_wall: Samples = field(default_factory=Samples)
    inductor_cpu: Samples = field(default_factory=Samples)
    audited_wall: Samples = field(default_factory=Samples)
    audited_cpu: Samples = field(default_factory=Samples)
    audit_wall: Samples = field(default_factory=Samples)  # the backend's own time, Inductor excluded
    audit_cpu: Samples = field(default_factory=Samples)
    cache_hits: int = 0


def _first_step(backend: str, options: dict | None, depth: int, width: int, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of a freshly built model's first compiled training step."""
    model = make_model(depth, width, device)
    x = make_batch(width, device=device)
    compiled = torch.compile(model, backend=backend, options=options)
    step = make_train_step(compiled, model, x)
    synchronize(device)
    wall, cpu = time.perf_counter(), cpu_seconds()
    step()
    synchronize(device)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def warm_up(device: torch.device) -> None:
    """Pay the once-per-process costs (imports, compiler start-up) before anything is timed."""
    for backend, options in (("inductor", None), ("inplace_audit", {"compiler": "eager", "print": False})):
        with cold_compile():
            _first_step(backend, options, depth=0, width=8, device=device)
    _audited_graphs().clear()


def _audited_graphs():
    from fxinplace.backend import inplace_audit

    return inplace_audit.graphs


def measure_compile_time(depth: int, width: int, device: torch.device, repeats: int) -> CompileTimes:
    result = CompileTimes(depth)
    for r in range(repeats):
        order = ("inductor", "inplace_audit") if r % 2 == 0 else ("inplace_audit", "inductor")
        for backend in order:
            hits = cache_hits()
            with cold_compile(), backend_overhead() as spent:
                options = AUDIT_OPTIONS if backend == "inplace_audit" else None
                wall, cpu = _first_step(backend, options, depth, width, device)
            result.cache_hits += cache_hits() - hits
            if backend == "inductor":
                result.inductor_wall.add(wall)
                result.inductor_cpu.add(cpu)
            else:
                result.audited_wall.add(wall)
                result.audited_cpu.add(cpu)
                result.audit_wall.add(spent["audit_wall"])
                result.audit_cpu.add(spent["audit_cpu"])
                graphs = _audited_graphs()
                result.nodes = sum(len(g.gm.graph.nodes) for g in graphs)
                graphs.clear()
            print(f"  [compile] depth {depth} {backend}: {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr, flush=True)
    return result


def compile_rows(times: CompileTimes, device: torch.device, clock: str) -> list[Row]:
    """Two rows per size; `clock` ("cpu" or "wall") is the one the targets are checked on."""
    model = f"depth {times.depth}, {times.nodes} nodes"
    ratio = {
        "wall": times.audited_wall.median / times.inductor_wall.median,
        "cpu": times.audited_cpu.median / times.inductor_cpu.median,
    }
    share = {
        "wall": times.audit_wall.median / times.inductor_wall.median,
        "cpu": times.audit_cpu.median / times.inductor_cpu.median,
    }
    other = "wall" if clock == "cpu" else "cpu"
    cold = "" if times.cache_hits == 0 else f" ({times.cache_hits} cache hits!)"
    return [
        Row(
            "1 compile",
            "time to first step, cold caches" + cold,
            model,
            device.type,
            f"inductor {times.inductor_wall} wall; {fmt_time(times.inductor_cpu.median)} CPU",
            f"audit+inductor {times.audited_wall} wall; {fmt_time(times.audited_cpu.median)} CPU",
            f"ratio {ratio[clock]:.3f} {clock} ({ratio[other]:.3f} {other}; cand/base)",
            f"<= {RATIO_TARGET}",
            status(ratio[clock], RATIO_TARGET, at_most=True),
            ratio[clock],
        ),
        Row(
            "1 compile",
            "audit's own time inside the backend",
            model,
            device.type,
            f"inductor {fmt_time(times.inductor_wall.median)} wall; {fmt_time(times.inductor_cpu.median)} CPU",
            f"audit {fmt_time(times.audit_wall.median)} wall; {fmt_time(times.audit_cpu.median)} CPU",
            f"+{share[clock]:.2%} {clock} (+{share[other]:.2%} {other}) -> ratio {1 + share[clock]:.3f}",
            f"<= {RATIO_TARGET}",
            status(1 + share[clock], RATIO_TARGET, at_most=True),
            1 + share[clock],
        ),
    ]
