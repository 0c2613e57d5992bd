"""Name what each write really targets, through any chain of views.

Storages are the ground truth: a view shares its base's storage, so a write's storage
leads to the node that first produced it (`MutationTrace.storage_root`). A placeholder root
is a parameter, a buffer or a user input, named from Dynamo's `Source`; any other root is an
intermediate, named by the op that produced it. Where the model is known (`name_placeholders`),
parameters and buffers get the name `named_parameters()` / `named_buffers()` gives them, and
their other registered names as aliases.
"""

from __future__ import annotations


import functools
import inspect
import re

import torch
import torch.fx

from .._compat import OpOverload, OpOverloadPacket, hop_name
from .._sources import is_internal_file, source_of, state_names
from ..facts import Target
from ._graph_io import GraphInput, input_of, name_input
from .op_knowledge import HOP_SPELLING, OPERATOR_SPELLING
from .trace_mutations import MutationTrace, Write, is_data_assignment

__all__ = ["resolve_target", "root_of", "target_of_root", "target_of_input", "name_placeholders", "Target", "describe_op"]




def describe_op(node: torch.fx.Node) -> str:
    """How the user spelled the op: `add_`, `+=`, `x[...] = v`, `relu(inplace=True)`, ..."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        if node.target in OPERATOR_SPELLING:
            return OPERATOR_SPELLING[node.target]
        if (hop := hop_name(node.target)) is not None:
            return HOP_SPELLING.get(hop, hop)
        if is_data_assignment(node):
            return ".data = v"  # Dynamo's spelling of `t.data = v` (see `is_data_assignment`)
        name = getattr(node.target, "__name__", None) or str(node.target)
        if isinstance(node.target, (OpOverload, OpOverloadPacket)):
            name = str(node.target)
        elif name == "_get_data_attr":
            name = ".data"
    else:
        return f"{node.op} {node.target}"
    flags = ["inplace=True"] if _inplace_flag(node) else []
    if "out" in node.kwargs:
        flags.append("out=")
    return f"{name}({', '.join(flags)})" if flags else name


def resolve_target(write: Write, trace: MutationTrace) -> tuple[Target, tuple[str, ...]]:
    """The storage owner `write` really writes, and the view chain that leads to it."""
    root = root_of(write, trace)
    if root is None:
        return _intermediate(write.arg), ()
    return target_of_root(root, trace), _view_chain(write, root, trace)


def root_of(write: Write, trace: MutationTrace) -> torch.fx.Node | None:
    """The node that owns the storage `write` writes (a parameter a `.data =` moved onto it, first)."""
    return write.owner or trace.storage_root.get(write.storage)


def target_of_root(root: torch.fx.Node, trace: MutationTrace) -> Target:
    """Name the node that owns a storage: a placeholder by its source, else by its op."""
    if root.op != "placeholder":
        return _intermediate(root)
    return target_of_input(root, trace.inputs.get(root))


def target_of_input(placeholder: torch.fx.Node, record: GraphInput | None) -> Target:
    """A graph input's name: the audit's (`name_placeholders`, an earlier graph's), else its source's."""
    current = input_of(placeholder) or record  # the record on the node carries the audit's name
    return current.named if current is not None else Target("input", placeholder.name)


def name_placeholders(gm: torch.fx.GraphModule, example_inputs: list, modules: list[torch.nn.Module]) -> None:
    """Name each parameter and buffer placeholder as the first of `modules` that holds it does.

    The tensor at a placeholder's position in `example_inputs` is the real one: looked up by
    identity, it gets the name `named_parameters()` gives, with its other names as aliases
    (one parameter registered as `seg.scale` and `shared_scale`), in its `GraphInput`;
    placeholders no module holds keep Dynamo's name.
    """
    tables = [state_names(m) for m in modules]
    for node, real in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if not isinstance(real, torch.Tensor):
            continue
        found = next((table[id(real)] for table in tables if id(real) in table), None)
        if found is not None:
            kind, name, aliases = found
            name_input(node, Target(kind, name, aliases=aliases))


def _view_chain(write: Write, root: torch.fx.Node, trace: MutationTrace) -> tuple[str, ...]:
    chain: list[str] = []
    node = write.arg
    while node is not root and len(chain) < 64:
        chain.append(describe_op(node))
        node = next((a for a in node.all_input_nodes if write.storage in trace.storages_made.get(a, ())), root)
    return tuple(reversed(chain))


def _inplace_flag(node: torch.fx.Node) -> bool:
    # `inplace=True` as keyword, or as the positional argument of that name: `nn.Hardswish`
    # calls `F.hardswish(input, self.inplace)`. One spelling for both.
    if node.kwargs.get("inplace") is True:
        return True
    index = _inplace_position(node.target) if node.op == "call_function" else None
    return index is not None and index < len(node.args) and node.args[index] is True


@functools.lru_cache(maxsize=512)
def _inplace_position(target) -> int | None:
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _intermediate(node: torch.fx.Node) -> Target:
    # Dynamo names a node after the variable the user's line assigns, else after its op
    # (`batch_norm`, `relu_1`) or the variable of the torch function that made it (`input_1`).
    # Dynamo leaves torch's module frames out of the stack trace: a name made there
    # (`input_2`, Sequential's variable) comes with the user's line that called the module,
    # where no such variable is written.
    source, op = source_of(node), describe_op(node)
    base = re.sub(r"_\d+$", "", node.name)
    by_op = base == op.split("(")[0].split(".")[-1]
    on_the_line = source is not None and base in re.findall(r"[A-Za-z_]\w*", source.code)
    return Target("intermediate", node.name, op,
                  user_named=on_the_line and not is_internal_file(source.file) and not by_op)

