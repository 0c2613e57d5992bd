"""Rewrite a Dynamo graph's in-place mutations out of place, keeping the writes the caller sees.

Expects a Dynamo graph (placeholders carry `example_value` fakes). Returns an ATen graph
whose only writes are to inputs nothing with a gradient reads (batch norm's running
statistics, counters; or the input graph, when there is nothing to rewrite) and a wrapper
for the compiled graph that performs the other caller-visible writes, so the program
computes what the original computed, with autograd seeing every value as it was when it was
read, and every tensor keeping the autograd history eager gives it.

PyTorch does the rewrite: `torch.func.functionalize(remove="mutations")`, traced by `make_fx`
on fresh fakes in Dynamo's fake mode (symbolic shapes included), turns every in-place op into
its out-of-place twin, makes later readers (views included) read the new value, and ends the
graph with one `copy_` per mutated input. It runs on an ATen graph traced first, where every
write is explicit (see `_trace`). The rest is done by hand:

- Grad mode. A `make_fx` trace below autograd forgets `torch.no_grad()` regions. Every traced
  node remembers the node it came from (`from_node`), so `_set_grad_enabled` calls are put
  back around the nodes that came from no-grad regions (`_trace`).
- Histories. Eager changes a tensor's autograd history in place; out of place some new
  values would get another one: writes hidden from autograd, whole-tensor overwrites, views
  taken under `no_grad` (`_histories`).
- Caller-visible writes. Each final `copy_` into an input (parameter, buffer, user input)
  becomes an extra graph output, and the wrapper copies it into the input after the compiled
  call, exactly once: under `no_grad` unless the new value carries autograd history (a write
  to a non-leaf input under grad mode, which eager records too). Kept in the graph, a `copy_`
  into a parameter makes AOTAutograd trip on its own version check. A write into an input
  without grad that nothing with a gradient reads stays in the graph, for the compiler to
  fuse (batch norm's running statistics go back to its in-place form, as in eager).
- Saved inputs. Autograd saves graph inputs by reference (and AOTAutograd may recompute
  from them in the backward), so a write-back into an input the backward reads would raise
  or silently feed it the new values. While grad is on, the compiled graph gets a clone of
  each written-back input the backward can reach (`_write_back`); gradients reach the
  original through the clone.

The pass returns facts (`FunctionalizedGraph`): which inputs it writes back, or why the graph
is compiled unchanged. The backend decides which graphs to rewrite (option `functionalize`)
and marks the audit's mutations from these facts (`fxinplace._rewrites`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

import torch
import torch.fx

from ..._compat import hop_name
from ...facts import KeptReason
from ._opaque import restore, stand_ins
from ._trace import trace_functional
from ._write_back import (aliased_outputs, clone_outputs, identity, outputs_for_writes, read_by_backward,
                                       read_by_functional_batch_norm, reinplace_running_stats, write_back)
from .._graph_io import GraphInput, graph_inputs, returned_values
from ..op_knowledge import INLINABLE_HOPS

__all__ = ["functionalize", "unchanged", "FunctionalizedGraph", "clone_outputs"]


@dataclass(frozen=True)
class FunctionalizedGraph:
    """What the rewrite made of a graph, as facts: the backend marks the audit's mutations."""

    gm: torch.fx.GraphModule  # what to hand to the compiler (the input graph when unchanged)
    wrap: Callable[[Callable], Callable]  # compiled graph -> callable that does the write-backs
    kept: KeptReason | None = None  # compiled unchanged, and why
    kept_detail: tuple[str, ...] = ()  # the names the reason refers to
    written_back: frozenset[int] = frozenset()  # placeholder indices the rewrite writes back
    unwritten: frozenset[int] = frozenset()  # placeholder indices no ATen op writes
    checkpoints_inlined: bool = False  # the ATen trace inlined checkpoint regions: memory, not gradients
    kept_whole: frozenset[str] = frozenset()  # the custom Function calls (node names) that went through whole
    written_in_place: frozenset[int] = frozenset()  # placeholder indices the graph handed on still writes


def functionalize(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    keep_saved: Collection[int] = (),
) -> FunctionalizedGraph:
    """Rewrite `gm` without in-place ops; see the module docstring.

    `keep_saved`: indices of inputs this graph saves for backward and a later graph may write
    (the graph ends in a break): each call with grad on gets a clone, so the backward keeps the
    value it saved, as the out-of-place program does.
    """
    opaque = _opaque_subgraphs(gm)
    stand = stand_ins(gm) if opaque else None  # each such call kept whole through the trace
    if opaque and stand is None:
        return unchanged(gm, KeptReason.OWN_BACKWARD, (opaque[0],), keep_saved)
    inputs = graph_inputs(gm, example_inputs)
    try:
        traced = trace_functional(stand.gm if stand else gm, example_inputs, inputs)
    finally:
        if stand is not None:
            stand.close()
    if traced is None:
        return unchanged(gm, KeptReason.NO_ATEN_WRITE, (), keep_saved)
    new_gm, written_at_aten, unbumped = traced
    if stand is not None:
        restore(new_gm, stand)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    read = read_by_backward(new_gm, [record.grad_by_end for record in inputs])
    reinplaced = reinplace_running_stats(new_gm)
    # A write to a tensor without grad that nothing with a gradient reads (counters) stays in
    # the graph: the compiler handles it as any buffer update (Inductor writes it from its
    # kernels). Not one that functional batch norm reads: autograd saves it there, and the
    # write, kept in the graph, would trip autograd's version check.
    saved_by_batch_norm = read_by_functional_batch_norm(new_gm)
    written, kept = outputs_for_writes(
        new_gm, keep=lambda i: not inputs[i].grad_by_end and not read[i] and i not in saved_by_batch_norm)
    shared = _sharing_storage(inputs, [i for i, _ in written] + kept + reinplaced)
    if shared:
        # The functional trace takes every input as a tensor of its own: a write through one
        # input would not reach another view of its storage (nor their write-backs each other).
        return unchanged(gm, KeptReason.SHARED_INPUT, (placeholders[shared[0]].name, placeholders[shared[1]].name),
                         keep_saved, written_in_place=frozenset(written_at_aten))
    new_gm.graph.lint()
    new_gm.recompile()

    returned = returned_values(new_gm)
    n_outputs = len(returned) - len(written)
    indices = [i for i, _ in written]
    clone = {i for i in indices if read[i]} | set(keep_saved)
    # Eager leaves these versions alone: batch norm's running statistics, and writes through
    # `.data` (a later reader would otherwise see a version eager never made).
    keep_version = {i for i in indices if (not read[i] and i in saved_by_batch_norm) or i in unbumped}
    wrap = write_back(indices, n_outputs, aliased_outputs(returned, written), clone, keep_version)
    return FunctionalizedGraph(
        new_gm, wrap,
        written_back=frozenset(indices + kept + reinplaced),
        unwritten=frozenset(i for i in range(len(placeholders)) if i not in written_at_aten),
        # The ATen trace inlines checkpoint regions: gradients stay right, memory does not.
        checkpoints_inlined=any(_is_hop(node, "tag_activation_checkpoint") for node in gm.graph.nodes),
        kept_whole=frozenset(stand.names) if stand is not None else frozenset(),
        written_in_place=frozenset(kept + reinplaced),
    )


def unchanged(
    gm: torch.fx.GraphModule, reason: KeptReason, detail: tuple[str, ...] = (), keep_saved: Collection[int] = (),
    written_in_place: frozenset[int] = frozenset(),
) -> FunctionalizedGraph:
    """`gm` compiled as it is (for `reason`), with only the clones `keep_saved` asks for;
    `written_in_place`: the inputs it writes, where known."""
    wrap = identity
    if keep_saved:
        wrap = write_back([], len(returned_values(gm)), {}, clone=keep_saved)
    return FunctionalizedGraph(gm, wrap, kept=reason, kept_detail=detail, written_in_place=written_in_place)


def _is_hop(node: torch.fx.Node, name: str) -> bool:
    return hop_name(node.target) == name


def _opaque_subgraphs(gm: torch.fx.GraphModule) -> list[str]:
    # Higher-order ops with a backward of their own, which a trace below autograd would drop.
    return [hop for node in gm.graph.nodes
            if (hop := hop_name(node.target)) is not None and hop not in INLINABLE_HOPS]


def _sharing_storage(inputs: Sequence[GraphInput], written: Collection[int]) -> tuple[int, int] | None:
    """(a written input, another input with the same storage), or None."""
    for i in written:
        for j, record in enumerate(inputs):
            if j != i and record.alias_group is not None and record.alias_group == inputs[i].alias_group:
                return i, j
    return None
