"""What a fix is, as records: the words are in `_render`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..facts import Hazard

__all__ = ["FixKind", "FixStatus", "NoFixReason", "ProposedFix"]


class FixKind(str, Enum):
    OUT_OF_PLACE = "out-of-place"  # `h += b` -> `h = h + b`, `x.relu_()` -> `x = x.relu()`, `torch.relu_(x)` -> `x = torch.relu(x)`
    INPLACE_FALSE = "inplace-false"  # `inplace=True` -> `inplace=False` (a functional call or a module's constructor)
    CLONE_FIRST = "clone-first"  # `h = h.clone()` before a slice assignment


class FixStatus(str, Enum):
    CHECKED = "checked"  # the patched model audits clean and trains like the functionalized original
    NO_SAFE_EDIT = "no-safe-edit"  # `reason` says why
    CHECK_FAILED = "check-failed"  # an edit exists, but the patched model failed its check (`reason`)


class NoFixReason(str, Enum):
    NO_SOURCE = "no-source"  # no line of the user's: the write is in torch's code, or the file is gone
    UNKNOWN_STATEMENT = "unknown-statement"  # not a statement we know how to rewrite safely (`out=`, an attribute)
    NOT_A_METHOD = "not-a-method"  # the line is in no method of the model's modules we can swap for the check
    NO_CONSTRUCTOR = "no-constructor"  # a module's `inplace=True`: no constructor call of ours makes it
    HAZARD_REMAINS = "hazard-remains"  # the patched model still has the hazard
    NEW_ERROR = "new-error"  # the patched model has another error-level hazard, or fails
    DIFFERENT_GRADIENTS = "different-gradients"  # outputs or gradients differ from the functionalized original


@dataclass(frozen=True)
class ProposedFix:
    hazard: Hazard
    status: FixStatus
    kind: FixKind | None = None
    file: str | None = None
    line: int | None = None
    diff: str = ""  # a unified diff of the user's file
    patched_source: str | None = None  # the whole file, patched (what `--apply` writes)
    reason: NoFixReason | None = None
    detail: str = ""  # for a failed check: what differed, or the error
    # How to redo the edit on a text where other fixes already landed (`FixReport.apply`):
    # ("statement", line) or ("constructor", first line, last line, module class name).
    edit: tuple = ()
    task_names: tuple[str | None, ...] = ()  # the graph's, to word the hazard
    also: tuple[Hazard, ...] = ()  # the other error-level hazards of the same write (saved by another op)
