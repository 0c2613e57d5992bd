"""The facts one fake run of a graph records (`trace_mutations`): writes, saved tensors, storages."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .._graph_io import GraphInput
from .._storage import StorageKey

__all__ = ["Write", "SavedTensor", "MutationTrace"]


@dataclass
class Write:
    """One tensor written by one node."""

    node: torch.fx.Node
    arg: torch.fx.Node  # the argument node whose value was written (maybe a view)
    tensor: torch.Tensor
    storage: StorageKey
    autograd_visible: bool  # did the write bump the version counter autograd checks?
    grad_enabled: bool
    how: str  # "version" (counter moved), "schema" (a write the schema hides), "rebind" (`set_`, `.data =`)
    # The placeholder whose tensor a `.data =` rebound onto this storage earlier: it owns what
    # is written now (`p.data = t; p.data.mul_(2)` writes `p`, not `t`'s producer).
    owner: torch.fx.Node | None = None
    region: torch.Tensor | None = None  # the part of `tensor` written, when known to be less
    # For a write inside a higher-order op's subgraph (a custom autograd.Function's forward,
    # a checkpoint region, ...): the body node that wrote. `node` is then the op's call.
    inner: torch.fx.Node | None = None


@dataclass
class SavedTensor:
    """One tensor autograd saved for backward while running `node`."""

    node: torch.fx.Node
    tensor: torch.Tensor
    version: int
    storage: StorageKey | None
    mutated_by: torch.fx.Node | None = None  # first write that moved its version
    hidden_writes: list[torch.fx.Node] = field(default_factory=list)
    # False when backward checks the tensor's version but never reads its values (see
    # `HiddenWrite.read_by_backward`): a write autograd does not see cannot change the gradients then.
    values_read: bool = True
    _last_version: int = 0
    # Facts from inside a higher-order op's subgraph (`node` or `mutated_by` is then the op's
    # call): the body node that saved it, the body node whose write moved its version, and
    # (op call, body node) for each write to it that autograd does not see.
    inner: torch.fx.Node | None = None
    mutated_inside: torch.fx.Node | None = None
    hidden_inside: list[tuple[torch.fx.Node, torch.fx.Node]] = field(default_factory=list)
    # Saved inside a non-reentrant checkpoint region (or read there from module state): backward
    # recomputes it from the values it finds then, with no version check, so a write to it is
    # silent: it matters when the recomputation reads or replays it.
    recomputed: bool = False


@dataclass
class MutationTrace:
    """What one fake run of a graph observed."""

    writes: list[Write]
    saved: list[SavedTensor]
    storage_root: dict[StorageKey, torch.fx.Node]  # the node that first produced each storage
    storages_read: dict[torch.fx.Node, set[StorageKey]]  # tensor arguments' storages
    storages_made: dict[torch.fx.Node, set[StorageKey]]  # outputs' storages
    grad_enabled: dict[torch.fx.Node, bool]
    # The graph's inputs (`describe_inputs`), by placeholder; empty for a subgraph's dry run.
    inputs: dict[torch.fx.Node, GraphInput] = field(default_factory=dict)
    # Graph output positions whose backward runs through the autograd nodes a node made.
    # A saved tensor matters only there: behind `.detach()`, `.data`, `no_grad` or an
    # output that needs no grad, backward never unpacks it, so a later write is harmless.
    backward_outputs: dict[torch.fx.Node, frozenset[int]] = field(default_factory=dict)
    # The same for placeholders: the output positions whose backward reaches the input.
    placeholder_reach: dict[torch.fx.Node, frozenset[int]] = field(default_factory=dict)
    # The tensors of the subgraph dry runs: some of their storages are keys above, and a
    # storage freed while tracing goes on could come back at the same address.
    subgraph_values: list[Any] = field(default_factory=list)

    @functools.cached_property
    def sources(self) -> dict[torch.fx.Node, Any]:
        """Each placeholder's Dynamo `Source` (Dynamo drops `grapharg` once compiled)."""
        return {node: record.source for node, record in self.inputs.items()}

    @functools.cached_property
    def requires_grad(self) -> dict[torch.fx.Node, bool]:
        """Whether each placeholder's tensor requires grad as the graph starts (a parameter with
        `requires_grad=False`, a momentum copy, trains nothing)."""
        return {node: record.requires_grad for node, record in self.inputs.items() if record.is_tensor}

    def writes_by_node(self) -> dict[torch.fx.Node, list[Write]]:
        grouped: dict[torch.fx.Node, list[Write]] = {}
        for write in self.writes:
            grouped.setdefault(write.node, []).append(write)
        return grouped
