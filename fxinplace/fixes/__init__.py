"""Fix-its: for each error-level hazard, a checked patch of the user's file at the user's line.

    fixes = fxinplace.propose_fixes(model, x)   # audits, edits, checks; changes nothing
    print(fixes.render())                       # each fix as a unified diff, with what it changes
    fixes.apply()                               # writes the checked patches to the files

A patch is shown only once it is checked: the patched model, run in eager PyTorch, no longer
has the hazard, has no new error, and trains like the functionalized original (the same
program written out of place). Where no safe edit is known, or the check fails, the entry
says why, and the hazard's advice stands.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._compat import dynamo_reset, pytree
from .._sources import is_internal_file
from ..facts import Hazard, Severity
from ..report import GraphReport
from ._check import difference, method_at, method_swapped, outcome_of, patched_method
from ._edits import MovedStep, edit_statement, flip_inplace_calls, move_step, unified_diff
from ._facts import FixKind, FixStatus, NoFixReason, ProposedFix
from ._render import fixes_dict, render_fixes

__all__ = ["propose_fixes", "FixReport", "ProposedFix", "FixKind", "FixStatus", "NoFixReason"]


@dataclass(frozen=True)
class FixReport:
    """One entry per site of an error-level hazard (a write whose hazards share one fix)."""

    fixes: tuple[ProposedFix, ...]

    @property
    def checked(self) -> list[ProposedFix]:
        return [f for f in self.fixes if f.status is FixStatus.CHECKED]

    def render(self) -> str:
        return render_fixes(self.fixes)

    def to_dict(self) -> dict:
        """The fixes as data: status, kind, file, line, diff, reason, and the hazards (docs/fixes.md)."""
        return fixes_dict(self.fixes)

    def attached_to(self, graph: GraphReport) -> GraphReport:
        """`graph` with each error-level hazard carrying its entry's `Patch` (`Hazard.patch`): the
        entry for the same write (the same line, or module and op), found by auditing a copy."""
        by_key = {_key(h, None): fix.patch for fix in self.fixes for h in (fix.hazard, *fix.also)}
        by_key.pop(None, None)

        def patched(hazards: tuple[Hazard, ...]) -> tuple[Hazard, ...]:
            return tuple(dataclasses.replace(h, patch=by_key[_key(h, None)])
                         if h.severity is Severity.ERROR and _key(h, None) in by_key else h for h in hazards)

        mutations = tuple(dataclasses.replace(m, hazards=patched(m.hazards)) for m in graph.mutations)
        return dataclasses.replace(graph, mutations=mutations, hazards=patched(graph.hazards))

    def apply(self) -> list[str]:
        """Write every checked patch to its file, those to one file together (from the
        bottom up, so that each edit finds its line); returns the files written."""
        by_file: dict[str, list[ProposedFix]] = {}
        for fix in self.checked:
            by_file.setdefault(fix.file, []).append(fix)
        for file, fixes in by_file.items():
            with open(file, encoding="utf-8") as f:
                text = f.read()
            for fix in sorted(fixes, key=lambda f: f.line, reverse=True):
                redone = _redo(fix.edit, text)
                if redone is None:
                    raise RuntimeError(f"fxinplace: the fix at {file}:{fix.line} no longer applies: was the file changed?")
                text = redone
            with open(file, "w", encoding="utf-8") as f:
                f.write(text)
        return list(by_file)


def _redo(edit: tuple, text: str) -> str | None:
    if edit[0] == "move":
        done = move_step(text, *edit[1:])
        return done.text if isinstance(done, MovedStep) else None
    if edit[0] == "statement":
        done = edit_statement(text, edit[1])
        return done[0] if done else None
    done = flip_inplace_calls(text, *edit[1:])
    return done[0] if done else None


def propose_fixes(model: torch.nn.Module, *args: Any, **kwargs: Any) -> FixReport:
    """Audit `model(*args, **kwargs)` and propose a checked fix for each error-level hazard.

    The model, its inputs and the user's files are left as they are: every run is on a copy.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"propose_fixes: `model` must be a torch.nn.Module, got {type(model).__name__}")
    with torch.random.fork_rng():  # the checks seed their steps: the caller's random stream stays as it was
        return _propose(model, args, kwargs)


def _propose(model, args, kwargs) -> FixReport:
    found = _errors(model, args, kwargs)
    before = [h for h, _ in found]
    sites: dict[Any, list[tuple[Hazard, tuple]]] = {}
    for h, names in found:
        sites.setdefault(_key(h, None) or h, []).append((h, names))
    reference = _functionalized_outcome(model, args, kwargs) if sites else None
    fixes = []
    for hazards in sites.values():
        (hazard, names), others = hazards[0], hazards[1:]
        fix = _fix(model, args, kwargs, hazard, before, reference)
        fixes.append(dataclasses.replace(fix, task_names=names, also=tuple(h for h, _ in others)))
    return FixReport(tuple(fixes))


def _errors(model, args, kwargs) -> list[tuple[Hazard, tuple]]:
    """The error-level hazards of one audited run of a copy of `model`, with their graph's task names."""
    from ..api import audit

    copied = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = audit(copied, *_copied(args), options={"print": False}, **_copied(kwargs))
    return [(h, report.graph_of(h).task_names) for h in report.hazards("error") if h.severity is Severity.ERROR]


def _copied(inputs, leaves: list[torch.Tensor] | None = None):
    """A deep copy; `leaves` gets, for each input that requires grad, the leaf its gradient reaches.

    A tensor the caller computed (`D(G(z))`, `l * 1.5`) cannot be deep-copied with its graph: it
    becomes a clone of a fresh leaf, so that an in-place write to it is still one to a non-leaf."""
    memo: dict[int, Any] = {}
    stand_ins = {}
    for t in pytree.tree_leaves(inputs):
        if isinstance(t, torch.Tensor) and not t.is_leaf:
            stand_ins[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
            memo[id(t)] = stand_ins[id(t)].clone()
    copied = copy.deepcopy(inputs, memo)
    if leaves is not None:
        for original, new in zip(pytree.tree_leaves(inputs), pytree.tree_leaves(copied)):
            if isinstance(original, torch.Tensor) and original.requires_grad:
                leaves.append(stand_ins.get(id(original), new))
    return copied


def _step(model, args, kwargs, call=None):
    """One training step of `call` (the model) on copies of the inputs, with their gradients."""
    leaves: list[torch.Tensor] = []
    a, k = _copied(args, leaves), _copied(kwargs, leaves)
    return outcome_of(lambda: (call if call is not None else model)(*a, **k), model, inputs=leaves)


def _functionalized_outcome(model, args, kwargs):
    """One step of the functionalized original: the same program written out of place. Where
    it still fails with the in-place error (a parameter saved in one graph and written after a
    break is left as it is), one eager step that saves a copy of each tensor autograd saves: the
    gradients an out-of-place program gets."""
    from ..backend import InplaceAudit

    copied = copy.deepcopy(model)
    compiled = torch.compile(copied, backend=InplaceAudit(compiler="eager", functionalize=True, print=False))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = _step(copied, args, kwargs, compiled)
    finally:
        dynamo_reset()
    if outcome.error is None or "modified by an inplace operation" not in outcome.error:
        return outcome
    copied = copy.deepcopy(model)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        return _step(copied, args, kwargs)


def _fix(model, args, kwargs, hazard: Hazard, before: list[Hazard], reference) -> ProposedFix:
    site = hazard.mutated_by
    module = _inplace_module(model, site)
    if module is not None:
        return _fix_constructor(model, args, kwargs, hazard, module, before, reference)
    if hazard.source is None:
        return ProposedFix.of(hazard, FixStatus.NO_SAFE_EDIT, reason=NoFixReason.NO_SOURCE)
    file, line = hazard.source.file, hazard.source.line
    try:
        with open(file, encoding="utf-8") as f:
            original = f.read()
    except OSError:
        return ProposedFix.of(hazard, FixStatus.NO_SAFE_EDIT, file=file, line=line, reason=NoFixReason.NO_SOURCE)
    edited = edit_statement(original, line)
    if edited is None:
        return ProposedFix.of(hazard, FixStatus.NO_SAFE_EDIT, file=file, line=line, reason=NoFixReason.UNKNOWN_STATEMENT)
    patched_source, kind = edited
    method = method_at(model, file, line)
    if method is None:
        return ProposedFix.of(hazard, FixStatus.NO_SAFE_EDIT, kind, file, line, reason=NoFixReason.NOT_A_METHOD)
    shift = patched_source.count("\n") - original.count("\n")
    try:
        function = patched_method(method, patched_source, shift)
    except Exception as e:  # the edit does not compile as a method: say so, propose nothing
        return ProposedFix.of(hazard, FixStatus.CHECK_FAILED, kind, file, line, reason=NoFixReason.NEW_ERROR,
                           detail=f"{type(e).__name__}: {e}")
    proposed = ProposedFix.of(hazard, FixStatus.CHECKED, kind, file, line, unified_diff(file, original, patched_source),
                           patched_source, edit=("statement", line))
    with method_swapped(method, function):
        return _checked(proposed, model, args, kwargs, {(file, line)}, before, reference, (file, line, shift))


def _fix_constructor(model, args, kwargs, hazard, found, before, reference) -> ProposedFix:
    path, module, owner_path, owner = found
    site = hazard.mutated_by
    try:
        init = vars(type(owner))["__init__"]
        file = init.__code__.co_filename
        lines, first = inspect.getsourcelines(init)
        with open(file, encoding="utf-8") as f:
            original = f.read()
    except (KeyError, AttributeError, OSError, TypeError):
        return ProposedFix.of(hazard, FixStatus.NO_SAFE_EDIT, reason=NoFixReason.NO_CONSTRUCTOR)
    edit = ("constructor", first, first + len(lines) - 1, type(module).__name__)
    flipped = flip_inplace_calls(original, *edit[1:])
    if flipped is None:
        return ProposedFix.of(hazard, FixStatus.NO_SAFE_EDIT, file=file, line=first, reason=NoFixReason.NO_CONSTRUCTOR)
    patched_source, line = flipped
    patched = copy.deepcopy(model)
    for m in _made_by(patched, owner_path, type(module)):
        m.inplace = False  # what the patched constructor makes
    keys = {(site.module, site.op)} if site is not None else set()
    proposed = ProposedFix.of(hazard, FixStatus.CHECKED, FixKind.INPLACE_FALSE, file, line,
                           unified_diff(file, original, patched_source), patched_source, edit=edit)
    return _checked(proposed, patched, args, kwargs, keys, before, reference, None)


def _inplace_module(model, site):
    """(path, module, owner path, owner) for a write by a module built with `inplace=True`, the
    owner being the nearest enclosing module of a user's class (its constructor built it)."""
    if site is None or not site.module:
        return None
    try:
        module = model.get_submodule(site.module)
    except AttributeError:
        return None
    if getattr(module, "inplace", None) is not True or type(module).__name__ != site.module_type:
        return None
    # torch's own module (`nn.ReLU`) writes in its code; a class of the user's with an `inplace`
    # flag of its own wrote at a line of the user's, which the statement edit rewrites.
    forward = getattr(type(module).forward, "__code__", None)
    if forward is None or not is_internal_file(forward.co_filename):
        return None
    parts = site.module.split(".")
    for n in range(len(parts) - 1, -1, -1):
        owner_path = ".".join(parts[:n])
        owner = model.get_submodule(owner_path) if owner_path else model
        if _builds_its_modules(type(owner)):
            return site.module, module, owner_path, owner
    return None


def _made_by(model, owner_path: str, kind: type) -> list[torch.nn.Module]:
    # Modules of `kind` the owner's constructor made: under it, with only torch's own
    # containers (Sequential, ModuleList, ...) between.
    owner = model.get_submodule(owner_path) if owner_path else model
    made = []
    for path, m in owner.named_modules():
        if type(m) is not kind or not path:
            continue
        between = path.split(".")[:-1]
        chain = [owner.get_submodule(".".join(between[:i + 1])) for i in range(len(between))]
        if not any(_builds_its_modules(type(c)) for c in chain):
            made.append(m)
    return made


def _builds_its_modules(cls: type) -> bool:
    # A class of the user's with its own constructor (torch's containers have theirs in torch).
    init = vars(cls).get("__init__")
    code = getattr(init, "__code__", None)
    return code is not None and not is_internal_file(code.co_filename)


def _checked(proposed: ProposedFix, patched, args, kwargs, keys, before, reference, moved) -> ProposedFix:
    def failed(reason: NoFixReason, detail: str = "") -> ProposedFix:
        return proposed.failed(reason, detail)

    try:
        after = [h for h, _ in _errors(patched, args, kwargs)]
    except Exception as e:
        return failed(NoFixReason.NEW_ERROR, f"{type(e).__name__}: {e}")
    old = {_identity(h, None) for h in before}
    remaining = [h for h in after if _key(h, moved) in keys]
    if remaining:
        return failed(NoFixReason.HAZARD_REMAINS)
    new = [h for h in after if _identity(h, moved) not in old]
    if new:
        return failed(NoFixReason.NEW_ERROR, new[0].code.value)
    # Other sites' errors still there: compare the functionalized patch with the functionalized original.
    if after:
        ours = _functionalized_outcome(patched, args, kwargs)
    else:
        patched = copy.deepcopy(patched)
        ours = _step(patched, args, kwargs)
    differs = difference(ours, reference)
    if differs is not None:
        return failed(NoFixReason.DIFFERENT_GRADIENTS, differs)
    return proposed


def _key(h: Hazard, moved):
    if h.source is None:
        return (h.mutated_by.module, h.mutated_by.op) if h.mutated_by else None
    return (h.source.file, _unshift(h.source.file, h.source.line, moved))


def _identity(h: Hazard, moved):
    # Not the target's name: an intermediate's name is Dynamo's, and changes with the graph.
    return (h.code, _key(h, moved))


def _unshift(file: str, line: int, moved) -> int:
    # The edit added `shift` lines after `line` of `file`: later lines had these numbers before.
    if moved is None:
        return line
    edited_file, edited_line, shift = moved
    if file == edited_file and line > edited_line:
        return max(edited_line, line - shift)
    return line
