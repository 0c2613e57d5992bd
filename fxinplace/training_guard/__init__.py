"""A training-loop guard: catch a saved tensor that changed before the backward that needs it.

The in-place error multi-task and GAN loops hit most often is not in the forward graph: a loop
builds several losses, runs one backward (or `torch.autograd.grad` per task), then an
`optimizer.step()`, a weight clip, an EMA update or a `.data` write changes a parameter that
another loss's graph saved, and the next backward fails naming nothing ("one of the variables
needed for gradient computation has been modified by an inplace operation"), or, for `.data`,
silently computes gradients from the new values. A compile backend sees one forward graph and
cannot see this; this guard watches the loop at run time::

    g = guard({"gen": G, "disc": D}, optimizers={"opt_g": opt_g, "opt_d": opt_d})
    with g:
        fake = G(z)
        loss_d = bce(D(real), ones) + bce(D(fake.detach()), zeros)
        loss_g = bce(D(fake), ones)           # saves D's weights
        g.losses({"disc": loss_d, "gen": loss_g})
        loss_d.backward()
        opt_d.step()                          # changes them
        loss_g.backward()   # StaleSavedTensorError: ... view of parameter `disc.2.weight` ...
                            #   changed by: `opt_d.step()` (Adam) at train.py:41 ...

How it works, in three parts that stay out of each other's way:

- `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd saves. The pack hook
  records the tensor's `_version`, the op that saved it, the user's line and the task; the
  unpack hook compares the version when backward needs the tensor and raises
  `StaleSavedTensorError` there. With pack hooks installed autograd skips its own version
  check, so this comparison is what keeps the gradients honest.
- A `TorchFunctionMode` names the op being run (for the pack hook), records the line of every
  in-place op (names ending in ``_``, ``__setitem__`` / ``__iadd__``..., ``out=``,
  ``inplace=True``), the line and loss of every `backward` / `autograd.grad` call, and
  `.data` reads and writes. It steps off the stack while the given models run forward, while
  an optimizer steps and while a given optimizer's `zero_grad` runs: their ops need no
  attention, and each would cost a Python call.
- Global optimizer step pre/post hooks attribute version bumps to ``opt.step()`` and the
  parameter it moved.

What is detected: any write that moves the version counter of a saved tensor (optimizer steps,
in-place ops under `no_grad` or not, on the tensor or a view of it), whoever made it; and
writes through `.data` made by Python code under the guard: ``p.data.clamp_()``,
``p.data[...] = v``, ``p.data.copy_(v)``, ``p.data = t`` (when ``p`` itself was saved).
What is not: `.data` writes inside compiled code, inside the given models' forward,
``optimizer.step()`` or ``zero_grad()``, in C++ extensions or through ``numpy()`` / DLPack
aliases; saved tensors of regions that install their own saved-tensor hooks
(`torch.utils.checkpoint`, activation offloading), which take precedence over the guard's.
Who made a write is named when the guard saw it (eager Python code, optimizer steps); a write
made by compiled kernels is still detected, but attributed to nobody.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import linecache
import logging
import operator
import re
import sys
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from types import CodeType, FrameType, TracebackType
from typing import Any, Literal, NamedTuple, TypeVar

import torch
from tabulate import tabulate
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.overrides import TorchFunctionMode

from ._sources import SourceLocation, is_internal_file, known_internal_files
from .errors import FxInplaceError, FxInplaceWarning

__all__ = [
    "guard",
    "StaleSavedTensor",
    "StaleSavedTensorError",
    "StaleSavedTensorWarning",
    "Write",
    "WriteKind",
    "render_table",
]

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

# One clock for saves and writes: a write changes a saved tensor only if it came after the save.
_clock = itertools.count()
_next_seq = _clock.__next__

# Bounded logs: a write only matters while a graph saved before it is alive, i.e. for a step or
# two; the bounds keep a long run from growing them.
_MAX_WRITES = 4096
_MAX_DATA_ALIASES = 4096


# --------------------------------------------------------------------------------------------
# Facts


class WriteKind(str, Enum):
    OPTIMIZER = "optimizer step"
    INPLACE = "in-place op"
    DATA = "write through .data"


@dataclass(frozen=True)
class Write:
    """One write to a saved tensor's memory, made after it was saved."""

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
    writes: tuple[Write, ...]  # the writes the guard saw after the save, oldest first
    needed_for: str | None  # the task whose backward needed it
    backward: str | None  # "backward" or "autograd.grad"
    backward_at: SourceLocation | None
    hidden: bool  # changed although its version counter did not move (`.data`)

    @property
    def changed_at(self) -> SourceLocation | None:
        return self.writes[0].source if self.writes else None


class StaleSavedTensorError(FxInplaceError):
    """A backward needed a saved tensor that had been changed since it was saved.

    ``.stale`` holds the facts as a `StaleSavedTensor`.
    """

    def __init__(self, stale: StaleSavedTensor) -> None:
        self.stale = stale
        super().__init__(_explain(stale))


class StaleSavedTensorWarning(FxInplaceWarning):
    """`guard(on_stale="warn")`: the same finding as `StaleSavedTensorError`, not raised."""


# --------------------------------------------------------------------------------------------
# Rendering


def _explain(stale: StaleSavedTensor) -> str:
    """The error message: what changed, who saved it and for what, who changed it, the fix."""
    s = stale
    if s.hidden:
        head = (
            f"fxinplace.guard: {s.tensor} was written through `.data` after autograd "
            f"saved it; its version counter did not move (version {s.version_now}), so PyTorch "
            "would not have noticed and would have computed gradients from the new values."
        )
    else:
        head = (
            "fxinplace.guard: one of the variables needed for gradient computation has been "
            f"modified by an inplace operation: {s.tensor} is at version "
            f"{s.version_now}; expected version {s.version_saved} instead."
        )
    lines = [head]
    saved = f"`{s.op}`" if s.op else _compiled_or_unknown(s.node)
    lines.append(f"  saved by:   {saved} at {_where(s.saved_at)}{_task(s.saved_for)}")
    if s.writes:
        for w in s.writes:
            lines.append(f"  changed by: {w.by} at {_where(w.source)}")
    else:
        lines.append(
            "  changed by: code the guard did not see (compiled kernels, a C++ extension, "
            "another thread, or code run outside the guard)"
        )
    call = f"`{s.backward}`" if s.backward else "a backward"
    node = f"{s.node} in " if s.node else ""
    lines.append(f"  needed by:  {node}{call} at {_where(s.backward_at)}{_task(s.needed_for)}")
    lines.append("How to fix: " + _fix(s))
    return "\n".join(lines)


def render_table(found: Sequence[StaleSavedTensor]) -> str:
    """The findings as a table, in the style of the backend's mutation tables."""
    if not found:
        return "fxinplace.guard: no stale saved tensors"
    headers = ["#", "tensor", "saved by", "saved at", "changed by", "changed at", "needed by",
               "backward at", "task", "version"]
    rows = []
    for i, s in enumerate(found):
        first = s.writes[0] if s.writes else None
        tasks = [t for t in (s.saved_for, s.needed_for) if t]
        rows.append([
            i,
            f"`{s.name}`" if s.name else f"{list(s.shape)} tensor",
            s.op or _compiled_or_unknown(s.node),
            str(s.saved_at) if s.saved_at else "?",
            (first.by + (f" (+{len(s.writes) - 1})" if len(s.writes) > 1 else "")) if first else "?",
            str(first.source) if first and first.source else "?",
            s.node or "?",
            str(s.backward_at) if s.backward_at else "?",
            " > ".join(dict.fromkeys(tasks)) or "-",
            f"{s.version_now} (.data)" if s.hidden else f"{s.version_saved} -> {s.version_now}",
        ])
    n = len(found)
    head = f"fxinplace.guard: {n} stale saved tensor{'s' if n != 1 else ''}"
    return head + "\n" + tabulate(rows, headers=headers, tablefmt="simple")


def _fix(s: StaleSavedTensor) -> str:
    target = f"`{s.name}`" if s.name else "the saved tensor"
    w = s.writes[0] if s.writes else None
    if w is None:
        fix = (
            f"Find what writes to {target} between the forward at {_where(s.saved_at)} and this "
            "backward, and move it after the backward."
        )
    elif w.kind is WriteKind.OPTIMIZER:
        fix = (
            f"{w.by} updated {target} between the forward that saved it and this backward. Run "
            "every backward that needs that forward before stepping (for several tasks or losses: "
            "call backward or torch.autograd.grad for each, then step once), or run the forward "
            "again after the step."
        )
    elif w.kind is WriteKind.DATA:
        fix = (
            f"Move the write to {target} after the last backward that needs the forward, and "
            "write under `torch.no_grad()` without `.data`, so that PyTorch can check it."
        )
    else:
        fix = (
            f"`{w.op}` wrote to {target} after it was saved. Move it after the last backward that "
            "needs the forward (clipping, EMA and other parameter updates belong after every "
            "backward of the step), or write out of place or on a clone so that the saved value "
            "stays intact."
        )
    return fix + (
        " `retain_graph=True` does not help: it keeps the saved tensors, not their old values. "
        "If the backward really needs the old value, clone the tensor before the write."
    )


def _where(source: SourceLocation | None) -> str:
    if source is None:
        return "?"
    return f"{source}" + (f" `{source.code}`" if source.code else "")


def _task(task: str | None) -> str:
    return f", task `{task}`" if task else ""


def _compiled_or_unknown(node: str | None) -> str:
    if node and node.startswith("CompiledFunction"):
        return "a compiled graph"
    return "an op the guard did not see run"


# --------------------------------------------------------------------------------------------
# Where the user is


# Frames are classified by file name, not by code object: a code object hashes its bytecode
# and constants (about a microsecond for `Module._call_impl`), and `pack` walks several frames
# per saved tensor. A file name is a string that keeps its hash.
_getframe = sys._getframe
_RESUMABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _user_frame(frame: FrameType | None) -> tuple[CodeType, int] | None:
    """The innermost frame outside torch and fxinplace, as (code, offset of the instruction
    it runs): no line-table walk; `_location` turns it into a line when needed."""
    known = known_internal_files
    while frame is not None:
        code = frame.f_code
        name = code.co_filename
        flag = known.get(name)
        if flag is None:
            flag = is_internal_file(name)
        if not flag:
            return code, frame.f_lasti
        frame = frame.f_back
    return None


def _line_of(code: CodeType, lasti: int) -> int:
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


def _location(at: tuple[CodeType, int] | None) -> SourceLocation | None:
    if at is None:
        return None
    code, lasti = at
    line = _line_of(code, lasti)
    return SourceLocation(code.co_filename, line, linecache.getline(code.co_filename, line).strip(),
                          code.co_name)


def _storage_key(t: Any) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # sparse, nested, some subclasses: no plain storage
        return None
    return ptr or None


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def _forward_op(node: str | None) -> str | None:
    """The op a backward node differentiates: "AddmmBackward0" -> "addmm"."""
    if not node or node.startswith("CompiledFunction"):
        return None
    name = re.sub(r"Backward\d*$", "", node)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() or None


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name in ("__get__", "__set__"):
        descriptor = getattr(func, "__self__", None)
        return f"{getattr(descriptor, '__name__', '?')}.{name}"
    return name


# --------------------------------------------------------------------------------------------
# What each torch function is to the guard. Derived from names, the one convention torch keeps
# for in-place ops at this level; exceptions by table.

_PLAIN, _ACCESS, _INPLACE, _BACKWARD, _DATA_GET, _DATA_SET = range(6)

# In-place by name but write metadata or flags, not values: autograd's check ignores them.
_METADATA_INPLACE = frozenset({
    "requires_grad_", "share_memory_", "detach_", "squeeze_", "unsqueeze_", "t_", "transpose_",
    "swapdims_", "swapaxes_", "as_strided_", "rename_", "_fix_weakref", "retain_grad",
})
_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
    "__imatmul__",
})
# What the mode does with each function it has seen, by the function object. Attribute
# accessors (`p.grad`, `p.grad = None`: `zero_grad` makes two per parameter) save nothing and
# need no name: `_ACCESS` runs them with the least work.
_kinds: dict[Any, int] = {}


def _classify(func: Any) -> int:
    name = getattr(func, "__name__", "")
    if func is torch.Tensor.backward or func is torch.autograd.backward or func is torch.autograd.grad:
        kind = _BACKWARD
    elif getattr(func, "__self__", None) is torch._C.TensorBase.data:
        kind = _DATA_GET if name == "__get__" else _DATA_SET
    elif name in ("__get__", "__set__"):
        kind = _ACCESS
    elif name in _INPLACE_DUNDERS or (
        name.endswith("_") and not name.endswith("__") and name not in _METADATA_INPLACE
    ):
        kind = _INPLACE
    else:
        kind = _PLAIN
    _kinds[func] = kind
    return kind


# --------------------------------------------------------------------------------------------
# Runtime records (mutable, cheap); turned into the facts above only when something is stale


class _Saved(NamedTuple):
    """What the pack hook keeps. It builds the plain tuple (cheaper, on the hot path); the
    unpack hook reads it by index, the error path through this view."""

    tensor: torch.Tensor
    version: int
    seq: int
    op: Any
    at: tuple[CodeType, int] | None  # the user's frame: its code and instruction offset
    task: str | None


class _Written:
    __slots__ = ("seq", "kind", "op", "by", "at", "optimizer", "refs", "storages")

    def __init__(self, seq: int, kind: WriteKind, op: str, by: str,
                 at: tuple[CodeType, int] | None, optimizer: str | None,
                 refs: tuple[weakref.ref, ...], storages: tuple[int | None, ...]) -> None:
        self.seq = seq
        self.kind = kind
        self.op = op
        self.by = by
        self.at = at
        self.optimizer = optimizer
        self.refs = refs
        self.storages = storages

    def touches(self, t: torch.Tensor, key: int | None) -> bool:
        if any(r() is t for r in self.refs):
            return True
        if key is None:
            return False
        if self.kind is WriteKind.OPTIMIZER:
            return any(_storage_key(r()) == key for r in self.refs if r() is not None)
        return key in self.storages


class _Backward:
    __slots__ = ("call", "at", "task", "roots", "heads")

    def __init__(self, call: str, at: tuple[CodeType, int] | None, task: str | None,
                 roots: list[torch.Tensor]) -> None:
        self.call = call
        self.at = at
        self.task = task  # the `guard.task` block's; the losses' names are read on a finding
        self.roots = roots
        self.heads: list[str] | None = None  # the model outputs it reaches, on a finding


_version_of = operator.attrgetter("_version")
_mode_stack_len = torch._C._len_torch_function_stack
_mode_stack_at = torch._C._get_function_stack_at
_pop_mode = torch._C._pop_torch_function_stack
_push_mode = torch._C._push_on_torch_function_stack
# Bound once for the hot path; Dynamo still sees `torch.compiler.is_compiling` and folds it.
_is_compiling = torch.compiler.is_compiling


class _Mode(TorchFunctionMode):
    """Names the running op for the pack hook and reports in-place ops, backward calls and
    `.data` to the session. Under Dynamo it only forwards the call (`is_compiling` is a
    constant there), so compiled graphs are traced as without the guard."""

    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session: _Session | None = session  # None once the session stopped
        self.op: Any = None
        # `pack`'s last walk from a torch frame. Held only while that frame's op or model
        # call runs: dropped when an op through the mode returns and when the mode comes back
        # (`forget`), so that the frame's locals (the op's inputs) are not kept.
        self.last_frame: FrameType | None = None
        self.last_at: tuple[CodeType, int] | None = None

    def forget(self) -> None:
        self.last_frame = self.last_at = None

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        # The hot path: every torch call of the loop outside the given models and optimizers
        # comes here. Plain ops and accessors in a few bytecodes; the rest in the session.
        if _is_compiling():
            return func(*args, **(kwargs or {}))
        kind = _kinds.get(func)
        if kind is None:
            kind = _classify(func)
        if kind == _ACCESS:
            return func(*args, **kwargs) if kwargs else func(*args)
        if kind == _PLAIN:
            if kwargs:
                if kwargs.get("out") is None and kwargs.get("inplace") is not True:
                    prev, self.op = self.op, func
                    try:
                        return func(*args, **kwargs)
                    finally:
                        self.op = prev
                        self.last_frame = None
                kind = _INPLACE
            else:
                prev, self.op = self.op, func
                try:
                    return func(*args)
                finally:
                    self.op = prev
                    self.last_frame = None
        if kwargs is None:
            kwargs = {}
        session = self.session
        if session is None:  # left on the stack after its guard exited (unbalanced exits)
            return func(*args, **kwargs)
        if kind == _BACKWARD:
            return session.on_backward(func, args, kwargs)
        if kind == _DATA_GET:
            return session.on_data_get(func, args, kwargs)
        if kind == _DATA_SET:
            return session.on_data_set(func, args, kwargs)
        return session.on_inplace(func, args, kwargs)


class _Session:
    """The state of one entry into a `guard`: hooks, the mode, and what they recorded."""

    def __init__(self, owner: guard) -> None:
        self.owner = owner
        self.mode = _Mode(self)
        self.writes: deque[_Written] = deque(maxlen=_MAX_WRITES)
        self.hidden_writes: deque[_Written] = deque(maxlen=_MAX_WRITES)
        self.data_aliases: dict[int, weakref.ref] = {}  # storage of a `.data` alias -> its tensor
        self.backwards: list[_Backward] = []
        self.steps: list[tuple[Any, int, tuple[CodeType, int] | None, list, list[int]]] = []
        # The mode is lifted off the stack while the given models run forward, while an
        # optimizer steps and while a given optimizer's `zero_grad` runs: hundreds of ops per
        # step that need no attention (the version counters say what a step moved; forward ops
        # need no names), and a Python call each.
        self.lift_depth = 0
        self.mode_lifted = False
        self.failed: set[str] = set()
        self.reported: set[int] = set()  # warn mode: once per saved tensor
        self.tasks = owner._tasks
        self.undo: list[Callable[[], Any]] = []

    # entering and leaving ------------------------------------------------------------------

    def start(self) -> None:
        # Per entry, so per step for a decorated step function: plain handles, no ExitStack.
        undo = self.undo
        try:
            undo.append(register_optimizer_step_pre_hook(self.on_step_pre).remove)
            undo.append(register_optimizer_step_post_hook(self.on_step_post).remove)
            for _, module in self.owner._modules:
                undo.append(module.register_forward_pre_hook(self.on_model_call).remove)
                undo.append(
                    module.register_forward_hook(self.on_model_output, always_call=True).remove)
            for _, opt in self.owner._optimizers:
                try:
                    undo.append(self.lift_zero_grad(opt))
                except Exception as e:  # then `zero_grad` runs under the mode, as any code
                    self.warn_once("zero_grad", e)
            hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            hooks.__enter__()
            undo.append(functools.partial(hooks.__exit__, None, None, None))
            self.mode.__enter__()
            undo.append(functools.partial(self.mode.__exit__, None, None, None))
        except BaseException:
            self.close()
            raise

    def stop(self) -> None:
        self.steps.clear()
        self.mode.forget()
        self.lift_depth = 1  # a step or forward that raised never ran its post hook
        self.unlift()
        self.close()  # in reverse: the mode, the saved-tensor hooks, then the other hooks
        # Break the session <-> mode cycle, so that refcounting frees both now rather than
        # the cyclic collector later (an entry per step otherwise leaves one per step).
        self.mode.session = None

    def close(self) -> None:
        undo, self.undo = self.undo, []
        error: BaseException | None = None
        for step in reversed(undo):
            try:
                step()
            except BaseException as e:  # undo the rest, then raise the first failure
                error = error or e
        if error is not None:
            raise error

    # saved tensors -------------------------------------------------------------------------

    def pack(self, t: torch.Tensor) -> tuple:
        # Once per tensor autograd saves. The walk to the user's frame (files are classified
        # once) keeps (code, instruction); lines are read on a finding. An op that saves
        # several tensors (`addmm`: both matrices) packs them from the same torch frame,
        # whose callers cannot move while it runs (unless it is a generator's, which another
        # caller can resume): the walk is done once for them.
        mode = self.mode
        try:
            frame = _getframe(1)
            if frame is mode.last_frame:
                at = mode.last_at
            else:
                at = _user_frame(frame)
                code = frame.f_code
                if at is not None and at[0] is not code and not code.co_flags & _RESUMABLE:
                    mode.last_frame, mode.last_at = frame, at
        except Exception as e:  # the guard's bug must not stop the forward
            at = None
            self.warn_once("pack", e)
        tasks = self.tasks
        # A leaf is saved as is (autograd does the same); anything else detached, which keeps
        # storage and version counter but not the grad_fn, so an output saved by its own node
        # makes no reference cycle (see the saved_tensors_hooks docs).
        return (t if t.is_leaf else t.detach(), t._version, _next_seq(), mode.op, at,
                tasks[-1] if tasks else None)  # a `_Saved`

    def unpack(self, packed: tuple) -> torch.Tensor:
        t = packed[0]
        if t._version != packed[1] or (self.hidden_writes and self.hidden_write(_Saved(*packed))):
            self.stale(_Saved(*packed))
        return t

    def hidden_write(self, saved: _Saved) -> bool:
        key: int | None = None
        keyed = False
        for w in reversed(self.hidden_writes):
            if w.seq < saved.seq:
                break
            if not keyed:
                key, keyed = _storage_key(saved.tensor), True
            if w.touches(saved.tensor, key):
                return True
        return False

    def stale(self, saved: _Saved) -> None:
        try:
            found = self.describe(saved)
        except Exception as e:  # still refuse the stale value, with what is known
            log.warning("fxinplace.guard could not describe a stale saved tensor: %s", e,
                        exc_info=True)
            t = saved.tensor
            found = StaleSavedTensor(
                tensor=f"a {list(t.shape)} tensor", name=None, shape=tuple(t.shape), op=None, node=None,
                saved_at=None, saved_for=None, version_saved=saved.version,
                version_now=t._version, writes=(), needed_for=None, backward=None,
                backward_at=None, hidden=t._version == saved.version)
        if self.owner.on_stale == "raise":
            self.owner.hazards.append(found)
            raise StaleSavedTensorError(found)
        if saved.seq not in self.reported:
            self.reported.add(saved.seq)
            self.owner.hazards.append(found)
            warnings.warn(StaleSavedTensorWarning(_explain(found)), stacklevel=2)

    def describe(self, saved: _Saved) -> StaleSavedTensor:
        t = saved.tensor
        key = _storage_key(t)
        kind, name, is_view = self.owner._name_of(t, key)
        node = torch._C._current_autograd_node()
        node_name = node.name() if node is not None else None
        op = _op_name(saved.op) if saved.op is not None else _forward_op(node_name)
        shape = tuple(t.shape)
        if name is None:
            what = f"a {list(shape)} tensor" + (f" saved by `{op}`" if op else "")
        elif is_view:
            what = f"a {list(shape)} view of {kind} `{name}`"
        else:
            what = f"{kind} `{name}` {list(shape)}"
        writes = tuple(
            Write(w.kind, w.op, w.by, _location(w.at), w.optimizer)
            for w in sorted(self.writes_to(saved, key), key=lambda w: w.seq)
        )
        call = self.backwards[-1] if self.backwards else None
        needed_for = None
        if call is not None:
            needed_for = call.task or self.owner._loss_task(call.roots)
            if needed_for is None:
                if call.heads is None:
                    call.heads = _heads_reached(call.roots)
                needed_for = ", ".join(call.heads) or None
        return StaleSavedTensor(
            tensor=what, name=name, shape=shape, op=op, node=node_name,
            saved_at=_location(saved.at), saved_for=saved.task,
            version_saved=saved.version, version_now=t._version, writes=writes,
            needed_for=needed_for, backward=call.call if call else None,
            backward_at=_location(call.at) if call else None,
            hidden=t._version == saved.version,
        )

    def writes_to(self, saved: _Saved, key: int | None) -> list[_Written]:
        seen = {id(w): w for w in (*self.writes, *self.hidden_writes)}
        return [w for w in seen.values() if w.seq > saved.seq and w.touches(saved.tensor, key)]

    # torch functions (from the mode) -------------------------------------------------------

    def on_inplace(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if self.steps and not self.data_aliases:
            # An optimizer's own update (the mode stays on when another guard's mode was above
            # it): the step hooks account for it.
            return func(*args, **kwargs)
        targets: list[torch.Tensor] = []
        watched: list[tuple[torch.Tensor, int]] = []
        seq = _next_seq()
        try:
            out = kwargs.get("out")
            targets = _tensors(out) if out is not None else _tensors(args[0] if args else None)
            if self.data_aliases:
                watched = self.watch_aliases(targets)
        except Exception as e:
            self.warn_once("in-place op", e)
        prev, self.mode.op = self.mode.op, func
        try:
            result = func(*args, **kwargs)
        finally:
            self.mode.op = prev
            self.mode.forget()
        try:
            self.record_inplace(func, seq, targets, watched)
        except Exception as e:
            self.warn_once("in-place op", e)
        return result

    def watch_aliases(self, targets: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        """The tensors whose `.data` alias `targets` write to, with their versions now."""
        watched = []
        for t in targets:
            key = _storage_key(t)
            ref = self.data_aliases.get(key) if key is not None else None
            owner = ref() if ref is not None else None
            if owner is not None and owner is not t and _storage_key(owner) == key:
                watched.append((owner, owner._version))
        return watched

    def record_inplace(self, func: Any, seq: int, targets: list[torch.Tensor],
                       watched: list[tuple[torch.Tensor, int]]) -> None:
        hidden = [o for o, v in watched if o._version == v]
        if not targets or (self.steps and not hidden):
            return
        name = _op_name(func)
        at = _user_frame(_getframe(2))
        storages = tuple(_storage_key(t) for t in targets)
        if hidden:
            self.hidden_writes.append(_Written(
                seq, WriteKind.DATA, name, f"`{name}` through `.data`", at, None,
                tuple(weakref.ref(o) for o in hidden), storages))
        else:
            self.writes.append(_Written(
                seq, WriteKind.INPLACE, name, f"in-place `{name}`", at, None, (), storages))

    def on_data_get(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        alias = func(*args, **kwargs)
        try:
            key = _storage_key(alias)
            if key is not None and args:
                if len(self.data_aliases) >= _MAX_DATA_ALIASES:
                    self.data_aliases = {k: r for k, r in self.data_aliases.items() if r() is not None}
                    if len(self.data_aliases) >= _MAX_DATA_ALIASES:
                        self.data_aliases.clear()
                self.data_aliases[key] = weakref.ref(args[0])
        except Exception as e:
            self.warn_once(".data", e)
        return alias

    def on_data_set(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        seq = _next_seq()
        result = func(*args, **kwargs)
        try:
            at = _user_frame(_getframe(2))
            self.hidden_writes.append(_Written(
                seq, WriteKind.DATA, "data =", "`.data = ...`", at, None,
                (weakref.ref(args[0]),), ()))
        except Exception as e:
            self.warn_once(".data", e)
        return result

    def on_backward(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        call = None
        try:
            if func is torch.autograd.grad:
                roots = args[0] if args else kwargs.get("outputs")
                name = "autograd.grad"
            else:
                roots = args[0] if args else kwargs.get("tensors")
                name = "backward"
            tasks = self.tasks
            call = _Backward(name, _user_frame(_getframe(2)), tasks[-1] if tasks else None,
                             _tensors(roots))
        except Exception as e:
            self.warn_once("backward", e)
        if call is None:
            return func(*args, **kwargs)
        self.backwards.append(call)
        self.mode.forget()
        prev, self.mode.op = self.mode.op, None
        try:
            return func(*args, **kwargs)
        finally:
            self.mode.op = prev
            self.mode.forget()
            self.backwards.pop()

    # optimizers ----------------------------------------------------------------------------

    def lift(self) -> None:
        self.lift_depth += 1
        if self.lift_depth == 1:
            n = _mode_stack_len()
            if n and _mode_stack_at(n - 1) is self.mode:
                _pop_mode()
                self.mode_lifted = True

    def unlift(self) -> None:
        if self.lift_depth > 0:
            self.lift_depth -= 1
        if self.lift_depth == 0:
            self.mode.forget()
            if self.mode_lifted:
                _push_mode(self.mode)
                self.mode_lifted = False

    def lift_zero_grad(self, opt: torch.optim.Optimizer) -> Callable[[], None]:
        """Lift the mode while a given optimizer's `zero_grad` runs; return the undo.

        `zero_grad` reads and sets `p.grad` for every parameter, two calls through the mode
        each, that need no attention. There is no hook for it, so the instance attribute
        wraps it for the session, as `LRScheduler` wraps `step`; `Optimizer.__getstate__`
        keeps it out of pickles and deep copies.
        """
        had = "zero_grad" in vars(opt)
        inner = opt.zero_grad

        def zero_grad(*args: Any, **kwargs: Any) -> None:
            if _is_compiling():
                return inner(*args, **kwargs)
            self.lift()
            try:
                return inner(*args, **kwargs)
            finally:
                self.unlift()

        opt.zero_grad = zero_grad  # type: ignore[method-assign]

        def undo() -> None:
            if vars(opt).get("zero_grad") is zero_grad:  # unless the user replaced it since
                if had:
                    opt.zero_grad = inner  # type: ignore[method-assign]
                else:
                    del opt.zero_grad
        return undo

    def on_step_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.lift()
        try:
            params = [p for group in opt.param_groups for p in group["params"]]
            at = _user_frame(_getframe(1))
            self.steps.append((opt, _next_seq(), at, params, list(map(_version_of, params))))
        except Exception as e:
            self.warn_once("optimizer step", e)

    def on_step_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            steps = self.steps
            for i in range(len(steps) - 1, -1, -1):
                if steps[i][0] is opt:
                    _, seq, at, params, versions = steps.pop(i)
                    break
            else:
                return
            moved = [p for p, v, now in zip(params, versions, map(_version_of, params)) if v != now]
            if moved:
                name = self.owner._optimizer_name(opt)
                self.writes.append(_Written(
                    seq, WriteKind.OPTIMIZER, "step",
                    f"`{name}.step()` ({type(opt).__name__})", at, name,
                    tuple(map(weakref.ref, moved)), ()))
        except Exception as e:
            self.warn_once("optimizer step", e)
        finally:
            self.unlift()

    # task names from the model's output keys -----------------------------------------------

    # The hooks on the given models are traced away under Dynamo (no graph break): the hooks of
    # a compiled module (`torch.compile(m)`) run outside its graph; those of the module inside
    # it do nothing. Name tasks with `guard.losses` / `guard.task` there.

    def on_model_call(self, module: torch.nn.Module, args: Any) -> None:
        if not _is_compiling():
            self.lift()

    def on_model_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if _is_compiling():
            return
        try:
            if self.owner.tasks_from_outputs and isinstance(output, Mapping):
                # Each output's key goes on the autograd node that made it, by output slot: no
                # hook, nothing held; a finding reads the keys its backward reaches.
                for position, (key, value) in enumerate(output.items()):
                    if isinstance(value, torch.Tensor):
                        node = value.grad_fn
                        if node is not None:
                            heads = node.metadata.setdefault(_HEADS, {})
                            heads[value.output_nr] = (position, str(key))
        except Exception as e:
            self.warn_once("output names", e)
        finally:
            self.unlift()  # after the names: with the mode on, each call above would go through it

    def warn_once(self, where: str, e: Exception) -> None:
        if where not in self.failed:
            self.failed.add(where)
            log.warning("fxinplace.guard: bookkeeping failed in %s (%s); continuing without it",
                        where, e, exc_info=True)


_HEADS = "fxinplace.guard.heads"  # node.metadata key: {output slot: (position, output key)}


def _heads_reached(roots: list[torch.Tensor]) -> list[str]:
    """The model output keys whose nodes a backward from `roots` reaches, in output order."""
    found: dict[str, int] = {}
    seen: set[Any] = set()
    todo = [(r.grad_fn, r.output_nr) for r in roots if r.grad_fn is not None]
    while todo:
        node, slot = todo.pop()
        heads = node.metadata.get(_HEADS)
        if heads and slot in heads:
            position, key = heads[slot]
            found.setdefault(key, position)
        if node in seen:
            continue
        seen.add(node)
        todo.extend((n, i) for n, i in node.next_functions if n is not None)
    return sorted(found, key=found.__getitem__)


# --------------------------------------------------------------------------------------------
# The public guard

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | Mapping[str, torch.optim.Optimizer]
Models = torch.nn.Module | Mapping[str, torch.nn.Module]


class guard:
    """Watch a training step for saved tensors that change before the backward needing them.

    Use it as a context manager around one step (or the whole loop), or as a decorator of
    the step function::

        g = fxinplace.guard({"gen": G, "disc": D}, optimizers={"opt_g": opt_g, "opt_d": opt_d})
        with g:
            ...

        @fxinplace.guard(model, optimizers=opt)
        def train_step(batch): ...

    Args:
        model: the module (or ``{"prefix": module}``) whose parameters and buffers the
            messages name; a compiled module (``torch.compile(m)``) works too. When the model
            returns a dict, its keys name the tasks whose backward reaches each output.
        optimizers: an optimizer, a list of them, or ``{"name": optimizer}`` for the names
            the messages use. Steps of optimizers not listed are still seen.
        on_stale: ``"raise"`` (default) raises `StaleSavedTensorError` when a backward needs
            a changed tensor; ``"warn"`` warns with `StaleSavedTensorWarning`, records it
            in `hazards` and lets the backward go on with the changed value, as PyTorch
            would without its check: those gradients are wrong; use it to survey a loop.
        tasks_from_outputs: name tasks by the model's output keys (see ``model``).

    Name the tasks with `losses` (the loss a backward starts from) or `task` (a block).
    ``hazards`` collects every finding of every use of this guard; `table` renders them.
    """

    def __init__(self, model: Models | None = None, *, optimizers: Optimizers | None = None,
                 on_stale: Literal["raise", "warn"] = "raise",
                 tasks_from_outputs: bool = True) -> None:
        if on_stale not in ("raise", "warn"):
            raise ValueError(f"`on_stale` must be 'raise' or 'warn', got {on_stale!r}")
        self._modules = _modules_of(model)
        self._optimizers = _optimizers_of(optimizers)
        self.on_stale = on_stale
        self.tasks_from_outputs = tasks_from_outputs
        self.hazards: list[StaleSavedTensor] = []
        self._session: _Session | None = None
        self._tasks: list[str] = []
        self._loss_names: dict[int, tuple[weakref.ref, str]] = {}

    def __enter__(self) -> guard:
        if self._session is not None:
            raise RuntimeError(
                "this `guard` is already active; nest a second `fxinplace.guard(...)` instead "
                "of entering the same one twice")
        session = _Session(self)
        session.start()
        self._session = session
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        session, self._session = self._session, None
        self._loss_names.clear()
        if session is not None:
            session.stop()

    def __call__(self, fn: _F) -> _F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    @contextmanager
    def task(self, name: str) -> Iterator[None]:
        """Name the task of the tensors saved, and of the backward calls made, in this block."""
        self._tasks.append(str(name))
        try:
            yield
        finally:
            self._tasks.pop()

    def losses(self, losses: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Name the task of each loss; a backward or `autograd.grad` from it is that task's.

        Returns ``losses`` unchanged, so ``losses = g.losses({...})`` reads naturally.
        """
        if not isinstance(losses, Mapping):
            raise TypeError(f"`losses` must be a mapping from task name to loss tensor, got "
                            f"{type(losses).__name__}")
        if len(self._loss_names) > 256:
            self._loss_names = {k: v for k, v in self._loss_names.items() if v[0]() is not None}
        for name, loss in losses.items():
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"`losses[{name!r}]` must be a tensor, got {type(loss).__name__}")
            self._loss_names[id(loss)] = (weakref.ref(loss), str(name))
        return losses

    def table(self) -> str:
        """`hazards` as a table."""
        return render_table(self.hazards)

    def __repr__(self) -> str:
        state = "active" if self._session is not None else "inactive"
        return f"fxinplace.guard({state}, on_stale={self.on_stale!r}, {len(self.hazards)} hazards)"

    # names ---------------------------------------------------------------------------------

    def _loss_name(self, t: torch.Tensor) -> str | None:
        entry = self._loss_names.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def _loss_task(self, roots: list[torch.Tensor]) -> str | None:
        named = [self._loss_name(r) for r in roots]
        return ", ".join(n for n in named if n) or None

    def _optimizer_name(self, opt: torch.optim.Optimizer) -> str:
        for name, known in self._optimizers:
            if known is opt:
                return name
        return type(opt).__name__.lower()

    def _name_of(self, t: torch.Tensor, key: int | None) -> tuple[str, str | None, bool]:
        """(kind, qualified name, is a view) of the parameter or buffer `t` is or views."""
        named: list[tuple[str, str, torch.Tensor]] = []
        for prefix, module in self._modules:
            for n, p in module.named_parameters(remove_duplicate=False):
                named.append(("parameter", prefix + n, p))
            for n, b in module.named_buffers(remove_duplicate=False):
                named.append(("buffer", prefix + n, b))
        for opt_name, opt in self._optimizers:
            for gi, group in enumerate(opt.param_groups):
                for pi, p in enumerate(group["params"]):
                    named.append(("parameter", f"{opt_name}.param_groups[{gi}]['params'][{pi}]", p))
        for kind, n, p in named:
            if p is t:
                return kind, _clean(n), False
        if key is not None:
            for kind, n, p in named:
                if _storage_key(p) == key:
                    return kind, _clean(n), True
        return "tensor", None, False


def _clean(name: str) -> str:
    return name.replace("_orig_mod.", "")


def _modules_of(model: Models | None) -> list[tuple[str, torch.nn.Module]]:
    if model is None:
        return []
    if isinstance(model, torch.nn.Module):
        return [("", model)]
    if isinstance(model, Mapping):
        out = []
        for name, m in model.items():
            if not isinstance(m, torch.nn.Module):
                raise TypeError(f"`model[{name!r}]` must be an nn.Module, got {type(m).__name__}")
            out.append((f"{name}.", m))
        return out
    raise TypeError(f"`model` must be an nn.Module or a mapping of them, got {type(model).__name__}")


def _optimizers_of(optimizers: Optimizers | None) -> list[tuple[str, torch.optim.Optimizer]]:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [("optimizer", optimizers)]
    if isinstance(optimizers, Mapping):
        items = [(str(k), v) for k, v in optimizers.items()]
    elif isinstance(optimizers, Sequence):
        items = [(f"optimizers[{i}]", v) for i, v in enumerate(optimizers)]
    else:
        raise TypeError("`optimizers` must be an optimizer, a sequence or a mapping of them, got "
                        f"{type(optimizers).__name__}")
    for name, opt in items:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"`optimizers` entry {name!r} must be a torch.optim.Optimizer, got "
                            f"{type(opt).__name__}")
    return items
