"""Fix-its for the guard's loop findings: an optimizer step that ran between the forward that
saved a parameter and a backward that needs it moves to just after that backward.

    fixes = loop_fixes(script, args)   # runs the script watched; for each finding, a checked move

The script runs under the command line's `Watch` (the guard on, every compile audited) until
the guard raises, or until an optimizer has stepped `STEPS` times (a loop that is wrong is
wrong on its first step). The move is checked the same way, on the patched text (the file is
not written): the guard must find nothing, the script must not fail, no new error-level hazard
may appear, and the moved step must run and see a gradient. What the move changes is measured,
not guessed: on both runs, which backward calls added to the gradients each step statement
took; the backward calls the moved step now takes and the original did not are the fix's
`gradients_from` (none: the same gradients, the step just runs later).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .._script import exec_script, main_module
from .._sources import SourceLocation
from ..facts import FixKind, FixStatus, NoFixReason
from ..training_guard import StaleSavedTensor, WriteKind
from ._capture import StopScript
from ._edits import move_step
from ._facts import ProposedFix

__all__ = ["loop_fixes", "STEPS"]

STEPS = 3  # an optimizer's steps before a watched run stops: two whole iterations of most loops


@dataclass
class _Run:
    error: BaseException | None
    stale: list[StaleSavedTensor]
    errors: set[tuple]  # the error-level hazards of the graphs it compiled: (code, file, line)
    taken: dict[int, list[frozenset[SourceLocation]]]  # step line -> per run, the backward calls its gradients came from
    saw_gradient: dict[int, bool]  # step line -> did its first run see a nonzero gradient


@dataclass
class _Tracker:
    """Which backward calls each parameter's gradient holds, and what each step of the script took."""

    file: str
    lines: Sequence[str]  # the text run (patched or not): names the backward calls
    optimizers: Any  # () -> the script's optimizers now
    taken: dict[int, list[frozenset[SourceLocation]]] = field(default_factory=dict)
    saw_gradient: dict[int, bool] = field(default_factory=dict)
    _holds: dict[int, list[SourceLocation]] = field(default_factory=dict)
    _steps: dict[int, int] = field(default_factory=dict)

    def __enter__(self) -> _Tracker:
        self._backward = torch.autograd.backward

        def backward(*args: Any, **kwargs: Any) -> Any:
            return self._on_backward(args, kwargs)

        torch.autograd.backward = backward
        self._hooks = [register_optimizer_step_pre_hook(self._before_step),
                       register_optimizer_step_post_hook(self._after_step)]
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.autograd.backward = self._backward
        for hook in self._hooks:
            hook.remove()

    def _params(self) -> list[torch.Tensor]:
        return [p for _, opt in self.optimizers() for group in opt.param_groups for p in group["params"]]

    def _on_backward(self, args: tuple, kwargs: dict) -> Any:
        params = self._params()
        before = {}
        for p in params:
            if p.grad is None or not bool(p.grad.any()):  # zeroed since: it holds no backward's gradient
                self._holds[id(p)] = []
            before[id(p)] = _grad_state(p)
        result = self._backward(*args, **kwargs)
        line = _line_in(self.file)
        if line is not None:
            at = SourceLocation(self.file, line, self.lines[line - 1].strip() if line <= len(self.lines) else "")
            for p in params:
                if _grad_state(p) != before[id(p)]:
                    self._holds.setdefault(id(p), []).append(at)
        return result

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        line = _line_in(self.file)
        if line is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        took = frozenset(at for p in params for at in self._holds.get(id(p), ()))
        self.taken.setdefault(line, []).append(took)
        self.saw_gradient.setdefault(line, any(p.grad is not None and bool(p.grad.any()) for p in params))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._steps[id(optimizer)] = self._steps.get(id(optimizer), 0) + 1
        if self._steps[id(optimizer)] >= STEPS:
            raise StopScript()


def _grad_state(p: torch.Tensor) -> tuple | None:
    # A backward that adds to a gradient writes it in place (its version moves) or sets a new one.
    return None if p.grad is None else (id(p.grad), p.grad._version)


def _line_in(file: str) -> int | None:
    # The line of the script running now (the call into torch's backward or the step).
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename != file:
        frame = frame.f_back
    return frame.f_lineno if frame is not None else None


def _run(path: pathlib.Path, text: str, args: Sequence[str]) -> _Run:
    from .._watch import Watch

    script = main_module(path)
    code = compile(text, str(path), "exec")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        with Watch(namespace=script.__dict__) as watch, \
                _Tracker(str(path), text.splitlines(), watch.optimizers) as tracker:
            try:
                _, error = exec_script(path, code, args, script)
            except StopScript:
                error = None
    errors = {(h.code, h.source.file if h.source else None, h.source.line if h.source else None)
              for h in watch.report.hazards("error")}
    return _Run(error, watch.stale, errors, tracker.taken, tracker.saw_gradient)


def loop_fixes(path: pathlib.Path, args: Sequence[str] = (), model_errors: bool = False) -> list[ProposedFix]:
    """Run the script watched; for each of the guard's findings that an optimizer step made, a
    checked move of the step after the backward that needed the old weights. Findings of other
    writes get their reason, unless `model_errors` (the script then fails in a model's own
    backward first, which the model's fixes are for)."""
    text = path.read_text(encoding="utf-8")
    first = _run(path, text, args)
    fixes = []
    for finding in first.stale:
        fix = _fix(path, text, args, finding, first)
        if fix.reason is not NoFixReason.NOT_A_STEP or not model_errors:
            fixes.append(fix)
    return fixes


def _fix(path: pathlib.Path, text: str, args: Sequence[str], finding: StaleSavedTensor, first: _Run) -> ProposedFix:
    def no_fix(status: FixStatus, reason: NoFixReason, detail: str = "", **done: Any) -> ProposedFix:
        return ProposedFix(None, status, FixKind.MOVE_STEP if done else None, reason=reason, detail=detail,
                           finding=finding, **done)

    if not finding.writes or any(w.kind is not WriteKind.OPTIMIZER for w in finding.writes):
        return no_fix(FixStatus.NO_SAFE_EDIT, NoFixReason.NOT_A_STEP)
    steps = {w.source for w in finding.writes}
    if len(steps) != 1:  # several step statements wrote it: which one to move is the user's call
        return no_fix(FixStatus.NO_SAFE_EDIT, NoFixReason.UNKNOWN_STATEMENT)
    (step,), backward = steps, finding.backward_at
    if step is None or backward is None or step.file != str(path) or backward.file != str(path):
        return no_fix(FixStatus.NO_SAFE_EDIT, NoFixReason.NOT_IN_SCRIPT)
    moved = move_step(text, step.line, backward.line)
    if moved is None:
        return no_fix(FixStatus.NO_SAFE_EDIT, NoFixReason.UNKNOWN_STATEMENT)
    patched, new_line, (moved_first, moved_last, by) = moved
    from . import _diff

    done = dict(file=str(path), line=step.line, diff=_diff(str(path), text, patched), patched_source=patched,
                edit=("move", step.line, backward.line))
    check = _run(path, patched, args)
    if check.stale:
        return no_fix(FixStatus.CHECK_FAILED, NoFixReason.HAZARD_REMAINS, **done)
    if check.error is not None:
        return no_fix(FixStatus.CHECK_FAILED, NoFixReason.NEW_ERROR, _said(check.error), **done)
    new = check.errors - first.errors
    if new:
        return no_fix(FixStatus.CHECK_FAILED, NoFixReason.NEW_ERROR, sorted(str(c[0]) for c in new)[0], **done)
    if new_line not in check.taken:
        return no_fix(FixStatus.CHECK_FAILED, NoFixReason.NEW_ERROR, "the moved step never ran", **done)
    if not check.saw_gradient[new_line]:
        return no_fix(FixStatus.CHECK_FAILED, NoFixReason.NO_GRADIENT, **done)
    before = {at.code for at in (first.taken.get(step.line) or [frozenset()])[0]}
    # Named at the original's lines, which the diff's reader has in front of them.
    gained = sorted((dataclasses.replace(at, line=at.line + by) if moved_first <= at.line <= moved_last else at
                     for at in check.taken[new_line][0] if at.code not in before), key=lambda at: at.line)
    return ProposedFix(None, FixStatus.CHECKED, FixKind.MOVE_STEP, finding=finding, gradients_from=tuple(gained),
                       **done)


def _said(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"
