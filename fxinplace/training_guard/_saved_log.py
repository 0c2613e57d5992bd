"""The saved-tensor hooks, and the backward calls that need what they saved.

The pack hook records each saved tensor's `_version`, the op that saved it, the user's line and
the task; the unpack hook compares the version when backward needs the tensor (and asks the
write log about `.data` writes, which move no version) and reports a stale one. With pack hooks
installed autograd skips its own version check, so this comparison is what keeps the gradients
honest.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch

from .._compat import current_autograd_node
from .._sources import SourceLocation
from ._errors import StaleSavedTensorError, StaleSavedTensorWarning
from ._facts import StaleSavedTensor
from ._mode import Mode
from ._names import Names, backward_task
from ._render import explain, tensor_words
from ._runtime import (
    At,
    forward_op,
    getframe,
    location,
    next_seq,
    op_name,
    storage_key,
    tensors_in,
    user_at,
)
from ._values import changed, fingerprint
from ._write_log import WriteLog, guard_writes

__all__ = ["SavedLog", "SavedLines"]

log = logging.getLogger(__name__)

# Frames that another caller can resume, so whose callers can move while their op runs.
_RESUMABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


class _Saved(NamedTuple):
    """What the pack hook keeps. It builds the plain tuple (cheaper, on the hot path); the
    unpack hook reads it by index, the error path through this view."""

    tensor: torch.Tensor
    version: int
    seq: int
    op: Any
    at: At | None  # the user's frame: its code and instruction offset
    task: str | None
    called_at: At | None = None  # the loop's line that called the given model saving it


class _Backward:
    __slots__ = ("call", "at", "task", "roots")

    def __init__(self, call: str, at: At | None, task: str | None,
                 roots: list[torch.Tensor]) -> None:
        self.call = call
        self.at = at
        self.task = task  # the `guard.task` block's; the losses' names are read on a finding
        self.roots = roots


def _unread_running_stat(t: torch.Tensor) -> bool:
    # Batch norm in training saves its running statistics before its kernel updates them (no
    # version bump), and its backward never reads them (derivatives.yaml: they enter the
    # formula only when not training): a value change there is the op's own, and harmless.
    # The saved leaf that requires no grad of such a node is one of them.
    node = current_autograd_node()
    return node is not None and getattr(node, "_saved_training", None) is True and t.is_leaf and not t.requires_grad


class SavedLog:
    """`pack` and `unpack` for `saved_tensors_hooks`, and the mode's backward handler.

    Args:
        mode: the session's mode: it names the running op and caches `pack`'s last walk.
        writes: the write log, asked which writes changed a stale tensor.
        names: names the tensor, the optimizer and the task in a finding.
        tasks: the `guard.task` blocks open now, innermost last.
        on_stale: says ``"raise"`` or ``"warn"``, read on each finding (the guard's setting).
        found: takes each finding (appends it to the guard's `hazards`).
        warn_once: reports a failure of the bookkeeping, once per place.
    """

    def __init__(self, mode: Mode, writes: WriteLog, names: Names, tasks: list[str],
                 on_stale: Callable[[], Literal["raise", "warn"]],
                 found: Callable[[StaleSavedTensor], None],
                 warn_once: Callable[[str, Exception], None]) -> None:
        self.mode = mode
        self.writes = writes
        self.hidden = writes.hidden  # the same deque: `unpack` asks only when it holds any
        self.names = names
        self.tasks = tasks
        self.on_stale = on_stale
        self.found = found
        self.warn_once = warn_once
        self.backwards: list[_Backward] = []
        self.reported: set[int] = set()  # warn mode: once per saved tensor
        self.pending: list[tuple[tuple, torch.Tensor]] = []  # value checks on a device, read per backward

    # saved tensors -------------------------------------------------------------------------

    def pack(self, t: torch.Tensor) -> tuple:
        # Once per tensor autograd saves. The walk to the user's frame (files are classified
        # once) keeps (code, instruction); lines are read on a finding. An op that saves
        # several tensors (`addmm`: both matrices) packs them from the same torch frame,
        # whose callers cannot move while it runs (unless it is a generator's, which another
        # caller can resume): the walk is done once for them.
        mode = self.mode
        try:
            frame = getframe(1)
            if frame is mode.last_frame:
                at = mode.last_at
            else:
                at = user_at(frame)
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
        calls = mode.calls
        return (t if t.is_leaf else t.detach(), t._version, next_seq(), mode.op, at,
                tasks[-1] if tasks else None, calls[-1] if calls else None)  # a `_Saved`

    def unpack(self, packed: tuple) -> torch.Tensor:
        t = packed[0]
        if t._version != packed[1] or (self.hidden and self.writes.hidden_write_after(t, packed[2])):
            self.stale(_Saved(*packed))
        return t

    # The value check (`check_values=True`): the same, plus a fingerprint (`_values`).

    def pack_values(self, t: torch.Tensor) -> tuple:
        packed = self.pack(t)
        try:
            return packed + (fingerprint(t),)
        except Exception as e:  # no fingerprint: the version check still stands
            self.warn_once("value check", e)
            return packed + (None,)

    def unpack_values(self, packed: tuple) -> torch.Tensor:
        t = packed[0]
        if t._version != packed[1] or (self.hidden and self.writes.hidden_write_after(t, packed[2])):
            self.stale(_Saved(*packed[:7]))
        elif packed[7] is not None:
            try:
                differs = changed(packed[7], t)
            except Exception as e:
                self.warn_once("value check", e)
                return t
            if isinstance(differs, torch.Tensor):
                if not _unread_running_stat(t):
                    self.pending.append((packed, differs))
            elif differs and not _unread_running_stat(t):
                self.stale(_Saved(*packed[:7]), by_value=True)
        return t

    def check_pending(self) -> None:
        """Read the device-side value checks of the backward that just ran (one sync)."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        flags = torch.stack([flag.reshape(()) for _, flag in pending]).cpu().tolist()
        for (packed, _), differs in zip(pending, flags):
            if differs:
                self.stale(_Saved(*packed[:7]), by_value=True)

    def stale(self, saved: _Saved, by_value: bool = False) -> None:
        try:
            found = self.describe(saved, by_value)
        except Exception as e:  # still refuse the stale value, with what is known
            log.warning("fxinplace.guard could not describe a stale saved tensor: %s", e,
                        exc_info=True)
            t = saved.tensor
            found = StaleSavedTensor(
                tensor=f"a {list(t.shape)} tensor", name=None, shape=tuple(t.shape), op=None, node=None,
                saved_at=None, saved_for=None, version_saved=saved.version,
                version_now=t._version, writes=(), needed_for=None, backward=None,
                backward_at=None, hidden=t._version == saved.version, by_value=by_value)
        if self.on_stale() == "raise":
            self.found(found)
            raise StaleSavedTensorError(found)
        if saved.seq not in self.reported:
            self.reported.add(saved.seq)
            self.found(found)
            warnings.warn(StaleSavedTensorWarning(explain(found)), stacklevel=2)

    def describe(self, saved: _Saved, by_value: bool = False) -> StaleSavedTensor:
        t = saved.tensor
        key = storage_key(t)
        kind, name, is_view = self.names.tensor(t, key)
        node = current_autograd_node()
        node_name = node.name() if node is not None else None
        op = op_name(saved.op) if saved.op is not None else forward_op(node_name)
        shape = tuple(t.shape)
        writes = guard_writes(self.writes.writes_to(t, saved.seq, key), t)
        call = self.backwards[-1] if self.backwards else None
        needed_for = (call.task or backward_task(self.names, call.roots)) if call is not None else None
        return StaleSavedTensor(
            tensor=tensor_words(kind, name, is_view, shape, op), name=name, shape=shape, op=op, node=node_name,
            saved_at=location(saved.at), saved_for=saved.task, called_at=location(saved.called_at),
            version_saved=saved.version, version_now=t._version, writes=writes,
            needed_for=needed_for, backward=call.call if call else None,
            backward_at=location(call.at) if call else None,
            hidden=t._version == saved.version, by_value=by_value,
        )

    # backward calls (from the mode) --------------------------------------------------------

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
            call = _Backward(name, user_at(getframe(2)), tasks[-1] if tasks else None,
                             tensors_in(roots))
        except Exception as e:
            self.warn_once("backward", e)
        if call is None:
            return func(*args, **kwargs)
        self.backwards.append(call)
        mode = self.mode
        mode.forget()
        prev, mode.op = mode.op, None
        try:
            result = func(*args, **kwargs)
            self.check_pending()  # the value checks of this backward, on a device: read now
            return result
        finally:
            mode.op = prev
            mode.forget()
            self.backwards.pop()


class SavedLines:
    """Which forward lines saved each parameter and buffer for each backward node, learned on
    the watched entries of `check="fast"` and read on the others, where no hook records it.

    Keyed by the node's name and the saved tensor's storage: a parameter keeps its storage from
    step to step (an activation's is gone by the next step, and no other tensor takes a live
    parameter's). A key that two lines saved (a module run from two places) names no line.
    """

    _MAX = 4096

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int | None], set[tuple[At | None, At | None]]] = {}

    def learning(self, unpack: Callable[[tuple], torch.Tensor],
                 named: set[int]) -> Callable[[tuple], torch.Tensor]:
        """`unpack`, also learning the lines of the saves whose storage is in `named` (the
        storages of the guard's parameters and buffers)."""
        seen = self.seen

        def unpack_learning(packed: tuple) -> torch.Tensor:
            t = unpack(packed)
            key = storage_key(t)
            if key in named and len(seen) < self._MAX:
                node = current_autograd_node()
                if node is not None:
                    seen.setdefault((node.name(), key), set()).add((packed[4], packed[6]))
            return t
        return unpack_learning

    def saved_by(self, node: str, key: int | None) -> tuple[SourceLocation | None, SourceLocation | None]:
        """(the op's line, the loop's line that called the model) that saved storage `key` for
        `node` on the watched entries; (None, None) unless one pair of lines did."""
        pairs = {(location(at), location(called)) for at, called in self.seen.get((node, key), ())}
        return next(iter(pairs)) if len(pairs) == 1 else (None, None)
