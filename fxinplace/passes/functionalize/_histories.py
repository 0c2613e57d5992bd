"""Give each tensor functionalize rewrites the autograd history eager gives it."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.fx

from ..._compat import SET_GRAD_ENABLED, example_value, origin_names
from ._respell import is_complex
from .._graph_io import GraphInput, example_requires_grad
from ..op_knowledge import OVERWRITES, aliased_arg, is_view, mutates, view_chain, written_inputs

__all__ = ["keep_eager_histories"]


def keep_eager_histories(aten: torch.fx.GraphModule, gm: torch.fx.GraphModule, inputs: Sequence[GraphInput],
                         modes: dict[str, bool]) -> dict[str, bool]:
    """Give each written tensor, for its later readers, the autograd history eager gives it.

    Eager updates a tensor's history in place; out of place the new value has the history of
    the op that computed it, which differs in three cases (each handled only when something
    reads the tensor under grad mode afterwards):

    - A write hidden from autograd (under `no_grad`, or through `.data` / `.detach()`, an
      `aten.detach` at ATen level) changes the value and leaves the history alone: a weight
      clipped before use still gets its gradient. The tensor `t` becomes, under grad mode,
      `t.detach() + (old - old.detach())`, `old` a clone taken before the write: the new value
      exactly (the difference is zero, kept zero where `old` is not finite) with `t`'s history.
    - The same write into a tensor that does not require grad, from a value that does
      (`buf.detach().mul_(x)`): in eager `buf` still requires no grad; `t` becomes `t.detach()`.
    - An overwrite (`copy_`, `fill_`; `zero_` and random fills arrive as `copy_`) of a whole tensor that requires grad keeps
      requiring grad in eager (a zero gradient to the old history): `t` becomes
      `where(False, old, t)`, the new value with that zero gradient.

    And a view taken under `no_grad` of a tensor written somewhere in the graph is detached
    for its grad-mode readers (see `_cut_no_grad_view`).

    `modes` are `grad_modes(aten)` as it comes; returns the grad mode of each node added here.
    """
    added: dict[str, bool] = {}
    if not torch.is_grad_enabled():
        return added  # the caller's mode: nothing in this graph records history
    order = {node: i for i, node in enumerate(aten.graph.nodes)}
    written_roots = {view_chain(w)[-1] for n in aten.graph.nodes if n.op == "call_function" and mutates(n)
                     for w in written_inputs(n)}
    for node in list(aten.graph.nodes):
        if is_view(node) and not modes[node.name] and view_chain(node)[-1] in written_roots:
            _cut_no_grad_view(aten.graph, node, modes, gm, inputs, added)
    for node in list(aten.graph.nodes):
        if node.op != "call_function" or not mutates(node):
            continue
        for written in written_inputs(node):
            chain = view_chain(written)
            root = chain[-1]
            through_detach = any(n.target is torch.ops.aten.detach.default for n in chain)
            hidden = not modes[node.name] or through_detach
            overwrite = not hidden and node.target in OVERWRITES and _covers(written, root)
            if not (hidden or overwrite) or not _read_with_grad_after(node, root, modes, order):
                continue
            requires_grad = _may_require_grad(root, gm, inputs)
            if hidden and requires_grad:
                _rebuild_after(aten.graph, node, root, modes[node.name], _graft, added)
            elif hidden and through_detach and modes[node.name]:
                _rebuild_after(aten.graph, node, root, modes[node.name], _detached, added)
            elif overwrite and requires_grad:
                _rebuild_after(aten.graph, node, root, modes[node.name], _zero_gradient, added)
    aten.graph.lint()
    aten.recompile()
    return added


def _cut_no_grad_view(graph: torch.fx.Graph, view: torch.fx.Node, modes: dict[str, bool], gm: torch.fx.GraphModule,
                      inputs: Sequence[GraphInput], added: dict[str, bool]) -> None:
    # A view taken under `no_grad` passes no gradient to its base, also when read under grad
    # mode later. Functionalization regenerates a view of a written base for each reader, in
    # the reader's mode: its grad-mode readers get `view.detach()` instead.
    readers = [u for u in view.users if u.op == "output" or (
        modes.get(u.name, False) and not (mutates(u) and view in written_inputs(u)))]
    if not readers or not _may_require_grad(view_chain(view)[-1], gm, inputs):
        return
    with graph.inserting_after(view):
        detached = graph.call_function(torch.ops.aten.detach.default, (view,))
    added[detached.name] = modes[view.name]
    detached.meta["fxinplace"] = f"no gradient through {view.name}, a view taken under no_grad"
    for reader in readers:
        reader.replace_input_with(view, detached)


def _covers(view: torch.fx.Node, root: torch.fx.Node) -> bool:
    # A view with as many elements as its base is all of it (`t[0:]`, `t.t()`, `t.view(-1)`).
    if view is root:
        return True
    a, b = view.meta.get("val"), root.meta.get("val")
    try:
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and bool(a.numel() == b.numel())
    except Exception:  # noqa: BLE001 - a symbolic size that cannot be decided: treat as partial
        return False


def _graft(call: Callable, root: torch.fx.Node, old: torch.fx.Node) -> torch.fx.Node:
    aten = torch.ops.aten
    delta = call(aten.sub.Tensor, old, call(aten.detach.default, old))  # zero, with `old`'s gradient
    if is_complex(root):  # complex `isfinite` is a composite writing temporaries in place; its parts are not
        finite = call(aten.all.dim, call(aten.isfinite.default, call(aten.view_as_real.default, old)), -1)
    else:
        finite = call(aten.isfinite.default, old)
    delta = call(aten.where.ScalarOther, finite, delta, 0.0)
    return call(aten.add.Tensor, call(aten.detach.default, root), delta)


def _detached(call: Callable, root: torch.fx.Node, old: torch.fx.Node) -> torch.fx.Node:
    return call(torch.ops.aten.detach.default, root)


def _zero_gradient(call: Callable, root: torch.fx.Node, old: torch.fx.Node) -> torch.fx.Node:
    val = root.meta.get("val")
    device = val.device if isinstance(val, torch.Tensor) else None
    false = call(torch.ops.aten.scalar_tensor.default, False, dtype=torch.bool, device=device)
    return call(torch.ops.aten.where.self, false, old, root)


def _rebuild_after(graph: torch.fx.Graph, write: torch.fx.Node, root: torch.fx.Node, mode: bool, value: Callable,
                   added: dict[str, bool]) -> None:
    """Around `write`, under grad mode: `old = root.clone()` before it, `root.copy_(value(...))` after."""
    aten, set_grad = torch.ops.aten, SET_GRAD_ENABLED
    created = []

    def call(target, *args, **kwargs):
        created.append(graph.call_function(target, args, kwargs))
        return created[-1]

    old = None
    if value is not _detached:
        with graph.inserting_before(write):
            call(set_grad, True)
            old = call(aten.clone.default, root)
            call(set_grad, mode)
    with graph.inserting_before(write.next):  # keeps the order of the calls below
        call(set_grad, True)
        call(aten.copy_.default, root, value(call, root, old))
        call(set_grad, mode)
    for node in created:
        # A node with empty meta passes no `from_node` on to what the next trace makes of
        # it, and `_restore_grad_mode` could not place it.
        node.meta["fxinplace"] = f"keeps eager's autograd history across {write.name}"
        # Between `set_grad(True)` and `set_grad(mode)`, the last call.
        added[node.name] = bool(node.args[0]) if node.target is set_grad else True


def _read_with_grad_after(write: torch.fx.Node, root: torch.fx.Node, modes: dict[str, bool], order: dict) -> bool:
    aliases, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if aliased_arg(user) is not None and user not in aliases:
                aliases.add(user)
                todo.append(user)
    for alias in aliases:
        for user in alias.users:
            if order.get(user, -1) > order[write] and (user.op == "output" or modes.get(user.name, False)) and not is_view(user):
                return True
    return False


def _may_require_grad(root: torch.fx.Node, gm: torch.fx.GraphModule, inputs: Sequence[GraphInput]) -> bool:
    # The ATen fakes carry no requires_grad; the input records (by the placeholder's position)
    # and Dynamo's example value of the node the ATen node came from do.
    if root.op == "placeholder":
        return inputs[list(root.graph.find_nodes(op="placeholder")).index(root)].grad_by_end
    names = origin_names(root)
    origin = next((n for n in gm.graph.nodes if names and n.name == names[0]), None)
    return example_requires_grad(example_value(origin) if origin is not None else None)

