"""Section 3: the audit's own cost against graph size, with no Inductor in the way.

For each size, a recording backend captures the Dynamo graph (and Dynamo's fake mode) on a
fresh `torch._dynamo.reset()`; the time to that first result is Dynamo's tracing time, as
`backend="eager"` would see it (the recorder returns `gm.forward`, as "eager" does). Then
the audit's two stages are timed on the captured graph, as the backend runs them:
`trace_mutations` (the fake run under saved-tensor hooks) and `analyze` (task split,
hazards). A log-log least-squares fit of audit time against node count gives the slope.

Both Dynamo and the audit are single-threaded Python in this process, so both are timed
in process CPU time (`time.process_time`): on a shared machine wall time also counts the
time other processes held the cores, which says nothing about the audit.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field

import torch

from models import make_batch, make_model
from table import Row, status
from timing import Samples, fmt_time, loglog_slope, synchronize

__all__ = ["measure_scaling", "scaling_rows", "SLOPE_TARGET", "SHARE_TARGET"]

SLOPE_TARGET = 1.1
SHARE_TARGET = 0.25


@dataclass
class ScalingPoint:
    depth: int
    nodes: int
    dynamo: float  # seconds to the first result with a recording ("eager") backend
    fake_run: Samples = field(default_factory=Samples)
    analysis: Samples = field(default_factory=Samples)
    total: Samples = field(default_factory=Samples)


def _capture(depth: int, width: int, device: torch.device) -> tuple[float, dict]:
    from fxinplace.backend import graph_identity

    torch._dynamo.reset()
    gc.collect()
    model = make_model(depth, width, device)
    x = make_batch(width, device=device)
    captured: dict = {}

    def record(gm, example_inputs, **kwargs):
        if "gm" in captured:
            raise AssertionError(f"depth {depth}: expected one graph, Dynamo made several (graph break)")
        captured.update(gm=gm, inputs=example_inputs, identity=graph_identity(gm),
                        fake_mode=torch._guards.detect_fake_mode(example_inputs))
        return gm.forward

    compiled = torch.compile(model, backend=record)
    synchronize(device)
    start = time.process_time()
    compiled(x)
    synchronize(device)
    return time.process_time() - start, captured


def measure_scaling(depth: int, width: int, device: torch.device, repeats: int) -> ScalingPoint:
    from fxinplace.backend import analyze
    from fxinplace.options import AuditOptions
    from fxinplace.passes.trace_mutations import trace_mutations

    dynamo, captured = _capture(depth, width, device)
    gm = captured["gm"]
    point = ScalingPoint(depth, len(gm.graph.nodes), dynamo)
    options = AuditOptions(print=False)
    for _ in range(repeats):
        gc.collect()
        start = time.process_time()
        trace = trace_mutations(gm, captured["inputs"], captured["fake_mode"])
        middle = time.process_time()
        analyze(gm, trace, captured["identity"], options)
        end = time.process_time()
        point.fake_run.add(middle - start)
        point.analysis.add(end - middle)
        point.total.add(end - start)
        del trace
    print(f"  [scaling] depth {depth}: {point.nodes} nodes, dynamo {dynamo:.2f} s CPU, audit {point.total} CPU",
          file=sys.stderr, flush=True)
    torch._dynamo.reset()
    return point


def scaling_rows(points: list[ScalingPoint], device: torch.device) -> list[Row]:
    rows = []
    for p in points:
        share = p.total.median / p.dynamo
        rows.append(Row(
            "3 scaling", "audit alone vs Dynamo tracing (CPU time)", f"depth {p.depth}, {p.nodes} nodes", device.type,
            f"dynamo {fmt_time(p.dynamo)}",
            f"audit {p.total} = fake run {fmt_time(p.fake_run.median)} + analysis {fmt_time(p.analysis.median)}",
            f"{share:.3f} x dynamo; {p.total.median / p.nodes * 1e6:.0f} µs/node",
            f"<= {SHARE_TARGET} x dynamo", status(share, SHARE_TARGET, at_most=True), share,
        ))
    if len(points) >= 2:
        rows.append(_slope_row(points, "log-log slope of audit CPU time vs nodes, all sizes", device))
    if len(points) >= 3:
        # Fixed costs flatten the fit over small graphs; the two largest show the asymptote.
        rows.append(_slope_row(sorted(points, key=lambda p: p.nodes)[-2:], "same, two largest sizes only", device))
    return rows


def _slope_row(points: list[ScalingPoint], measure: str, device: torch.device) -> Row:
    nodes = [p.nodes for p in points]

    def fit(values: list[float]) -> float:
        return loglog_slope(nodes, values)

    slope = fit([p.total.median for p in points])
    parts = f"fake run {fit([p.fake_run.median for p in points]):.2f}, analysis {fit([p.analysis.median for p in points]):.2f}"
    return Row(
        "3 scaling", measure, f"{min(nodes)}–{max(nodes)} nodes", device.type,
        f"dynamo slope {fit([p.dynamo for p in points]):.2f}", parts,
        f"slope {slope:.2f}", f"<= {SLOPE_TARGET}", status(slope, SLOPE_TARGET, at_most=True), slope,
    )
