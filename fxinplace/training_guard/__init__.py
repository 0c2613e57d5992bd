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
  an optimizer steps and while a given optimizer's or model's `zero_grad` runs: their ops
  need no attention, and each would cost a Python call.
- Global optimizer step pre/post hooks attribute version bumps to ``opt.step()`` and the
  parameter it moved.

Those three run on every entry with ``check="all"``, on the first ``first`` entries with
``check="fast"`` and ``"sampled"``. On the other entries (`_unwatched`) nothing but the step
hooks is installed (with ``"sampled"`` not even those): autograd runs its own version check, and
the error it raises is named on the way out of the guard, from the graph the failed backward
left.

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

The package: `_mode` (the function mode, the hot path), `_saved_log` (the saved-tensor hooks and
backward calls), `_write_log` (writes seen), `_optimizer_watch` (step hooks), tied together per
watched entry by `_session`; `_unwatched` the other entries; `_names` names tensors, optimizers and tasks; `_facts` holds what is found,
`_render` its words, `_errors` the error and warning that carry it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Literal, TypeVar

import torch

from ._errors import StaleSavedTensorError, StaleSavedTensorWarning
from ._facts import GuardWrite, StaleSavedTensor, WriteKind
from ._names import Names
from ._render import render_table
from ._saved_log import SavedLines
from ._runtime import report_failure
from ._session import Session
from ._unwatched import Unwatched

__all__ = [
    "guard",
    "StaleSavedTensor",
    "StaleSavedTensorError",
    "StaleSavedTensorWarning",
    "GuardWrite",
    "WriteKind",
    "render_table",
]

_F = TypeVar("_F", bound=Callable[..., Any])

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
        check: ``"all"`` (default) watches every entry into the guard with its hooks.
            ``"fast"`` watches the ``first`` entries; on the others it installs only the
            optimizer step hooks, PyTorch's own version check runs, and the in-place error it
            raises becomes a `StaleSavedTensorError` naming the tensor, the node, the backward
            and the optimizer step, and the forward line the watched entries saw save it (not
            other writers).
            ``"sampled"`` (long runs) watches the ``first`` entries, then one entry in
            ``every``, and names PyTorch's errors on the others without the step hooks. Enter
            the guard once per step (a decorated step function) for entries to be steps. On
            an unwatched entry a write through ``.data`` goes unseen, and ``on_stale="warn"``
            does not apply (PyTorch's error stops the backward).
        first: the entries watched first, with ``check="fast"`` or ``"sampled"`` (default 3).
        every: with ``check="sampled"`` only, one entry watched in ``every`` after them
            (default 100; 0: none).
        check_values: also fingerprint each saved tensor when it is saved and compare when
            backward needs it (`_values`): catches the writes no version counter sees (`.data`
            in the model's forward or in compiled code, kernels writing their inputs, custom
            ops that do not declare `mutates_args`), at the cost of two reads of each saved tensor.

    Name the tasks with `losses` (the loss a backward starts from) or `task` (a block).
    ``hazards`` collects every finding of every use of this guard; `table` renders them.
    """

    def __init__(self, model: Models | None = None, *, optimizers: Optimizers | None = None,
                 on_stale: Literal["raise", "warn"] = "raise",
                 tasks_from_outputs: bool = True,
                 check: Literal["all", "fast", "sampled"] = "all",
                 first: int | None = None, every: int | None = None,
                 check_values: bool = False) -> None:
        if on_stale not in ("raise", "warn"):
            raise ValueError(f"`on_stale` must be 'raise' or 'warn', got {on_stale!r}")
        if check not in ("all", "fast", "sampled"):
            raise ValueError(f"`check` must be 'all', 'fast' or 'sampled', got {check!r}")
        if check == "all" and (first is not None or every is not None):
            raise ValueError("`first` and `every` say which entries check='fast' / 'sampled' watch; got them "
                             "with check='all', which watches every entry (pass check='fast' or 'sampled', "
                             "or leave them out)")
        if check == "fast" and every is not None:
            raise ValueError("`every` sets the sampling of check='sampled'; check='fast' watches only the "
                             "`first` entries (pass check='sampled', or leave `every` out)")
        if not isinstance(check_values, bool):
            raise TypeError(f"`check_values` must be True or False, got {check_values!r}")
        self.check = check
        self.check_values = check_values
        self.first = _count("first", 3 if first is None else first, least=1)
        self.every = _count("every", 100 if every is None else every, least=0) if check == "sampled" else 0
        self.entries = 0  # entries so far, checked or not
        self._names = Names(_modules_of(model), _optimizers_of(optimizers))
        self.on_stale = on_stale
        self.tasks_from_outputs = tasks_from_outputs
        self.hazards: list[StaleSavedTensor] = []
        self._session: Session | None = None
        self._tasks: list[str] = []
        self._lines = SavedLines() if check != "all" else None  # learned on watched entries, for the others
        # The entries the hooks do not watch, one at a time (one object, reused: an entry per
        # step allocates little); `_unwatched` while one is under way.
        self._unwatched_entry = (Unwatched(self._names, self._lines, _warn_once, log_steps=check == "fast")
                                 if check != "all" else None)
        self._unwatched: Unwatched | None = None

    def checks(self, entry: int) -> bool:
        """Does the guard watch its `entry`-th entry (from 0) with its hooks?"""
        if self.check == "all" or entry < self.first:
            return True
        return self.every > 0 and (entry - self.first + 1) % self.every == 0

    def __enter__(self) -> guard:
        if self._session is not None or self._unwatched is not None:
            raise RuntimeError(
                "this `guard` is already active; nest a second `fxinplace.guard(...)` instead "
                "of entering the same one twice")
        entry, self.entries = self.entries, self.entries + 1
        if not self.checks(entry):
            # PyTorch's own version check runs; `__exit__` names the error it raises.
            unwatched = self._unwatched_entry
            assert unwatched is not None  # check="all" watches every entry
            unwatched.start()
            self._unwatched = unwatched
            return self
        # The settings are read when needed, so that a change made while active counts.
        session = Session(self._names, self._tasks, on_stale=lambda: self.on_stale,
                          found=lambda stale: self.hazards.append(stale),
                          tasks_from_outputs=lambda: self.tasks_from_outputs, check_values=self.check_values,
                          lines=self._lines)
        session.start()
        self._session = session
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        session, self._session = self._session, None
        unwatched, self._unwatched = self._unwatched, None
        if unwatched is not None:
            unwatched.stop()
            found = None
            if exc is not None and not isinstance(exc, StaleSavedTensorError):
                try:
                    found = unwatched.explain(exc)
                except Exception as e:  # PyTorch's own error stands
                    _warn_once("naming PyTorch's error", e)
            unwatched.forget()
            self._names.forget_losses()
            if found is not None:
                self.hazards.append(found)
                raise StaleSavedTensorError(found) from exc
            return
        self._names.forget_losses()
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
        self._names.add_losses(losses)
        return losses

    def table(self) -> str:
        """`hazards` as a table."""
        return render_table(self.hazards)

    def __repr__(self) -> str:
        state = "active" if self._session is not None else "unwatched entry" if self._unwatched else "inactive"
        sampling = (f", check='sampled', first={self.first}, every={self.every}" if self.check == "sampled"
                    else f", check='fast', first={self.first}" if self.check == "fast" else "")
        return f"fxinplace.guard({state}, on_stale={self.on_stale!r}{sampling}, {len(self.hazards)} hazards)"


_failed: set[str] = set()  # the places whose failure was logged, outside any session
_warn_once = functools.partial(report_failure, _failed)


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}")
    return value


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
