"""Optimizer steps: global step pre/post hooks attribute version bumps to ``opt.step()`` and the
parameters it moved, and lift the mode while a step (or a given optimizer's `zero_grad`) runs."""

from __future__ import annotations

import functools
import operator
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .._compat import current_sequence_nr
from ._facts import WriteKind
from ._mode import Mode
from ._runtime import At, getframe, is_compiling, next_seq, user_at
from ._write_log import Written

__all__ = ["OptimizerWatch", "Step", "StepWritten"]

_version_of = operator.attrgetter("_version")

# A step under way: (optimizer, seq, where, its parameters, their versions before the step,
# the sequence number autograd gives the next node: nodes made before the step have smaller ones).
Step = tuple[torch.optim.Optimizer, int, At | None, list, list[int], int]


class OptimizerWatch:
    """Records each step that moved a parameter as a `Written` of kind `OPTIMIZER`.

    Args:
        mode: the session's mode, lifted while a step or a given `zero_grad` runs.
        steps: the steps under way, innermost last; the write log reads it too.
        record: takes each step's `Written` (the write log's `add`).
        name_of: the name the messages give an optimizer.
        warn_once: reports a failure of the bookkeeping, once per place.
    """

    def __init__(self, mode: Mode, steps: list[Step], record: Callable[[Written], None],
                 name_of: Callable[[torch.optim.Optimizer], str],
                 warn_once: Callable[[str, Exception], None]) -> None:
        self.mode = mode
        self.steps = steps
        self.record = record
        self.name_of = name_of
        self.warn_once = warn_once

    def hook(self) -> list[Callable[[], Any]]:
        """Install the global step hooks; return their removers."""
        return [register_optimizer_step_pre_hook(self.on_step_pre).remove,
                register_optimizer_step_post_hook(self.on_step_post).remove]

    def lift_zero_grad(self, opt: torch.optim.Optimizer) -> Callable[[], None]:
        """Lift the mode while a given optimizer's `zero_grad` runs; return the undo.

        `zero_grad` reads and sets `p.grad` for every parameter, two calls through the mode
        each, that need no attention. There is no hook for it, so the instance attribute
        wraps it for the session, as `LRScheduler` wraps `step`; `Optimizer.__getstate__`
        keeps it out of pickles and deep copies.
        """
        had = "zero_grad" in vars(opt)
        inner = opt.zero_grad
        mode = self.mode

        def zero_grad(*args: Any, **kwargs: Any) -> None:
            if is_compiling():
                return inner(*args, **kwargs)
            mode.lift()
            try:
                return inner(*args, **kwargs)
            finally:
                mode.unlift()

        opt.zero_grad = zero_grad  # type: ignore[method-assign]

        def undo() -> None:
            if vars(opt).get("zero_grad") is zero_grad:  # unless the user replaced it since
                if had:
                    opt.zero_grad = inner  # type: ignore[method-assign]
                else:
                    del opt.zero_grad
        return undo

    def lift_model_zero_grad(self, cls: type) -> Callable[[], None]:
        """Lift the mode while a given model's own `zero_grad()` runs; return the undo.

        Like an optimizer's, it reads and sets `p.grad` for every parameter. Wrapped on the
        model's class for the session, not on the instance: an instance attribute would travel
        with the model into `copy.deepcopy` (the copy's `zero_grad` would zero the original's
        gradients), and not on `nn.Module`: assigning an attribute of a class invalidates the
        attribute caches of all its subclasses, which for `nn.Module` costs more than the lift
        saves. Only in the thread that entered the guard: the mode stack is per thread.
        """
        had = "zero_grad" in vars(cls)
        own = vars(cls).get("zero_grad")
        inner = cls.zero_grad
        mode = self.mode
        owner = threading.get_ident()

        def zero_grad(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            if is_compiling() or threading.get_ident() != owner:
                return inner(module, *args, **kwargs)
            mode.lift()
            try:
                return inner(module, *args, **kwargs)
            finally:
                mode.unlift()

        functools.update_wrapper(zero_grad, inner)
        cls.zero_grad = zero_grad  # type: ignore[method-assign]

        def undo() -> None:
            if vars(cls).get("zero_grad") is zero_grad:  # unless replaced since
                if had:
                    cls.zero_grad = own  # type: ignore[method-assign]
                else:
                    del cls.zero_grad
        return undo

    def on_step_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.mode.lift()
        try:
            params = [p for group in opt.param_groups for p in group["params"]]
            at = user_at(getframe(1))
            self.steps.append((opt, next_seq(), at, params, list(map(_version_of, params)), current_sequence_nr()))
        except Exception as e:
            self.warn_once("optimizer step", e)

    def on_step_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            steps = self.steps
            for i in range(len(steps) - 1, -1, -1):
                if steps[i][0] is opt:
                    _, seq, at, params, versions, node_seq = steps.pop(i)
                    break
            else:
                return
            after = list(map(_version_of, params))
            if after != versions:
                name = self.name_of(opt)
                self.record(StepWritten(
                    seq, f"`{name}.step()` ({type(opt).__name__})", at, name, params, versions, after, node_seq))
        except Exception as e:
            self.warn_once("optimizer step", e)
        finally:
            self.mode.unlift()


class StepWritten(Written):
    """A step's `Written`, whose parameters moved (`refs`) are worked out when a finding asks.

    The step's own list of its parameters is held, not weak references: the session (one
    entry into the guard) holds it, and the optimizer holds the parameters anyway.
    """

    __slots__ = ("params", "before", "after", "node_seq", "_refs")

    def __init__(self, seq: int, by: str, at: At | None, optimizer: str, params: list,
                 before: list[int], after: list[int], node_seq: int) -> None:
        # `Written.__init__` would set `refs`, a property here.
        self.seq, self.kind, self.op, self.by, self.at = seq, WriteKind.OPTIMIZER, "step", by, at
        self.optimizer, self.storages = optimizer, ()
        self.params, self.before, self.after = params, before, after
        self.node_seq = node_seq  # the step came after the autograd nodes numbered below it
        self._refs: tuple[weakref.ref, ...] | None = None

    @property  # type: ignore[override]
    def refs(self) -> tuple[weakref.ref, ...]:
        if self._refs is None:
            self._refs = tuple(weakref.ref(p) for p, v, now in zip(self.params, self.before, self.after) if v != now)
        return self._refs
