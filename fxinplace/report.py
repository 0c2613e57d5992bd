"""The audit's report: one `GraphReport` of facts per graph, and `Report` over all of them.

The records are in `fxinplace.facts`; every word about them comes from `fxinplace.render`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from . import render
from .errors import FxInplaceError
from .facts import EagerReason, Hazard, Mutation, OutputRole, Severity, Site

__all__ = ["GraphReport", "Report", "HazardError", "SEVERITIES"]

SEVERITIES = tuple(s.value for s in Severity)


def severity_rank(severity: str | Severity) -> int:
    return Severity(severity).rank


@dataclass(frozen=True)
class GraphReport:
    compile_id: str
    function: str
    reason: str
    mutations: tuple[Mutation, ...] = ()
    task_names: tuple[str | None, ...] = ()  # one per graph output position; None: that output is no task
    outputs: tuple[OutputRole | None, ...] = ()  # what each output is to the user's code; () when Dynamo could not say
    shared: dict[str, frozenset[int]] = field(default_factory=dict)  # parameter -> positions of the tasks reading it
    hazards: tuple[Hazard, ...] = ()  # hazards not tied to a mutation node (e.g. tracing failures)
    analysis_error: str | None = None
    functionalized: bool = False
    compile_error: str | None = None  # the compiler failed on this graph: it never ran as audited
    # With `functionalize`, the graph (as rewritten) runs op by op in eager instead, and why
    ran_eagerly: EagerReason | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n in self.task_names if n is not None))

    @property
    def shared_parameters(self) -> dict[str, tuple[str, ...]]:
        """Parameter name -> the names of the tasks that read it (two or more)."""
        return {p: render.task_names(positions, self.task_names) for p, positions in self.shared.items()}

    def tasks_of(self, item: Mutation | Site | frozenset[int]) -> tuple[str, ...]:
        """The names (sorted) of the tasks of a mutation, a hazard's site, or output positions."""
        positions = item.site.tasks if isinstance(item, Mutation) else item.tasks if isinstance(item, Site) else item
        return render.task_names(positions, self.task_names)

    def message(self, hazard: Hazard) -> str:
        """`hazard` in words, with this graph's task names."""
        return render.message(hazard, self.task_names)

    def named(self, names: Sequence[str | None]) -> GraphReport:
        """The same facts with tasks renamed by output position (None keeps a name)."""
        renamed = tuple(new or old for old, new in zip(self.task_names, list(names) + [None] * len(self.task_names)))
        return dataclasses.replace(self, task_names=renamed)

    def all_hazards(self) -> list[Hazard]:
        return [h for m in self.mutations for h in m.hazards] + list(self.hazards)

    def to_dict(self) -> dict[str, Any]:
        return render.graph_dict(self)

    def render(self, compact: bool = False) -> str:
        """The table; `compact` leaves out the view chain, code and module columns."""
        return render.render_graph(self, compact)


@dataclass(frozen=True)
class Report:
    """Everything the audit learned, one `GraphReport` per graph Dynamo compiled."""

    graphs: tuple[GraphReport, ...] = ()

    @property
    def mutations(self) -> list[Mutation]:
        return [m for g in self.graphs for m in g.mutations]

    def hazards(self, min_severity: str = "info") -> list[Hazard]:
        rank = Severity(_check_severity(min_severity)).rank
        return [h for g in self.graphs for h in g.all_hazards() if h.severity.rank >= rank]

    def messages(self, min_severity: str = "info") -> list[str]:
        """Each hazard at or above `min_severity` in words, with its graph's task names."""
        rank = Severity(_check_severity(min_severity)).rank
        return [g.message(h) for g in self.graphs for h in g.all_hazards() if h.severity.rank >= rank]

    def graph_of(self, hazard: Hazard) -> GraphReport:
        return next(g for g in self.graphs if any(h is hazard for h in g.all_hazards()))

    def assert_no_hazards(self, min_severity: str = "error") -> None:
        """Raise `HazardError` listing every hazard at or above `min_severity`.

        Use it in your own test suite: ``fxinplace.audit(model, x).assert_no_hazards()``.
        """
        found = self.hazards(min_severity)
        if found:
            raise HazardError(self, found)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": render.SCHEMA_VERSION, "graphs": [g.to_dict() for g in self.graphs]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report `to_dict()` (or the parsed `to_json()`) describes; `ValueError` names a bad field."""
        from ._load import report_from_dict

        return report_from_dict(data)

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
        graphs = report.graphs if isinstance(report, Report) else (report,)
        for h in self.hazards:
            graph = next((g for g in graphs if any(x is h for x in g.all_hazards())), None)
            lines += render.hazard_lines([h], graph.task_names if graph else ())
        lines += ["", report.render(), "", _FIXES]
        super().__init__("\n".join(lines))


_FIXES = (
    "How to fix: rewrite the flagged line out of place (`h = h + y` instead of `h += y`, "
    "`F.relu(h)` instead of `h.relu_()`, `h = h.clone(); h[...] = v` for slice writes), or let "
    "fxinplace do it: torch.compile(model, backend=\"inplace_audit\", options={\"functionalize\": True})."
)


def _check_severity(severity: str) -> str:
    if severity not in SEVERITIES:
        raise ValueError(f"`min_severity` must be one of {', '.join(map(repr, SEVERITIES))}, got {severity!r}")
    return severity

