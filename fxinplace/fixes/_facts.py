"""A proposed fix: the `Patch` the report records, with what `apply()` needs to write it.

The kinds, statuses and reasons are `fxinplace.facts` records; the words are in `fxinplace.render`."""

from __future__ import annotations

from dataclasses import dataclass

from .._sources import SourceLocation
from ..facts import FixKind, FixStatus, Hazard, NoFixReason, Patch
from ..training_guard import StaleSavedTensor

__all__ = ["FixKind", "FixStatus", "NoFixReason", "ProposedFix"]


@dataclass(frozen=True)
class ProposedFix:
    hazard: Hazard | None  # None for the guard's loop findings (`findings`)
    status: FixStatus
    kind: FixKind | None = None
    file: str | None = None
    line: int | None = None
    diff: str = ""  # a unified diff of the user's file
    patched_source: str | None = None  # the whole file, patched (what `--apply` writes)
    reason: NoFixReason | None = None
    detail: str = ""  # for a failed check: what differed, or the error
    # How to redo the edit on a text where other fixes already landed (`FixReport.apply`):
    # ("statement", line), ("constructor", first line, last line, module class name) or
    # ("move", step line, backward line).
    edit: tuple = ()
    task_names: tuple[str | None, ...] = ()  # the graph's, to word the hazard
    also: tuple[Hazard, ...] = ()  # the other error-level hazards of the same write (saved by another op)
    findings: tuple[StaleSavedTensor, ...] = ()  # the guard's findings a `move-step` fix is for
    gradients_from: tuple[SourceLocation, ...] = ()  # `Patch.gradients_from`

    @property
    def patch(self) -> Patch:
        """The fix as the report records it on each hazard it is for."""
        return Patch(self.status, self.kind, self.file, self.line, self.diff if self.status is FixStatus.CHECKED else "",
                     self.reason, self.detail, self.gradients_from)
