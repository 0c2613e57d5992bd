"""Autograd's side of the fake run: the autograd nodes each op made, and what a custom
`autograd.Function` saves out of the saved-tensor hooks' sight."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

from ..._compat import pytree
from .._graph_io import returned_values

__all__ = ["grad_fns", "new_grad_fns", "autograd_function_saved_args", "function_saved_values"]


def grad_fns(values: list[Any], written: list[torch.Tensor] = ()) -> list[Any]:
    """The autograd nodes behind `values` and, for tensors written in place, their bases'.

    A write through a view rebases the base's history (`CopySlices` wraps the op's own
    backward node), so the written view's base node is the op's node too.
    """
    owners = [t for t in values if isinstance(t, torch.Tensor)]
    owners += [t._base for t in written if t._base is not None]
    fns = []
    for t in owners:
        try:
            fn = t.grad_fn if t.requires_grad else None
        except RuntimeError:  # a no_grad view whose base changed refuses even this
            fn = None
        if fn is not None:
            fns.append(fn)
    return fns


def new_grad_fns(roots: list[Any], known: set[Any]) -> list[Any]:
    """The autograd nodes reachable from `roots` and not in `known`; adds them to `known`."""
    found = []
    stack = list(roots)
    while stack:
        fn = stack.pop()
        if fn is None or fn in known:
            continue
        known.add(fn)
        found.append(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def autograd_function_saved_args(n: torch.fx.Node, gm: torch.fx.GraphModule, env: dict) -> list[tuple[torch.fx.Node, bool]]:
    # A custom autograd.Function becomes `autograd_function_apply(fwd_body, bwd_body, *args)`;
    # at run time it keeps `ctx.save_for_backward` tensors in a closure, out of the hooks'
    # sight. Its fwd body returns (outputs, saved values): saved values that are the body's
    # own inputs are the caller's tensors, saved as eager PyTorch would save them. Each comes
    # with whether the backward reads it for a gradient autograd wants (see `_read_for_grads`).
    if n.op != "call_function" or getattr(n.target, "__name__", "") != "autograd_function_apply":
        return []
    try:
        fwd = getattr(gm, n.args[0].target)
        placeholders = list(fwd.graph.find_nodes(op="placeholder"))
        saved_values = function_saved_values(fwd)
        read = _read_for_grads(getattr(gm, n.args[1].target), len(saved_values), n.args[2:], env)
        picked = [i for i in n.kwargs.get("saved_for_backward_idx", ()) if saved_values[i] in placeholders]
        return [(n.args[2 + placeholders.index(saved_values[i])], read[i]) for i in picked]
    except (AttributeError, IndexError, TypeError, ValueError):
        return []


def _read_for_grads(bwd: torch.fx.GraphModule, n_saved: int, inputs: Sequence, env: dict) -> list[bool]:
    """Per saved value: does the Function's backward use it for the gradient of an input that
    requires grad? Autograd drops the others, so their values cannot change a gradient."""
    placeholders = list(bwd.graph.find_nodes(op="placeholder"))
    grads = pytree.tree_leaves(bwd.graph.output_node().args)
    if n_saved > len(placeholders) or len(grads) != len(inputs):
        return [True] * n_saved  # a layout we do not know: every save counts
    wanted = {g for g, arg in zip(grads, inputs) if isinstance(g, torch.fx.Node) and _gets_gradient(env.get(arg))}
    read = []
    for placeholder in placeholders[len(placeholders) - n_saved:]:
        seen, stack = set(), [placeholder]
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(node.users)
        read.append(bool(seen & wanted))
    return read


def _gets_gradient(value: Any) -> bool:
    """Does autograd give an op's node an edge to `value` (its `grad_fn`, or a leaf's
    `AccumulateGrad`), so that the gradient computed for it goes somewhere?

    A view made under `no_grad` of a tensor that requires grad says `requires_grad` (its base
    does) but has neither: the edge is None and autograd drops what backward computes for it.
    Asked of autograd itself, as `torch.autograd.graph.get_gradient_edge` does: the edge a
    `view_as` gets.
    """
    if not isinstance(value, torch.Tensor):
        return True  # not a tensor we can ask about: count it
    if not value.requires_grad:
        return False
    if value.grad_fn is not None:
        return True
    with torch.enable_grad():
        return value.view_as(value).grad_fn.next_functions[0][0] is not None


def function_saved_values(fwd: torch.fx.GraphModule) -> list[Any]:
    """What a Function's fwd body saves: its output is (outputs, saved values)."""
    return list(returned_values(fwd)[1])
