"""The words of `fxinplace run` and the pytest plugin: the summary of a watched run, and what a
raw in-place autograd error means when nothing watched predicted it."""

from __future__ import annotations

from collections.abc import Sequence

from . import render
from .report import SEVERITIES, Report
from .training_guard import StaleSavedTensor, render_table
from .training_guard._render import explain

__all__ = ["summary", "unexplained_inplace_error", "predicted_inplace_error", "hazard_lines", "failure",
           "json_written", "failed_on", "no_model_ran", "applied", "watched_run_failed"]

GUARD_DOCS = "docs/guard.md"


def summary(report: Report, stale: Sequence[StaleSavedTensor], *, tables: bool = False,
            width: int | None = None) -> str:
    """Graphs audited, hazards by severity, each error-level hazard in one line, the guard's findings."""
    found = [h.severity.value for h in report.hazards()]
    counts = {s: found.count(s) for s in SEVERITIES}
    by_severity = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES))
    n = len(report.graphs)
    lines = [f"fxinplace run: {n} graph{'s' if n != 1 else ''} audited; hazards: {by_severity}; "
             f"training-loop guard: {len(stale)} stale saved tensor{'s' if len(stale) != 1 else ''}"]
    if tables:
        lines += [render.render_graph(g, width=width, every_row=False) for g in report.graphs]
    else:
        lines += hazard_lines(report, "error", width)
    if stale:
        lines.append(render_table(stale))
    return "\n".join(lines)


def hazard_lines(report: Report, min_severity: str = "error", width: int | None = None) -> list[str]:
    """One line per hazard at or above `min_severity`, with its graph's task names."""
    rank = SEVERITIES.index(min_severity)
    lines = []
    for graph in report.graphs:
        hazards = [h for h in graph.all_hazards() if SEVERITIES.index(h.severity.value) >= rank]
        lines += [render._fill(line, width, indent=6) for line in render.hazard_lines(hazards, graph.task_names)]
    return lines


def failure(report: Report, stale: Sequence[StaleSavedTensor], min_severity: str) -> str:
    """Why a watched test fails: its hazards at or above `min_severity`, and each stale saved tensor."""
    lines = ["fxinplace: in-place hazards at or above `" + min_severity + "`:"] + hazard_lines(report, min_severity)
    return "\n".join(lines + [explain(s) for s in stale])


def predicted_inplace_error(report: Report, width: int | None = None) -> str:
    """PyTorch's in-place error came, and the audit had predicted it: which hazards."""
    lines = ["fxinplace: the audit of the compiled graphs predicted this error:"]
    return "\n".join(lines + hazard_lines(report, "error", width))


def unexplained_inplace_error() -> str:
    """PyTorch's in-place error came, and neither the audit nor the guard saw the write."""
    return (f"fxinplace: PyTorch raised its in-place autograd error (\"{render.AUTOGRAD_ERROR}\"), and neither "
            "the audit of the compiled graphs nor the training-loop guard saw the write: it happened outside "
            "what was watched (a region with its own saved-tensor hooks such as torch.utils.checkpoint, "
            "another thread, or tensors saved before the run started). See "
            f"{GUARD_DOCS} (`fxinplace.guard`) for what the guard sees.")


def json_written(path: str) -> str:
    return f"fxinplace run: JSON report written to {path}"


def failed_on(fail_on: str) -> str:
    return f"fxinplace run: exit 1: hazards at or above `{fail_on}` (--fail-on {fail_on})"


def no_model_ran() -> str:
    return ("fxinplace fix: the script ran no torch.nn.Module before its first backward (or its end): nothing to "
            "audit. Call `fxinplace.propose_fixes(model, *inputs)` on the model yourself (docs/fixes.md).")


def watched_run_failed(said: str) -> str:
    return (f"fxinplace fix: the script failed when run watched for its loop's findings ({said}): its loop was "
            "checked up to there")


def applied(path: str) -> str:
    return f"fxinplace fix: wrote the checked fixes to {path}"
