"""The two ATen traces behind `functionalize`, and the grad modes a trace below autograd forgets."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx

from ._histories import keep_eager_histories
from ._respell import respell
from ..._compat import (SET_GRAD_ENABLED, detect_fake_mode, enable_python_dispatcher, make_fx_aten, origin_sources,
                        preserve_node_meta)
from .._graph_io import GraphInput, fresh_fakes
from ..op_knowledge import mutates, view_chain, written_inputs

__all__ = ["trace_functional", "grad_modes"]


def trace_functional(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], inputs: Sequence[GraphInput]
) -> tuple[torch.fx.GraphModule, set[int], set[int]] | None:
    """The functional ATen graph of `gm`, the indices of the inputs its ATen ops write, and
    those of them whose version counter the writes leave alone (every write went through
    `.data`, which has a counter of its own); None when `gm` writes nothing."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        raise AssertionError("fxinplace: functionalize needs Dynamo's fake mode; none was found")
    versions: dict[int, int] = {}  # input index -> its fake's version after the first trace

    def trace(fn: Callable, decompositions: dict | None = None) -> torch.fx.GraphModule:
        fakes = fresh_fakes(inputs, fake_mode, with_grad=False)
        before = [t._version if isinstance(t, torch.Tensor) else None for t in fakes]
        # Fakes without requires_grad: the trace is below autograd anyway, and functionalize's
        # own final `copy_` into a leaf parameter would otherwise be refused by autograd.
        with fake_mode, preserve_node_meta(), torch.no_grad(), enable_python_dispatcher():
            traced = make_fx_aten(fn, decompositions)(*fakes)
        if not versions:
            versions.update({i: t._version - v for i, (t, v) in enumerate(zip(fakes, before)) if v is not None})
        return traced

    # Two traces. The first decomposes to ATen ops with every write explicit: composite ops
    # (`cross_entropy` with label smoothing, `instance_norm`) would otherwise write their own
    # temporaries below `functionalize`'s reach, and the Python dispatcher turns
    # `native_batch_norm`, whose schema hides its running-stat writes, into
    # `_native_batch_norm_legit`, whose schema shows them (as AOTAutograd does). The second
    # trace functionalizes that ATen graph.
    aten = trace(torch.fx.Interpreter(gm).run)
    if not any(mutates(node) for node in aten.graph.nodes):
        return None
    _restore_grad_mode(aten, _all_grad_modes(gm))
    respell(aten)
    modes = grad_modes(aten)  # once: the nodes added for the histories say their own modes
    modes.update(keep_eager_histories(aten, gm, inputs, modes))
    functional = trace(torch.func.functionalize(torch.fx.Interpreter(aten).run, remove="mutations"),
                       {torch.ops.aten.copy.default: _copy_out_of_place})
    _restore_grad_mode(functional, {(id(aten.graph), name): mode for name, mode in modes.items()})
    placeholders = list(aten.graph.find_nodes(op="placeholder"))
    written = {placeholders.index(root) for node in aten.graph.nodes if node.op == "call_function" and mutates(node)
               for w in written_inputs(node) if (root := view_chain(w)[-1]).op == "placeholder"}
    return functional, written, {i for i in written if versions.get(i) == 0}


def _copy_out_of_place(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    # `functionalize` turns `dst.copy_(src)` into `aten.copy`, which has no derivative: the
    # same value from ops that have one (Inductor's own decomposition, but always a new tensor).
    if not isinstance(src, torch.Tensor):  # `t[i] = 1.0` may reach here with a Python number
        return torch.full_like(dst, src)
    value = src.to(dtype=dst.dtype, device=dst.device, non_blocking=non_blocking, copy=True)
    return value if value.shape == dst.shape else value.expand(dst.shape).clone()


def grad_modes(gm: torch.fx.GraphModule) -> dict[str, bool]:
    """Grad mode each node runs under (the graph starts in the caller's mode)."""
    enabled = torch.is_grad_enabled()
    modes = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is SET_GRAD_ENABLED:
            enabled = bool(node.args[0])
        modes[node.name] = enabled
    return modes


def _all_grad_modes(gm: torch.fx.GraphModule) -> dict[tuple[int, str], bool]:
    """The grad mode of each node of `gm` and of the bodies its higher-order ops call (a
    checkpoint region runs in the mode of its call), keyed by (id of its graph, name)."""
    modes: dict[tuple[int, str], bool] = {}

    def walk(module: torch.fx.GraphModule, enabled: bool) -> None:
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target is SET_GRAD_ENABLED:
                enabled = bool(node.args[0])
            modes[(id(module.graph), node.name)] = enabled
            if node.op == "call_function":
                for arg in node.args:
                    body = getattr(module, arg.target, None) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" \
                        else None
                    if isinstance(body, torch.fx.GraphModule):
                        walk(body, enabled)

    walk(gm, torch.is_grad_enabled())
    return modes


def _restore_grad_mode(gm: torch.fx.GraphModule, modes: dict[tuple[int, str], bool]) -> None:
    # `modes` are those of the traced graph and its bodies, by (graph id, name); `from_node`
    # names the node each new node came from. One without an origin (a view functionalization
    # regenerates for a reader or for an output) runs in the mode of its first user: a view
    # made under `no_grad` would cut the history its reader needs. The graph ends in the mode
    # it started in.
    initial = torch.is_grad_enabled()
    nodes = list(gm.graph.nodes)
    wanted: dict[torch.fx.Node, bool] = {}
    for node in nodes:
        sources = [source for source in origin_sources(node) if source in modes]
        if node.op == "output":
            wanted[node] = initial
        elif sources and node.op != "placeholder":
            wanted[node] = modes[sources[0]]
    order = {node: i for i, node in enumerate(nodes)}
    for node in reversed(nodes):
        if node not in wanted and node.op != "placeholder":
            users = sorted((u for u in node.users if u in wanted), key=order.__getitem__)
            if users:
                wanted[node] = wanted[users[0]]
    current = initial
    for node in nodes:
        mode = wanted.get(node, current)
        if node.op != "placeholder" and mode != current:
            with gm.graph.inserting_before(node):
                gm.graph.call_function(SET_GRAD_ENABLED, (mode,))
            current = mode

