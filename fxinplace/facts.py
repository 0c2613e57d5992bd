"""What the audit found, as frozen records: no words here, `fxinplace.render` writes those.

A hazard is a code, a severity, the target written, the site that mutated it and (for the
saved-tensor hazards) the site that saved it and what it saved. A site names tasks by the
graph's output positions; the graph's report gives the positions their names, so naming a
task (`fxinplace.audit` uses the keys of the model's output dict) never re-runs an analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ._sources import SourceLocation

__all__ = [
    "Severity", "HazardCode", "Detail", "Fix", "Target", "Site", "Saved", "Hazard", "RewriteKind", "KeptReason",
    "Rewrite", "Mutation", "OutputKind", "OutputRole", "DEFAULT_SEVERITY", "FIX_OF", "FixKind", "FixStatus",
    "NoFixReason", "Patch",
]


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)

    def __str__(self) -> str:
        return self.value


class HazardCode(str, Enum):
    """What kind of hazard; docs/hazards.md explains each one."""

    SAVED_THEN_MUTATED = "saved-then-mutated"
    HIDDEN_WRITE_TO_SAVED = "hidden-write-to-saved"
    LEAF_INPLACE = "leaf-inplace"
    VIEW_INPLACE = "view-inplace"
    CROSS_TASK_WRITE = "cross-task-write"
    PARAMETER_WRITE = "parameter-write"
    INPUT_WRITE = "input-write"
    BUFFER_UPDATE = "buffer-update"
    SAFE_INPLACE = "safe-inplace"

    def __str__(self) -> str:
        return self.value


class Detail(str, Enum):
    """Which case of its code a hazard is, where the code has several."""

    CHECKPOINT_RECOMPUTE = "checkpoint-recompute"  # hidden: the write lands in a region checkpoint recomputes
    FUNCTION_FORWARD = "autograd-function-forward"  # hidden: inside a custom Function's forward, after it saved
    UNSEEN_PATH = "unseen-path"  # hidden: `.data`, a write the schema does not declare, ...
    CROSSED_BREAK = "crossed-break"  # saved by an earlier graph, written after the graph break
    NO_GRAD_COPY = "no-grad-copy"  # parameter-write to a parameter that requires no grad (EMA, momentum copy)
    REBIND = "rebind"  # parameter-write by `p.data = v`

    def __str__(self) -> str:
        return self.value


class Fix(str, Enum):
    """The kind of change that removes the hazard; `fxinplace.render` says it in words."""

    WRITE_OUT_OF_PLACE = "write-out-of-place"  # `h = h + y`, `x = x.relu()`, `inplace=False`, or a clone first
    NO_GRAD_UPDATE = "no-grad-update"  # a deliberate update of a leaf: wrap it in `torch.no_grad()`
    CLONE_THE_VIEW = "clone-the-view"  # a view autograd forbids writing: clone it first
    ORDER_THE_TASKS = "order-the-tasks"  # decide which task sees the write; write a copy for the others
    NONE = "none"  # nothing to fix: a note

    def __str__(self) -> str:
        return self.value


class FixKind(str, Enum):
    """The edit a checked fix makes (`fxinplace.fixes`)."""

    OUT_OF_PLACE = "out-of-place"  # `h += b` -> `h = h + b`, `x.relu_()` -> `x = x.relu()`, `torch.relu_(x)` -> `x = torch.relu(x)`
    INPLACE_FALSE = "inplace-false"  # `inplace=True` -> `inplace=False` (a functional call or a module's constructor)
    CLONE_FIRST = "clone-first"  # `h = h.clone()` before a slice assignment
    MOVE_STEP = "move-step"  # the guard's loop finding: `opt.step()` after the backward that needed the old weights

    def __str__(self) -> str:
        return self.value


class FixStatus(str, Enum):
    # The patched model audits clean and trains like the functionalized original; for `move-step`,
    # the patched loop runs watched with no finding, no failure and no new error or warning.
    CHECKED = "checked"
    NO_SAFE_EDIT = "no-safe-edit"  # `reason` says why
    CHECK_FAILED = "check-failed"  # an edit exists, but the patched model failed its check (`reason`)

    def __str__(self) -> str:
        return self.value


class NoFixReason(str, Enum):
    NO_SOURCE = "no-source"  # no line of the user's: the write is in torch's code, or the file is gone
    UNKNOWN_STATEMENT = "unknown-statement"  # not a statement we know how to rewrite safely (`out=`, an attribute)
    NOT_A_METHOD = "not-a-method"  # the line is in no method of the model's modules we can swap for the check
    NO_CONSTRUCTOR = "no-constructor"  # a module's `inplace=True`: no constructor call of ours makes it
    HAZARD_REMAINS = "hazard-remains"  # the patched model still has the hazard
    NEW_ERROR = "new-error"  # the patched model has another error-level hazard, or fails
    DIFFERENT_GRADIENTS = "different-gradients"  # outputs or gradients differ from the functionalized original
    # The guard's loop findings (`move-step`):
    NOT_A_STEP = "not-a-step"  # a write that is no optimizer step (a clip, an EMA, `.data`)
    SEVERAL_STEPS = "several-steps"  # several step statements wrote the tensor
    NOT_IN_SCRIPT = "not-in-script"  # the step or the backward is not in the script (the check runs the patched script)
    NOT_ONE_BLOCK = "not-one-block"  # the step and the backward are not statements of one block, step first
    MOVES_OVER = "moves-over"  # between them is more than backward calls and other objects' `zero_grad()`
    STEP_NOT_RUN = "step-not-run"  # the moved step never ran in the check
    NO_GRADIENT = "no-gradient"  # moved, the step would see no gradient
    LOSES_GRADIENTS = "loses-gradients"  # moved, the step would no longer take some backward's gradients (`detail`)
    NEW_WARNING = "new-warning"  # the patched script warns where the original did not (`detail`)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Patch:
    """A checked edit of the user's file that removes an error-level hazard, or why there is none."""

    status: FixStatus
    kind: FixKind | None = None
    file: str | None = None
    line: int | None = None
    diff: str = ""  # a unified diff of the user's file (CHECKED only)
    reason: NoFixReason | None = None  # for NO_SAFE_EDIT and CHECK_FAILED
    detail: str = ""  # for a failed check: what differed, or the error
    # MOVE_STEP: the backward calls whose gradients the moved step now also takes (none: the
    # same gradients as before, the step just runs later), as measured on the patched loop.
    gradients_from: tuple[SourceLocation, ...] = ()


# code -> (its default severity, the kind of change that removes it)
_BY_CODE = {
    HazardCode.SAVED_THEN_MUTATED: (Severity.ERROR, Fix.WRITE_OUT_OF_PLACE),
    HazardCode.HIDDEN_WRITE_TO_SAVED: (Severity.ERROR, Fix.WRITE_OUT_OF_PLACE),
    HazardCode.LEAF_INPLACE: (Severity.ERROR, Fix.NO_GRAD_UPDATE),
    HazardCode.VIEW_INPLACE: (Severity.ERROR, Fix.CLONE_THE_VIEW),
    HazardCode.CROSS_TASK_WRITE: (Severity.WARNING, Fix.ORDER_THE_TASKS),
    # info for a copy that requires no grad (`Detail.NO_GRAD_COPY`)
    HazardCode.PARAMETER_WRITE: (Severity.WARNING, Fix.NONE),
    HazardCode.INPUT_WRITE: (Severity.WARNING, Fix.NONE),
    HazardCode.BUFFER_UPDATE: (Severity.INFO, Fix.NONE),
    HazardCode.SAFE_INPLACE: (Severity.INFO, Fix.NONE),
}
DEFAULT_SEVERITY = {code: severity for code, (severity, _) in _BY_CODE.items()}
FIX_OF = {code: fix for code, (_, fix) in _BY_CODE.items()}


class OutputKind(str, Enum):
    """What a graph output is to the user's code; only a returned value can be a task's."""

    RETURNED = "returned"  # in the value the traced function returns
    LIVE = "live"  # the graph ends at a break: the code after it goes on with this value
    STORED = "stored"  # only stored as an attribute (`self.cache = t`): no loss comes from it here


@dataclass(frozen=True)
class OutputRole:
    kind: OutputKind
    path: str  # RETURNED: "" (the value), "seg" (a dict key), "[1]", "aux.depth"; LIVE: the local; STORED: the attribute


@dataclass(frozen=True)
class Target:
    """What a write really writes: the owner of the storage, through any chain of views."""

    kind: str  # "parameter" | "buffer" | "input" | "intermediate"
    name: str
    produced_by: str | None = None  # the op that made an intermediate
    aliases: tuple[str, ...] = ()  # the other names a parameter or buffer is registered under
    # An intermediate's name is Dynamo's node name: the user's variable when the user's code
    # made it (`h = torch.sigmoid(...)`), torch's (`input_1`) when a torch module did.
    user_named: bool = True

    def __str__(self) -> str:
        if self.kind == "intermediate":
            return f"{self.name} (output of {self.produced_by})"
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Site:
    """One op call in the user's program: as spelled, where, under which module, for which tasks."""

    op: str  # as the user spelled it: `add_`, `+=`, `relu(inplace=True)`
    source: SourceLocation | None = None
    module: str = ""
    tasks: frozenset[int] = frozenset()  # output positions; `GraphReport.task_names` names them
    graph: str | None = None  # the compile id, for a site in an earlier graph (across a break)
    hidden: bool = False  # the write is hidden from autograd (`.data`, an undeclared write)
    no_grad: bool = False  # ran under `torch.no_grad()`
    module_type: str = ""  # the class of `module` (`ReLU`): where a torch module's own code made the call


@dataclass(frozen=True)
class Saved:
    """A tensor saved for backward, named by the owner of its storage."""

    target: Target | None  # None: a tensor whose storage the trace could not follow
    made_at: Site | None = None  # where an intermediate was computed


@dataclass(frozen=True)
class Hazard:
    code: HazardCode
    severity: Severity
    target: Target | None = None  # what was written (None where tracing failed before a write)
    mutated_by: Site | None = None  # the op that wrote it: the user's line to look at
    saved_by: Site | None = None  # for the saved-tensor hazards: the op that saved it
    saved: tuple[Saved, ...] = ()  # ... and what it saved
    detail: Detail | None = None
    readers: tuple[tuple[str, Site], ...] = ()  # cross-task-write: ("before" | "after", a reader in another task)
    other_tasks: frozenset[int] = frozenset()  # cross-task-write: the tasks that read what this one writes
    pytorch_said: str | None = None  # the error PyTorch raised, for hazards found when tracing failed
    removed_by_rewrite: bool = False  # functionalize wrote the op out of place: the hazard is gone
    # Saved-tensor hazards: only tensors the forward stores and does not return (`self.attn = a`)
    # need the save; a backward fails only if a loss is computed from one of them (a warning).
    stored_only: bool = False
    # A checked edit for an error-level hazard, where one was asked for (`fxinplace.audit(...,
    # options={"fixes": True})`); None otherwise.
    patch: Patch | None = None

    @property
    def fix(self) -> Fix:
        return FIX_OF[self.code] if not self.removed_by_rewrite else Fix.NONE

    @property
    def source(self) -> SourceLocation | None:
        return self.mutated_by.source if self.mutated_by else None


class RewriteKind(str, Enum):
    """What `functionalize` did with a mutation."""

    REWRITTEN = "rewritten"  # an intermediate, written out of place
    WRITTEN_BACK = "written back"  # a parameter, buffer or input: out of place, then copied into it
    NOTHING_TO_WRITE_BACK = "nothing to write back"  # eager bumps the version and writes no value
    KEPT_IN_PLACE = "kept in place"  # the graph was compiled unchanged (`Rewrite.reason` says why)
    NOT_APPLIED = "not applied"  # the compiler failed: what runs is Dynamo's fallback

    def __str__(self) -> str:
        return self.value


class KeptReason(str, Enum):
    NO_ERROR_HAZARD = "no-error-hazard"  # option functionalize="hazards" on a graph without errors
    OWN_BACKWARD = "own-backward"  # a subgraph with a backward of its own (`Rewrite.detail`: its name)
    INSIDE_FUNCTION = "inside-function"  # a write in a custom Function's forward, kept whole (`detail`: its call)
    NO_ATEN_WRITE = "no-aten-write"
    SHARED_INPUT = "shared-input"  # a written input shares memory with another (`detail`: both names)
    UNTESTED_TORCH = "untested-torch"  # `detail`: the torch version
    FAILED = "failed"  # functionalize raised (`detail`: the exception type)

    def __str__(self) -> str:
        return self.value


class EagerReason(str, Enum):
    """Why `functionalize` ran a graph op by op in eager instead of compiling it."""

    COMPILER_FAILED = "compiler-failed"  # the compiler raised (`GraphReport.compile_error`)
    REFUSED_WHEN_RUN = "refused-when-run"  # AOTAutograd would fail when the graph runs
    SAVED_BETWEEN_GRAPHS = "saved-between-graphs"  # it writes what code Dynamo ran between graphs saved

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Rewrite:
    kind: RewriteKind
    reason: KeptReason | None = None  # for KEPT_IN_PLACE
    detail: tuple[str, ...] = ()  # names the reason refers to
    saved_earlier: bool = False  # WRITTEN_BACK into a tensor an earlier graph saved for backward
    checkpoints_inlined: bool = False  # the ATen trace inlined checkpoint regions (memory, not gradients)


@dataclass(frozen=True)
class Mutation:
    """One write to one target, with every hazard it causes."""

    node: str
    target: Target
    site: Site  # the op, the user's line, the module, the tasks that write or read it
    view_chain: tuple[str, ...] = ()
    shared: bool = False  # more than one task writes or reads what it writes
    hazards: tuple[Hazard, ...] = ()
    rewrite: Rewrite | None = None  # what `functionalize` did with it, when it ran
    read_by: frozenset[int] = frozenset()  # the tasks (output positions) whose ops read what it writes

    @property
    def op(self) -> str:
        return self.site.op

    @property
    def source(self) -> SourceLocation | None:
        return self.site.source

    @property
    def module(self) -> str:
        return self.site.module

    @property
    def autograd_visible(self) -> bool:
        return not self.site.hidden

    @property
    def under_no_grad(self) -> bool:
        return self.site.no_grad

    @property
    def severity(self) -> Severity | None:
        return max((h.severity for h in self.hazards), key=lambda s: s.rank, default=None)

    @property
    def removed(self) -> tuple[HazardCode, ...]:
        """The codes of the hazards `functionalize` removed by writing the op out of place."""
        return tuple(sorted({h.code for h in self.hazards if h.removed_by_rewrite}))
