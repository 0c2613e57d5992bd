"""Name what each write really targets, through any chain of views.

Storages are the ground truth: a view shares its base's storage, so a write's storage
leads to the node that first produced it (`MutationTrace.storage_root`). A placeholder root
is a parameter, a buffer or a user input, named from Dynamo's `Source`; any other root is an
intermediate, named by the op that produced it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from .._sources import qualified_name_of
from .trace_mutations import MutationTrace, Write

__all__ = ["resolve_target", "target_of_root", "Target", "describe_op"]


@dataclass(frozen=True)
class Target:
    kind: str  # "parameter" | "buffer" | "input" | "intermediate"
    name: str
    produced_by: str | None = None  # the op that made an intermediate

    def __str__(self) -> str:
        if self.kind == "intermediate":
            return f"{self.name} (output of {self.produced_by})"
        return f"{self.kind} {self.name}"


_OPERATOR_SPELLING = {
    operator.setitem: "x[...] = v",
    operator.iadd: "+=", operator.isub: "-=", operator.imul: "*=", operator.itruediv: "/=",
    operator.ifloordiv: "//=", operator.imod: "%=", operator.ipow: "**=", operator.imatmul: "@=",
    operator.iand: "&=", operator.ior: "|=", operator.ixor: "^=",
    operator.ilshift: "<<=", operator.irshift: ">>=",
}


def describe_op(node: torch.fx.Node) -> str:
    """How the user spelled the op: `add_`, `+=`, `x[...] = v`, `relu(inplace=True)`, ..."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        if node.target in _OPERATOR_SPELLING:
            return _OPERATOR_SPELLING[node.target]
        name = getattr(node.target, "__name__", None) or str(node.target)
        if isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            name = str(node.target)
        elif name == "_get_data_attr":
            name = ".data"
    else:
        return f"{node.op} {node.target}"
    flags = [f"{k}={v}" for k, v in node.kwargs.items() if k == "inplace" and v is True]
    if "out" in node.kwargs:
        flags.append("out=")
    return f"{name}({', '.join(flags)})" if flags else name


def resolve_target(write: Write, trace: MutationTrace) -> tuple[Target, tuple[str, ...]]:
    """The storage owner `write` really writes, and the view chain that leads to it."""
    root = trace.storage_root.get(write.storage)
    if root is None:
        return Target("intermediate", write.arg.name, describe_op(write.arg)), ()
    return target_of_root(root, trace), _view_chain(write, root, trace)


def target_of_root(root: torch.fx.Node, trace: MutationTrace) -> Target:
    """Name the node that owns a storage: a placeholder by its source, else by its op."""
    if root.op != "placeholder":
        return Target("intermediate", root.name, describe_op(root))
    if root in trace.known_targets:
        return trace.known_targets[root]
    source = trace.sources.get(root)
    kind, name = qualified_name_of(source) if source is not None else ("input", root.name)
    return Target(kind, name)


def _view_chain(write: Write, root: torch.fx.Node, trace: MutationTrace) -> tuple[str, ...]:
    chain: list[str] = []
    node = write.arg
    while node is not root and len(chain) < 64:
        chain.append(describe_op(node))
        node = next((a for a in node.all_input_nodes if write.storage in trace.storages_made.get(a, ())), root)
    return tuple(reversed(chain))
