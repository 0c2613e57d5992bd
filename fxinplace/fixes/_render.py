"""The words of the fix-its: what each kind of edit changes, and why a hazard has none."""

from __future__ import annotations

from typing import Sequence

from .. import render
from .._sources import SourceLocation
from ._facts import FixKind, FixStatus, NoFixReason, ProposedFix

__all__ = ["render_fixes", "semantics", "fix_line", "fixes_dict"]

_SEMANTICS = {
    FixKind.OUT_OF_PLACE: "same values, one extra tensor: the name now holds a new tensor, and whatever else "
                          "holds the old one (a view, a list, the caller) keeps the old values",
    FixKind.INPLACE_FALSE: "same values, one extra tensor per call: the input is no longer overwritten",
    FixKind.CLONE_FIRST: "same values, one extra copy: the write lands in the copy, the tensor autograd saved "
                         "keeps its values",
}

_NO_FIX = {
    NoFixReason.NO_SOURCE: "no line of yours made this write (it is in torch's code, or the file is gone)",
    NoFixReason.UNKNOWN_STATEMENT: "the statement is not one fxinplace rewrites safely (only a plain name is "
                                   "rewritten: `h.relu_()`, `h += b`, `h[i] = v`, `inplace=True`)",
    NoFixReason.NOT_A_METHOD: "the line is in no method of the model's modules (the check swaps the method)",
    NoFixReason.NO_CONSTRUCTOR: "no constructor call of yours builds the module with `inplace=True`",
    NoFixReason.HAZARD_REMAINS: "the patched model still has the hazard",
    NoFixReason.NEW_ERROR: "the patched model has a new error",
    NoFixReason.DIFFERENT_GRADIENTS: "the patched model does not train like the functionalized original",
}


def semantics(kind: FixKind) -> str:
    """What an edit of `kind` changes, in one sentence."""
    return _SEMANTICS[kind]


def fix_line(fix: ProposedFix) -> str:
    """One line: the fix and what it changes, or why there is none."""
    where = f" at {SourceLocation(fix.file, fix.line or 0, '')}" if fix.file else ""
    if fix.status is FixStatus.CHECKED:
        return f"fix ({fix.kind.value}){where}: {semantics(fix.kind)}"
    why = _NO_FIX[fix.reason] + (f" ({fix.detail})" if fix.detail else "")
    advice = render.fix_text(fix.hazard)
    status = "no checked fix" if fix.status is FixStatus.CHECK_FAILED else "no safe edit"
    return f"{status}{where}: {why}" + (f"; advice: {advice}" if advice else "")


def render_fixes(fixes: Sequence[ProposedFix]) -> str:
    if not fixes:
        return "fxinplace: no error-level hazard, nothing to fix"
    blocks = []
    for fix in fixes:
        head = "\n".join(f"{h.severity.value.upper()} [{h.code.value}] {render.message(h, fix.task_names)}"
                         for h in (fix.hazard, *fix.also))
        blocks.append("\n".join([head, "  " + fix_line(fix)] + ([fix.diff.rstrip("\n")] if fix.diff and
                                                               fix.status is FixStatus.CHECKED else [])))
    checked = sum(f.status is FixStatus.CHECKED for f in fixes)
    blocks.append(f"checked fixes: {checked} of {len(fixes)}")
    return "\n\n".join(blocks)


def fixes_dict(fixes: Sequence[ProposedFix]) -> dict:
    """The fixes as data (`fxinplace fix --json`): per entry its status, the edit, and the
    hazards it is for, as the report's JSON writes them."""
    return {
        "fixes": [{
            "status": f.status.value,
            "kind": f.kind.value if f.kind else None,
            "semantics": semantics(f.kind) if f.kind and f.status is FixStatus.CHECKED else None,
            "file": f.file,
            "line": f.line,
            "diff": f.diff if f.status is FixStatus.CHECKED else "",
            "reason": f.reason.value if f.reason else None,
            "detail": f.detail,
            "text": fix_line(f),
            "hazards": [render.hazard_dict(h, f.task_names) for h in (f.hazard, *f.also)],
        } for f in fixes],
        "checked": sum(f.status is FixStatus.CHECKED for f in fixes),
        "total": len(fixes),
    }
