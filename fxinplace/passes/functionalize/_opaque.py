"""Higher-order ops with a backward of their own (a custom `autograd.Function` Dynamo traced,
`autograd_function_apply`) through the functional trace, kept whole.

A trace below autograd would inline the Function's forward and drop its backward. So, for the
trace, each such call becomes a call of one opaque custom op, `fxinplace::opaque_call`, which
declares no writes and which neither trace looks into; after it, each is the original
higher-order op again, now reading the values the rewrite computed out of place. A forward
that writes an argument through `.data` (a fused kernel's way) is spelled, for the trace, as
the opaque call returning the new value and the graph writing it through `.data` itself, and
comes back as the call on a copy of the argument, the copy then holding the new value. A call
that writes an argument any other way, or returns an alias of one, has no such spelling:
`stand_ins` says None, and the graph is kept in place as before.
"""

from __future__ import annotations

import functools
import itertools
import operator
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


def _run_call(target, modules, kwargs, written: list[int], *args: torch.Tensor) -> list[torch.Tensor]:
    # The call, its written arguments cloned first; their new values follow its outputs.
    args = tuple(a.clone() if i in written else a for i, a in enumerate(args))
    return [*target(*modules, *args, **kwargs), *(args[i] for i in written)]


@dataclass(frozen=True)
class _Call:
    target: Any  # the higher-order op
    bodies: tuple[str, ...]  # the names of its subgraph modules in the original graph, in argument order
    n_bodies: int
    kwargs: dict
    n_outputs: int
    written: tuple[int, ...] = ()  # the arguments its forward writes through `.data`


@dataclass
class StandIns:
    gm: torch.fx.GraphModule  # the graph to trace: each call an `opaque_call`
    calls: dict[int, _Call]
    source: torch.fx.GraphModule  # the original graph, which holds the bodies
    names: tuple[str, ...] = ()  # the calls' node names in the original graph

    def close(self) -> None:
        for key in self.calls:
            _CALLS.pop(key, None)


def stand_ins(gm: torch.fx.GraphModule) -> StandIns | None:
    """A copy of `gm` whose calls of higher-order ops with a backward of their own are
    `opaque_call`s, or None when one of them writes an input or returns an alias of one."""
    copied = torch.fx.GraphModule(gm, _copied_graph(gm))
    calls: dict[int, _Call] = {}
    names = []
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
        written = _written_through_data(node.target, modules, node.kwargs, examples)
        if written is None:
            return None
        key = next(_keys)
        names.append(node.name)
        target, kwargs = node.target, dict(node.kwargs)
        _CALLS[key] = functools.partial(_run_call, target, modules, kwargs, written)
        calls[key] = _Call(target, tuple(b.target for b in bodies), len(bodies), kwargs, len(outputs), tuple(written))
        with copied.graph.inserting_before(node):
            stand_in = copied.graph.call_function(opaque_call(), (list(tensors), key))
            # The forward's `.data` writes, now the graph's own: later readers see the new values.
            for k, i in enumerate(written):
                new_value = copied.graph.call_function(operator.getitem, (stand_in, len(outputs) + k))
                data = copied.graph.call_function(torch._C._autograd._get_data_attr, (tensors[i],))
                copied.graph.call_method("copy_", (data, new_value))
        stand_in.meta.update(node.meta)
        node.replace_all_uses_with(stand_in)
        copied.graph.erase_node(node)
        for body in bodies:  # not `eliminate_dead_code`: it takes an unused `h.mul_(2)` for dead
            if not body.users:
                copied.graph.erase_node(body)
    if not calls:
        return None
    copied.recompile()
    return StandIns(copied, calls, gm, tuple(names))


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
            # What the forward writes through `.data` it writes in a copy (the functional graph
            # still reads the old value); the copy then holds the new value (with the
            # argument's history, as `.data` keeps it).
            args = [traced.graph.call_function(torch.ops.aten.clone.default, (a,)) if i in call.written else a
                    for i, a in enumerate(args)]
            hop = traced.graph.call_function(call.target, (*bodies, *args), call.kwargs)
        hop.meta.update(node.meta)
        for user in list(node.users):
            # `opaque_call` returns a list, the higher-order op a tuple: `getitem` reads both.
            index = user.args[1] if user.target is operator.getitem else None
            if index is not None and index >= call.n_outputs:
                user.replace_all_uses_with(args[call.written[index - call.n_outputs]])
                traced.graph.erase_node(user)
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


def _written_through_data(target, modules, kwargs, examples) -> list[int] | None:
    """The arguments the call's forward writes through `.data` (traced to ATen ops on fakes:
    `detach`, then the write), or None when it writes one otherwise (autograd would see that
    write, or refuse it) or returns an output sharing an argument's storage."""
    from torch._guards import detect_fake_mode
    from torch.multiprocessing.reductions import StorageWeakRef

    fake_mode = detect_fake_mode(examples)
    if fake_mode is None:
        return None

    def run(*args):
        return target(*modules, *args, **kwargs)

    with fake_mode, torch.no_grad():
        fakes = [torch.empty_strided(e.shape, e.stride(), dtype=e.dtype, device=e.device) for e in examples]
        try:
            forward = make_fx_aten(run)(*fakes)
            outputs = run(*fakes)
        except Exception:
            return None
    placeholders = list(forward.graph.find_nodes(op="placeholder"))
    written = set()
    for node in forward.graph.nodes:
        if node.op != "call_function" or not mutates(node):
            continue
        for w in written_inputs(node):
            chain = view_chain(w)
            if chain[-1] not in placeholders:
                continue  # the forward's own temporaries
            if not any(n.op == "call_function" and n.target is torch.ops.aten.detach.default for n in chain):
                return None
            written.add(placeholders.index(chain[-1]))
    storages = {StorageWeakRef(f.untyped_storage()) for f in fakes}
    if any(isinstance(t, torch.Tensor) and StorageWeakRef(t.untyped_storage()) in storages
           for t in pytree.tree_leaves(outputs)):
        return None
    return sorted(written)
