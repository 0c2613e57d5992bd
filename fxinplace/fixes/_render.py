"""The fix-its as text and data; the words for one fix are `fxinplace.render`'s (the report shows them too)."""

from __future__ import annotations

from typing import Sequence

from .. import render
from ..training_guard._render import advice, explain, finding_dict
from ._facts import FixStatus, ProposedFix

__all__ = ["render_fixes", "fix_line", "fixes_dict"]


def fix_line(fix: ProposedFix) -> str:
    """One line: the fix and what it changes, or why there is none."""
    return render.patch_text(fix.patch, _advice(fix))


def _advice(fix: ProposedFix) -> str:
    return advice(fix.findings[0]) if fix.findings else render.fix_text(fix.hazard)


def _head(fix: ProposedFix) -> str:
    if fix.findings:  # the guard's messages; the advice is the fix line's
        return "\n".join(explain(f, with_fix=False) for f in fix.findings)
    return "\n".join(f"{h.severity.value.upper()} [{h.code.value}] {render.message(h, fix.task_names)}"
                     for h in (fix.hazard, *fix.also))


def render_fixes(fixes: Sequence[ProposedFix]) -> str:
    if not fixes:
        return "fxinplace: no error-level hazard, nothing to fix"
    blocks = []
    for fix in fixes:
        blocks.append("\n".join([_head(fix), "  " + fix_line(fix)] + ([fix.diff.rstrip("\n")] if fix.diff and
                                                               fix.status is FixStatus.CHECKED else [])))
    checked = sum(f.status is FixStatus.CHECKED for f in fixes)
    blocks.append(f"checked fixes: {checked} of {len(fixes)}")
    return "\n\n".join(blocks)


def fixes_dict(fixes: Sequence[ProposedFix]) -> dict:
    """The fixes as data (`fxinplace fix --json`): per entry its status, the edit, and the
    hazards it is for, as the report's JSON writes them."""
    return {
        "fixes": [{
            **render.patch_dict(f.patch, _advice(f)),
            "hazards": [render.hazard_dict(h, f.task_names) for h in (f.hazard, *f.also) if h is not None],
            "findings": [finding_dict(s) for s in f.findings],
        } for f in fixes],
        "checked": sum(f.status is FixStatus.CHECKED for f in fixes),
        "total": len(fixes),
    }
