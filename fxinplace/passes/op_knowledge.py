"""What the passes know about ops: read from their schemas, special cases kept as tables.

An ATen op's schema says which argument it writes (`Tensor(a!)`) and which result is a view
of which argument (`Tensor(a)`): `written_args`, `aliased_arg`, `view_chain`. Where the
schema is silent or wrong for what eager PyTorch does, the fact is kept below in one table,
with why: the writes schemas hide (`HIDDEN_WRITES`, batch norm's running statistics), the
in-place ops functionalize respells (`RESPELLED`), how users spell in place
(`OPERATOR_SPELLING`, `is_spelled_inplace`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from .._compat import NATIVE_BATCH_NORM_LEGIT, OpOverload, overload_name, pytree, schema_of
__all__ = [
    "written_args", "written_inputs", "mutates", "aliased_arg", "is_view", "view_chain",
    "OPERATOR_SPELLING", "HOP_SPELLING", "is_spelled_inplace", "is_inplace_function",
    "HiddenWrite", "HIDDEN_WRITES", "hidden_write_of", "functional_running_stats", "REINPLACED_RUNNING_STATS",
    "RESPELLED", "out_of_place_twin", "OVERWRITES", "OUT_UNVERSIONED_IN_EAGER",
    "OWN_RESULT_SAVERS", "MASKING_WRITES", "MASKING_INPLACE", "INLINABLE_HOPS",
]

_aten = torch.ops.aten


# -- Schemas ------------------------------------------------------------------------------

def written_args(op: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of each argument `op`'s schema marks written (`Tensor(a!)`); () without one."""
    schema = schema_of(op)
    if schema is None:
        return ()
    return tuple((i, a.name) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)


def mutates(node: torch.fx.Node) -> bool:
    """Does the schema of `node`'s op mark an argument written?"""
    return bool(written_args(node.target))


def written_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The argument nodes `node`'s schema writes, in schema order (a `Tensor(a!)[]` gives each)."""
    written = []
    for i, name in written_args(node.target):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(name)
        written += [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.fx.Node)]
    return written


def aliased_arg(node: torch.fx.Node) -> torch.fx.Node | None:
    """The argument `node`'s result aliases: a view's base, an in-place op's `self`, an `out=`."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:  # one result of a multi-output view (split, unbind)
        return aliased_arg(node.args[0])
    schema = schema_of(node.target)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    sets = schema.returns[0].alias_info.before_set  # empty for `Tensor(a)[]`: the views of `self`
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and (arg.alias_info.before_set & sets or not sets):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return value if isinstance(value, torch.fx.Node) else None
    return None


def is_view(node: torch.fx.Node) -> bool:
    return aliased_arg(node) is not None and not mutates(node)


def view_chain(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node`, the tensors it aliases (views, in-place results), last the storage's owner."""
    chain = [node]
    while (base := aliased_arg(chain[-1])) is not None:
        chain.append(base)
    return chain


# -- How users spell "in place" (Dynamo graphs) -----------------------------------------------

OPERATOR_SPELLING = {
    operator.setitem: "x[...] = v",
    operator.iadd: "+=", operator.isub: "-=", operator.imul: "*=", operator.itruediv: "/=",
    operator.ifloordiv: "//=", operator.imod: "%=", operator.ipow: "**=", operator.imatmul: "@=",
    operator.iand: "&=", operator.ior: "|=", operator.ixor: "^=",
    operator.ilshift: "<<=", operator.irshift: ">>=",
}

# Higher-order ops as the user called them.
HOP_SPELLING = {
    "tag_activation_checkpoint": "checkpoint",
    "autograd_function_apply": "autograd.Function.apply",
    "cond": "torch.cond",
}


def is_inplace_function(n: torch.fx.Node) -> bool:
    """`torch.relu_`, `operator.iadd`, `F.relu(..., inplace=True)`: a call_function spelled in place."""
    name = getattr(n.target, "__name__", "")
    return n.op == "call_function" and (
        (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or n.kwargs.get("inplace") is True
        or n.target in _OPERATOR_INPLACE
    )


# `t += y` is `operator.iadd` in Dynamo's graph (FACTS.md): its `__name__` is "iadd".
_OPERATOR_INPLACE = frozenset(getattr(operator, f"i{op}") for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift", "rshift"))


def is_spelled_inplace(n: torch.fx.Node) -> bool:
    """`t.add_()`, `t[i] = v`, or an in-place function (see `is_inplace_function`)."""
    name = str(n.target) if n.op == "call_method" else ""
    return (name.endswith("_") and not name.endswith("__")) or n.target is operator.setitem or is_inplace_function(n)


# -- Writes the schemas hide: batch norm's running statistics ----------------------------------

@dataclass(frozen=True)
class HiddenWrite:
    """A norm op's update of its running statistics, on when its flag (argument 5) is set.

    `written`: (position, name) of the running statistics. `read_by_backward`: does backward
    read their values (training mode)? `new_values`: for a functional op, the result positions
    holding the new statistics (it writes nothing), and `inplace`, the op that writes them in place.
    """

    op: Any
    written: tuple[tuple[int, str], ...]
    flag: str
    default: bool
    read_by_backward: bool
    new_values: tuple[int, ...] = ()
    inplace: Any = None

    def is_on(self, args: tuple, kwargs: dict) -> bool:
        return bool(args[5] if len(args) > 5 else kwargs.get(self.flag, self.default))

    def written_now(self, args: tuple, kwargs: dict) -> list[int | str]:
        """The written arguments for this call: a position when passed positionally, else the name."""
        return [p if p < len(args) else name for p, name in self.written] if self.is_on(args, kwargs) else []


_F_STATS = ((1, "running_mean"), (2, "running_var"))  # F.batch_norm(input, running_mean, running_var, weight, ...)
_ATEN_STATS = ((3, "running_mean"), (4, "running_var"))  # torch.batch_norm(input, weight, bias, running_mean, ...)

# Eager batch norm updates the running statistics inside the kernel and bumps no version,
# whatever the schema says (measured on torch 2.13: `native_batch_norm` marks nothing written,
# `_native_batch_norm_legit` marks `running_mean(a!)`; neither bumps, with or without `out=`;
# its `no_stats` overload has a bool at position 3: no tensor argument, nothing picked).
# Instance norm updates them by a `copy_` eager does count (tests/test_op_knowledge.py): listed
# all the same, so that they are named written whatever the run shows.
# Training-mode batch norm saves `running_mean`/`running_var` (its backward formula takes them,
# so their versions are checked) yet computes the gradient from the batch statistics it saved
# itself; eval mode does read them. Measured for `F.batch_norm` and `torch.batch_norm`; the
# other entries are taken as read (the safe answer). At ATen level functionalize meets
# `_native_batch_norm_legit_functional`, which returns the new statistics (results 3, 4).
HIDDEN_WRITES = {w.op: w for w in (
    HiddenWrite(torch.nn.functional.batch_norm, _F_STATS, "training", False, read_by_backward=False),
    HiddenWrite(torch.batch_norm, _ATEN_STATS, "training", False, read_by_backward=False),
    HiddenWrite(torch.native_batch_norm, _ATEN_STATS, "training", False, read_by_backward=True),
    HiddenWrite(NATIVE_BATCH_NORM_LEGIT, _ATEN_STATS, "training", False, read_by_backward=True),
    HiddenWrite(torch.nn.functional.instance_norm, _F_STATS, "use_input_stats", True, read_by_backward=True),
    HiddenWrite(torch.instance_norm, _ATEN_STATS, "use_input_stats", True, read_by_backward=True),
    HiddenWrite(_aten._native_batch_norm_legit_functional.default, _ATEN_STATS, "training", False,
                read_by_backward=False, new_values=(3, 4), inplace=_aten._native_batch_norm_legit.default),
)}

# The in-place ops functionalize puts back for a functional one: the only writes it leaves.
REINPLACED_RUNNING_STATS = frozenset(w.inplace for w in HIDDEN_WRITES.values() if w.inplace is not None)


def hidden_write_of(node: torch.fx.Node) -> HiddenWrite | None:
    """The hidden write `node` makes, if its op has one (a functional op writes nothing: None)."""
    found = HIDDEN_WRITES.get(node.target) if node.op == "call_function" else None
    return found if found is not None and not found.new_values else None


def functional_running_stats(node: torch.fx.Node) -> HiddenWrite | None:
    """The entry of a functional op that returns new running statistics, for `node`."""
    found = HIDDEN_WRITES.get(node.target) if node.op == "call_function" else None
    return found if found is not None and found.new_values else None


# -- In-place ops functionalize respells --------------------------------------------------------

# In-place ops whose out-of-place twin gets autograd wrong (derivatives.yaml), by how eager
# records them. Each is respelled in the ATen graph before `functionalize`, with ops whose
# derivatives give eager's gradients (tests/test_functionalize_ops.py checks every entry
# against eager):
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
RESPELLED = {
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


def out_of_place_twin(op: OpOverload) -> OpOverload:
    """`aten.gt.Scalar` for `aten.gt_.Scalar`."""
    return getattr(getattr(_aten, schema_of(op).name.split("::")[1].removesuffix("_")), overload_name(op))


# In-place ops whose new value does not depend on the old one: out of place, the result
# loses the old tensor's history, which eager keeps (with a zero gradient).
OVERWRITES = frozenset({
    _aten.copy_.default, _aten.fill_.Scalar, _aten.fill_.Tensor,  # `zero_`: see `RESPELLED`
})

# `out=` ops whose eager kernel writes the out tensor through an alias with a counter of its
# own (`kron` writes a `_unsafe_view` of it), so eager bumps no version: the write is hidden
# from autograd. Measured on torch 2.13: every other out= op tried bumps each out tensor.
OUT_UNVERSIONED_IN_EAGER = frozenset({torch.kron, _aten.kron.out})

# Ops whose backward reads only their own result, element by element (grad * f(result)): a
# zero output gradient gives a zero input gradient, whatever the saved value holds.
OWN_RESULT_SAVERS = frozenset({torch.exp, torch.sigmoid, torch.tanh, torch.relu, torch.nn.functional.relu,
                               torch.nn.functional.sigmoid, torch.nn.functional.tanh, "exp", "sigmoid", "tanh", "relu"})
# In-place ops whose own backward gives zero gradient wherever they changed a value: they
# overwrite a region (`h[i] = v`, `fill_`, `zero_`, `masked_fill_`, `copy_`) or clip to a range.
MASKING_WRITES = frozenset({operator.setitem, torch.relu_, torch.clamp_, "relu_", "clamp_", "clamp_min_",
                            "clamp_max_", "fill_", "zero_", "masked_fill_", "copy_", "hardtanh_", "threshold_"})
MASKING_INPLACE = frozenset({torch.nn.functional.relu, torch.nn.functional.hardtanh, torch.nn.functional.threshold})

# Higher-order ops whose subgraph the ATen trace may inline: their backward is autograd's
# own. Any other (a custom `autograd.Function`'s `autograd_function_apply`, flex attention,
# ...) carries a backward that a trace below autograd would drop, silently changing gradients.
INLINABLE_HOPS = frozenset({"tag_activation_checkpoint", "wrap"})
