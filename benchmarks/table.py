"""The benchmark's one table: measured figures beside their targets, PASS or MISS."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tabulate import tabulate

__all__ = ["Row", "status", "render"]

HEADERS = ["#", "measure", "model", "device", "baseline", "candidate", "result", "target", "status"]


@dataclass(frozen=True)
class Row:
    section: str  # "1 compile", "2 step", ...
    measure: str
    model: str
    device: str
    baseline: str
    candidate: str
    result: str
    target: str = "—"
    status: str = "info"  # PASS / MISS / info / n/a
    value: float | None = None  # the number the target is checked on, for --json

    def as_dict(self) -> dict:
        return asdict(self)


def status(value: float, target: float, at_most: bool) -> str:
    if value != value:  # NaN
        return "n/a"
    ok = value <= target if at_most else value >= target
    return "PASS" if ok else "MISS"


def render(rows: list[Row], fmt: str = "simple_grid") -> str:
    body = [[r.section, r.measure, r.model, r.device, r.baseline, r.candidate, r.result, r.target, r.status] for r in rows]
    return tabulate(body, headers=HEADERS, tablefmt=fmt, disable_numparse=True)
