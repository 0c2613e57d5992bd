"""The writes the guard saw: in-place ops, writes through `.data`, and (recorded by the optimizer
watch) optimizer steps. Mutable and cheap; turned into `GuardWrite` facts only on a finding."""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ._facts import GuardWrite, WriteKind
from ._mode import Mode
from ._render import compiled_write_by
from ._runtime import At, getframe, location, next_seq, op_name, storage_key, tensors_in, user_at

__all__ = ["Written", "WriteLog", "compiled_writes", "guard_writes"]

# Bounded logs: a write only matters while a graph saved before it is alive, i.e. for a step or
# two; the bounds keep a long run from growing them.
_MAX_WRITES = 4096
_MAX_DATA_ALIASES = 4096


class Written:
    __slots__ = ("seq", "kind", "op", "by", "at", "optimizer", "refs", "storages")

    def __init__(self, seq: int, kind: WriteKind, op: str, by: str, at: At | None,
                 optimizer: str | None, refs: tuple[weakref.ref, ...],
                 storages: tuple[int | None, ...]) -> None:
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
            return any(storage_key(r()) == key for r in self.refs if r() is not None)
        return key in self.storages


class WriteLog:
    """Records writes from the mode's in-place and `.data` handlers, and those `add`ed.

    Args:
        mode: the session's mode: its running op is set around each write.
        stepping: the optimizer steps under way (truthy while one runs): their own updates
            are the optimizer watch's to record.
        warn_once: reports a failure of the bookkeeping, once per place.
    """

    def __init__(self, mode: Mode, stepping: Sequence[Any],
                 warn_once: Callable[[str, Exception], None]) -> None:
        self.mode = mode
        self.stepping = stepping
        self.warn_once = warn_once
        self.writes: deque[Written] = deque(maxlen=_MAX_WRITES)
        self.hidden: deque[Written] = deque(maxlen=_MAX_WRITES)  # through `.data`: no version bump
        self.data_aliases: dict[int, weakref.ref] = {}  # storage of a `.data` alias -> its tensor

    def add(self, written: Written) -> None:
        self.writes.append(written)

    # questions from the saved-tensor log ---------------------------------------------------

    def hidden_write_after(self, t: torch.Tensor, seq: int) -> bool:
        """Was `t` written through `.data` after `seq`?"""
        key: int | None = None
        keyed = False
        for w in reversed(self.hidden):
            if w.seq < seq:
                break
            if not keyed:
                key, keyed = storage_key(t), True
            if w.touches(t, key):
                return True
        return False

    def writes_to(self, t: torch.Tensor, seq: int, key: int | None) -> list[Written]:
        """The writes to `t` (whose storage is `key`) after `seq`, in no particular order."""
        seen = {id(w): w for w in (*self.writes, *self.hidden)}
        return [w for w in seen.values() if w.seq > seq and w.touches(t, key)]

    # torch functions (from the mode) -------------------------------------------------------

    def on_inplace(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if self.stepping and not self.data_aliases:
            # An optimizer's own update (the mode stays on when another guard's mode was above
            # it): the step hooks account for it.
            return func(*args, **kwargs)
        targets: list[torch.Tensor] = []
        watched: list[tuple[torch.Tensor, int]] = []
        seq = next_seq()
        try:
            out = kwargs.get("out")
            targets = tensors_in(out) if out is not None else tensors_in(args[0] if args else None)
            if self.data_aliases:
                watched = self.watch_aliases(targets)
        except Exception as e:
            self.warn_once("in-place op", e)
        mode = self.mode
        prev, mode.op = mode.op, func
        try:
            result = func(*args, **kwargs)
        finally:
            mode.op = prev
            mode.forget()
        try:
            self.record_inplace(func, seq, targets, watched)
        except Exception as e:
            self.warn_once("in-place op", e)
        return result

    def watch_aliases(self, targets: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        """The tensors whose `.data` alias `targets` write to, with their versions now."""
        watched = []
        for t in targets:
            key = storage_key(t)
            ref = self.data_aliases.get(key) if key is not None else None
            owner = ref() if ref is not None else None
            if owner is not None and owner is not t and storage_key(owner) == key:
                watched.append((owner, owner._version))
        return watched

    def record_inplace(self, func: Any, seq: int, targets: list[torch.Tensor],
                       watched: list[tuple[torch.Tensor, int]]) -> None:
        hidden = [o for o, v in watched if o._version == v]
        if not targets or (self.stepping and not hidden):
            return
        name = op_name(func)
        at = user_at(getframe(2))
        storages = tuple(storage_key(t) for t in targets)
        if hidden:
            self.hidden.append(Written(
                seq, WriteKind.DATA, name, f"`{name}` through `.data`", at, None,
                tuple(weakref.ref(o) for o in hidden), storages))
        else:
            self.writes.append(Written(
                seq, WriteKind.INPLACE, name, f"in-place `{name}`", at, None, (), storages))

    def on_data_get(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        alias = func(*args, **kwargs)
        try:
            key = storage_key(alias)
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
        seq = next_seq()
        result = func(*args, **kwargs)
        try:
            at = user_at(getframe(2))
            self.hidden.append(Written(
                seq, WriteKind.DATA, "data =", "`.data = ...`", at, None,
                (weakref.ref(args[0]),), ()))
        except Exception as e:
            self.warn_once(".data", e)
        return result


def guard_writes(written: Iterable[Written], t: torch.Tensor) -> tuple[GuardWrite, ...]:
    """The facts of the writes seen to `t`, oldest first; else those compiled graphs make."""
    return tuple(GuardWrite(w.kind, w.op, w.by, location(w.at), w.optimizer)
                 for w in sorted(written, key=lambda w: w.seq)) or compiled_writes(t)


def compiled_writes(t: torch.Tensor) -> tuple[GuardWrite, ...]:
    """The writes to `t` that graphs compiled with `inplace_audit` make, from their audits: the
    guard sees no op run there (compiled kernels), the audit knows the op and the line."""
    from ..backend import compiled_writes_to  # only on a finding: the guard runs without the backend

    found = (GuardWrite(WriteKind.COMPILED, m.op, compiled_write_by(graph, m), m.source)
             for graph, m in compiled_writes_to(t))
    return tuple(dict.fromkeys(found))
