"""Classify every write: safe, or a hazard, as records (`fxinplace.facts`) with no words.

Expects the `MutationTrace` of `trace_mutations` and the `TaskSplit` of `split_tasks`;
returns one `Mutation` per written target, in graph order (batch norm writes two buffers from
one node). Tasks are output positions; `fxinplace.render` names them and writes the messages.
"""

from __future__ import annotations

import dataclasses

import torch.fx

from .._sources import module_path_of, module_type_of, source_of
from ..facts import DEFAULT_SEVERITY, Detail, Hazard, HazardCode, Mutation, Saved, Severity, Site, Target
from .resolve_aliases import describe_op, resolve_target, root_of, target_of_root
from .split_tasks import TaskSplit
from .trace_mutations import MutationTrace, SavedTensor, Write, overlaps

__all__ = ["find_hazards", "site_of"]


def find_hazards(
    gm: torch.fx.GraphModule,
    trace: MutationTrace,
    split: TaskSplit,
    saved_inputs: dict[torch.fx.Node, list] | None = None,
) -> list[Mutation]:
    """`saved_inputs`: placeholders an earlier graph saved for backward (graph breaks), each
    save with its `saved_by` site and `record` (a `SavedTensor` of that graph)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # Keyed by (graph node, body node or None): a write inside a higher-order op's subgraph
    # is the op's call and the body node that wrote (`Write.inner`).
    saved_by_mutator: dict[tuple, list[SavedTensor]] = {}
    hidden_by_mutator: dict[tuple, list[SavedTensor]] = {}
    for record in trace.saved:
        if not trace.backward_outputs.get(record.node):
            continue  # no output's backward goes through the op that saved it
        if record.mutated_by is not None:
            # What a checkpoint recomputes is never version-checked in eager: a visible write
            # to it is as silent as a hidden one.
            by_mutator = hidden_by_mutator if record.recomputed else saved_by_mutator
            by_mutator.setdefault((record.mutated_by, record.mutated_inside), []).append(record)
        for node in record.hidden_writes:
            hidden_by_mutator.setdefault((node, None), []).append(record)
        for pair in record.hidden_inside:
            hidden_by_mutator.setdefault(pair, []).append(record)

    mutations = []
    for node, writes in trace.writes_by_node().items():
        for write in writes:
            target, chain = resolve_target(write, trace)
            writers = _writer_tasks(write, split)
            readers = [r for r in split.readers.get(write.storage, ()) if r is not node]
            read = frozenset().union(*(split.tasks_of(r) for r in readers))
            key = (node, write.inner)
            stale, hidden = saved_by_mutator.get(key, ()), hidden_by_mutator.get(key, ())
            if len(writes) > 1:  # `out=(v, i)`: each saved tensor belongs to the write of its storage
                stale = [r for r in stale if r.storage == write.storage]
                hidden = [r for r in hidden if r.storage == write.storage]
            shown = write.inner or node  # the line the user wrote, inside a subgraph too
            site = Site(
                op=describe_op(shown), source=source_of(shown), module=module_path_of(shown) or module_path_of(node),
                tasks=writers | (read if target.kind == "intermediate" else frozenset()),
                hidden=not write.autograd_visible, no_grad=not write.grad_enabled,
                module_type=module_type_of(shown) if module_path_of(shown) else module_type_of(node),
            )
            mutated_by = dataclasses.replace(site, tasks=writers)
            hazards = _saved_hazards(write, target, mutated_by, trace, split, stale, hidden)
            cross = _cross_task(target, mutated_by, split, readers, order, node)
            if cross is not None:
                hazards.append(cross)
            kind = _kind_hazard(write, target, mutated_by, trace, bool(hazards))
            if kind is not None:
                hazards.append(kind)
            saved_earlier = (saved_inputs or {}).get(trace.storage_root.get(write.storage), ())
            invalidated = _invalidated(write, saved_earlier)
            if invalidated:
                hazards.insert(0, _crossed_break(write, target, mutated_by, invalidated[0]))
            mutations.append(Mutation(
                node=node.name if write.inner is None else f"{node.name}.{write.inner.name}",
                target=target, site=site, view_chain=chain,
                shared=split.spans_tasks(writers | read) or target.name in split.shared_parameters,
                hazards=tuple(hazards), read_by=read,
            ))
    return mutations


def site_of(node: torch.fx.Node, tasks: frozenset[int] = frozenset(), graph: str | None = None) -> Site:
    """The op `node` runs, as a site: its spelling, the user's line, its module."""
    return Site(describe_op(node), source_of(node), module_path_of(node), tasks, graph,
                module_type=module_type_of(node))


def _invalidated(write: Write, saved_earlier) -> list:
    # Autograd's counter is per storage, so a visible write anywhere invalidates the save; a
    # hidden one changes the gradients only where it overlaps the saved region, and only if
    # backward reads the saved values (not batch norm's running statistics). `.data =` leaves
    # a saved view on the old storage: only a tensor saved as itself (not a view of it) reads
    # the new value (see `_record_rebind`).
    region = write.region if write.region is not None else write.tensor
    return [s for s in saved_earlier
            if write.autograd_visible
            or (s.record.values_read and (s.record.tensor._base is None if write.how == "rebind"
                                          else overlaps(s.record.tensor, region)))]


def _crossed_break(write: Write, target: Target, mutated_by: Site, save) -> Hazard:
    code = HazardCode.SAVED_THEN_MUTATED if write.autograd_visible else HazardCode.HIDDEN_WRITE_TO_SAVED
    return Hazard(code, Severity.ERROR, target, mutated_by, saved_by=save.saved_by, saved=(Saved(target),),
                  detail=Detail.CROSSED_BREAK)


def _writer_tasks(write: Write, split: TaskSplit) -> frozenset[int]:
    # The tasks a write belongs to: those downstream of it (through later readers), those
    # whose module ran it, and those that computed the value written.
    tasks = set(split.tasks_of(write.node))
    for arg in write.node.all_input_nodes:
        if arg is not write.arg:
            tasks |= split.tasks_of(arg)
    return frozenset(tasks)


def _saved_hazards(write: Write, target: Target, mutated_by: Site, trace: MutationTrace, split: TaskSplit,
                   stale, hidden) -> list[Hazard]:
    hazards = []
    for code, records_of in ((HazardCode.SAVED_THEN_MUTATED, stale), (HazardCode.HIDDEN_WRITE_TO_SAVED, hidden)):
        for (saving_node, saver), records in _group(records_of).items():
            needed_by = frozenset(trace.backward_outputs.get(saving_node, ())) & split.positions
            saved_by = site_of(saver, needed_by)
            detail = _unseen_path(write, records) if code is HazardCode.HIDDEN_WRITE_TO_SAVED else None
            stored_only = bool(needed_by) and needed_by <= split.stored
            hazards.append(Hazard(code, Severity.WARNING if stored_only else Severity.ERROR, target, mutated_by,
                                  saved_by=saved_by, saved=_saved(records, trace), detail=detail,
                                  stored_only=stored_only))
    return hazards


def _cross_task(target: Target, mutated_by: Site, split: TaskSplit, readers, order, node) -> Hazard | None:
    # Another task reads what this one writes: which value it sees depends on the task order.
    writers = mutated_by.tasks
    if all(split.names[i] is None for i in writers):  # no task writes it (a cache, a graph break's values)
        return None
    others = [r for r in readers if split.outside(split.tasks_of(r), writers)]
    if not others:
        return None
    other_tasks = frozenset().union(*(split.outside(split.tasks_of(r), writers) for r in others))
    seen = dict.fromkeys(("before" if order[r] < order[node] else "after", site_of(r)) for r in others)
    return Hazard(HazardCode.CROSS_TASK_WRITE, Severity.WARNING, target, mutated_by,
                  readers=tuple(sorted(seen, key=lambda w: w[0] != "before")),
                  other_tasks=other_tasks)


def _kind_hazard(write: Write, target: Target, mutated_by: Site, trace: MutationTrace, any_other: bool) -> Hazard | None:
    # What the target's kind says: a parameter, the caller's input, a buffer, or (with no other
    # hazard) a safe write to an intermediate.
    if target.kind == "parameter":
        if not trace.requires_grad.get(root_of(write, trace), True):
            # No gradient, so no optimizer step, reaches it: a momentum or EMA copy (MoCo, BYOL).
            return Hazard(HazardCode.PARAMETER_WRITE, Severity.INFO, target, mutated_by, detail=Detail.NO_GRAD_COPY)
        detail = Detail.REBIND if write.how == "rebind" else None
        return Hazard(HazardCode.PARAMETER_WRITE, Severity.WARNING, target, mutated_by, detail=detail)
    code = {"input": HazardCode.INPUT_WRITE, "buffer": HazardCode.BUFFER_UPDATE}.get(target.kind)
    if code is None:
        if any_other:
            return None
        code = HazardCode.SAFE_INPLACE
    return Hazard(code, DEFAULT_SEVERITY[code], target, mutated_by)


def _group(records) -> dict[tuple[torch.fx.Node, torch.fx.Node], list[SavedTensor]]:
    """Records by (the graph node that saved them, the node to name: the body node inside a subgraph)."""
    grouped: dict[tuple[torch.fx.Node, torch.fx.Node], list[SavedTensor]] = {}
    for record in records:
        grouped.setdefault((record.node, record.inner or record.node), []).append(record)
    return grouped


def _unseen_path(write: Write, records: list[SavedTensor]) -> Detail:
    """Why autograd's version check does not catch this write."""
    if any(r.recomputed for r in records):
        return Detail.CHECKPOINT_RECOMPUTE
    if write.inner is not None and write.autograd_visible and any(r.node is write.node for r in records):
        return Detail.FUNCTION_FORWARD
    return Detail.UNSEEN_PATH


def _saved(records: list[SavedTensor], trace: MutationTrace) -> tuple[Saved, ...]:
    found = []
    for record in records:
        root = trace.storage_root.get(record.storage) if record.storage is not None else None
        if root is None:
            found.append(Saved(None))
        elif root.op == "placeholder":
            found.append(Saved(target_of_root(root, trace)))
        else:
            found.append(Saved(target_of_root(root, trace), site_of(root)))
    return tuple(dict.fromkeys(found))
