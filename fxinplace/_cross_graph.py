"""What one graph leaves to the next across a graph break: who owns a storage, who saved it.

Dynamo hands the backend one graph at a time. After a break, an intermediate of the earlier
graph arrives in the next one as an input of its own, and parameters, buffers and the
caller's inputs arrive as placeholders of their own: only the real tensors, by storage,
link the graphs. The backend records, per real storage an audited graph touched, how that
graph names its owner and which of its saves read it; a later graph looks its placeholders
up here before it is analysed.
"""

from __future__ import annotations

import enum
import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

import torch
import torch.fx

from ._compat import function_class_of, saves_of_node, sequence_nr
from ._sources import SourceLocation
from .facts import Site
from .passes.find_hazards import site_of
from .passes.resolve_aliases import Target, describe_op, target_of_root
from .passes.trace_mutations import MutationTrace, SavedTensor, Write, output_nodes, overlaps, storage_key

__all__ = ["CrossGraphState", "ForwardWrite", "Reach", "SavedByForward", "forward_writes_saved", "saves_for_later_graphs", "reach_after_call",
           "saves_between_graphs", "writes_after_reads"]

log = logging.getLogger(__name__)

# Nodes walked when asking whether a real autograd history reaches an earlier save.
_WALK_LIMIT = 200_000
# Nodes walked for saves made between two graphs: the code of one graph break, a few nodes.
_BETWEEN_LIMIT = 2_000


@dataclass
class _Call:
    """The latest call of one graph: its outputs, and what became of their autograd nodes."""

    reach: dict[int, weakref.ref] = field(default_factory=dict)  # output position -> that output
    fns: dict[int, int] = field(default_factory=dict)  # output position -> id() of its grad_fn
    consumed: set[int] = field(default_factory=set)  # positions a backward has run through
    released: set[int] = field(default_factory=set)  # positions whose autograd node was freed


@dataclass
class GraphSaves:
    """One audited graph's saves that a later graph can invalidate, and its latest call."""

    graph_id: str
    saves: list[_Save] = field(default_factory=list)
    positions: set[int] = field(default_factory=set)  # outputs some save's backward runs through
    call: _Call | None = None
    calls: int = 0
    output_nodes: list[torch.fx.Node] | None = None


@dataclass
class _Save:
    """A save of an earlier graph that a later write can invalidate."""

    saved_by: Site  # the op that saved it, in graph `saved_by.graph`
    record: SavedTensor  # its fake tensor gives the saved region's geometry
    positions: frozenset[int]  # outputs of that graph whose backward runs through the save
    graph: GraphSaves
    kept_apart: bool = False  # functionalize gives that graph a clone to save, each call

    @property
    def freed(self) -> bool:
        """Did the values saved on the graph's latest call go away (a backward ran through
        them, or nothing can run one any more)?"""
        call = self.graph.call
        if call is None:
            return False
        return bool(self.positions & call.consumed) or self.positions <= call.released


@dataclass
class _Storage:
    tensor: weakref.ref
    target: Target
    saves: list[_Save] = field(default_factory=list)


@dataclass
class LaterView:
    """What the registry says about one graph's placeholders (see `CrossGraphState.look_up`)."""

    targets: dict[torch.fx.Node, Target]
    saves: dict[torch.fx.Node, list[_Save]]


class CrossGraphState:
    """Per backend instance: the storages earlier graphs touched, by real storage."""

    def __init__(self) -> None:
        self._storages: dict[Any, _Storage] = {}
        self._sites: dict[tuple[int, str], Site] = {}  # the same save, one site

    def clear(self) -> None:
        self._storages.clear()
        self._sites.clear()

    def look_up(self, gm: torch.fx.GraphModule, example_inputs: list) -> LaterView:
        """Names and earlier saves for `gm`'s placeholders whose storage an earlier graph saw."""
        targets, saves = {}, {}
        for node, real in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
            entry = self._entry(real)
            if entry is None:
                continue
            targets[node] = entry.target
            if entry.saves:
                saves[node] = list(entry.saves)
        return LaterView(targets, saves)

    def saved_inputs(
        self, view: LaterView, gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace, per_op: bool
    ) -> dict[torch.fx.Node, list[_Save]]:
        """The earlier saves each placeholder's write would invalidate.

        `per_op`: the earlier graph ran op by op (compiler "eager"), so a save matters only if
        the loss can still reach it. A compiled graph (AOTAutograd) runs one backward node for
        the whole graph, which unpacks every save once any of its outputs gets a gradient.
        """
        reals = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
        found = {}
        for node, saves in view.saves.items():
            kept = [s for s in saves if not s.freed and (not per_op or self._may_reach_loss(s, reals, trace))]
            if kept:
                found[node] = kept
        return found

    def record_inputs(
        self, gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace,
        saved: dict[torch.fx.Node, SavedTensor], graph_id: str,
    ) -> tuple[GraphSaves, dict[torch.fx.Node, _Save]]:
        """Register `gm`'s placeholders (compile time): the graph's saves, and its placeholders'."""
        graph = GraphSaves(graph_id)
        by_node = {}
        for node, real in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
            entry = self._entry(real) or self._add(real, target_of_root(node, trace))
            record = saved.get(node)
            if entry is not None and record is not None:
                by_node[node] = self._new_save(entry, record, trace, graph)
        return graph, by_node

    def after_call(
        self, graph: GraphSaves, gm: torch.fx.GraphModule, outputs: list, trace: MutationTrace,
        saved: dict[int, SavedTensor], kept_apart: Collection[int] = (),
    ) -> None:
        """After a call of `gm` (the first; every one for a graph that ends in a break): its
        outputs' storages and saves, and autograd hooks that tell when these saves are gone.
        `kept_apart`: the outputs handed over as clones of what was saved (`functionalize`)."""
        if graph.output_nodes is None:
            graph.output_nodes = output_nodes(gm)
        for position, (node, real) in enumerate(zip(graph.output_nodes, outputs)):
            if not isinstance(real, torch.Tensor):
                continue
            # An intermediate later graphs may receive, named as this graph's.
            entry = self._entry(real) or self._add(
                real, Target("intermediate", node.name, f"{describe_op(node)} in graph {graph.graph_id}"))
            if entry is not None and position in saved:
                self._new_save(entry, saved[position], trace, graph).kept_apart = position in kept_apart
        graph.call = _watch(graph, outputs)
        graph.calls += 1
        if graph.calls == 1 or graph.calls % 32 == 0:
            self._prune()

    def _new_save(self, entry: _Storage, record: SavedTensor, trace: MutationTrace, graph: GraphSaves) -> _Save:
        positions = trace.backward_outputs.get(record.node, frozenset())
        save = _Save(self._site(record, graph.graph_id), record, positions, graph)
        entry.saves.append(save)
        graph.saves.append(save)
        graph.positions |= positions
        return save

    def _site(self, record: SavedTensor, graph_id: str) -> Site:
        key = (id(record), graph_id)
        if key not in self._sites:  # the body node, for a save inside a subgraph
            self._sites[key] = site_of(record.inner or record.node, graph=graph_id)
        return self._sites[key]

    def _may_reach_loss(self, save: _Save, reals: dict[torch.fx.Node, Any], trace: MutationTrace) -> bool:
        # The save is dead only when each output its backward runs through came into this
        # graph and none of this graph's outputs reaches it, and no other input that does
        # reach them has the save's graph in its history (an eager op between the graphs).
        # Anything unknown (an output also returned by the frame, used in a later graph)
        # counts as reaching the loss: see docs/hazards.md.
        call = save.graph.call
        if call is None:
            return True
        by_identity = {id(real): node for node, real in reals.items()}
        reach = [call.reach[p]() if p in call.reach else None for p in save.positions]
        if not reach or any(t is None or id(t) not in by_identity for t in reach):
            return True
        if any(trace.placeholder_reach.get(by_identity[id(t)]) for t in reach):
            return True
        fns = {call.fns[p] for p in save.positions if p in call.fns}
        for node, real in reals.items():
            if trace.placeholder_reach.get(node) and isinstance(real, torch.Tensor) and real.grad_fn is not None:
                if _history_contains(real.grad_fn, fns):
                    return True
        return False

    def _entry(self, real: Any) -> _Storage | None:
        key = storage_key(real)
        entry = self._storages.get(key) if key is not None else None
        if entry is None or entry.tensor() is None:
            return None
        return entry

    def _add(self, real: Any, target: Target) -> _Storage | None:
        key = storage_key(real)
        if key is None:
            return None
        entry = self._storages[key] = _Storage(weakref.ref(real), target)
        return entry

    def _prune(self) -> None:
        for key, entry in self._storages.items():  # a storage's saves of calls long gone
            if len(entry.saves) > 64:
                del entry.saves[:-64]
        for key in [k for k, e in self._storages.items() if e.tensor() is None or k.expired()]:
            del self._storages[key]


@dataclass(frozen=True)
class _SavedBetween:
    """What the hazard rules read of a `SavedTensor`, for a save no graph made."""

    tensor: torch.Tensor  # on the meta device: the saved region's geometry
    values_read: bool = True


@dataclass
class BetweenSave:
    """A save made between two graphs, by code Dynamo ran itself (the call a graph broke at,
    `Scale.apply(t, t)`), found by the graph after the break. `graph`: None, or (op by op, a save
    only what graphs since the break returned lead to) those tensors, watched as a graph's outputs."""

    saved_by: Site
    record: _SavedBetween
    positions: frozenset[int]  # outputs of the graph after the break whose backward reaches it
    graph: GraphSaves | None = None
    kept_apart: bool = False
    freed: bool = False


def saves_between_graphs(
    gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace, since: int, made_at: SourceLocation | None,
    per_op: bool, returned: Sequence[torch.Tensor] = (),
) -> dict[torch.fx.Node, list[BetweenSave]]:
    """The saves of autograd nodes made after sequence number `since` (the end of the call of the
    graph before the break) by the placeholder of `gm` sharing their storage. `made_at`: the line
    of the break.

    The nodes are found in the histories of `gm`'s inputs, and of `returned` (what graphs run
    since the break returned: the forward of a Function Dynamo ran itself there, whose result
    may go past `gm` to a later graph). Only inputs whose backward some output of `gm` reaches
    count (AOTAutograd gives the others no edge either); a save's `positions` are the outputs whose
    backward reaches it: those reaching its input when `gm` runs op by op (`per_op`), every
    output when compiled (one backward node for them all). A save only `returned` leads to is
    watched on those tensors instead (`BetweenSave.graph`)."""
    every = frozenset(range(len(output_nodes(gm))))
    by_storage = {}
    for key, found in _reached_saves(gm, example_inputs, trace, since, per_op, returned).items():
        reach, graph = found.positions, None
        if not reach:  # no backward of `gm` reaches it, compiled or not: the Function's result does
            graph = GraphSaves("between", positions=set(range(len(found.via))))
            graph.call = _watch(graph, found.via)
            reach = frozenset(graph.positions)
        by_storage.setdefault(key[1], []).append(BetweenSave(
            Site(_node_op(found.fn), made_at), _SavedBetween(_geometry(found.saved)), reach or every, graph))
    found = {}
    for node, real in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        saves = by_storage.get(storage_key(real))
        if saves:
            found[node] = saves
    return found


@dataclass(frozen=True)
class ForwardWrite:
    """A write to an input after the graph read it, in a graph compiled between a break and the
    code resuming after it: maybe the forward of the custom Function Dynamo ran itself there,
    which saves its inputs only when that forward returns (`forward_writes_saved`)."""

    code: Any  # the graph's frame: `forward.__code__` of that Function, if it is one
    mutation: int  # index in the graph's `report.mutations`
    storage: Any  # the real input's storage
    region: torch.Tensor  # the input written (all of it), on the meta device
    visible: bool  # the write moved the version counter


def writes_after_reads(gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace,
                       code: Any) -> list[ForwardWrite]:
    """The writes of `gm` (frame `code`) to inputs an earlier node of `gm` read the values of."""
    reals = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = []
    writes = [w for ws in trace.writes_by_node().values() for w in ws]  # find_hazards' order: one mutation each
    for index, write in enumerate(writes):
        real = reals.get(trace.storage_root.get(write.storage))
        if write.inner is not None or not isinstance(real, torch.Tensor) or not _read_before(trace, order, write):
            continue
        # The input's extent: Dynamo's fake of a view input may not keep the real offset.
        found.append(ForwardWrite(code, index, storage_key(real), _geometry(real), write.autograd_visible))
    return found


@dataclass
class SavedByForward:
    """A `ForwardWrite` the Function whose forward wrote it saved (`forward_writes_saved`)."""

    write: ForwardWrite
    apply: str  # `Function.apply`
    watched: GraphSaves | None  # op by op: the Function's result, whose fate settles the error


def forward_writes_saved(
    gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace, since: int, per_op: bool,
    pending: list[ForwardWrite], returned: Sequence[torch.Tensor],
) -> list[SavedByForward]:
    """The writes of `pending` that the Function whose forward wrote them saved (its node made
    after `since`, found as `saves_between_graphs` finds them). Autograd packs a Function's saves
    when its forward returns, recording the versions then: backward gets the written values,
    with no error, where forward computed with the values before the write."""
    if not pending:
        return []
    found = []
    for key, save in _reached_saves(gm, example_inputs, trace, since, per_op, returned).items():
        forward = getattr(function_class_of(save.fn), "forward", None)
        # `@torch.amp.custom_fwd` wraps it: Dynamo compiles the user's forward.
        code = getattr(inspect.unwrap(forward), "__code__", None) if forward is not None else None
        results = [t for t in returned if t.grad_fn is save.fn]
        for write in pending:
            if code is None or write.code is not code or write.storage != key[1]:
                continue
            if not overlaps(_geometry(save.saved), write.region):
                continue
            watched = None
            if results:  # its fate settles the error, compiled or not
                watched = GraphSaves("between", positions=set(range(len(results))))
                watched.call = _watch(watched, results)
            found.append(SavedByForward(write, _node_op(save.fn), watched))
    return found


@dataclass
class _Reached:
    fn: Any  # the autograd node
    saved: torch.Tensor
    positions: frozenset[int]  # outputs of `gm` whose backward reaches it through an input
    via: list[torch.Tensor]  # the tensors of `returned` in whose history it is


def _reached_saves(gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace, since: int,
                   per_op: bool, returned: Sequence[torch.Tensor]) -> dict[tuple[int, Any], _Reached]:
    # {(id of the node, storage): what it saved there}; a node saving one storage twice: one save
    every = frozenset(range(len(output_nodes(gm))))
    starts: list[tuple[torch.Tensor, frozenset[int] | None]] = []
    for node, real in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        reach = trace.placeholder_reach.get(node, frozenset())
        if isinstance(real, torch.Tensor) and real.grad_fn is not None and reach:
            starts.append((real, reach if per_op else every))
    starts += [(t, None) for t in returned if t.grad_fn is not None]
    found: dict[tuple[int, Any], _Reached] = {}
    for start, reach in starts:
        for fn, saved in _saved_since(start.grad_fn, since):
            key = storage_key(saved)
            if key is None:
                continue
            entry = found.setdefault((id(fn), key), _Reached(fn, saved, frozenset(), []))
            if reach is None:
                entry.via.append(start)
            else:
                entry.positions |= reach
    return found


def _geometry(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=t.dtype, device="meta").as_strided(t.size(), t.stride(), t.storage_offset())


def _read_before(trace: MutationTrace, order: dict[torch.fx.Node, int], write: Write) -> bool:
    # Reading consumes values; making a view (`.data`, slicing) does not.
    key, step = write.storage, order[write.node]
    for node, i in order.items():
        if i >= step:
            break
        if key in trace.storages_read.get(node, ()) and (key not in trace.storages_made.get(node, ()) or any(
                w.node is node and w.storage == key for w in trace.writes)):
            return True
    return False


def _saved_since(start: Any, since: int) -> list[tuple[Any, torch.Tensor]]:
    found, seen, stack = [], set(), [start]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen or sequence_nr(fn) < since:
            continue
        if len(seen) >= _BETWEEN_LIMIT:
            log.debug("saves between graphs: stopped after %d autograd nodes", _BETWEEN_LIMIT)
            break
        seen.add(id(fn))
        found += [(fn, t) for t in saves_of_node(fn)]
        stack.extend(f for f, _ in fn.next_functions)
    return found


def _node_op(fn: Any) -> str:
    forward = function_class_of(fn)
    return f"{forward.__name__}.apply" if forward is not None else type(fn).__name__


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


class _Token:
    """Kept in an autograd node's `metadata`: freed with the node."""


def _watch(graph: GraphSaves, outputs: list) -> _Call:
    # A save's values are gone once a backward ran through an output its backward runs
    # through (a train step compiled whole: `loss.backward()` breaks the graph, and the next
    # graph's update writes what the forward saved), or once the autograd nodes of all those
    # outputs are freed (a forward whose outputs were dropped without a backward).
    call = _Call()
    by_fn: dict[int, tuple[Any, list[int]]] = {}
    for position in graph.positions:
        real = outputs[position] if position < len(outputs) else None
        if not isinstance(real, torch.Tensor):
            continue
        call.reach[position] = weakref.ref(real)
        fn = real.grad_fn
        if fn is not None:
            call.fns[position] = id(fn)
            by_fn.setdefault(id(fn), (fn, []))[1].append(position)
    for fn, positions in by_fn.values():
        fn.register_prehook(lambda grad_outputs, p=tuple(positions): call.consumed.update(p))
        token = _Token()
        fn.metadata[f"fxinplace:{id(call)}"] = token
        weakref.finalize(token, call.released.update, tuple(positions))
    return call


class Reach(enum.Enum):
    """What became of the autograd nodes through which a save's backward runs, after a call."""

    REACHED = "reached"  # a backward ran through one, or what the call returned has one in its history
    UNRETURNED = "unreturned"  # alive, but in the history of nothing the call returned (a caller's tensor written)
    FREED = "freed"  # all freed before any backward ran through them: nothing can ever unpack the save


def reach_after_call(watched: list[tuple[GraphSaves, frozenset[int]]], returned: list[Any] | None) -> Reach:
    """Can a loss computed from `returned` (the frame's result's tensors; None where the result
    holds objects we cannot look into) unpack a save of these graphs?

    `watched`: (graph, the positions of its outputs whose backward runs through the save),
    each graph watched on its latest call (`_watch`). Asked of autograd after the call, not of
    the graphs: a node nothing references is freed and no backward can run it (a value the
    code after a break drops, or reads only through `.detach()`); a node alive but absent from
    the history of every tensor returned is reached only by what keeps it (a caller's input
    written in place with it, an attribute): a loss computed from that would unpack it.
    """
    live: set[int] = set()
    for graph, positions in watched:
        call = graph.call
        if call is None or not positions or positions & call.consumed:
            return Reach.REACHED
        for p in positions - call.released:
            if p not in call.fns:
                return Reach.REACHED  # not watched: count it
            live.add(call.fns[p])
    if not live:
        return Reach.FREED
    if returned is None:
        return Reach.REACHED
    for t in returned:
        if isinstance(t, torch.Tensor) and t.grad_fn is not None and _history_contains(t.grad_fn, live):
            return Reach.REACHED
    return Reach.UNRETURNED


def _history_contains(root: Any, wanted: set[int]) -> bool:
    if not wanted:
        return False
    seen, stack = set(), [root]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        if id(fn) in wanted:
            return True
        seen.add(id(fn))
        if len(seen) > _WALK_LIMIT:
            return True  # too large to tell: assume it does
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False
