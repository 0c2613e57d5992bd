"""The guard's words: the error message with its fix, and the table of findings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tabulate import tabulate

from .._sources import SourceLocation
from ._facts import StaleSavedTensor, WriteKind

__all__ = ["explain", "advice", "render_table", "compiled_write_by", "finding_dict", "tensor_words"]


def compiled_write_by(graph, mutation) -> str:
    """How a message names a write a graph compiled with `inplace_audit` makes (`_write_log`)."""
    tasks = graph.tasks_of(mutation)
    task = f", task {', '.join(tasks)}" if tasks else ""
    return f"`{mutation.op}` in graph {graph.compile_id} `{graph.function}` (compiled, audited by inplace_audit{task})"


def tensor_words(kind: str, name: str | None, is_view: bool, shape: tuple[int, ...], op: str | None) -> str:
    """A finding's tensor in words (`StaleSavedTensor.tensor`), from `Names.tensor`'s answer."""
    if name is None:
        return f"a {list(shape)} tensor" + (f" saved by `{op}`" if op else "")
    if is_view:
        return f"a {list(shape)} view of {kind} `{name}`"
    return f"{kind} `{name}` {list(shape)}"


def explain(stale: StaleSavedTensor, with_fix: bool = True) -> str:
    """The error message: what changed, who saved it and for what, who changed it, the fix
    (left out without `with_fix`: a fix-it says its own)."""
    s = stale
    if s.hidden and s.writes and s.writes[0].kind is WriteKind.OPTIMIZER:  # see `_fsdp`
        head = (
            f"fxinplace.guard: {s.tensor} was changed after autograd saved it: an optimizer step "
            "updated its shard and FSDP all-gathered the new values into the same unsharded "
            f"tensor without moving its version counter (version {s.version_now}), so PyTorch "
            "would not have noticed and would have computed gradients from the new values."
        )
    elif s.by_value and not s.writes:
        head = (
            f"fxinplace.guard: the values of {s.tensor} changed after autograd saved it, and its version "
            f"counter did not move (version {s.version_now}): a write no version counter sees (`.data` in "
            "code the guard does not watch, such as the model's forward or compiled code; a fused or foreign "
            "kernel that writes its input; a custom op that does not declare `mutates_args`). PyTorch would "
            "not have noticed and would have computed gradients from the new values."
        )
    elif s.hidden:
        head = (
            f"fxinplace.guard: {s.tensor} was written through `.data` after autograd "
            f"saved it; its version counter did not move (version {s.version_now}), so PyTorch "
            "would not have noticed and would have computed gradients from the new values."
        )
    else:
        head = (
            "fxinplace.guard: one of the variables needed for gradient computation has been "
            f"modified by an inplace operation: {s.tensor} is at version "
            f"{s.version_now}; expected version {s.version_saved} instead."
        )
    lines = [_rank_head() + head]
    saved = f"`{s.op}`" if s.op else _compiled_or_unknown(s.node)
    if s.watched:
        lines.append(f"  saved by:   {saved} at {_where(s.saved_at)}{_called(s.saved_at, s.called_at)}{_task(s.saved_for)}")
    elif s.seen_saved_at is None:
        lines.append(f"  saved by:   {saved} (line not recorded: this entry was checked by PyTorch's version "
                     "counter, not watched by the guard's hooks; check=\"all\" records it)")
    else:
        lines.append(f"  saved by:   {saved} (not recorded on this entry; on the entries the guard watched, at "
                     f"{_where(s.seen_saved_at)}{_called(s.seen_saved_at, s.seen_called_at)})")
    if s.writes:
        for w in s.writes:
            lines.append(f"  changed by: {w.by} at {_where(w.source)}")
    elif not s.watched:
        logged = "only optimizer steps" if s.steps_logged else "no writes"
        lines.append(f"  changed by: not known (on this entry the guard logged {logged}; check=\"all\" names every write)")
    else:
        lines.append(
            "  changed by: code the guard did not see (compiled kernels, a C++ extension, "
            "another thread, or code run outside the guard)"
        )
    call = f"`{s.backward}`" if s.backward else "a backward"
    node = f"{s.node} in " if s.node else ""
    lines.append(f"  needed by:  {node}{call} at {_where(s.backward_at)}{_task(s.needed_for)}")
    if with_fix:
        lines.append("How to fix: " + advice(s))
    return "\n".join(lines)


def render_table(found: Sequence[StaleSavedTensor]) -> str:
    """The findings as a table, in the style of the backend's mutation tables."""
    if not found:
        return f"{_rank_head()}fxinplace.guard: no stale saved tensors"
    headers = ["#", "tensor", "saved by", "saved at", "changed by", "changed at", "needed by",
               "backward at", "task", "version"]
    rows = []
    for i, s in enumerate(found):
        first = s.writes[0] if s.writes else None
        tasks = [t for t in (s.saved_for, s.needed_for) if t]
        rows.append([
            i,
            f"`{s.name}`" if s.name else f"{list(s.shape)} tensor",
            s.op or _compiled_or_unknown(s.node),
            str(s.saved_at) if s.saved_at else "?",
            (first.by + (f" (+{len(s.writes) - 1})" if len(s.writes) > 1 else "")) if first else "?",
            str(first.source) if first and first.source else "?",
            s.node or "?",
            str(s.backward_at) if s.backward_at else "?",
            " > ".join(dict.fromkeys(tasks)) or "-",
            _version_cell(s),
        ])
    n = len(found)
    head = f"{_rank_head()}fxinplace.guard: {n} stale saved tensor{'s' if n != 1 else ''}"
    return head + "\n" + tabulate(rows, headers=headers, tablefmt="simple")


def advice(s: StaleSavedTensor) -> str:
    """How to fix a finding, in words (the last line of `explain`)."""
    target = f"`{s.name}`" if s.name else "the saved tensor"
    w = s.writes[0] if s.writes else None
    if w is None:
        forward = f"the forward at {_where(s.saved_at)}" if s.saved_at is not None else "the forward that saved it"
        fix = f"Find what writes to {target} between {forward} and this backward, and move it after the backward."
    elif w.kind is WriteKind.OPTIMIZER:
        fix = (
            f"{w.by} updated {target} between the forward that saved it and this backward. Run "
            "every backward that needs that forward before stepping (for several tasks or losses: "
            "call backward or torch.autograd.grad for each, then step once), or run the forward "
            "again after the step."
        )
    elif w.kind is WriteKind.DATA:
        fix = (
            f"Move the write to {target} after the last backward that needs the forward, and "
            "write under `torch.no_grad()` without `.data`, so that PyTorch can check it."
        )
    else:
        fix = (
            f"`{w.op}` wrote to {target} after it was saved. Move it after the last backward that "
            "needs the forward (clipping, EMA and other parameter updates belong after every "
            "backward of the step), or write out of place or on a clone so that the saved value "
            "stays intact."
        )
    return fix + (
        " `retain_graph=True` does not help: it keeps the saved tensors, not their old values. "
        "If the backward really needs the old value, clone the tensor before the write."
    )


def _version_cell(s: StaleSavedTensor) -> str:
    if not s.hidden:
        return f"{s.version_saved} -> {s.version_now}"
    gathered = s.writes and s.writes[0].kind is WriteKind.OPTIMIZER  # FSDP, see `_fsdp`
    if s.by_value and not s.writes:
        return f"{s.version_now} (values)"
    return f"{s.version_now} ({'all-gathered' if gathered else '.data'})"


def _rank_head() -> str:
    # As the backend's tables (`backend._rank`): under torch.distributed every rank reports,
    # and the head says whose report a line of the merged output is.
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"[rank {dist.get_rank()}] "
    return ""


def _where(source: SourceLocation | None) -> str:
    if source is None:
        return "?"
    return f"{source}" + (f" `{source.code}`" if source.code else "")


def _called(saved_at: SourceLocation | None, called_at: SourceLocation | None) -> str:
    # The loop's line that called the model, unless it is the saving line itself.
    if called_at is None or (saved_at is not None and (called_at.file, called_at.line) == (saved_at.file, saved_at.line)):
        return ""
    return f", called from {_where(called_at)}"


def _task(task: str | None) -> str:
    return f", task `{task}`" if task else ""


def _compiled_or_unknown(node: str | None) -> str:
    if node and node.startswith("CompiledFunction"):
        return "a compiled graph"
    return "an op the guard did not see run"


def finding_dict(s: StaleSavedTensor) -> dict:
    """A finding as data (`fxinplace fix --json`): the tensor, its lines and the message."""
    from ..render import source_dict

    return {
        "tensor": s.name,
        "shape": list(s.shape),
        "saved_by": s.op,
        "saved_at": source_dict(s.saved_at),
        "called_at": source_dict(s.called_at),
        "changed_by": [{"kind": w.kind.value, "by": w.by, "source": source_dict(w.source)} for w in s.writes],
        "needed_by": s.node,
        "backward_at": source_dict(s.backward_at),
        "version_saved": s.version_saved,
        "version_now": s.version_now,
        "message": explain(s),
    }
