"""The guard's `TorchFunctionMode`: THE HOT PATH. Every torch call of the loop outside the given
models and optimizers goes through `Mode.__torch_function__`; keep it to a few bytecodes for
plain ops and accessors (no extra calls, no indirection), and hand everything else on.

What each torch function is to the guard is derived from its name, the one convention torch
keeps for in-place ops at this level; exceptions by table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .. import _compat
from ._runtime import At, is_compiling

__all__ = ["Mode", "Handler"]

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
    elif getattr(func, "__self__", None) is _compat.TENSOR_DATA:
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


# What the mode hands an in-place op, a backward call or a `.data` read or write to:
# `handler(func, args, kwargs)` runs `func` and returns its result.
Handler = Callable[[Any, Sequence[Any], dict[str, Any]], Any]

# Bound once: the same C functions, no extra call on the way (see `_compat`).
_mode_stack_len = _compat.len_torch_function_stack
_mode_stack_at = _compat.torch_function_stack_at
_pop_mode = _compat.pop_torch_function_stack
_push_mode = _compat.push_torch_function_stack


class Mode(TorchFunctionMode):
    """Names the running op for the pack hook and hands in-place ops, backward calls and
    `.data` to the handlers it `serve`s. Under Dynamo it only forwards the call
    (`is_compiling` is a constant there), so compiled graphs are traced as without the guard."""

    def __init__(self) -> None:
        super().__init__()
        # By kind, as `_classify` numbers them; None before `serve` and after `retire`.
        self.handlers: tuple[Handler | None, ...] | None = None
        self.op: Any = None
        # `pack`'s last walk from a torch frame. Held only while that frame's op or model
        # call runs: dropped when an op through the mode returns and when the mode comes back
        # (`forget`), so that the frame's locals (the op's inputs) are not kept.
        self.last_frame: FrameType | None = None
        self.last_at: At | None = None
        # The mode is lifted off the stack while the given models run forward, while an
        # optimizer steps and while a given optimizer's `zero_grad` runs: hundreds of ops per
        # step that need no attention (the version counters say what a step moved; forward ops
        # need no names), and a Python call each.
        self.lift_depth = 0
        self.calls: list = []  # the loop's lines calling the given models now (`At`), outermost first
        self.lifted = False

    def serve(self, *, inplace: Handler, backward: Handler, data_get: Handler,
              data_set: Handler) -> None:
        handlers: list[Handler | None] = [None] * 6
        handlers[_INPLACE], handlers[_BACKWARD] = inplace, backward
        handlers[_DATA_GET], handlers[_DATA_SET] = data_get, data_set
        self.handlers = tuple(handlers)

    def retire(self) -> None:
        # Break the handlers -> logs -> mode cycle, so that refcounting frees them now rather
        # than the cyclic collector later (an entry per step otherwise leaves one per step).
        self.handlers = None

    def forget(self) -> None:
        self.last_frame = self.last_at = None

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        # The hot path: every torch call of the loop outside the given models and optimizers
        # comes here. Plain ops and accessors in a few bytecodes; the rest in the handlers.
        if is_compiling():
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
        handlers = self.handlers
        if handlers is None:  # left on the stack after its guard exited (unbalanced exits)
            return func(*args, **kwargs)
        return handlers[kind](func, args, kwargs)

    # off the stack and back --------------------------------------------------------------

    def lift(self) -> None:
        self.lift_depth += 1
        if self.lift_depth == 1:
            n = _mode_stack_len()
            if n and _mode_stack_at(n - 1) is self:
                _pop_mode()
                self.lifted = True

    def unlift(self) -> None:
        if self.lift_depth > 0:
            self.lift_depth -= 1
        if self.lift_depth == 0:
            self.forget()
            if self.lifted:
                _push_mode(self)
                self.lifted = False

    def land(self) -> None:
        """Back on the stack whatever the depth: a step or forward that raised never ran its
        post hook."""
        self.lift_depth = 1
        self.unlift()
