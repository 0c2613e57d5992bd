"""Section 2: steady-state training step time once compiled, audit against Inductor alone.

The audit runs at compile time and hands Inductor the graph unchanged, so the compiled
step should cost the same; with `functionalize` the graph Inductor gets is rewritten out of
place, which may cost a little. Ratio = baseline time / candidate time, taken round by
round over interleaved blocks of steps (`timing.paired_ratio`), median over rounds: 1.0 is
equal, 0.99 means the candidate is 1% slower.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from compile_time import AUDIT_OPTIONS
from models import make_batch, make_model, make_train_step
from table import Row, status
from timing import StepTimes, interleaved_steps, paired_ratio

__all__ = ["measure_step_time", "step_rows", "VARIANTS", "WARMUP_STEPS"]

WARMUP_STEPS = 3

# name -> (backend, options, target ratio baseline/candidate)
VARIANTS: dict[str, tuple[str, dict | None, float | None]] = {
    "inductor": ("inductor", None, None),
    "audit+inductor": ("inplace_audit", AUDIT_OPTIONS, 0.99),
    "audit+functionalize+inductor": ("inplace_audit", {**AUDIT_OPTIONS, "functionalize": True}, 0.95),
}


def _compiled_step(backend: str, options: dict | None, depth: int, width: int, device: torch.device) -> Callable:
    model = make_model(depth, width, device)
    x = make_batch(width, device=device)
    step = make_train_step(torch.compile(model, backend=backend, options=options), model, x)
    for _ in range(WARMUP_STEPS):  # the first call compiles; the next ones must not recompile
        step()
    return step


def measure_step_time(
    depth: int, width: int, device: torch.device, rounds: int, per_round: int
) -> tuple[dict[str, StepTimes], dict[str, str]]:
    """Median step times per variant; variants that failed to compile map to their error."""
    torch._dynamo.reset()
    steps, failed = {}, {}
    for name, (backend, options, _) in VARIANTS.items():
        try:
            steps[name] = _compiled_step(backend, options, depth, width, device)
        except Exception as e:  # functionalize may not exist yet: report it, keep measuring
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:80]
        print(f"  [step] compiled {name}" + (f" FAILED {failed[name]}" if name in failed else ""),
              file=sys.stderr, flush=True)
    times = interleaved_steps(steps, device, rounds, per_round)
    from fxinplace.backend import inplace_audit

    inplace_audit.graphs.clear()
    torch._dynamo.reset()
    return times, failed


def step_rows(depth: int, times: dict[str, StepTimes], failed: dict[str, str], device: torch.device) -> list[Row]:
    rows = []
    base = times.get("inductor")
    for name, (_, options, target) in VARIANTS.items():
        if target is None:
            continue
        label = "functionalize=True" if options and options.get("functionalize") else "audit only"
        measure = f"step time (fwd+bwd+SGD), {label}"
        model = f"depth {depth}"
        if base is None or name not in times:
            reason = "functionalize not available" if "functionalize" in name else "compile failed"
            detail = failed.get(name) or failed.get("inductor", "")
            rows.append(Row("2 step", measure, model, device.type, f"inductor {base or 'n/a'}",
                            f"{name}: {detail}", f"n/a ({reason})", f">= {target}", "n/a"))
            continue
        ratio = paired_ratio(base, times[name])
        rows.append(Row(
            "2 step", measure, model, device.type, f"inductor {base}", f"{name} {times[name]}",
            f"ratio {ratio:.3f} (base/cand, paired)", f">= {target}", status(ratio, target, at_most=False), ratio,
        ))
    return rows
