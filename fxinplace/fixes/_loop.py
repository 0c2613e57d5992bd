"""Fix-its for the guard's loop findings: an optimizer step that ran between the forward that
saved a parameter and a backward that needs it moves to just after that backward.

    fixes, error = loop_fixes(script, args)   # runs the script watched; a checked move per finding

The script runs under the command line's `Watch` (the guard on, warning rather than raising, so
that every finding of the run is seen; every compile audited) until an optimizer has stepped
`STEPS` times (a loop that is wrong is wrong on its first step) or the script ends. The move is
checked the same way, on the patched text (the file is not written): the finding must be gone
with no new one, the script must not fail, exit non-zero or warn anew, no new error-level hazard
may appear, and the moved step must run and see a gradient. What the move changes is measured,
not guessed: on both runs, which backward calls added to the gradients each step took (read at
the step from the parameters' gradients, whichever optimizer holds them). A move that would
lose some of them (a `zero_grad()` in between) is refused; the backward calls it gains are the
fix's `gradients_from` (none: the same gradients, the step just runs later).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .._script import exec_script, main_module
from .._sources import SourceLocation
from ..facts import FixKind, FixStatus, NoFixReason
from ..training_guard import StaleSavedTensor, WriteKind
from ._capture import StopScript
from ._edits import MovedStep, move_step, unified_diff
from ._facts import ProposedFix

__all__ = ["loop_fixes", "STEPS"]

STEPS = 3  # an optimizer's steps before a watched run stops: two whole iterations of most loops


_Took = dict[tuple[int, int], frozenset[SourceLocation]]  # (group, index) of a parameter -> the backward calls


@dataclass
class _Run:
    error: BaseException | None
    exit_code: int
    stale: list[StaleSavedTensor]
    errors: set[tuple]  # the error-level hazards of the graphs it compiled: (code, file, line)
    warned: set[tuple]  # (category, first line) of each warning, the guard's own left out
    taken: dict[int, list[_Took]]  # a step's line -> per run, what it took
    saw_gradient: dict[int, bool]  # a step's line -> did its first run see a nonzero gradient


@dataclass
class _Tracker:
    """Which backward calls each parameter's gradient holds, and what each step of the script took.

    Lines are the original script's (`original_line` maps a patched text's back), so that two
    runs compare by place."""

    file: str
    lines: Sequence[str]  # the original script's text: names the backward calls
    original_line: Callable[[int], int]
    taken: dict[int, list[_Took]] = field(default_factory=dict)
    saw_gradient: dict[int, bool] = field(default_factory=dict)
    _holds: dict[int, list[SourceLocation]] = field(default_factory=dict)  # id(parameter) -> backward calls
    _left: dict[int, tuple | None] = field(default_factory=dict)  # id(parameter) -> its grad as a backward left it
    _leaves: dict[int, torch.Tensor] = field(default_factory=dict)  # keeps the ids above alive
    _steps: dict[int, int] = field(default_factory=dict)
    _backward: Callable[..., Any] | None = None
    _hooks: list[Any] = field(default_factory=list)

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

    def _on_backward(self, args: tuple, kwargs: dict) -> Any:
        leaves = _leaves_reached(args[0] if args else kwargs.get("tensors"))
        for p in leaves:
            self._leaves[id(p)] = p
            self._cleared_since(p)
        before = {id(p): _grad_state(p) for p in leaves}
        result = self._backward(*args, **kwargs)
        at = self._at()
        for p in leaves:
            state = _grad_state(p)
            if state != before[id(p)] and at is not None:
                self._holds.setdefault(id(p), []).append(at)
            self._left[id(p)] = state
        return result

    def _cleared_since(self, p: torch.Tensor) -> None:
        # Set to None or zeroed in place (`zero_grad`) since a backward last wrote it.
        if id(p) in self._left and _grad_state(p) != self._left[id(p)]:
            self._holds[id(p)] = []

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        line = _line_in(self.file)
        if line is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            self._cleared_since(p)
        # By the parameter's place in the optimizer, which two runs of the script share.
        took = {(g, i): frozenset(self._holds.get(id(p), ())) for g, group in enumerate(optimizer.param_groups)
                for i, p in enumerate(group["params"])}
        self.taken.setdefault(line, []).append(took)
        self.saw_gradient.setdefault(line, any(p.grad is not None and bool(p.grad.any()) for p in params))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._steps[id(optimizer)] = self._steps.get(id(optimizer), 0) + 1
        if self._steps[id(optimizer)] >= STEPS:
            raise StopScript()

    def _at(self) -> SourceLocation | None:
        line = _line_in(self.file)
        if line is None:
            return None
        line = self.original_line(line)
        return SourceLocation(self.file, line, self.lines[line - 1].strip() if line <= len(self.lines) else "")


def _leaves_reached(roots: Any) -> list[torch.Tensor]:
    # The tensors whose gradient a backward from `roots` accumulates (its `AccumulateGrad` nodes).
    tensors = [roots] if isinstance(roots, torch.Tensor) else list(roots or ())
    found, seen = {}, set()
    stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    found.update({id(t): t for t in tensors if isinstance(t, torch.Tensor) and t.is_leaf and t.requires_grad})
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


def _grad_state(p: torch.Tensor) -> tuple | None:
    # A backward that adds to a gradient writes it in place (its version moves) or sets a new one.
    return None if p.grad is None else (id(p.grad), p.grad._version)


def _line_in(file: str) -> int | None:
    # The line of the script running now (the call into torch's backward or the step).
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename != file:
        frame = frame.f_back
    return frame.f_lineno if frame is not None else None


def _run(path: pathlib.Path, text: str, args: Sequence[str], original: str,
         original_line: Callable[[int], int] = lambda line: line) -> _Run:
    from .._watch import Watch
    from ..training_guard import StaleSavedTensorWarning

    script = main_module(path)
    code = compile(text, str(path), "exec")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Watch(namespace=script.__dict__, on_stale="warn") as watch, \
                _Tracker(str(path), original.splitlines(), original_line) as tracker:
            try:
                exit_code, error = exec_script(path, code, args, script)
            except StopScript:
                exit_code, error = 0, None

    def place(source) -> tuple:
        if source is None:
            return (None, None)
        return (source.file, original_line(source.line) if source.file == str(path) else source.line)

    errors = {(h.code, *place(h.source)) for h in watch.report.hazards("error")}
    warned = {(w.category.__name__, str(w.message).splitlines()[0] if str(w.message) else "")
              for w in caught if not issubclass(w.category, StaleSavedTensorWarning)}
    stale = [_placed(s, path, original_line) for s in watch.stale]
    return _Run(error, exit_code, stale, errors, warned, tracker.taken, tracker.saw_gradient)


def _placed(s: StaleSavedTensor, path: pathlib.Path, original_line: Callable[[int], int]) -> StaleSavedTensor:
    # A finding of a patched run, at the original's lines.
    def at(source: SourceLocation | None) -> SourceLocation | None:
        if source is None or source.file != str(path):
            return source
        return dataclasses.replace(source, line=original_line(source.line))

    writes = tuple(dataclasses.replace(w, source=at(w.source)) for w in s.writes)
    return dataclasses.replace(s, saved_at=at(s.saved_at), backward_at=at(s.backward_at), called_at=at(s.called_at),
                               writes=writes)


def _key(s: StaleSavedTensor) -> tuple:
    return (s.name, s.shape, s.saved_at and s.saved_at.line, s.backward_at and s.backward_at.line)


def loop_fixes(path: pathlib.Path, args: Sequence[str] = (),
               model_errors: bool = False) -> tuple[list[ProposedFix], BaseException | None]:
    """Run the script watched; for each of the guard's findings that an optimizer step made, a
    checked move of the step after the backward that needed the old weights. Findings of other
    writes get their reason, unless `model_errors` (the script then fails in a model's own
    backward first, which the model's fixes are for). Also returns what the watched run raised,
    if it did (not a finding: the guard warns)."""
    text = path.read_text(encoding="utf-8")
    first = _run(path, text, args, text)
    # Findings one edit is for (a step that changed several saved weights) share one entry.
    groups: dict[tuple, list[StaleSavedTensor]] = {}
    for finding in first.stale:
        edit = (tuple(dict.fromkeys(w.source for w in finding.writes)), finding.backward_at)
        if all(_key(finding) != _key(f) for f in groups.get(edit, ())):
            groups.setdefault(edit, []).append(finding)
    fixes = []
    for findings in groups.values():
        fix = _fix(path, text, args, findings, first)
        if fix.reason is not NoFixReason.NOT_A_STEP or not model_errors:
            fixes.append(fix)
    return fixes, first.error


def _fix(path: pathlib.Path, text: str, args: Sequence[str], findings: list[StaleSavedTensor],
         first: _Run) -> ProposedFix:
    finding = findings[0]

    def no_fix(status: FixStatus, reason: NoFixReason, detail: str = "", **done: Any) -> ProposedFix:
        return ProposedFix.of(None, status, FixKind.MOVE_STEP if done else None, reason=reason, detail=detail,
                              findings=tuple(findings), **done)

    if not finding.writes or any(w.kind is not WriteKind.OPTIMIZER for w in finding.writes):
        return no_fix(FixStatus.NO_SAFE_EDIT, NoFixReason.NOT_A_STEP)
    steps = {w.source for w in finding.writes}
    if len(steps) != 1:
        return no_fix(FixStatus.NO_SAFE_EDIT, NoFixReason.SEVERAL_STEPS)
    (step,), backward = steps, finding.backward_at
    if step is None or backward is None or step.file != str(path) or backward.file != str(path):
        return no_fix(FixStatus.NO_SAFE_EDIT, NoFixReason.NOT_IN_SCRIPT)
    moved = move_step(text, step.line, backward.line)
    if not isinstance(moved, MovedStep):
        return no_fix(FixStatus.NO_SAFE_EDIT, moved)
    done = dict(file=str(path), line=step.line, diff=unified_diff(str(path), text, moved.text),
                patched_source=moved.text, edit=("move", step.line, backward.line))
    check = _run(path, moved.text, args, text, moved.original_line)

    def failed(reason: NoFixReason, detail: str = "") -> ProposedFix:
        return no_fix(FixStatus.CHECK_FAILED, reason, detail, **done)

    before = {_key(s) for s in first.stale}
    after = {_key(s) for s in check.stale}
    if any(_key(f) in after for f in findings):
        return failed(NoFixReason.HAZARD_REMAINS)
    if after - before:
        return failed(NoFixReason.NEW_ERROR, "the guard finds a stale saved tensor it did not find before")
    if check.error is not None or check.exit_code != 0:
        said = _said(check.error) if check.error is not None else f"the script exits with {check.exit_code}"
        return failed(NoFixReason.NEW_ERROR, said)
    new = check.errors - first.errors
    if new:
        return failed(NoFixReason.NEW_ERROR, sorted(str(c[0]) for c in new)[0])
    warned = check.warned - first.warned
    if warned:
        return failed(NoFixReason.NEW_WARNING, " ".join(sorted(warned)[0]))
    if moved.line not in check.taken:
        return failed(NoFixReason.STEP_NOT_RUN)
    if not check.saw_gradient[moved.line]:
        return failed(NoFixReason.NO_GRADIENT)
    took_before = (first.taken.get(step.line) or [{}])[0]
    took_after = check.taken[moved.line][0]
    places = set(took_before) | set(took_after)
    lost = {at for p in places for at in took_before.get(p, frozenset()) - took_after.get(p, frozenset())}
    if lost:
        return failed(NoFixReason.LOSES_GRADIENTS, ", ".join(f"`{at.code}` at {at}" for at in _in_order(lost)))
    gained = _in_order({at for p in places for at in took_after.get(p, frozenset()) - took_before.get(p, frozenset())})
    return ProposedFix.of(None, FixStatus.CHECKED, FixKind.MOVE_STEP, findings=tuple(findings), gradients_from=gained,
                          **done)


def _in_order(places: set[SourceLocation]) -> tuple[SourceLocation, ...]:
    return tuple(sorted(places, key=lambda at: at.line))


def _said(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"
