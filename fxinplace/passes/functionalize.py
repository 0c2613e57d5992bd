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
write is explicit (see `_trace_functional`). The rest is done by hand:

- Grad mode. A `make_fx` trace below autograd forgets `torch.no_grad()` regions. Every traced
  node remembers the node it came from (`from_node`), so `_set_grad_enabled` calls are put
  back around the nodes that came from no-grad regions (`_restore_grad_mode`).
- Histories. Eager changes a tensor's autograd history in place; out of place some new
  values would get another one: writes hidden from autograd, whole-tensor overwrites, views
  taken under `no_grad` (`_keep_eager_histories`).
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
  each written-back input the backward can reach (`_read_by_backward`); gradients reach the
  original through the clone.

The pass returns facts (`FunctionalizedGraph`): which inputs it writes back, or why the graph
is compiled unchanged. The backend decides which graphs to rewrite (option `functionalize`)
and marks the audit's mutations from these facts (`fxinplace._rewrites`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.proxy_tensor import make_fx

from ..facts import KeptReason
from .trace_mutations import storage_key

__all__ = ["functionalize", "unchanged", "FunctionalizedGraph"]


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
    if opaque:
        return unchanged(gm, KeptReason.OWN_BACKWARD, (opaque[0],), keep_saved)
    traced = _trace_functional(gm, example_inputs)
    if traced is None:
        return unchanged(gm, KeptReason.NO_ATEN_WRITE, (), keep_saved)
    new_gm, written_at_aten = traced
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    grads = [_example_requires_grad(p.meta.get("example_value")) for p in placeholders]
    read = _read_by_backward(new_gm, grads)
    reinplaced = _reinplace_running_stats(new_gm)
    # A write to a tensor without grad that nothing with a gradient reads (counters) stays in
    # the graph: the compiler handles it as any buffer update (Inductor writes it from its
    # kernels). Not one that functional batch norm reads: autograd saves it there, and the
    # write, kept in the graph, would trip autograd's version check.
    saved_by_batch_norm = _read_by_functional_batch_norm(new_gm)
    written, kept = _outputs_for_writes(
        new_gm, keep=lambda i: not grads[i] and not read[i] and i not in saved_by_batch_norm)
    shared = _sharing_storage(example_inputs, [i for i, _ in written] + kept + reinplaced)
    if shared:
        # The functional trace takes every input as a tensor of its own: a write through one
        # input would not reach another view of its storage (nor their write-backs each other).
        return unchanged(gm, KeptReason.SHARED_INPUT,
                         (placeholders[shared[0]].name, placeholders[shared[1]].name), keep_saved)
    new_gm.graph.lint()
    new_gm.recompile()

    n_outputs = len(new_gm.graph.output_node().args[0]) - len(written)
    indices = [i for i, _ in written]
    clone = {i for i in indices if read[i]} | set(keep_saved)
    keep_version = {i for i in indices if not read[i] and i in saved_by_batch_norm}
    wrap = _write_back(indices, n_outputs, _aliased(new_gm, written), clone, keep_version)
    return FunctionalizedGraph(
        new_gm, wrap,
        written_back=frozenset(indices + kept + reinplaced),
        unwritten=frozenset(i for i in range(len(placeholders)) if i not in written_at_aten),
        # The ATen trace inlines checkpoint regions: gradients stay right, memory does not.
        checkpoints_inlined=any(_is_hop(node, "tag_activation_checkpoint") for node in gm.graph.nodes),
    )


def unchanged(
    gm: torch.fx.GraphModule, reason: KeptReason, detail: tuple[str, ...] = (), keep_saved: Collection[int] = ()
) -> FunctionalizedGraph:
    """`gm` compiled as it is (for `reason`), with only the clones `keep_saved` asks for."""
    wrap = _identity
    if keep_saved:
        n_outputs = len(gm.graph.output_node().args[0])
        wrap = _write_back([], n_outputs, {}, clone=keep_saved)
    return FunctionalizedGraph(gm, wrap, kept=reason, kept_detail=detail)


# Higher-order ops whose subgraph the ATen trace may inline: their backward is autograd's
# own. Any other (a custom `autograd.Function`'s `autograd_function_apply`, flex attention,
# ...) carries a backward that a trace below autograd would drop, silently changing gradients.
_INLINABLE_HOPS = frozenset({"tag_activation_checkpoint", "wrap"})


def _is_hop(node: torch.fx.Node, name: str) -> bool:
    return isinstance(node.target, torch._ops.HigherOrderOperator) and node.target.name() == name


def _opaque_subgraphs(gm: torch.fx.GraphModule) -> list[str]:
    return [node.target.name() for node in gm.graph.nodes
            if isinstance(node.target, torch._ops.HigherOrderOperator) and node.target.name() not in _INLINABLE_HOPS]


def _sharing_storage(example_inputs: Sequence[Any], written: Collection[int]) -> tuple[int, int] | None:
    """(a written input, another input with the same storage), or None."""
    keys = [storage_key(t) for t in example_inputs]
    for i in written:
        for j, key in enumerate(keys):
            if j != i and key is not None and key == keys[i]:
                return i, j
    return None


def _trace_functional(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[torch.fx.GraphModule, set[int]] | None:
    """The functional ATen graph of `gm` and the indices of the inputs its ATen ops write, or
    None when `gm` writes nothing."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        raise AssertionError("fxinplace: functionalize needs Dynamo's fake mode; none was found")
    placeholders = list(gm.graph.find_nodes(op="placeholder"))

    def trace(fn: Callable, decompositions: dict | None = None) -> torch.fx.GraphModule:
        with fake_mode:
            fakes = [_fresh_fake(p, real, fake_mode) for p, real in zip(placeholders, example_inputs)]
        # Fakes without requires_grad: the trace is below autograd anyway, and functionalize's
        # own final `copy_` into a leaf parameter would otherwise be refused by autograd.
        with fake_mode, fx_traceback.preserve_node_meta(), torch.no_grad(), enable_python_dispatcher():
            return make_fx(fn, decompositions, pre_dispatch=False)(*fakes)

    # Two traces. The first decomposes to ATen ops with every write explicit: composite ops
    # (`cross_entropy` with label smoothing, `instance_norm`) would otherwise write their own
    # temporaries below `functionalize`'s reach, and the Python dispatcher turns
    # `native_batch_norm`, whose schema hides its running-stat writes, into
    # `_native_batch_norm_legit`, whose schema shows them (as AOTAutograd does). The second
    # trace functionalizes that ATen graph.
    aten = trace(torch.fx.Interpreter(gm).run)
    if not any(_mutates(node) for node in aten.graph.nodes):
        return None
    _restore_grad_mode(aten, _grad_modes(gm))
    _respell(aten)
    _keep_eager_histories(aten, gm)
    functional = trace(torch.func.functionalize(torch.fx.Interpreter(aten).run, remove="mutations"),
                       {torch.ops.aten.copy.default: _copy_out_of_place})
    _restore_grad_mode(functional, _grad_modes(aten))
    inputs = list(aten.graph.find_nodes(op="placeholder"))
    written = {inputs.index(root) for node in aten.graph.nodes if node.op == "call_function" and _mutates(node)
               for w in _written_args(node) if (root := _view_chain(w)[-1]).op == "placeholder"}
    return functional, written


def _copy_out_of_place(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    # `functionalize` turns `dst.copy_(src)` into `aten.copy`, which has no derivative: the
    # same value from ops that have one (Inductor's own decomposition, but always a new tensor).
    if not isinstance(src, torch.Tensor):  # `t[i] = 1.0` may reach here with a Python number
        return torch.full_like(dst, src)
    value = src.to(dtype=dst.dtype, device=dst.device, non_blocking=non_blocking, copy=True)
    return value if value.shape == dst.shape else value.expand(dst.shape).clone()


_aten = torch.ops.aten

# In-place ops whose out-of-place twin gets autograd wrong (derivatives.yaml), by how eager
# records them. Each is respelled in the ATen graph before `functionalize`, with ops whose
# derivatives give eager's gradients (tests/test_functionalize.py checks every entry against
# eager):
# - "compare": a new value with a zero gradient to `self` and to a tensor `other`; the twin
#   returns bool and records no history. Spelled `self.copy_(where(False, other, twin(...)))`.
# - "fill": a random fill (or `zero_`), a zero gradient to `self`; `normal_functional` and
#   `bernoulli.p` have no derivative at all, `zero` and `uniform` none for complex outputs.
#   Spelled `self.copy_(op(empty_like(self)))`: same draws.
# - "untracked": autograd records nothing and `self` keeps its old history (the logical ops
#   are composites of `out=` ops). Spelled `self.detach().copy_(twin(...))`, a hidden write.
# - rrelu with noise, training: the twin's derivative reads the noise it was given, not the
#   noise it drew. Spelled `rrelu_with_noise(self.detach(), noise)` (same draws, `noise`
#   written), then `self * noise`: the kernel's values exactly, and eager's derivative.
# - "real no-op": `conj_physical_` of a real tensor writes no value (eager only bumps the
#   version); `functionalize` drops it and leaves no write-back to find. Dropped here.
_RESPELLED = {
    **{getattr(getattr(_aten, f"{name}_"), overload): "compare"
       for name in ("eq", "ne", "gt", "ge", "lt", "le") for overload in ("Scalar", "Tensor")},
    **{op: "fill" for op in (_aten.normal_.default, _aten.bernoulli_.float, _aten.uniform_.default,
                             _aten.cauchy_.default, _aten.exponential_.default, _aten.geometric_.default,
                             _aten.log_normal_.default, _aten.random_.default, _aten.random_.to,
                             getattr(_aten.random_, "from"), _aten.zero_.default)},
    **{getattr(_aten, f"logical_{name}_").default: "untracked" for name in ("not", "xor", "and", "or")},
    _aten.rrelu_with_noise_.default: "rrelu", _aten.rrelu_with_noise.default: "rrelu",
    _aten.conj_physical_.default: "real no-op",
}


def _twin(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """`aten.gt.Scalar` for `aten.gt_.Scalar`."""
    return getattr(getattr(_aten, op._schema.name.split("::")[1].removesuffix("_")), op._overloadname)


def _is_complex(arg: Any) -> bool:
    val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def _respell(gm: torch.fx.GraphModule) -> None:
    """Respell the ops of `_RESPELLED` (see there) with ops whose functional twins compute
    eager's values and gradients."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _RESPELLED]:
        how, self_ = _RESPELLED[node.target], node.args[0]
        training = node.args[4] if len(node.args) > 4 else node.kwargs.get("training", False)
        if how == "rrelu" and not training:
            continue  # in eval mode: leaky relu, whose twin's derivative is right
        if how == "real no-op":
            val = self_.meta.get("val")
            if isinstance(val, torch.Tensor) and not val.is_complex():
                node.replace_all_uses_with(self_)
                graph.erase_node(node)
            continue

        def call(target, *args, **kwargs):
            new = graph.call_function(target, args, kwargs)
            new.meta = dict(node.meta)  # `from_node` and the stack trace of the op respelled
            return new

        with graph.inserting_before(node):
            if how == "compare":
                value = call(_twin(node.target), *node.args, **node.kwargs)
                written = self_.meta.get("val")
                for other in node.args[1:]:
                    val = other.meta.get("val") if isinstance(other, torch.fx.Node) else None
                    # (a complex `other` only into a complex `self`: `copy_` would drop its imaginary part)
                    if isinstance(val, torch.Tensor) and (val.is_floating_point() or (
                            val.is_complex() and isinstance(written, torch.Tensor) and written.is_complex())):
                        false = call(_aten.scalar_tensor.default, False, dtype=torch.bool, device=val.device)
                        value = call(_aten.where.self, false, other, value)
                call(_aten.copy_.default, self_, value)
            elif how == "fill":
                fresh = call(_aten.empty_like.default, self_)
                call(_aten.copy_.default, self_, call(node.target, fresh, *node.args[1:], **node.kwargs))
            elif how == "untracked":
                # For complex operands the twin is a composite whose in-place temporaries the
                # next trace would leave below `functionalize`; nonzero-ness is all it reads.
                operands = [call(_aten.ne.Scalar, a, 0) if _is_complex(a) else a for a in node.args]
                value = call(_twin(node.target), *operands, **node.kwargs)
                call(_aten.copy_.default, call(_aten.detach.default, self_), value)
            else:
                noise = node.args[1]
                call(_aten.rrelu_with_noise.default, call(_aten.detach.default, self_), *node.args[1:], **node.kwargs)
                result = call(_aten.mul_.Tensor if node.target is _aten.rrelu_with_noise_.default else _aten.mul.Tensor,
                              self_, noise)
        # An in-place op returns `self`; its readers read `self`, which now holds the new value.
        node.replace_all_uses_with(result if how == "rrelu" and node.target is _aten.rrelu_with_noise.default else self_)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


# In-place ops whose new value does not depend on the old one: out of place, the result
# loses the old tensor's history, which eager keeps (with a zero gradient).
_OVERWRITES = frozenset({
    torch.ops.aten.copy_.default, torch.ops.aten.fill_.Scalar, torch.ops.aten.fill_.Tensor,  # `zero_`: see `_RESPELLED`
})


def _keep_eager_histories(aten: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> None:
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
    """
    if not torch.is_grad_enabled():
        return  # the caller's mode: nothing in this graph records history
    modes = _grad_modes(aten)
    order = {node: i for i, node in enumerate(aten.graph.nodes)}
    written_roots = {_view_chain(w)[-1] for n in aten.graph.nodes if n.op == "call_function" and _mutates(n)
                     for w in _written_args(n)}
    for node in list(aten.graph.nodes):
        if _is_view(node) and not modes[node.name] and _view_chain(node)[-1] in written_roots:
            _cut_no_grad_view(aten.graph, node, modes, gm)
    for node in list(aten.graph.nodes):
        if node.op != "call_function" or not _mutates(node):
            continue
        for written in _written_args(node):
            chain = _view_chain(written)
            root = chain[-1]
            through_detach = any(n.target is torch.ops.aten.detach.default for n in chain)
            hidden = not modes[node.name] or through_detach
            overwrite = not hidden and node.target in _OVERWRITES and _covers(written, root)
            if not (hidden or overwrite) or not _read_with_grad_after(node, root, modes, order):
                continue
            requires_grad = _may_require_grad(root, gm)
            if hidden and requires_grad:
                _rebuild_after(aten.graph, node, root, modes[node.name], _graft)
            elif hidden and through_detach and modes[node.name]:
                _rebuild_after(aten.graph, node, root, modes[node.name], _detached)
            elif overwrite and requires_grad:
                _rebuild_after(aten.graph, node, root, modes[node.name], _zero_gradient)
    aten.graph.lint()
    aten.recompile()


def _cut_no_grad_view(graph: torch.fx.Graph, view: torch.fx.Node, modes: dict[str, bool], gm: torch.fx.GraphModule) -> None:
    # A view taken under `no_grad` passes no gradient to its base, also when read under grad
    # mode later. Functionalization regenerates a view of a written base for each reader, in
    # the reader's mode: its grad-mode readers get `view.detach()` instead.
    readers = [u for u in view.users if u.op == "output" or (
        modes.get(u.name, False) and not (_mutates(u) and view in _written_args(u)))]
    if not readers or not _may_require_grad(_view_chain(view)[-1], gm):
        return
    with graph.inserting_after(view):
        detached = graph.call_function(torch.ops.aten.detach.default, (view,))
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
    if _is_complex(root):  # complex `isfinite` is a composite writing temporaries in place; its parts are not
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


def _rebuild_after(graph: torch.fx.Graph, write: torch.fx.Node, root: torch.fx.Node, mode: bool, value: Callable) -> None:
    """Around `write`, under grad mode: `old = root.clone()` before it, `root.copy_(value(...))` after."""
    aten, set_grad = torch.ops.aten, torch._C._set_grad_enabled
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


def _written_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    schema = node.target._schema
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            written += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.fx.Node)]
    return written


def _aliased_arg(node: torch.fx.Node) -> torch.fx.Node | None:
    """The argument `node`'s result aliases: a view's base, an in-place op's `self`, an `out=`."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:  # one result of a multi-output view (split, unbind)
        return _aliased_arg(node.args[0])
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    sets = schema.returns[0].alias_info.before_set  # empty for `Tensor(a)[]`: the views of `self`
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and (arg.alias_info.before_set & sets or not sets):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return value if isinstance(value, torch.fx.Node) else None
    return None


def _is_view(node: torch.fx.Node) -> bool:
    return _aliased_arg(node) is not None and not _mutates(node)


def _view_chain(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node`, the tensors it aliases (views, in-place results), last the storage's owner."""
    chain = [node]
    while (base := _aliased_arg(chain[-1])) is not None:
        chain.append(base)
    return chain


def _read_with_grad_after(write: torch.fx.Node, root: torch.fx.Node, modes: dict[str, bool], order: dict) -> bool:
    aliases, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if _aliased_arg(user) is not None and user not in aliases:
                aliases.add(user)
                todo.append(user)
    for alias in aliases:
        for user in alias.users:
            if order.get(user, -1) > order[write] and (user.op == "output" or modes.get(user.name, False)) and not _is_view(user):
                return True
    return False


def _may_require_grad(root: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    # The ATen fakes carry no requires_grad; Dynamo's example values, reached through
    # the placeholder's position or the node the ATen node came from, do.
    if root.op == "placeholder":
        index = list(root.graph.find_nodes(op="placeholder")).index(root)
        origin = list(gm.graph.find_nodes(op="placeholder"))[index]
    else:
        names = [s.name for s in root.meta.get("from_node", ())]
        origin = next((n for n in gm.graph.nodes if names and n.name == names[0]), None)
    return _example_requires_grad(origin.meta.get("example_value") if origin is not None else None)


def _example_requires_grad(value: Any) -> bool:
    """Does Dynamo's example value require grad? True when unknown (the safe answer)."""
    if not isinstance(value, torch.Tensor):
        return True
    return value.requires_grad and (value.is_floating_point() or value.is_complex())


def _fresh_fake(placeholder: torch.fx.Node, real: Any, fake_mode) -> Any:
    # Dynamo's own fakes carry the symbolic shapes it chose; fresh ones shaped like them keep
    # those shapes without letting our trace touch Dynamo's tensors.
    meta = placeholder.meta.get("example_value")
    if meta is None and isinstance(real, torch.Tensor):
        meta = fake_mode.from_tensor(real)
    if not isinstance(meta, torch.Tensor):
        return meta if meta is not None else real
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=meta.device)


def _outputs_for_writes(
    gm: torch.fx.GraphModule, keep: Callable[[int], bool]
) -> tuple[list[tuple[int, torch.fx.Node]], list[int]]:
    """Turn each final `copy_(input, value)` into an extra output, unless `keep(index)`.

    Returns (input index, value) per write taken out, and the indices of the writes kept.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    output = gm.graph.output_node()
    written, kept = [], []
    for node in list(gm.graph.nodes):
        if _is_write_back(node):
            index = placeholders.index(node.args[0])
            if keep(index):
                kept.append(index)
                continue
            written.append((index, node.args[1]))
            gm.graph.erase_node(node)
        elif node.op == "call_function" and _mutates(node) and node.target is not torch.ops.aten._native_batch_norm_legit.default:
            raise AssertionError(f"fxinplace: functionalize left a mutation in the graph: {node.format_node()}")
    output.args = (tuple(output.args[0]) + tuple(value for _, value in written),)
    return written, kept


def _reinplace_running_stats(gm: torch.fx.GraphModule) -> list[int]:
    """Batch norm's running-statistics update back in place, when that is all that reads them;
    returns the indices of the placeholders now written in the graph.

    Functional batch norm takes the running statistics as inputs, which autograd saves, so a
    `copy_` of its new statistics into them, kept in the graph, trips autograd's version
    check. Eager (and `torch.compile` without fxinplace) updates them in place inside the
    op, before anything is saved: `_native_batch_norm_legit` does that.
    """
    functional = torch.ops.aten._native_batch_norm_legit_functional.default
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    done = []
    for node in list(gm.graph.find_nodes(op="call_function", target=functional)):
        stats = node.args[3:5]
        outputs = {user.args[1]: user for user in node.users if user.target is operator.getitem}
        copies = []
        for k, stat in ((3, stats[0]), (4, stats[1])):
            new = outputs.get(k)
            users = list(new.users) if new is not None else []
            if not (stat.op == "placeholder" and len(users) == 1 and _is_write_back(users[0])
                    and users[0].args[0] is stat and set(stat.users) == {node, users[0]}):
                break
            copies.append((new, users[0]))
        else:
            with gm.graph.inserting_before(node):
                inplace = gm.graph.call_function(torch.ops.aten._native_batch_norm_legit.default, node.args, node.kwargs)
            inplace.meta = dict(node.meta)
            for new, copy in copies:
                gm.graph.erase_node(copy)
                gm.graph.erase_node(new)
            node.replace_all_uses_with(inplace)
            gm.graph.erase_node(node)
            done += [placeholders.index(stat) for stat in stats]
    return done


def _is_write_back(node: torch.fx.Node) -> bool:
    return node.target is torch.ops.aten.copy_.default and node.args[0].op == "placeholder"


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _grad_modes(gm: torch.fx.GraphModule) -> dict[str, bool]:
    """Grad mode each node runs under (the graph starts in the caller's mode)."""
    enabled = torch.is_grad_enabled()
    modes = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            enabled = bool(node.args[0])
        modes[node.name] = enabled
    return modes


def _restore_grad_mode(gm: torch.fx.GraphModule, modes: dict[str, bool]) -> None:
    # `modes` are those of the traced graph; `from_node` names the node each new node came
    # from. One without an origin (a view functionalization regenerates for a reader or for
    # an output) runs in the mode of its first user: a view made under `no_grad` would cut
    # the history its reader needs. The graph ends in the mode it started in.
    initial = torch.is_grad_enabled()
    nodes = list(gm.graph.nodes)
    wanted: dict[torch.fx.Node, bool] = {}
    for node in nodes:
        sources = [s.name for s in node.meta.get("from_node", ()) if s.name in modes]
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
                gm.graph.call_function(torch._C._set_grad_enabled, (mode,))
            current = mode


def _aliased(gm: torch.fx.GraphModule, written: list[tuple[int, torch.fx.Node]]) -> dict[int, int]:
    """Output position -> input index, for outputs that are the new value of a written input."""
    outputs = list(gm.graph.output_node().args[0])[: -len(written) or None]
    return {k: i for k, out in enumerate(outputs) for i, value in written if out is value}


# Arguments whose value the op's backward never reads: training batch norm normalizes with
# the batch statistics it saves, and only updates the running ones.
_UNREAD_BY_BACKWARD = {torch.ops.aten._native_batch_norm_legit_functional.default: (3, 4)}


def _unread_by_backward(user: torch.fx.Node, arg: torch.fx.Node) -> bool:
    positions = _UNREAD_BY_BACKWARD.get(user.target, ())
    training = len(user.args) > 5 and user.args[5] is True
    return training and any(i < len(user.args) and user.args[i] is arg for i in positions) and \
        sum(a is arg for a in user.args) == 1


def _read_by_backward(gm: torch.fx.GraphModule, placeholder_grads: list[bool]) -> list[bool]:
    """Per placeholder: may the backward read its value (through anything computed from it)?

    Only then does a written-back input need the clone `_write_back` gives it: a value that
    reaches no computation with a gradient can be neither saved nor recomputed by the
    backward (AOTAutograd's partitioner recomputes from saved inputs, so reach counts, not
    just direct use).
    """
    modes = _grad_modes(gm)
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
                if user.op == "output" or _is_write_back(user) or user in seen or _unread_by_backward(user, node):
                    continue
                if requires_grad.get(user, True):
                    found = True
                    break
                seen.add(user)
                todo.append(user)
        read.append(found)
    return read


def _read_by_functional_batch_norm(gm: torch.fx.GraphModule) -> set[int]:
    """Indices of the placeholders a functional batch norm takes (and autograd saves)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return {i for i, p in enumerate(placeholders) if any(user.target in _UNREAD_BY_BACKWARD for user in p.users)}


def _write_back(
    indices: list[int], n_outputs: int, aliased: dict[int, int], clone: Collection[int] = (), keep_version: Collection[int] = ()
) -> Callable[[Callable], Callable]:
    # `clone`: inputs the backward may read (see `_read_by_backward`); `keep_version`: inputs
    # eager writes without a version bump (batch norm's running statistics).
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
                with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(hidden):
                    torch._foreach_copy_(plain_old, plain_new)
            result = list(outputs[:n_outputs])
            for k, i in aliased.items():  # eager returns the written input itself
                result[k] = args[i]
            return type(outputs)(result) if isinstance(outputs, tuple) else result

        return run

    return wrap


def _identity(compiled: Callable) -> Callable:
    return compiled
