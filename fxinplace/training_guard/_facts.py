"""What the guard found, as frozen facts: a stale saved tensor and the writes that changed it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .._sources import SourceLocation

__all__ = ["WriteKind", "GuardWrite", "StaleSavedTensor"]


class WriteKind(str, Enum):
    OPTIMIZER = "optimizer step"
    INPLACE = "in-place op"
    DATA = "write through .data"
    COMPILED = "write in a compiled graph"  # not seen run: named by the graph's audit (`inplace_audit`)


@dataclass(frozen=True)
class GuardWrite:
    """One write to a saved tensor's memory, made after it was saved.

    Not `fxinplace.passes.trace_mutations.Write` (a mutation in a graph): this one was seen
    at run time, by the training guard.
    """

    kind: WriteKind
    op: str  # "step", "clamp_", "__setitem__", "data ="
    by: str  # how the message names it: "`opt_d.step()` (Adam)", "in-place `clamp_`"
    source: SourceLocation | None
    optimizer: str | None = None


@dataclass(frozen=True)
class StaleSavedTensor:
    """A tensor autograd saved that had changed by the time a backward needed it."""

    tensor: str  # in words: "parameter `disc.2.weight`", "tensor [8, 16] saved by `sigmoid`"
    name: str | None  # qualified name of the parameter / buffer it is (or views), if any
    shape: tuple[int, ...]
    op: str | None  # the forward op that saved it; None where the guard did not see it run
    node: str | None  # the backward node that needed it, e.g. "AddmmBackward0"
    saved_at: SourceLocation | None
    saved_for: str | None  # the task active (`guard.task`) when it was saved
    version_saved: int
    version_now: int
    writes: tuple[GuardWrite, ...]  # the writes the guard saw after the save, oldest first
    needed_for: str | None  # the task whose backward needed it
    backward: str | None  # "backward" or "autograd.grad"
    backward_at: SourceLocation | None
    hidden: bool  # changed although its version counter did not move (`.data`)
    called_at: SourceLocation | None = None  # the loop's line that called the model whose forward saved it
    by_value: bool = False  # found by the value check (`check_values=True`): its values changed, not its version
    # False: found by PyTorch's own version check on an entry the guard's hooks did not watch
    # (`check="fast"` / `"sampled"`): the saving op's line and writes other than optimizer steps are unknown.
    watched: bool = True
    steps_logged: bool = True  # unwatched: whether the optimizer steps were logged (`check="fast"`) or not
    # Unwatched: the op's line (and the loop's line) that the watched entries saw save this
    # parameter or buffer for this node; not checked on this entry, whose loop may differ.
    seen_saved_at: SourceLocation | None = None
    seen_called_at: SourceLocation | None = None

    @property
    def changed_at(self) -> SourceLocation | None:
        return self.writes[0].source if self.writes else None
