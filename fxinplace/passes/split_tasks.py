"""Split a graph into per-task subgraphs: which task outputs each node feeds.

A node belongs to every task whose output depends on it. Mutations add the edges FX does
not show: later readers of a mutated tensor still point at the original node, so a write
is also linked to every later reader of the storage it writes.

Tasks are the outputs the user's losses can come from: the tensors the traced function
returns. An output only stored on an object (`self.cache = t`) is no task, and in a graph
that ends at a graph break no output is one (they are values the code after the break goes
on with; the losses come later): those positions have no name. A task is named, by one rule
for the backend and `fxinplace.audit`: by the user's `tasks` option (task name -> module
prefix or output key), else by its key in the returned dict (`seg`, `aux.depth`), else by
the module path all of its own nodes share (`heads.seg`), else by its place in the returned
value (`output`, `output[1]`). `fxinplace.audit`, which sees the returned value, names
the outputs the backend could not place (`GraphReport.named`): naming is not analysis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch.fx

from .._sources import module_path_of
from ..facts import OutputKind, OutputRole
from .resolve_aliases import target_of_root
from .trace_mutations import MutationTrace, StorageKey, output_nodes

__all__ = ["split_tasks", "TaskSplit", "task_name"]


@dataclass(frozen=True)
class TaskSplit:
    """Tasks as output positions: a node's tasks are the outputs that depend on it. Positions
    with the same name are one task (two outputs of one head)."""

    names: tuple[str | None, ...]  # one per graph output position; None: not a task
    node_tasks: dict[torch.fx.Node, frozenset[int]]
    shared_parameters: dict[str, frozenset[int]]  # parameter name -> output positions whose tasks read it
    readers: dict[StorageKey, list[torch.fx.Node]]  # nodes reading each storage, in order
    stored: frozenset[int] = frozenset()  # positions only stored on an object, not returned nor live

    def tasks_of(self, node: torch.fx.Node) -> frozenset[int]:
        return self.node_tasks.get(node, frozenset())

    @property
    def positions(self) -> frozenset[int]:
        return frozenset(range(len(self.names)))

    def outside(self, positions: frozenset[int], tasks: frozenset[int]) -> frozenset[int]:
        """The positions in `positions` whose task is none of `tasks`' tasks."""
        own = {self.names[i] for i in tasks}
        return frozenset(i for i in positions if self.names[i] is not None and self.names[i] not in own)

    def spans_tasks(self, positions: frozenset[int]) -> bool:
        return len({self.names[i] for i in positions} - {None}) > 1


def split_tasks(
    gm: torch.fx.GraphModule,
    trace: MutationTrace,
    task_prefixes: dict[str, str] | None = None,
    roles: Sequence[OutputRole | None] | None = None,
) -> TaskSplit:
    """`roles`: what each output is to the user's code (`_compat.graph_output_roles`); None when
    Dynamo could not say: then every output is a task."""
    nodes = list(gm.graph.nodes)
    outputs = output_nodes(gm)
    written: dict[torch.fx.Node, set[StorageKey]] = {}
    for w in trace.writes:
        written.setdefault(w.node, set()).add(w.storage)
        if w.how == "rebind":  # `p.data = v`: later readers of `p` read the storage it now has
            written[w.node] |= trace.storages_made.get(w.node, set())
    readers = _readers_by_storage(nodes, trace, written)

    masks = _reachability(nodes, outputs, readers, written, trace)
    names = _name_outputs(nodes, outputs, masks, task_prefixes or {}, roles)
    node_tasks = {n: frozenset(i for i in range(len(names)) if mask >> i & 1) for n, mask in masks.items()}
    # A write under a task's module belongs to that task even where no output depends on it.
    prefixes = dict(task_prefixes or {})
    for name in dict.fromkeys(n for n in names if n is not None):
        own = [n for n, tasks in node_tasks.items() if tasks and all(names[i] == name for i in tasks)]
        prefix = _common_module_prefix(own)
        if prefix and name not in prefixes:
            prefixes[name] = prefix
    for node in written:
        path = module_path_of(node)
        extra = {i for i, name in enumerate(names) if _under(path, prefixes.get(name, ""))}
        if extra:
            node_tasks[node] = node_tasks.get(node, frozenset()) | extra

    shared = {}
    for key, root in trace.storage_root.items():
        if root.op != "placeholder":
            continue
        target = target_of_root(root, trace)
        if target.kind != "parameter":
            continue
        tasks = frozenset().union(*(node_tasks.get(r, frozenset()) for r in readers.get(key, ())))
        if len({names[i] for i in tasks} - {None}) > 1:
            shared[target.name] = frozenset(i for i in tasks if names[i] is not None)
    stored = frozenset(i for i, r in enumerate(roles or ()) if r is not None and r.kind is OutputKind.STORED)
    return TaskSplit(tuple(names), node_tasks, shared, readers, stored)


def _readers_by_storage(nodes, trace: MutationTrace, written) -> dict[StorageKey, list[torch.fx.Node]]:
    # A node reads a storage when it consumes its values; making a view of it is not a read.
    readers: dict[StorageKey, list[torch.fx.Node]] = {}
    for node in nodes:
        made = trace.storages_made.get(node, set())
        for key in trace.storages_read.get(node, ()):
            if key not in made or key in written.get(node, ()):
                readers.setdefault(key, []).append(node)
    return readers


def _reachability(nodes, outputs, readers, written, trace: MutationTrace) -> dict[torch.fx.Node, int]:
    """Bit i of a node's mask is set when output i depends on it (through data or writes)."""
    order = {n: i for i, n in enumerate(nodes)}
    masks: dict[torch.fx.Node, int] = {}
    for i, out in enumerate(outputs):
        masks[out] = masks.get(out, 0) | 1 << i
    # The output node reads what it returns: a write into a returned storage feeds that output.
    returned: dict[StorageKey, int] = {}
    for i, out in enumerate(outputs):
        for key in trace.storages_made.get(out, ()):
            returned[key] = returned.get(key, 0) | 1 << i
    for node in reversed(nodes):
        mask = masks.get(node, 0)
        for user in node.users:
            if user.op != "output":
                mask |= masks.get(user, 0)
        for key in written.get(node, ()):
            mask |= returned.get(key, 0)
            for reader in readers.get(key, ()):
                if order[reader] > order[node]:
                    mask |= masks.get(reader, 0)
        if mask:
            masks[node] = mask
    return masks


def _name_outputs(nodes, outputs, masks, task_prefixes, roles) -> list[str | None]:
    names: list[str | None] = []
    for i, out in enumerate(outputs):
        role = roles[i] if roles is not None and i < len(roles) else None
        ancestors = [n for n in nodes if masks.get(n, 0) >> i & 1]
        by_prefix = next(
            (t for t, p in task_prefixes.items() if any(_under(module_path_of(n), p) for n in ancestors)), None
        )
        if roles is not None and (role is None or role.kind is not OutputKind.RETURNED):
            names.append(by_prefix)  # the user said which module is a task; otherwise none is
            continue
        own = [n for n in ancestors if masks[n] == 1 << i]
        path = role.path if role is not None else f"[{i}]"
        names.append(by_prefix or task_name(path, task_prefixes, _common_module_prefix(own)))
    return names


def task_name(path: str, task_options: dict[str, str], module_prefix: str = "") -> str:
    """The name of the task returned at `path` in the traced function's result: the `tasks`
    option's name for that output key, else the dict key, else `module_prefix`, else the place."""
    for task, wanted in task_options.items():
        if path == wanted or path.startswith((wanted + ".", wanted + "[")):
            return task
    if path and not path.startswith("["):
        return path
    return module_prefix or f"output{path}"


def _under(path: str, prefix: str) -> bool:
    return bool(prefix) and (path == prefix or path.startswith(prefix + "."))


def _common_module_prefix(nodes) -> str:
    paths = [module_path_of(n).split(".") for n in nodes if n.op in ("call_function", "call_method")]
    paths = [p for p in paths if p != [""]]
    if not paths:
        return ""
    return ".".join(os.path.commonprefix(paths))
