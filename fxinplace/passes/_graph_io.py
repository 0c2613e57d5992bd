"""A Dynamo graph's inputs and outputs, worked out once for every pass.

`describe_inputs` makes one `GraphInput` per placeholder: its name from Dynamo's `Source`,
how it starts (`requires_grad`, leaf-ness, from the real input: Dynamo's fake shows the end
of tracing), and which inputs share its storage. The backend calls it once per graph and
the records stay on the placeholders (`meta["fxinplace"]`, the one key of ours); each pass
reads them with `graph_inputs`, which builds them only for a pass called on its own. Where the
audit knows a better name (the model's `named_parameters()`, an earlier graph's), `name_input`
puts it in the record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx

from .._compat import example_value, fake_from_real, fake_mode_of, graph_arg_source, pytree
from .._sources import qualified_name_of
from ..facts import Target
from ._storage import storage_key

__all__ = ["GraphInput", "describe_inputs", "graph_inputs", "name_input", "input_of", "fresh_fakes", "example_requires_grad", "output_nodes", "returned_values"]

_KEY = "fxinplace"


@dataclass(frozen=True)
class GraphInput:
    """One placeholder of a Dynamo graph, as the graph starts."""

    index: int  # position among the placeholders (and in `example_inputs`)
    source: Any  # Dynamo's `Source` (`grapharg`), None when there is none
    kind: str  # "parameter" | "buffer" | "input", from the source (the audit may rename it later)
    name: str
    # Dynamo's fake (shape, strides, symbolic sizes), a fake of the real input when Dynamo kept
    # none, or the value itself when it is no tensor.
    example: Any
    requires_grad: bool  # as the graph starts: the real input's flag
    is_leaf: bool
    # May the input require grad by the end of the graph? Dynamo's fake says so once a write
    # with a grad-requiring operand gave it history. True when unknown: the safe answer.
    grad_by_end: bool
    alias_group: int | None  # index of the first input sharing its storage; None if it shares none
    target: Target | None = None  # the audit's name, when it knows a better one than the source's

    @property
    def named(self) -> Target:
        return self.target if self.target is not None else Target(self.kind, self.name)

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.example, torch.Tensor)


def describe_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], fake_mode=None) -> list[GraphInput]:
    """One `GraphInput` per placeholder of `gm`, also stored on each placeholder for the passes."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    examples = []
    for node, real in zip(placeholders, example_inputs):
        meta = example_value(node)
        if meta is None and isinstance(real, torch.Tensor):
            if fake_mode is None:
                fake_mode = fake_mode_of(example_inputs)
            with fake_mode:
                meta = fake_from_real(fake_mode, real)
        examples.append(meta if meta is not None else real)
    keys = [storage_key(e) for e in examples]
    first_of: dict[Any, int] = {}
    count: dict[Any, int] = {}
    for i, key in enumerate(keys):
        if key is not None:
            first_of.setdefault(key, i)
            count[key] = count.get(key, 0) + 1
    inputs = []
    for i, (node, real, example) in enumerate(zip(placeholders, example_inputs, examples)):
        source = graph_arg_source(node)
        kind, name = qualified_name_of(source) if source is not None else ("input", node.name)
        tensor = isinstance(example, torch.Tensor)
        start = real if isinstance(real, torch.Tensor) else example  # how the graph starts (see above)
        record = GraphInput(
            index=i, source=source, kind=kind, name=name, example=example,
            requires_grad=bool(tensor and start.requires_grad), is_leaf=bool(not tensor or start.is_leaf),
            # torch 2.14 gives an input that `.data =` rebinds a detached snapshot as its
            # example value (no grad): the real input's flag counts too.
            grad_by_end=example_requires_grad(example_value(node))
            or (isinstance(real, torch.Tensor) and example_requires_grad(real)),
            alias_group=first_of[keys[i]] if count.get(keys[i], 0) > 1 else None,
        )
        node.meta[_KEY] = record
        inputs.append(record)
    return inputs


def graph_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], fake_mode=None) -> list[GraphInput]:
    """The records `describe_inputs` left on `gm`'s placeholders; made now if it has not run."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    stored = [p.meta.get(_KEY) for p in placeholders]
    if len(stored) == len(example_inputs) and all(isinstance(r, GraphInput) for r in stored):
        return stored
    return describe_inputs(gm, example_inputs, fake_mode)


def input_of(placeholder: torch.fx.Node) -> GraphInput | None:
    """The record on `placeholder` (None before `describe_inputs` ran)."""
    record = placeholder.meta.get(_KEY)
    return record if isinstance(record, GraphInput) else None


def name_input(placeholder: torch.fx.Node, target: Target) -> None:
    """Give the input at `placeholder` the audit's name for it."""
    record = input_of(placeholder)
    if record is None:
        raise AssertionError(f"fxinplace: no input record on placeholder {placeholder.name}: run describe_inputs first")
    placeholder.meta[_KEY] = dataclasses.replace(record, target=target)


def example_requires_grad(value: Any) -> bool:
    """Does Dynamo's example value require grad? True when unknown (the safe answer)."""
    if not isinstance(value, torch.Tensor):
        return True
    return value.requires_grad and (value.is_floating_point() or value.is_complex())


def fresh_fakes(inputs: Sequence[GraphInput], fake_mode, with_grad: bool = True) -> list[Any]:
    """Fresh fakes shaped like the inputs, so our runs never touch Dynamo's own fakes.

    Inputs that share a storage and require no grad stay aliased: views of one shared base.
    `with_grad`: inputs that require grad get fakes that do (a non-leaf stays a non-leaf).
    """
    fakes = []
    bases: dict[int, torch.Tensor] = {}
    with fake_mode:
        for record in inputs:
            meta = record.example
            if not record.is_tensor:
                fakes.append(meta)
                continue
            requires_grad = with_grad and record.requires_grad
            if record.alias_group is not None and not requires_grad:
                if record.alias_group not in bases:
                    bases[record.alias_group] = torch.empty(
                        meta.untyped_storage().nbytes() // meta.element_size(), dtype=meta.dtype, device=meta.device
                    )
                fakes.append(bases[record.alias_group].as_strided(meta.shape, meta.stride(), meta.storage_offset()))
                continue
            fake = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=meta.device)
            if requires_grad:
                fake.requires_grad_()
                if not record.is_leaf:  # e.g. a tensor from the graph before a graph break
                    fake = fake.clone()
            fakes.append(fake)
    return fakes


def output_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes a graph returns, flattened, in output position order."""
    return [a for a in pytree.tree_leaves(gm.graph.output_node().args) if isinstance(a, torch.fx.Node)]


def returned_values(gm: torch.fx.GraphModule) -> list[Any]:
    """What a graph's output node returns, one entry per output position (nodes, maybe None)."""
    return list(gm.graph.output_node().args[0])
