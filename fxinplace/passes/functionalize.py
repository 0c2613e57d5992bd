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
write is explicit (see `_functionalize_trace`). The rest is done by hand:

- Grad mode. A `make_fx` trace below autograd forgets `torch.no_grad()` regions. Every traced
  node remembers the node it came from (`from_node`), so `_set_grad_enabled` calls are put
  back around the nodes that came from no-grad regions (`_functionalize_trace`).
- Histories. Eager changes a tensor's autograd history in place; out of place some new
  values would get another one: writes hidden from autograd, whole-tensor overwrites, views
  taken under `no_grad` (`_functionalize_histories`).
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
  each written-back input the backward can reach (`_functionalize_writeback`); gradients reach the
  original through the clone.

`mode="hazards"` is all or nothing per graph: a graph is functionalized as a whole when one of
its mutations has an error-level hazard, and handed over unchanged otherwise. Rewriting only
some mutations would mean re-inplacing the others after `torch.func.functionalize`, and
Inductor already re-inplaces what is safe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

import torch
import torch.fx

from ..report import Hazard, Mutation
from ._functionalize_trace import trace_functional
from ._functionalize_writeback import (aliased_outputs, identity, outputs_for_writes, read_by_backward,
                                       read_by_functional_batch_norm, reinplace_running_stats, write_back)
from ._graph_io import GraphInput, graph_inputs, returned_values
from .op_knowledge import INLINABLE_HOPS
from .resolve_aliases import target_of_input

__all__ = ["functionalize", "FunctionalizedGraph"]

# Hazards that come from the write happening in place; gone once it happens out of place.
_REMOVED = frozenset({"saved-then-mutated", "hidden-write-to-saved"})


@dataclass(frozen=True)
class FunctionalizedGraph:
    gm: torch.fx.GraphModule  # what to hand to the compiler (the input graph when unchanged)
    wrap: Callable[[Callable], Callable]  # compiled graph -> callable that does the write-backs
    mutations: tuple[Mutation, ...]  # the audit's mutations with `rewrite` filled in


def functionalize(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str = "all",
    mutations: Sequence[Mutation] = (),
    saved_inputs: Collection[torch.fx.Node] = (),
    keep_saved: Collection[int] = (),
) -> FunctionalizedGraph:
    """Rewrite `gm` without in-place ops; see the module docstring.

    `mode` is "all" or "hazards"; `mutations` are the audit's findings for `gm` (they choose
    what "hazards" rewrites, and come back with `rewrite` and removed hazards marked).
    `saved_inputs` are placeholders an earlier graph saved for backward (a graph break): their
    write-back still reaches what that graph saved, so their hazards stay. `keep_saved`: indices of inputs this graph saves for backward and a later graph may write
    (the graph ends in a break): each call with grad on gets a clone, so the backward keeps the
    value it saved, as the out-of-place program does.
    """
    if mode not in ("all", "hazards"):
        raise ValueError(f'fxinplace: `functionalize` mode must be "all" or "hazards", got {mode!r}')
    if mode == "hazards" and not any(m.severity == "error" for m in mutations):
        return _unchanged(gm, mutations, "kept in place: no error-level hazard in this graph", keep_saved)
    opaque = _opaque_subgraphs(gm)
    if opaque:
        return _unchanged(gm, mutations, f"kept in place: `{opaque[0]}` in this graph has a backward of its own, "
                                         "which the rewrite would lose", keep_saved)
    inputs = graph_inputs(gm, example_inputs)
    traced = trace_functional(gm, example_inputs, inputs)
    if traced is None:
        return _unchanged(gm, mutations, "kept in place: no write at ATen level", keep_saved)
    new_gm, written_at_aten = traced
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
        return _unchanged(gm, mutations, f"kept in place: written input `{placeholders[shared[0]].name}` shares "
                                         f"memory with input `{placeholders[shared[1]].name}`", keep_saved)
    new_gm.graph.lint()
    new_gm.recompile()

    target = {p: _target_of(p, record) for p, record in zip(placeholders, inputs)}
    names = {target[placeholders[i]] for i in [i for i, _ in written] + kept + reinplaced}
    saved_earlier = {target[p] for p in saved_inputs}
    returned = returned_values(new_gm)
    n_outputs = len(returned) - len(written)
    indices = [i for i, _ in written]
    clone = {i for i in indices if read[i]} | set(keep_saved)
    keep_version = {i for i in indices if not read[i] and i in saved_by_batch_norm}
    wrap = write_back(indices, n_outputs, aliased_outputs(returned, written), clone, keep_version)
    unwritten = {target[p] for i, p in enumerate(placeholders) if i not in written_at_aten}
    marked = tuple(_mark(m, names, saved_earlier, unwritten) for m in mutations)
    if any(_is_hop(node, "tag_activation_checkpoint") for node in gm.graph.nodes):
        # The ATen trace inlines checkpoint regions: gradients stay right, memory does not.
        note = "; checkpoint regions inlined: their activations are kept, not recomputed"
        marked = tuple(dataclasses.replace(m, rewrite=m.rewrite + note) for m in marked)
    return FunctionalizedGraph(new_gm, wrap, marked)


def _is_hop(node: torch.fx.Node, name: str) -> bool:
    return isinstance(node.target, torch._ops.HigherOrderOperator) and node.target.name() == name


def _opaque_subgraphs(gm: torch.fx.GraphModule) -> list[str]:
    # Higher-order ops with a backward of their own, which a trace below autograd would drop.
    return [node.target.name() for node in gm.graph.nodes
            if isinstance(node.target, torch._ops.HigherOrderOperator) and node.target.name() not in INLINABLE_HOPS]


def _sharing_storage(inputs: Sequence[GraphInput], written: Collection[int]) -> tuple[int, int] | None:
    """(a written input, another input with the same storage), or None."""
    for i in written:
        for j, record in enumerate(inputs):
            if j != i and record.alias_group is not None and record.alias_group == inputs[i].alias_group:
                return i, j
    return None


def _unchanged(
    gm: torch.fx.GraphModule, mutations: Sequence[Mutation], why: str, keep_saved: Collection[int] = ()
) -> FunctionalizedGraph:
    wrap = identity
    if keep_saved:
        n_outputs = len(returned_values(gm))
        wrap = write_back([], n_outputs, {}, clone=keep_saved)
    return FunctionalizedGraph(gm, wrap, tuple(dataclasses.replace(m, rewrite=why) for m in mutations))


def _target_of(placeholder: torch.fx.Node, record: GraphInput) -> tuple[str, str]:
    target = target_of_input(placeholder, record)
    return target.kind, target.name


def _mark(
    mutation: Mutation, written: set[tuple[str, str]], saved_earlier: set[tuple[str, str]],
    unwritten: set[tuple[str, str]],
) -> Mutation:
    target = mutation.target
    key = (target.kind, target.name)
    if key in unwritten and key not in written:
        # Eager bumps the version and writes no value (`conj_physical_` of a real tensor).
        return dataclasses.replace(mutation, rewrite=f"nothing to write back: no ATen op writes {target.kind} "
                                                     f"{target.name}")
    if key in saved_earlier:
        # The write-back lands in the storage the earlier graph's backward reads, as in eager.
        return dataclasses.replace(mutation, rewrite=f"written back to {target.kind} (an earlier graph saved it)")
    if key in written:  # placeholders, an earlier graph's intermediates among them
        rewrite = f"written back to {target.kind}"
    elif target.kind == "intermediate":
        rewrite = "rewritten"
    else:
        raise AssertionError(f"fxinplace: functionalize found no write-back for {target} ({mutation.node})")
    hazards = tuple(_removed(h) if h.code in _REMOVED else h for h in mutation.hazards)
    if any(h.code in _REMOVED for h in mutation.hazards):
        rewrite += " (removes " + ", ".join(sorted({h.code for h in mutation.hazards if h.code in _REMOVED})) + ")"
    return dataclasses.replace(mutation, rewrite=rewrite, hazards=hazards)


def _removed(hazard: Hazard) -> Hazard:
    # The write no longer happens to the saved tensor: what is left is a note, not an error.
    return dataclasses.replace(hazard, severity="info", message=f"removed by functionalize: {hazard.message}")


def carry_rewrites(done: Sequence[Mutation], fresh: Sequence[Mutation]) -> tuple[Mutation, ...]:
    """What functionalize did to `done`, applied to `fresh`: a re-analysis of the same graph.

    `fxinplace.audit` re-runs the cheap passes once it knows the task names; the rewrite
    itself happened at compile time and must not be lost.
    """
    carried = []
    for old, new in zip(done, fresh, strict=True):
        hazards = tuple(
            _removed(h) if o.message.startswith("removed by functionalize:") else h
            for o, h in zip(old.hazards, new.hazards, strict=True)
        )
        carried.append(dataclasses.replace(new, rewrite=old.rewrite, hazards=hazards))
    return tuple(carried)
