"""Classify every write: safe, or a named hazard with the user's lines and tasks.

Expects the `MutationTrace` of `trace_mutations` and the `TaskSplit` of `split_tasks`;
writes one `Mutation` per written target to `node.meta["fxinplace"]` (a list, since batch
norm writes two buffers from one node) and returns them in graph order.
"""

from __future__ import annotations

import torch.fx

from .._sources import module_path_of, source_of
from ..report import Hazard, Mutation
from .resolve_aliases import describe_op, resolve_target, root_of, target_of_root
from .split_tasks import TaskSplit
from .trace_mutations import MutationTrace, SavedTensor, Write, output_nodes, overlaps

__all__ = ["find_hazards", "HAZARD_CODES"]

# code -> default severity; the catalogue in docs/hazards.md explains each one.
HAZARD_CODES = {
    "saved-then-mutated": "error",
    "hidden-write-to-saved": "error",
    "leaf-inplace": "error",
    "view-inplace": "error",
    "cross-task-write": "warning",
    "parameter-write": "warning",
    "input-write": "warning",
    "buffer-update": "info",
    "safe-inplace": "info",
}

_AUTOGRAD_ERROR = "one of the variables needed for gradient computation has been modified by an inplace operation"


def find_hazards(
    gm: torch.fx.GraphModule,
    trace: MutationTrace,
    split: TaskSplit,
    saved_inputs: dict[torch.fx.Node, list] | None = None,
) -> list[Mutation]:
    """`saved_inputs`: placeholders an earlier graph saved for backward (graph breaks), each
    save with its `description` and `record` (a `SavedTensor` of that graph)."""
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
        facts = []
        for write in writes:
            target, chain = resolve_target(write, trace)
            writer_tasks = _writer_tasks(write, split)
            readers = [r for r in split.readers.get(write.storage, ()) if r is not node]
            before = [r for r in readers if order[r] < order[node]]
            after = [r for r in readers if order[r] > order[node]]
            read_tasks = set().union(*(split.tasks_of(r) for r in readers)) if readers else set()
            shared = len(writer_tasks | read_tasks) > 1 or target.name in split.shared_parameters
            key = (node, write.inner)
            stale, hidden = saved_by_mutator.get(key, ()), hidden_by_mutator.get(key, ())
            if len(writes) > 1:  # `out=(v, i)`: each saved tensor belongs to the write of its storage
                stale = [r for r in stale if r.storage == write.storage]
                hidden = [r for r in hidden if r.storage == write.storage]
            hazards = _hazards_for(write, target, trace, split, writer_tasks, before, after, stale, hidden)
            saved_earlier = (saved_inputs or {}).get(trace.storage_root.get(write.storage), ())
            # Autograd's counter is per storage, so a visible write anywhere invalidates the
            # save; a hidden one changes the gradients only where it overlaps the saved region,
            # and only if backward reads the saved values (not batch norm's running statistics).
            # `.data =` leaves a saved view on the old storage: only a tensor saved as itself
            # (not a view of it) reads the new value (see `_record_rebind`).
            region = write.region if write.region is not None else write.tensor
            invalidated = [s.description for s in saved_earlier
                           if write.autograd_visible
                           or (s.record.values_read and (s.record.tensor._base is None if write.how == "rebind"
                                                         else overlaps(s.record.tensor, region)))]
            if invalidated:
                hazards.insert(0, _saved_in_earlier_graph(write, target, invalidated[0]))
            shown = write.inner or node  # the line the user wrote, inside a subgraph too
            facts.append(Mutation(
                node=node.name if write.inner is None else f"{node.name}.{write.inner.name}",
                op=describe_op(shown),
                target=target,
                view_chain=chain,
                source=source_of(shown),
                module=module_path_of(shown) or module_path_of(node),
                tasks=tuple(sorted(writer_tasks | (read_tasks if target.kind == "intermediate" else set()))),
                shared=shared,
                autograd_visible=write.autograd_visible,
                under_no_grad=not write.grad_enabled,
                hazards=tuple(hazards),
            ))
        node.meta["fxinplace"] = facts
        mutations.extend(facts)
    return mutations


def saves_for_later_graphs(
    gm: torch.fx.GraphModule, trace: MutationTrace
) -> tuple[dict[int, SavedTensor], dict[torch.fx.Node, SavedTensor]]:
    """Saved tensors a later graph can write: ({output position: save}, {placeholder: save}).

    After a graph break an output arrives as an input of the next graph; parameters, buffers
    and the caller's inputs are the same tensors in every graph. A write there breaks this
    graph's backward: the backend checks that when the later graph compiles. Only saves that
    some output's backward reaches count, and only those not already modified here.
    """
    # What a checkpoint region saved is recomputed in backward: a later write cannot reach it.
    live = [r for r in trace.saved if r.storage is not None and r.mutated_by is None and not r.recomputed
            and trace.backward_outputs.get(r.node)]
    by_output = {}
    for position, out in enumerate(output_nodes(gm)):
        made = trace.storages_made.get(out, set())
        record = next((r for r in live if r.storage in made), None)
        if record is not None:
            by_output[position] = record
    by_placeholder = {}
    for record in live:
        root = trace.storage_root.get(record.storage)
        if root is not None and root.op == "placeholder":
            by_placeholder.setdefault(root, record)
    return by_output, by_placeholder


def describe_save(record: SavedTensor) -> str:
    saver = record.inner or record.node  # the body node, for a save inside a subgraph
    return f"`{describe_op(saver)}` at {_at(saver)}"


def _saved_in_earlier_graph(write: Write, target, saved_by: str) -> Hazard:
    node = write.inner or write.node
    op = f"`{describe_op(node)}` at {_at(node)}"
    if write.autograd_visible:
        return Hazard("saved-then-mutated", "error", (
            f"{_saved_name(target)} was saved for backward by {saved_by}, crossed a graph break, and is modified in place "
            f"by {op}: backward will fail with \"{_AUTOGRAD_ERROR}\""
        ), source_of(node))
    return Hazard("hidden-write-to-saved", "error", (
        f"{_saved_name(target)} was saved for backward by {saved_by}, crossed a graph break, and is overwritten by {op} "
        f"through a path autograd does not see: gradients silently use the new values"
    ), source_of(node))


def _saved_name(target) -> str:
    return f"`{target.name}` (output of {target.produced_by})" if target.kind == "intermediate" else str(target)


def _writer_tasks(write: Write, split: TaskSplit) -> set[str]:
    # The tasks a write belongs to: those downstream of it (through later readers), those
    # whose module ran it, and those that computed the value written.
    tasks = set(split.tasks_of(write.node))
    for arg in write.node.all_input_nodes:
        if arg is not write.arg:
            tasks |= split.tasks_of(arg)
    return tasks


def _hazards_for(write, target, trace, split, writer_tasks, before, after, stale, hidden) -> list[Hazard]:
    node = write.inner or write.node
    where = source_of(node)
    op = f"`{describe_op(node)}` at {_at(node)}"
    hazards = []
    for (saving_node, saver), records in _group(stale).items():
        hazards.append(Hazard("saved-then-mutated", "error", (
            f"{_describe_saved(records, trace)} was saved for backward by `{describe_op(saver)}` at "
            f"{_at(saver)} (needed by the backward of {_tasks(_backward_tasks(saving_node, trace, split))}), "
            f"then modified in place by {op}: backward will fail with \"{_AUTOGRAD_ERROR}\""
        ), where))
    for (saving_node, saver), records in _group(hidden).items():
        hazards.append(Hazard("hidden-write-to-saved", "error", (
            f"{_describe_saved(records, trace)} was saved for backward by `{describe_op(saver)}` at "
            f"{_at(saver)} (needed by the backward of {_tasks(_backward_tasks(saving_node, trace, split))}), "
            f"then overwritten by {op} {_unseen_path(write, records)}: backward raises nothing and "
            f"silently computes gradients from the new values"
        ), where))
    other_readers = [r for r in before + after if split.tasks_of(r) - writer_tasks]
    if writer_tasks and other_readers:
        others = set().union(*(split.tasks_of(r) for r in other_readers)) - writer_tasks
        when = []
        for label, group in (("before", before), ("after", after)):
            readers = [r for r in group if split.tasks_of(r) & others]
            if readers:
                when.append(f"{label} the write at {', '.join(sorted({_at(r) for r in readers}))}")
        hazards.append(Hazard("cross-task-write", "warning", (
            f"{_tasks(writer_tasks)} writes {target} with {op}, and {_tasks(others)} reads it too "
            f"({'; '.join(when)}): what {_tasks(others)} sees depends on the order the tasks run in"
        ), where))
    how = "" if write.autograd_visible else " (hidden from autograd)"
    if not write.grad_enabled:
        how += " under no_grad"
    if target.kind == "parameter":
        hazards.append(_parameter_write(write, target, trace, op, how, where))
    elif target.kind == "input":
        hazards.append(Hazard("input-write", "warning", (
            f"{op} writes the caller's input `{target.name}` in place{how}: the caller sees the change"
        ), where))
    elif target.kind == "buffer":
        hazards.append(Hazard("buffer-update", "info", f"{op} updates buffer `{target.name}`{how}", where))
    elif not hazards:
        hazards.append(Hazard("safe-inplace", "info", f"{op} writes {target}: no saved tensor or other task is affected", where))
    return hazards


def _parameter_write(write: Write, target, trace: MutationTrace, op: str, how: str, where) -> Hazard:
    if not trace.requires_grad.get(root_of(write, trace), True):
        # No gradient, so no optimizer step, reaches it: a momentum or EMA copy (MoCo, BYOL).
        return Hazard("parameter-write", "info", (
            f"{op} updates parameter `{target.name}`{how}, which requires no grad: a deliberate update "
            f"(a momentum or EMA copy), no gradient or optimizer state involved"
        ), where)
    if write.how == "rebind":
        return Hazard("parameter-write", "warning", (
            f"{op} rebinds parameter `{target.name}` to a new tensor outside autograd: its gradient skips what "
            f"computed the new value, and the optimizer's state for it (momentum, Adam's moments) was built "
            f"for the old value"
        ), where)
    return Hazard("parameter-write", "warning", (
        f"{op} writes parameter `{target.name}` in place{how}: the optimizer, every task and the next "
        f"step see the new value"
    ), where)


def _backward_tasks(node: torch.fx.Node, trace: MutationTrace, split: TaskSplit) -> set[str]:
    return {split.names[i] for i in trace.backward_outputs.get(node, ()) if i < len(split.names)}


def _group(records) -> dict[tuple[torch.fx.Node, torch.fx.Node], list[SavedTensor]]:
    """Records by (the graph node that saved them, the node to name: the body node inside a subgraph)."""
    grouped: dict[tuple[torch.fx.Node, torch.fx.Node], list[SavedTensor]] = {}
    for record in records:
        grouped.setdefault((record.node, record.inner or record.node), []).append(record)
    return grouped


def _unseen_path(write: Write, records: list[SavedTensor]) -> str:
    """Why autograd's version check does not catch this write."""
    if any(r.recomputed for r in records):
        return ("while the checkpoint region is to be recomputed: backward's recomputation reads (or replays) "
                "the write, and checkpoint checks no versions (compiled by AOTAutograd, as with aot_eager or "
                "inductor, the region is traced as plain code and backward fails instead)")
    if write.inner is not None and write.autograd_visible and any(r.node is write.node for r in records):
        return ("inside the custom autograd.Function's forward, after forward used it: `ctx.save_for_backward` "
                "keeps the tensor, not its value, and versions are checked only from the end of forward")
    return "through a path autograd does not see"


def _describe_saved(records: list[SavedTensor], trace: MutationTrace) -> str:
    names = []
    for record in records:
        root = trace.storage_root.get(record.storage) if record.storage is not None else None
        if root is None:
            names.append("a tensor")
        elif root.op == "placeholder":
            target = target_of_root(root, trace)
            names.append(f"{target.kind} `{target.name}`")
        else:
            names.append(f"`{root.name}` (output of `{describe_op(root)}` at {_at(root)})")
    unique = list(dict.fromkeys(names))
    return unique[0] if len(unique) == 1 else " and ".join(unique)


def _at(node: torch.fx.Node) -> str:
    source = source_of(node)
    where = f"{source}" if source else "an unknown line"
    module = module_path_of(node)
    return f"{where} ({module})" if module else where


def _tasks(tasks) -> str:
    tasks = sorted(tasks)
    if not tasks:
        return "no task"
    return ("task " if len(tasks) == 1 else "tasks ") + ", ".join(f"'{t}'" for t in tasks)
