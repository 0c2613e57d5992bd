"""The facts the audit found, as frozen dataclasses, and their renderings (table, dict, JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from tabulate import tabulate

from ._sources import SourceLocation
from .errors import FxInplaceError
from .passes.resolve_aliases import Target

__all__ = ["Hazard", "Mutation", "GraphReport", "Report", "HazardError", "SEVERITIES"]

SEVERITIES = ("info", "warning", "error")


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class Hazard:
    code: str
    severity: str  # "error" | "warning" | "info"
    message: str
    source: SourceLocation | None = None  # the user's line to look at

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "message": self.message, "source": _source_dict(self.source)}


@dataclass(frozen=True)
class Mutation:
    node: str
    op: str
    target: Target
    view_chain: tuple[str, ...]
    source: SourceLocation | None
    module: str
    tasks: tuple[str, ...] = ()
    shared: bool = False
    autograd_visible: bool = True  # False for `.data` writes and writes schemas hide
    under_no_grad: bool = False
    hazards: tuple[Hazard, ...] = ()
    rewrite: str | None = None  # what `functionalize` did with it, when it ran

    @property
    def severity(self) -> str | None:
        return max((h.severity for h in self.hazards), key=severity_rank, default=None)

    def to_dict(self) -> dict[str, Any]:
        target = {"kind": self.target.kind, "name": self.target.name}
        if self.target.produced_by:
            target["produced_by"] = self.target.produced_by
        if self.target.aliases:
            target["aliases"] = list(self.target.aliases)
        return {
            "node": self.node,
            "op": self.op,
            "target": target,
            "view_chain": list(self.view_chain),
            "source": _source_dict(self.source),
            "module": self.module,
            "tasks": list(self.tasks),
            "shared": self.shared,
            "autograd_visible": self.autograd_visible,
            "under_no_grad": self.under_no_grad,
            "hazards": [h.to_dict() for h in self.hazards],
            "rewrite": self.rewrite,
        }


@dataclass(frozen=True)
class GraphReport:
    compile_id: str
    function: str
    reason: str
    mutations: tuple[Mutation, ...] = ()
    tasks: tuple[str, ...] = ()
    shared_parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hazards: tuple[Hazard, ...] = ()  # hazards not tied to a mutation node (e.g. tracing failures)
    analysis_error: str | None = None
    functionalized: bool = False
    compile_error: str | None = None  # the compiler failed on this graph: it never ran as audited

    def all_hazards(self) -> list[Hazard]:
        return [h for m in self.mutations for h in m.hazards] + list(self.hazards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "compile_id": self.compile_id,
            "function": self.function,
            "reason": self.reason,
            "tasks": list(self.tasks),
            "shared_parameters": {k: list(v) for k, v in self.shared_parameters.items()},
            "mutations": [m.to_dict() for m in self.mutations],
            "hazards": [h.to_dict() for h in self.hazards],
            "analysis_error": self.analysis_error,
            "functionalized": self.functionalized,
            "compile_error": self.compile_error,
        }

    def render(self, compact: bool = False) -> str:
        """The table; `compact` leaves out the view chain, code and module columns."""
        head = f"fxinplace: graph {self.compile_id} `{self.function}` (graph ended: {self.reason})"
        if self.analysis_error:
            return f"{head}: analysis failed ({self.analysis_error}); compiled without it"
        lines = [head]
        if self.compile_error:
            lines.append(f"not compiled: the compiler failed ({self.compile_error}); what runs instead is "
                         "Dynamo's fallback, with the in-place writes as written")
        if self.tasks:
            lines.append("tasks: " + ", ".join(self.tasks))
        if self.shared_parameters:
            shared = "; ".join(f"{p} ({', '.join(t)})" for p, t in self.shared_parameters.items())
            lines.append("shared parameters: " + shared)
        if not self.mutations:
            lines.append("no in-place mutations")
        else:
            headers = ["#", "op", "writes", "via", "where", "code", "module", "tasks", "hazard"]
            if self.functionalized:
                headers.append("rewrite")
            rows = []
            for i, m in enumerate(self.mutations):
                flags = [] if m.autograd_visible else ["hidden"]
                also = f" (also {', '.join(m.target.aliases)})" if m.target.aliases else ""
                if m.under_no_grad:
                    flags.append("no_grad")
                row = [
                    i,
                    m.op + (f" [{', '.join(flags)}]" if flags else ""),
                    f"{m.target.kind} {m.target.name}{also}",
                    " > ".join(m.view_chain) or "-",
                    str(m.source) if m.source else "?",
                    m.source.code if m.source else "",
                    m.module or "-",
                    ", ".join(m.tasks) + (" (shared)" if m.shared else "") if m.tasks else "-",
                    ", ".join(sorted({h.code for h in m.hazards}, key=lambda c: c)) or "-",
                ]
                if self.functionalized:
                    row.append(m.rewrite or "-")
                rows.append(row)
            if compact:
                keep = [i for i, h in enumerate(headers) if h not in ("via", "code", "module")]
                headers, rows = [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]
            lines.append(tabulate(rows, headers=headers, tablefmt="simple"))
        notable = [h for h in self.all_hazards() if h.severity != "info"]
        for h in notable:
            lines.append(f"  {h.severity.upper()} [{h.code}] {h.message}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """Everything the audit learned, one `GraphReport` per graph Dynamo compiled."""

    graphs: tuple[GraphReport, ...] = ()

    @property
    def mutations(self) -> list[Mutation]:
        return [m for g in self.graphs for m in g.mutations]

    def hazards(self, min_severity: str = "info") -> list[Hazard]:
        rank = severity_rank(_check_severity(min_severity))
        return [h for g in self.graphs for h in g.all_hazards() if severity_rank(h.severity) >= rank]

    def assert_no_hazards(self, min_severity: str = "error") -> None:
        """Raise `HazardError` listing every hazard at or above `min_severity`.

        Use it in your own test suite: ``fxinplace.audit(model, x).assert_no_hazards()``.
        """
        found = self.hazards(min_severity)
        if found:
            raise HazardError(self, found)

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "graphs": [g.to_dict() for g in self.graphs]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def render(self, compact: bool = False) -> str:
        return "\n\n".join(g.render(compact) for g in self.graphs)

    def __str__(self) -> str:
        return self.render()


class HazardError(FxInplaceError):
    """In-place hazards that will break (or silently corrupt) training, with the table."""

    def __init__(self, report: Report | GraphReport, hazards: Iterable[Hazard], cause: str | None = None):
        self.report = report
        self.hazards = list(hazards)
        lines = [cause or f"fxinplace found {len(self.hazards)} in-place hazard(s):"]
        for h in self.hazards:
            lines.append(f"  {h.severity.upper()} [{h.code}] {h.message}")
        lines += ["", report.render(), "", _FIXES]
        super().__init__("\n".join(lines))


_FIXES = (
    "How to fix: rewrite the flagged line out of place (`h = h + y` instead of `h += y`, "
    "`F.relu(h)` instead of `h.relu_()`, `h = h.clone(); h[...] = v` for slice writes), or let "
    "fxinplace do it: torch.compile(model, backend=\"inplace_audit\", options={\"functionalize\": True})."
)


def _source_dict(source: SourceLocation | None) -> dict[str, Any] | None:
    if source is None:
        return None
    return {"file": source.file, "line": source.line, "code": source.code}


def _check_severity(severity: str) -> str:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(map(repr, SEVERITIES))}, got {severity!r}")
    return severity

