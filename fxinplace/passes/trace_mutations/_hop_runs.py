"""Subgraphs of higher-order ops: each body's dry run on copies of the operands.

A custom autograd.Function, a checkpoint region, `wrap`, `cond` and `while_loop` reach the
graph as one call of a higher-order op (HOP) whose bodies are `get_attr` submodules. Run as
one op, a body's write shows at most as a version bump of an operand, and not at all when it
goes through `.data` (as a fused kernel writes its input buffer inside a Function's forward).

So each body first runs alone, on copies of the operands that keep their storage layout and
aliasing but have fresh version counters, in a nested tracing interpreter: that dry run tells
which body node writes which operand region, whether autograd sees it, and what the body
saves, in order. Then the op runs as before, on the real fakes: each write happens once, and
autograd sees the op exactly as PyTorch builds it (a Function's own backward node, the saved
inputs of a checkpoint). Last, the op's facts are refined with the dry run's: its writes
become the body nodes' writes, and saved tensors are checked by the rules of the op (`_hop_facts`).
Anything unexpected leaves the op audited as one op, as before.

How the saved tensors of a body behave, per HOP:
  "plain":     the body runs as a call, saving by reference (wrap);
  "recompute": non-reentrant checkpoint: its explicit inputs are saved (version-checked) at
               entry, and what the body saves is recomputed in backward, which replays the
               body up to its last save (early stop) on the inputs as they are then. Module
               state the body reads (parameters, buffers) is not an explicit input: Dynamo
               lifts it into the body's operands, indistinguishable from explicit ones, so
               operands rooted in a parameter or buffer are taken as lifted;
  "function":  autograd.Function: `ctx.save_for_backward` keeps references, checked against
               versions from the moment forward returns; forward runs under no_grad;
  "own":       the op saves its operands and its backward reruns the body with autograd
               (cond, while_loop), so the body's saves behave as in plain code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx

from .._graph_io import output_nodes
from ._facts import MutationTrace
from .._storage import StorageKey, storage_key

__all__ = ["Layout", "BodyRun", "dry_run_bodies"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    bodies: Callable[[Sequence], list[tuple[Any, Sequence]]]  # the op's args -> [(body, operands)]
    saves: str
    grad: bool | None = None  # grad mode the body runs under; None: the mode around the call


_LAYOUTS = {
    "wrap": Layout(lambda a: [(a[0], a[1:])], "plain"),
    "tag_activation_checkpoint": Layout(lambda a: [(a[0], a[1:])], "recompute"),
    "autograd_function_apply": Layout(lambda a: [(a[0], a[2:])], "function", grad=False),
    "cond": Layout(lambda a: [(a[1], a[3]), (a[2], a[3])], "own"),
    "while_loop": Layout(lambda a: [(a[0], (*a[2], *a[3])), (a[1], (*a[2], *a[3]))], "own"),
}


@dataclass
class BodyRun:
    """One body's dry run on copies of the op's operands."""

    layout: Layout
    body: torch.fx.GraphModule
    trace: MutationTrace  # on the copies
    order: dict[torch.fx.Node, int]  # the body's nodes, in order
    operands: list[tuple[Any, Any]]  # (the op's argument node, its value) per body placeholder
    copies: dict[StorageKey, int]  # a copy's storage -> the operand position it stands for
    values: list[Any]  # everything the dry run made, kept alive (see `MutationTrace.subgraph_values`)


def dry_run_bodies(n: torch.fx.Node, target, args: tuple, nested: Callable) -> list[BodyRun]:
    """Each body of `n` run alone; `nested(body)` makes the interpreter. [] when that fails."""
    layout = _LAYOUTS.get(target.name())
    if layout is None:
        return []
    try:
        runs = []
        for (body, values), (_, nodes) in zip(layout.bodies(args), layout.bodies(n.args), strict=True):
            run = _dry_run(body, list(values), list(nodes), layout, nested)
            if run is None:
                return []
            runs.append(run)
        return runs
    except Exception as e:  # a layout we do not know: the op is audited as one op
        log.warning("fxinplace: could not run the body of `%s` alone (%s: %s); auditing it as one op",
                    n.name, type(e).__name__, e)
        return []


def _dry_run(body, values: list, nodes: list, layout: Layout, nested_interpreter: Callable) -> BodyRun | None:
    if not isinstance(body, torch.fx.GraphModule):
        return None
    if len(list(body.graph.find_nodes(op="placeholder"))) != len(values):
        return None
    copied = _copy_operands(values)
    if copied is None:
        return None
    copies, of_storage = copied
    nested = nested_interpreter(body)
    grad = torch.is_grad_enabled() if layout.grad is None else layout.grad
    # `set_grad_enabled` restores the mode on exit, whatever `_set_grad_enabled` nodes did.
    with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(nested.pack, nested.unpack):
        nested.run(*copies)
    nested.record_backward_reach([nested.env.get(a) for a in output_nodes(body)])
    order = {node: i for i, node in enumerate(body.graph.nodes)}
    kept = [copies, nested.env, nested.trace.subgraph_values]
    return BodyRun(layout, body, nested.trace, order, list(zip(nodes, values)), of_storage, kept)


def _copy_operands(values: list) -> tuple[list, dict[StorageKey, int]] | None:
    """Fresh tensors laid out like `values` (same storage size, strides, offsets, aliasing)."""
    copies: list[Any] = []
    of_storage: dict[StorageKey, int] = {}
    roots: dict[StorageKey, torch.Tensor] = {}
    # Non-leaf operands that require grad stay non-leaves, so in-place ops stay legal on them.
    with_grad = {storage_key(v) for v in values if isinstance(v, torch.Tensor) and v.requires_grad and not v.is_leaf}
    for position, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            copies.append(v)
            continue
        key = storage_key(v)
        if key is None:
            return None
        if v.requires_grad and v.is_leaf:
            copy = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).requires_grad_()
        else:
            root = roots.get(key)
            if root is None:
                root = torch.empty(v.untyped_storage().nbytes() // v.element_size(), dtype=v.dtype, device=v.device)
                if key in with_grad:
                    root = root.requires_grad_().clone()
                roots[key] = root
            if root.dtype != v.dtype:
                return None
            copy = root.as_strided(v.shape, v.stride(), v.storage_offset())
            if not v.requires_grad and copy.requires_grad:
                copy = copy.detach()  # same storage and version counter, no history
        of_storage.setdefault(storage_key(copy), position)
        copies.append(copy)
    return copies, of_storage

