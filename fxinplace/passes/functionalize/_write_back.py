"""The caller-visible writes of a functionalized graph: taken out of the graph as extra outputs
and done by a wrapper after the compiled call, or kept in the graph (batch norm's running
statistics back in place); and which inputs the backward may read (they get a clone)."""

from __future__ import annotations

import collections
import operator
from typing import Any, Callable, Collection, Sequence

import torch
import torch.fx

from ..._compat import foreach_copy_, preserve_version_counter
from ._trace import grad_modes
from ..op_knowledge import REINPLACED_RUNNING_STATS, functional_running_stats, is_view, mutates, view_chain

__all__ = ["outputs_for_writes", "reinplace_running_stats", "read_by_backward", "read_by_functional_batch_norm",
           "aliased_outputs", "write_back", "identity", "clone_outputs"]


def outputs_for_writes(
    gm: torch.fx.GraphModule, keep: Callable[[int], bool]
) -> tuple[list[tuple[int, torch.fx.Node]], list[int]]:
    """Turn each final `copy_(input, value)` into an extra output, unless `keep(index)`.

    Returns (input index, value) per write taken out, and the indices of the writes kept.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    output = gm.graph.output_node()
    written, kept = [], []
    for node in list(gm.graph.nodes):
        if is_write_back(node):
            index = placeholders.index(node.args[0])
            if keep(index):
                kept.append(index)
                _view_the_input(gm, node)
                continue
            written.append((index, node.args[1]))
            gm.graph.erase_node(node)
        elif node.op == "call_function" and mutates(node) and node.target not in REINPLACED_RUNNING_STATS:
            raise AssertionError(f"fxinplace: functionalize left a mutation in the graph: {node.format_node()}")
    output.args = (tuple(output.args[0]) + tuple(value for _, value in written),)
    return written, kept


def _view_the_input(gm: torch.fx.GraphModule, copy: torch.fx.Node) -> None:
    # An output that views the written value (`t = x.t(); t.relu_(); return t`): eager returns
    # a view of the input itself, which later writes (after a graph break) reach. Make the
    # output the same views of the input, after the write, so the compiler sees the alias.
    placeholder, value = copy.args[0], copy.args[1]
    output = gm.graph.output_node()
    returned = list(output.args[0])
    for k, out in enumerate(returned):
        chain = view_chain(out) if isinstance(out, torch.fx.Node) else []
        chain = chain[:chain.index(value) + 1] if value in chain else []  # `value` may itself be a view
        steps = _view_steps(chain)
        if not steps:
            continue
        base = placeholder
        with gm.graph.inserting_before(output):
            for n in reversed(steps):
                base = gm.graph.call_function(n.target, (base, *n.args[1:]), dict(n.kwargs))
                base.meta = dict(n.meta)
        returned[k] = base
    output.args = (tuple(returned), *output.args[1:])


def _view_steps(chain: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The nodes that make `chain[0]` from `chain[-1]`, outermost first, each taking the next
    as its first argument; [] if some link is not such a view. A `split`/`chunk`/`unbind`
    item is one link of `chain` (`getitem` aliases the split's input): two nodes here."""
    steps = []
    for n, base in zip(chain, chain[1:]):
        if is_view(n) and n.args and n.args[0] is base:
            steps.append(n)
        elif (n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node) and n.args[0].args
              and n.args[0].args[0] is base):
            steps += [n, n.args[0]]
        else:
            return []
    return steps


def reinplace_running_stats(gm: torch.fx.GraphModule) -> list[int]:
    """Batch norm's running-statistics update back in place, when that is all that reads them;
    returns the indices of the placeholders now written in the graph.

    Functional batch norm takes the running statistics as inputs, which autograd saves, so a
    `copy_` of its new statistics into them, kept in the graph, trips autograd's version
    check. Eager (and `torch.compile` without fxinplace) updates them in place inside the
    op, before anything is saved: `_native_batch_norm_legit` does that (`HIDDEN_WRITES` pairs
    each functional op with its in-place twin).
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    done = []
    for node in [n for n in gm.graph.nodes if functional_running_stats(n) is not None]:
        entry = functional_running_stats(node)
        stats = [node.args[p] for p, _ in entry.written]
        outputs = {user.args[1]: user for user in node.users if user.target is operator.getitem}
        copies = []
        for k, stat in zip(entry.new_values, stats):
            new = outputs.get(k)
            users = list(new.users) if new is not None else []
            if not (stat.op == "placeholder" and len(users) == 1 and is_write_back(users[0])
                    and users[0].args[0] is stat and set(stat.users) == {node, users[0]}):
                break
            copies.append((new, users[0]))
        else:
            with gm.graph.inserting_before(node):
                inplace = gm.graph.call_function(entry.inplace, node.args, node.kwargs)
            inplace.meta = dict(node.meta)
            for new, copy in copies:
                gm.graph.erase_node(copy)
                gm.graph.erase_node(new)
            node.replace_all_uses_with(inplace)
            gm.graph.erase_node(node)
            done += [placeholders.index(stat) for stat in stats]
    return done


def is_write_back(node: torch.fx.Node) -> bool:
    return node.target is torch.ops.aten.copy_.default and node.args[0].op == "placeholder"


def aliased_outputs(returned: Sequence[Any], written: list[tuple[int, torch.fx.Node]]) -> dict[int, int]:
    """Output position -> input index, for outputs that are the new value of a written input."""
    outputs = list(returned)[: -len(written) or None]
    return {k: i for k, out in enumerate(outputs) for i, value in written if out is value}


def _unread_by_backward(user: torch.fx.Node, arg: torch.fx.Node) -> bool:
    # An argument whose value the op's backward never reads: training batch norm normalizes
    # with the batch statistics it saves, and only updates the running ones (`HIDDEN_WRITES`).
    entry = functional_running_stats(user)
    if entry is None or entry.read_by_backward or not entry.is_on(user.args, user.kwargs):
        return False
    return any(i < len(user.args) and user.args[i] is arg for i, _ in entry.written) and \
        sum(a is arg for a in user.args) == 1


def read_by_backward(gm: torch.fx.GraphModule, placeholder_grads: list[bool]) -> list[bool]:
    """Per placeholder: may the backward read its value (through anything computed from it)?

    Only then does a written-back input need the clone `write_back` gives it: a value that
    reaches no computation with a gradient can be neither saved nor recomputed by the
    backward (AOTAutograd's partitioner recomputes from saved inputs, so reach counts, not
    just direct use).
    """
    modes = grad_modes(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    requires_grad = dict(zip(placeholders, placeholder_grads))
    for node in gm.graph.nodes:
        if node.op == "call_function":
            requires_grad[node] = modes[node.name] and any(requires_grad.get(a, True) for a in node.all_input_nodes)
    read = []
    for placeholder in placeholders:
        seen, todo, found = set(), [placeholder], False
        while todo and not found:
            node = todo.pop()
            for user in node.users:
                if user.op == "output" or is_write_back(user) or user in seen or _unread_by_backward(user, node):
                    continue
                if requires_grad.get(user, True):
                    found = True
                    break
                seen.add(user)
                todo.append(user)
        read.append(found)
    return read


def read_by_functional_batch_norm(gm: torch.fx.GraphModule) -> set[int]:
    """Indices of the placeholders a functional batch norm takes (and autograd saves)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return {i for i, p in enumerate(placeholders) if any(functional_running_stats(u) is not None for u in p.users)}


def write_back(
    indices: list[int], n_outputs: int, aliased: dict[int, int], clone: Collection[int] = (), keep_version: Collection[int] = ()
) -> Callable[[Callable], Callable]:
    # `clone`: inputs the backward may read (see `read_by_backward`); `keep_version`: inputs
    # eager writes without a version bump (batch norm's running statistics, `.data` writes).
    def wrap(compiled: Callable) -> Callable:
        if not indices and not clone:
            return compiled

        def run(*args):
            inputs = list(args)
            if torch.is_grad_enabled():
                for i in clone:  # autograd may save these: keep them apart from the write-back
                    inputs[i] = args[i].clone()
            outputs = compiled(*inputs)
            plain_old, plain_new = [], []
            for i, new in zip(indices, outputs[n_outputs:]):
                old = args[i]
                if new.requires_grad and not (old.is_leaf and old.requires_grad):
                    old.copy_(new)  # a write eager records in autograd too
                else:
                    plain_old.append(old)
                    plain_new.append(new)
            if plain_old:  # one fused copy for parameters, buffers and inputs
                hidden = tuple(args[i] for i in keep_version)
                with torch.no_grad(), preserve_version_counter(hidden):
                    foreach_copy_(plain_old, plain_new)
            result = list(outputs[:n_outputs])
            for k, i in aliased.items():  # eager returns the written input itself
                result[k] = args[i]
            _view_written_inputs(result, [args[i] for i in indices], outputs[n_outputs:], aliased)
            return type(outputs)(result) if isinstance(outputs, tuple) else result

        return run

    return wrap


def _view_written_inputs(result: list, olds: list, news: Sequence[Any], aliased: dict[int, int]) -> None:
    # An output that views a written input (`t = x.t(); t.relu_(); return t`, a graph that ends
    # in a break): eager returns a view of the input itself, which later writes reach. The
    # functional graph returns a view of the input's new value, which the write-back copies
    # and drops: make the same view of the input. Only where the new value has the input's
    # layout, so that the view's strides mean the same elements in both.
    by_storage = {}
    for old, new in zip(olds, news):
        if isinstance(new, torch.Tensor) and new.untyped_storage().nbytes() and new.stride() == old.stride():
            by_storage[new.untyped_storage().data_ptr()] = (old, new)
    if not by_storage:
        return
    for k, out in enumerate(result):
        if k in aliased or not isinstance(out, torch.Tensor) or not out.untyped_storage().nbytes():
            continue
        pair = by_storage.get(out.untyped_storage().data_ptr())
        if pair is not None and out._base is not None:
            old, new = pair
            offset = old.storage_offset() + out.storage_offset() - new.storage_offset()
            # A view eager took through `.data` / `.detach()` of a parameter has no history.
            base = old.detach() if old.requires_grad and not out.requires_grad else old
            result[k] = base.as_strided(out.size(), out.stride(), offset)


def identity(compiled: Callable) -> Callable:
    return compiled


def clone_outputs(positions: Collection[int], cloned: set[int]) -> Callable[[Callable], Callable]:
    """A wrapper that hands the caller a clone of each output at `positions`: values the graph
    saved for backward, which the code after a graph break goes on with. A later write (the
    next graph's write-back) then lands in the clone, and the backward, one node for the whole
    compiled graph, reads the value it saved: the out-of-place program. Outputs sharing memory
    with each other are cloned together, the views remade on the clone of their base, so the
    alias holds; an output sharing memory with an input is left as it is (the write-back's).
    `cloned` holds the positions the latest call cloned."""
    def wrap(compiled: Callable) -> Callable:
        def run(*args):
            outputs = compiled(*args)
            cloned.clear()
            if not torch.is_grad_enabled():
                return outputs
            result = list(outputs)
            of_inputs = {_storage(t) for t in args if isinstance(t, torch.Tensor)}
            groups = collections.defaultdict(list)  # storage -> the positions of the outputs in it
            for i, t in enumerate(result):
                if isinstance(t, torch.Tensor):
                    groups[_storage(t)].append(i)
            for p in positions:
                t = result[p] if p < len(result) else None
                if not isinstance(t, torch.Tensor) or p in cloned or _storage(t) in of_inputs:
                    continue
                members = groups[_storage(t)]
                remade = _clone_together([result[i] for i in members])
                if remade is not None:
                    for i, r in zip(members, remade):
                        result[i] = r
                    cloned.update(members)
            return type(outputs)(result) if isinstance(outputs, tuple) else result
        return run
    return wrap


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _clone_together(views: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Clones of tensors sharing one storage, still sharing one: the base they view is cloned
    (with its strides) and each is remade on it with its own size, strides and offset, so a
    write to one shows in the others as before, and gradients flow through the clone. None
    where they view no one base (then they are left as they are)."""
    if len(views) == 1:
        return [views[0].clone()]
    bases = {id(b): b for b in (t if t._base is None else t._base for t in views)}
    if len(bases) != 1:
        return None
    (base,) = bases.values()
    copy = base.clone()
    if copy.stride() != base.stride():  # a base with gaps or overlaps: its views' offsets would not map
        return None
    shift = base.storage_offset()
    return [copy if t is base else copy.as_strided(t.size(), t.stride(), t.storage_offset() - shift) for t in views]
