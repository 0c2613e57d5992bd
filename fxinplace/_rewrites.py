"""What `functionalize` did, marked on the audit's mutations: each gets a `Rewrite` record, and
the hazards the rewrite removes are marked removed (they no longer count as errors)."""

from __future__ import annotations

import dataclasses
from typing import Collection, Sequence

from .facts import Hazard, HazardCode, KeptReason, Mutation, Rewrite, RewriteKind, Severity, Site, Target
from .passes.functionalize import FunctionalizedGraph

__all__ = ["mark_rewrites", "mark_kept"]

# Hazards that come from the write happening in place; gone once it happens out of place.
REMOVED_BY_REWRITE = frozenset({HazardCode.SAVED_THEN_MUTATED, HazardCode.HIDDEN_WRITE_TO_SAVED})


def mark_kept(mutations: Sequence[Mutation], kind: RewriteKind, reason: KeptReason | None = None,
              detail: tuple[str, ...] = ()) -> tuple[Mutation, ...]:
    """Every mutation with the same rewrite (kept in place, not applied), hazards as they were."""
    rewrite = Rewrite(kind, reason, detail)
    return tuple(dataclasses.replace(m, rewrite=rewrite) for m in mutations)


def mark_rewrites(
    mutations: Sequence[Mutation], done: FunctionalizedGraph, targets: Sequence[Target],
    saved_earlier: Collection[Target], whole: dict[str, Site] | None = None,
) -> tuple[Mutation, ...]:
    """`targets`: the audit's name for each placeholder; `saved_earlier`: targets an earlier
    graph saved for backward (a graph break), whose write-back still reaches that save;
    `whole`: the site of each custom Function call the rewrite kept whole, by node name."""
    if done.kept is not None:
        return mark_kept(mutations, RewriteKind.KEPT_IN_PLACE, done.kept, done.kept_detail)
    written = {_key(targets[i]) for i in done.written_back}
    unwritten = {_key(targets[i]) for i in done.unwritten}
    earlier = {_key(t) for t in saved_earlier}
    return tuple(_inside(m, whole[m.node.split(".")[0]], m.node.split(".")[0])
                 if "." in m.node and m.node.split(".")[0] in (whole or {})
                 else _mark(m, written, unwritten, earlier, done.checkpoints_inlined) for m in mutations)


def _inside(mutation: Mutation, call: Site, name: str) -> Mutation:
    # A write in the forward of a Function the rewrite kept whole: it lands in a copy of the
    # argument. What the Function itself saved is that copy (its own hazard stays); what
    # anything else saved is the original, now left alone.
    def own(h: Hazard) -> bool:
        s = h.saved_by
        return s is not None and (s.op, s.source, s.module) == (call.op, call.source, call.module)

    hazards = tuple(_removed(h) if h.code in REMOVED_BY_REWRITE and not own(h) else h for h in mutation.hazards)
    return dataclasses.replace(mutation, rewrite=Rewrite(RewriteKind.KEPT_IN_PLACE, KeptReason.INSIDE_FUNCTION,
                                                         (name,)), hazards=hazards)


def _mark(mutation: Mutation, written: set, unwritten: set, saved_earlier: set, inlined: bool) -> Mutation:
    key = _key(mutation.target)
    if key in unwritten and key not in written:
        # Eager bumps the version and writes no value (`conj_physical_` of a real tensor).
        return dataclasses.replace(mutation, rewrite=Rewrite(RewriteKind.NOTHING_TO_WRITE_BACK,
                                                             checkpoints_inlined=inlined))
    if key in saved_earlier:
        # The write-back lands in the storage the earlier graph's backward reads, as in eager.
        return dataclasses.replace(mutation, rewrite=Rewrite(RewriteKind.WRITTEN_BACK, saved_earlier=True,
                                                             checkpoints_inlined=inlined))
    if key in written:  # placeholders, an earlier graph's intermediates among them
        kind = RewriteKind.WRITTEN_BACK
    elif mutation.target.kind == "intermediate":
        kind = RewriteKind.REWRITTEN
    else:
        raise AssertionError(f"fxinplace: functionalize found no write-back for {mutation.target} ({mutation.node})")
    hazards = tuple(_removed(h) if h.code in REMOVED_BY_REWRITE else h for h in mutation.hazards)
    return dataclasses.replace(mutation, rewrite=Rewrite(kind, checkpoints_inlined=inlined), hazards=hazards)


def _removed(hazard: Hazard) -> Hazard:
    # The write no longer happens to the saved tensor: what is left is a note, not an error.
    return dataclasses.replace(hazard, severity=Severity.INFO, removed_by_rewrite=True)


def _key(target: Target) -> tuple[str, str]:
    return target.kind, target.name
