"""Higher-order ops with a backward of their own (a custom `autograd.Function` Dynamo traced,
`autograd_function_apply`) through the functional trace, kept whole.

A trace below autograd would inline the Function's forward and drop its backward. So, for the
trace, each such call becomes a call of one opaque custom op, `fxinplace::opaque_call`, which
declares no writes and which neither trace looks into; after it, each is the original
higher-order op again, now reading the values the rewrite computed out of place. That is
sound only for a call that writes none of its inputs (its forward may write its own
temporaries) and returns no alias of one: `stand_ins` checks both on the call's bodies, and
says None otherwise, so that the graph is kept in place as before.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from ..._compat import hop_name, make_fx_aten, pytree
from ..op_knowledge import INLINABLE_HOPS, mutates, view_chain, written_inputs

__all__ = ["stand_ins", "restore", "StandIns", "opaque_call"]

_CALLS: dict[int, Callable[..., Any]] = {}  # key -> the higher-order call on given tensors (for the fakes)
_keys = itertools.count()


@functools.cache
def opaque_call() -> Any:
    """The op, registered on first use (not at import)."""

    @torch.library.custom_op("fxinplace::opaque_call", mutates_args=())
    def call(args: list[torch.Tensor], key: int) -> list[torch.Tensor]:
        # Only the trace runs it, on fakes: `restore` puts the real call back before anything compiles.
        return [t.clone() for t in _CALLS[key](*args)]

    @call.register_fake
    def _(args: list[torch.Tensor], key: int) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.clone() for t in _CALLS[key](*args)]

    return torch.ops.fxinplace.opaque_call.default


@dataclass(frozen=True)
class _Call:
    target: Any  # the higher-order op
    bodies: tuple[str, ...]  # the names of its subgraph modules in the original graph, in argument order
    n_bodies: int
    kwargs: dict
    n_outputs: int


@dataclass
class StandIns:
    gm: torch.fx.GraphModule  # the graph to trace: each call an `opaque_call`
    calls: dict[int, _Call]
    source: torch.fx.GraphModule  # the original graph, which holds the bodies

    def close(self) -> None:
        for key in self.calls:
            _CALLS.pop(key, None)


def stand_ins(gm: torch.fx.GraphModule) -> StandIns | None:
    """A copy of `gm` whose calls of higher-order ops with a backward of their own are
    `opaque_call`s, or None when one of them writes an input or returns an alias of one."""
    copied = torch.fx.GraphModule(gm, _copied_graph(gm))
    calls: dict[int, _Call] = {}
    for node in list(copied.graph.nodes):
        name = hop_name(node.target) if node.op == "call_function" else None
        if name is None or name in INLINABLE_HOPS:
            continue
        bodies = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        tensors = node.args[len(bodies):]
        if not all(isinstance(t, torch.fx.Node) for t in tensors) or node.args[:len(bodies)] != tuple(bodies):
            return None
        modules = [getattr(gm, b.target) for b in bodies]
        examples = [t.meta.get("example_value") for t in tensors]
        outputs = node.meta.get("example_value")
        if not all(isinstance(e, torch.Tensor) for e in examples) or not isinstance(outputs, tuple):
            return None
        if _writes_or_returns_an_input(node.target, modules, node.kwargs, examples):
            return None
        key = next(_keys)
        target, kwargs = node.target, dict(node.kwargs)
        _CALLS[key] = lambda *args, target=target, modules=modules, kwargs=kwargs: target(*modules, *args, **kwargs)
        calls[key] = _Call(target, tuple(b.target for b in bodies), len(bodies), kwargs, len(outputs))
        with copied.graph.inserting_before(node):
            stand_in = copied.graph.call_function(opaque_call(), (list(tensors), key))
        stand_in.meta.update(node.meta)
        node.replace_all_uses_with(stand_in)
        copied.graph.erase_node(node)
        for body in bodies:  # not `eliminate_dead_code`: it takes an unused `h.mul_(2)` for dead
            if not body.users:
                copied.graph.erase_node(body)
    if not calls:
        return None
    copied.recompile()
    return StandIns(copied, calls, gm)


def restore(traced: torch.fx.GraphModule, stand: StandIns) -> None:
    """Each `opaque_call` of the traced graph back as its higher-order op, on the same arguments."""
    for node in list(traced.graph.nodes):
        if node.op != "call_function" or node.target is not opaque_call():
            continue
        args, key = node.args
        call = stand.calls[key]
        with traced.graph.inserting_before(node):
            bodies = []
            for name in call.bodies:
                fresh = f"{name}_{key}"
                traced.add_submodule(fresh, getattr(stand.source, name))
                bodies.append(traced.graph.get_attr(fresh))
            hop = traced.graph.call_function(call.target, (*bodies, *args), call.kwargs)
        hop.meta.update(node.meta)
        # `opaque_call` returns a list, the higher-order op a tuple: `getitem` reads both.
        node.replace_all_uses_with(hop)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.recompile()


def _copied_graph(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    for old, new in zip(gm.graph.nodes, graph.nodes):
        new.meta = dict(old.meta)
    return graph


def _writes_or_returns_an_input(target, modules, kwargs, examples) -> bool:
    # The call's forward, traced to ATen ops on fakes: a write whose storage is an argument's
    # (through `.data` and views too), or an output that shares an argument's storage.
    from torch._guards import detect_fake_mode
    from torch.multiprocessing.reductions import StorageWeakRef

    fake_mode = detect_fake_mode(examples)
    if fake_mode is None:
        return True

    def run(*args):
        return target(*modules, *args, **kwargs)

    with fake_mode, torch.no_grad():
        fakes = [torch.empty_strided(e.shape, e.stride(), dtype=e.dtype, device=e.device) for e in examples]
        try:
            forward = make_fx_aten(run)(*fakes)
            outputs = run(*fakes)
        except Exception:
            return True
    placeholders = list(forward.graph.find_nodes(op="placeholder"))
    for node in forward.graph.nodes:
        if node.op == "call_function" and mutates(node):
            if any(view_chain(w)[-1] in placeholders for w in written_inputs(node)):
                return True
    storages = {StorageWeakRef(f.untyped_storage()) for f in fakes}
    return any(isinstance(t, torch.Tensor) and StorageWeakRef(t.untyped_storage()) in storages
               for t in pytree.tree_leaves(outputs))

