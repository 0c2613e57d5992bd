"""A higher-order op's facts from its bodies' dry runs (`_hop_runs`), in the outer graph's terms.

The op ran once on the real fakes; its dry runs tell which body node wrote what, and what the
body saved. `subgraph_facts` turns those into writes and saved-tensor findings of the op call,
by the rules of the op's layout ("plain", "recompute", "function", "own": see `_hop_runs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from ._hop_runs import BodyRun
from ._facts import MutationTrace, SavedTensor, Write
from ._saved_tensors import function_saved_values
from .._storage import StorageKey, overlaps, storage_key
from ..op_knowledge import MASKING_INPLACE, MASKING_WRITES, OWN_RESULT_SAVERS

__all__ = ["subgraph_facts"]


@dataclass
class _SubgraphFacts:
    """What a HOP call's bodies did, in the outer graph's terms; `apply` puts it in the trace."""

    writes: list[Write] = field(default_factory=list)
    mutated_inside: list[tuple[SavedTensor, torch.fx.Node]] = field(default_factory=list)
    mutated_in_body: list[tuple[SavedTensor, torch.fx.Node]] = field(default_factory=list)
    hidden_inside: list[tuple[SavedTensor, torch.fx.Node]] = field(default_factory=list)
    savers: list[tuple[SavedTensor, torch.fx.Node]] = field(default_factory=list)
    new_saved: list[SavedTensor] = field(default_factory=list)
    unsaved: list[SavedTensor] = field(default_factory=list)  # saves that backward never reads
    recomputed: list[SavedTensor] = field(default_factory=list)  # read again only by a recomputation
    roots: dict[StorageKey, torch.fx.Node] = field(default_factory=dict)  # body-made storages

    def apply(self, n: torch.fx.Node, trace: MutationTrace, saved_by_storage: dict, first: int) -> None:
        for record, inner in self.savers:
            record.inner = inner
        for record, inner in self.mutated_inside:
            if record.mutated_by is n and record.mutated_inside is None:
                record.mutated_inside = inner
        for record, inner in self.mutated_in_body:
            # A write between a save and its use, both inside the body: the op's inputs never
            # showed it, the dry run did.
            if record.mutated_by is None:
                record.mutated_by, record.mutated_inside = n, inner
        for record, inner in self.hidden_inside:
            if (n, inner) not in record.hidden_inside:
                record.hidden_inside.append((n, inner))
        for record in self.recomputed:
            record.recomputed = True
        # (Identity, not `==`: the dataclasses hold tensors.)
        unsaved = {id(r) for r in self.unsaved}
        trace.saved[:] = [r for r in trace.saved if id(r) not in unsaved]
        for records in saved_by_storage.values():
            records[:] = [r for r in records if id(r) not in unsaved]
        trace.saved.extend(self.new_saved)
        for key, root in self.roots.items():
            trace.storage_root.setdefault(key, root)
        # The op-level write of a storage the bodies' writes explain goes, unless a saved
        # tensor's hazard still points at the op as a whole (nothing else would carry it).
        explained = {w.storage for w in self.writes}
        unattributed = {r.storage for r in trace.saved if r.mutated_by is n and r.mutated_inside is None}
        kept = [w for w in trace.writes[first:] if w.storage not in explained or w.storage in unattributed]
        trace.writes[first:] = [*self.writes, *kept]


def subgraph_facts(n, runs: list[BodyRun], trace: MutationTrace, saved_here: list[SavedTensor], saved_by_storage,
                    gm) -> _SubgraphFacts:
    facts = _SubgraphFacts()
    saved_here = [r for r in saved_here if r.node is n]
    here = {id(r) for r in saved_here}
    for run in runs:
        writes = _outer_writes(n, run, facts)
        facts.writes += [w for w, _, _ in writes]
        first_visible: dict[StorageKey, torch.fx.Node] = {}
        for w, _, _ in writes:
            if w.autograd_visible:
                first_visible.setdefault(w.storage, w.inner)
        saves = run.layout.saves
        # The op's own saves whose writes the rules below know better than a version bump.
        matched = saves == "function" or (saves == "plain" and _match_plain_saves(run, saved_here, facts))
        for w, region, _ in writes:
            for record in saved_by_storage.get(w.storage, ()):
                plain_here = matched and id(record) in here
                if record.mutated_by is n and not plain_here:
                    facts.mutated_inside.append((record, first_visible.get(w.storage, w.inner)))
                # Batch norm's running statistics (the writes schemas hide) feed no saved value
                # in training mode: not a hazard for what the op itself saved.
                schema_own = w.how == "schema" and id(record) in here
                if (not w.autograd_visible and not plain_here and not schema_own and record.values_read
                        and overlaps(record.tensor, region)):
                    facts.hidden_inside.append((record, w.inner))
        if saves == "function":
            _check_function_saves(n, run, writes, saved_here, gm, facts)
        elif saves == "recompute":
            _sort_checkpoint_inputs(run, saved_here, trace, facts)
            _check_recomputed_saves(n, run, facts)
        elif saves == "own":
            _check_body_saves(n, run, facts, recomputed=False, before_step=None)
    return facts


def _outer_writes(n, run: BodyRun, facts: _SubgraphFacts) -> list[tuple[Write, torch.Tensor, int]]:
    """The body's writes as writes of the op call: (write, written region, body step)."""
    writes = []
    for w in run.trace.writes:
        inner = w.inner or w.node
        position = run.copies.get(w.storage)
        if position is not None:
            node, value = run.operands[position]
            write = Write(n, node, value, storage_key(value), w.autograd_visible, w.grad_enabled, w.how,
                          region=w.region, inner=inner)
        else:
            # A tensor the body made: named by the body node that made it.
            root = run.trace.storage_root.get(w.storage, w.arg)
            facts.roots[w.storage] = root
            write = Write(n, root, w.tensor, w.storage, w.autograd_visible, w.grad_enabled, w.how,
                          region=w.region, inner=inner)
        if write.storage is not None:
            # The copies share the operands' layout: the region's offsets hold for the operand.
            writes.append((write, w.tensor, run.order[w.node]))
    return writes


def _match_plain_saves(run: BodyRun, saved_here: list[SavedTensor], facts: _SubgraphFacts) -> bool:
    # A plain call saves under the outer hooks, in the order the dry run saved: pair them up.
    inner_saved = run.trace.saved
    if len(inner_saved) != len(saved_here):
        return False
    for record, inner in zip(saved_here, inner_saved):
        facts.savers.append((record, inner.inner or inner.node))
        if inner.mutated_by is not None:
            facts.mutated_inside.append((record, inner.mutated_inside or inner.mutated_by))
            facts.mutated_in_body.append((record, inner.mutated_inside or inner.mutated_by))
        root = run.trace.storage_root.get(inner.storage) if inner.storage not in run.copies else None
        if root is not None and record.storage is not None:
            facts.roots[record.storage] = root  # a tensor the body made: named by its body node
        for node in inner.hidden_writes:
            facts.hidden_inside.append((record, node))
        for _, node in inner.hidden_inside:
            facts.hidden_inside.append((record, node))
    return True


def _check_function_saves(n, run: BodyRun, writes, saved_here: list[SavedTensor], gm, facts: _SubgraphFacts) -> None:
    # `ctx.save_for_backward(x)` keeps `x` itself; its version is recorded when forward returns.
    # A write in forward after forward read `x` (visible or through `.data`, no error either
    # way) hands backward values that forward did not compute with. A write before any read
    # is what forward computed with; a saved tensor backward never reads is harmless.
    for position in _function_saved_operands(n, gm):
        value = run.operands[position][1]
        record = next((r for r in saved_here if r.tensor is value), None)
        # Operands that alias (`apply(t, t.detach())`) share one copy, keyed by the first of them.
        copy_key = next((k for k, p in run.copies.items() if storage_key(run.operands[p][1]) == record.storage),
                        None) if record is not None else None
        if record is None or copy_key is None or not record.values_read:
            continue  # `values_read`: used by the backward for a gradient autograd wants
        for w, region, step in writes:
            if w.storage != record.storage or not overlaps(value, region):
                continue
            if _read_before(run, copy_key, step):
                facts.hidden_inside.append((record, w.inner))


def _function_saved_operands(n: torch.fx.Node, gm: torch.fx.GraphModule) -> list[int]:
    """Operand positions of the Function's saved tensors (`ctx.save_for_backward` of inputs)."""
    fwd = getattr(gm, n.args[0].target)
    fwd_inputs = list(fwd.graph.find_nodes(op="placeholder"))
    saved_values = function_saved_values(fwd)
    return [fwd_inputs.index(saved_values[i]) for i in n.kwargs.get("saved_for_backward_idx", ())
            if saved_values[i] in fwd_inputs]


def _read_before(run: BodyRun, key: StorageKey, step: int) -> bool:
    # Reading consumes values; making a view (`.data`, slicing) does not.
    for node, i in run.order.items():
        if i >= step:
            continue
        read = key in run.trace.storages_read.get(node, ())
        if read and (key not in run.trace.storages_made.get(node, ()) or any(
                w.node is node and w.storage == key for w in run.trace.writes)):
            return True
    return False


def _sort_checkpoint_inputs(run: BodyRun, saved_here: list[SavedTensor], trace: MutationTrace,
                            facts: _SubgraphFacts) -> None:
    # The op saved all its operands at entry (torch.compile runs checkpoint so); eager saves
    # only the explicit inputs, and only a region that saves something ever reads them again.
    if not run.trace.saved:
        facts.unsaved += saved_here
        return
    saved_inside = {r.storage for r in run.trace.saved}
    feeding = _operands_feeding_saves(run)
    for record in saved_here:
        if not _is_module_state(record.storage, trace):
            continue
        copies = {k for k, p in run.copies.items() if storage_key(run.operands[p][1]) == record.storage}
        positions = {p for p, (_, value) in enumerate(run.operands) if storage_key(value) == record.storage}
        if copies & saved_inside or positions & feeding:
            # The recomputation reads it as it is then: saved itself (`linear` saves its
            # weight), or computed into what the region saves (`exp(u * w)` saves its result).
            facts.recomputed.append(record)
        else:
            facts.unsaved.append(record)  # `num_batches_tracked`: nothing saved depends on it


def _operands_feeding_saves(run: BodyRun) -> set[int]:
    """Operand positions whose values flow, in the body, into something the body saves."""
    placeholders = {node: i for i, node in enumerate(run.body.graph.find_nodes(op="placeholder"))}
    stack = [r.node for r in run.trace.saved if r.node in run.order]
    seen, feeding = set(), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in placeholders:
            feeding.add(placeholders[node])
        stack.extend(node.all_input_nodes)
    return feeding


def _is_module_state(key: StorageKey | None, trace: MutationTrace) -> bool:
    root = trace.storage_root.get(key) if key is not None else None
    record = trace.inputs.get(root) if root is not None and root.op == "placeholder" else None
    return record is not None and record.source is not None and record.kind in ("parameter", "buffer")


def _check_recomputed_saves(n, run: BodyRun, facts: _SubgraphFacts) -> None:
    # Backward's recomputation replays the region up to its last save, then stops: a write
    # to a tensor saved earlier in the region, made before that last save, is replayed and
    # hands backward the written values; a write after it is not. No error either way: the
    # checkpoint's hooks hold the saved tensors, not autograd's version check. (Writes to the
    # region's inputs are checked against the inputs the checkpoint saved at entry.)
    steps = [run.order[r.node] for r in run.trace.saved if r.node in run.order]
    if steps:
        _check_body_saves(n, run, facts, recomputed=True, before_step=max(steps))


def _masks_own_result(run: BodyRun, record: SavedTensor, writer: torch.fx.Node) -> bool:
    """Does a visible write over an elementwise op's saved result leave its gradient alone?

    In a checkpoint region eager checks no versions, so the recomputed backward reads the
    written values. For `h = exp(u); h[0] = 1.0` (or `relu_`, `clamp_`) that is harmless: where
    the write changed `h`, autograd already zeroes `h`'s gradient, and `exp`'s backward is
    `grad * h`, element by element. Only if nothing else read `h` in between (its gradient would
    reach `exp` unmasked).
    """
    saver = record.node
    if _op_key(saver) not in OWN_RESULT_SAVERS or saver.kwargs.get("inplace"):
        return False
    if record.storage not in run.trace.storages_made.get(saver, ()):
        return False  # it saved its input, not its result
    masking = _op_key(writer) in MASKING_WRITES or (
        _op_key(writer) in MASKING_INPLACE and writer.kwargs.get("inplace") is True)
    if not masking or writer not in run.order or saver not in run.order:
        return False
    between = [m for m, i in run.order.items() if run.order[saver] < i < run.order[writer]]
    return not any(record.storage in run.trace.storages_read.get(m, ())
                   and record.storage not in run.trace.storages_made.get(m, ()) for m in between)


def _op_key(node: torch.fx.Node) -> Any:
    return str(node.target) if node.op == "call_method" else node.target


def _check_body_saves(n, run: BodyRun, facts: _SubgraphFacts, recomputed: bool, before_step: int | None) -> None:
    """Saved-then-written pairs inside the body, on tensors the body made, as saved tensors of `n`."""
    for inner in run.trace.saved:
        if inner.storage is None or inner.storage in run.copies or not run.trace.backward_outputs.get(inner.node):
            continue
        visible = [(inner.mutated_by, inner.mutated_inside or inner.mutated_by)] if inner.mutated_by else []
        hidden = [(node, node) for node in inner.hidden_writes] + list(inner.hidden_inside)
        if recomputed:
            # Both kinds only replace the recomputed value: no error, silently wrong values,
            # unless the write is a mask over what an elementwise op saved of its own result.
            visible = [(at, node) for at, node in visible if not _masks_own_result(run, inner, node)]
            hidden = [(at, node) for at, node in visible + hidden if run.order.get(at, before_step) < before_step]
            visible = []
        if not visible and not hidden:
            continue
        record = SavedTensor(n, inner.tensor, inner.version, inner.storage, inner=inner.inner or inner.node,
                             recomputed=recomputed)
        if visible:
            record.mutated_by, record.mutated_inside = n, visible[0][1]
        record.hidden_inside = [(n, node) for _, node in hidden]
        facts.new_saved.append(record)
        root = run.trace.storage_root.get(inner.storage)
        if root is not None:
            facts.roots[inner.storage] = root
