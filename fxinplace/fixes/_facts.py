"""A proposed fix: the `Patch` the report records, with what `apply()` needs to write it.

The kinds, statuses and reasons are `fxinplace.facts` records; the words are in `fxinplace.render`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._sources import SourceLocation
from ..facts import FixKind, FixStatus, Hazard, NoFixReason, Patch
from ..training_guard import StaleSavedTensor

__all__ = ["FixKind", "FixStatus", "NoFixReason", "ProposedFix"]


@dataclass(frozen=True)
class ProposedFix:
    """One entry of `FixReport`: the `Patch` (what the report records on each hazard it is for)
    and what `apply()` needs to write it."""

    hazard: Hazard | None  # None for the guard's loop findings (`findings`)
    patch: Patch
    patched_source: str | None = None  # the whole file, patched (what `--apply` writes)
    # How to redo the edit on a text where other fixes already landed (`FixReport.apply`):
    # ("statement", line), ("constructor", first line, last line, module class name) or
    # ("move", step line, backward line).
    edit: tuple = ()
    task_names: tuple[str | None, ...] = ()  # the graph's, to word the hazard
    also: tuple[Hazard, ...] = ()  # the other error-level hazards of the same write (saved by another op)
    findings: tuple[StaleSavedTensor, ...] = ()  # the guard's findings a `move-step` fix is for

    @classmethod
    def of(cls, hazard: Hazard | None, status: FixStatus, kind: FixKind | None = None, file: str | None = None,
           line: int | None = None, diff: str = "", patched_source: str | None = None,
           reason: NoFixReason | None = None, detail: str = "", edit: tuple = (),
           findings: tuple[StaleSavedTensor, ...] = (), gradients_from: tuple[SourceLocation, ...] = ()) -> ProposedFix:
        patch = Patch(status, kind, file, line, diff if status is FixStatus.CHECKED else "", reason, detail,
                      gradients_from)
        return cls(hazard, patch, patched_source, edit, findings=findings)

    def failed(self, reason: NoFixReason, detail: str = "") -> ProposedFix:
        """The same edit, its check failed (the diff is no longer shown)."""
        patch = dataclasses.replace(self.patch, status=FixStatus.CHECK_FAILED, diff="", reason=reason, detail=detail)
        return dataclasses.replace(self, patch=patch)

    # The patch's facts, read through the entry.
    status = property(lambda self: self.patch.status)
    kind = property(lambda self: self.patch.kind)
    file = property(lambda self: self.patch.file)
    line = property(lambda self: self.patch.line)
    diff = property(lambda self: self.patch.diff)
    reason = property(lambda self: self.patch.reason)
    detail = property(lambda self: self.patch.detail)
    gradients_from = property(lambda self: self.patch.gradients_from)
