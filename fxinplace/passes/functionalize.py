"""Rewrite a Dynamo graph's in-place mutations out of place, keeping the writes the caller sees.

Expects a Dynamo graph (placeholders carry `example_value` fakes) and returns an ATen graph
with no mutation at all, plus a runtime wrapper that performs the caller-visible writes.

PyTorch does the rewrite: `torch.func.functionalize(remove="mutations")` traced by `make_fx`
on fresh fakes in Dynamo's fake mode (symbolic shapes included) turns every in-place op into
its out-of-place twin, makes later readers (views included) read the new value, and ends the
graph with one `copy_` per mutated input. Three things are done by hand:

- Grad mode. A `make_fx` trace below autograd forgets `torch.no_grad()` regions; every ATen
  node remembers the Dynamo node it came from (`from_node`), so the `_set_grad_enabled` calls
  are put back around the nodes that came from no-grad regions.
- Caller-visible writes. Each final `copy_` into an input (parameter, buffer, user input)
  becomes an extra graph output; the wrapper copies it into the input after the compiled call,
  exactly once, under `no_grad` unless the new value carries autograd history the caller
  should see (as in eager, where writes to parameters happen under `no_grad` or via `.data`).
  A `copy_` kept in the graph would make AOTAutograd trip on its own version check.
- Saved inputs. Autograd saves the graph's inputs by reference, so writing back into an input
  the backward still needs would break it (or silently feed it the new values): while grad is
  on, the compiled graph gets a clone of each input it writes back; gradients flow to the
  original through the clone.

`mode="hazards"` functionalizes a graph as a whole when one of its mutations has an
error-level hazard and hands it over unchanged otherwise: partial functionalization would
need re-inplacing on top of `torch.func.functionalize`, and Inductor re-inplaces what is safe
anyway.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx

from .._sources import qualified_name_of
from ..report import Hazard, Mutation

__all__ = ["functionalize", "FunctionalizedGraph"]

# Hazards that come from the write happening in place; gone once it happens out of place.
_REMOVED = frozenset({"saved-then-mutated", "hidden-write-to-saved"})


@dataclass(frozen=True)
class FunctionalizedGraph:
    gm: torch.fx.GraphModule  # what to hand to the compiler (the input graph when unchanged)
    wrap: Callable[[Callable], Callable]  # compiled graph -> callable that does the write-backs
    mutations: tuple[Mutation, ...]  # the audit's mutations with `rewrite` filled in


def functionalize(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: str = "all", mutations: Sequence[Mutation] = ()
) -> FunctionalizedGraph:
    """Rewrite `gm` without in-place ops; see the module docstring.

    `mode` is "all" or "hazards"; `mutations` are the audit's findings for `gm` (they choose
    what "hazards" rewrites, and come back with `rewrite` and removed hazards marked).
    """
    if mode not in ("all", "hazards"):
        raise ValueError(f'fxinplace: `functionalize` mode must be "all" or "hazards", got {mode!r}')
    if mode == "hazards" and mutations and not any(m.severity == "error" for m in mutations):
        kept = "kept in place: no error-level hazard in this graph"
        return FunctionalizedGraph(gm, _identity, tuple(dataclasses.replace(m, rewrite=kept) for m in mutations))

    new_gm = _trace_functional(gm, example_inputs)
    written = _outputs_for_writes(new_gm)
    _restore_grad_mode(new_gm, _grad_modes(gm))
    new_gm.graph.lint()
    new_gm.recompile()

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    names = {_target_of(placeholders[i]) for i, _ in written}
    rewritten = tuple(_mark(m, names) for m in mutations)
    n_outputs = len(new_gm.graph.output_node().args[0]) - len(written)
    return FunctionalizedGraph(new_gm, _write_back([i for i, _ in written], n_outputs, _aliased(new_gm, written)), rewritten)


def _trace_functional(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        raise AssertionError("fxinplace: functionalize needs Dynamo's fake mode; none was found")
    with fake_mode:
        fakes = [_fresh_fake(p, real, fake_mode) for p, real in zip(gm.graph.find_nodes(op="placeholder"), example_inputs)]
    run = torch.func.functionalize(torch.fx.Interpreter(gm).run, remove="mutations")
    # Fakes without requires_grad: the trace is below autograd anyway, and functionalize's own
    # final `copy_` into a leaf parameter would otherwise be refused by autograd.
    with fake_mode, fx_traceback.preserve_node_meta(), torch.no_grad():
        return make_fx(run, pre_dispatch=False)(*fakes)


def _fresh_fake(placeholder: torch.fx.Node, real: Any, fake_mode) -> Any:
    # Dynamo's own fakes carry the symbolic shapes it chose; fresh ones shaped like them keep
    # those shapes without letting our trace touch Dynamo's tensors.
    meta = placeholder.meta.get("example_value")
    if meta is None and isinstance(real, torch.Tensor):
        meta = fake_mode.from_tensor(real)
    if not isinstance(meta, torch.Tensor):
        return meta if meta is not None else real
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=meta.device)


def _outputs_for_writes(gm: torch.fx.GraphModule) -> list[tuple[int, torch.fx.Node]]:
    """Turn each final `copy_(input, value)` into an extra output; return (input index, value)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    output = gm.graph.output_node()
    written = []
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.copy_.default and node.args[0].op == "placeholder":
            written.append((placeholders.index(node.args[0]), node.args[1]))
            gm.graph.erase_node(node)
        elif node.op == "call_function" and _mutates(node):
            raise AssertionError(f"fxinplace: functionalize left a mutation in the graph: {node.format_node()}")
    output.args = (tuple(output.args[0]) + tuple(value for _, value in written),)
    return written


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _grad_modes(gm: torch.fx.GraphModule) -> dict[str, bool]:
    """Grad mode each Dynamo node ran under (the graph starts in the caller's mode)."""
    enabled = torch.is_grad_enabled()
    modes = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            enabled = bool(node.args[0])
        modes[node.name] = enabled
    return modes


def _restore_grad_mode(gm: torch.fx.GraphModule, modes: dict[str, bool]) -> None:
    # An ATen node without a Dynamo origin (a view functionalization regenerates) keeps the
    # mode of the node before it; the graph ends in the mode it started in.
    initial = current = torch.is_grad_enabled()
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            continue
        sources = [s.name for s in node.meta.get("from_node", ()) if s.name in modes]
        wanted = initial if node.op == "output" else modes[sources[0]] if sources else current
        if wanted != current:
            with gm.graph.inserting_before(node):
                gm.graph.call_function(torch._C._set_grad_enabled, (wanted,))
            current = wanted


def _aliased(gm: torch.fx.GraphModule, written: list[tuple[int, torch.fx.Node]]) -> dict[int, int]:
    """Output position -> input index, for outputs that are the new value of a written input."""
    outputs = list(gm.graph.output_node().args[0])[: -len(written) or None]
    return {k: i for k, out in enumerate(outputs) for i, value in written if out is value}


def _write_back(indices: list[int], n_outputs: int, aliased: dict[int, int]) -> Callable[[Callable], Callable]:
    def wrap(compiled: Callable) -> Callable:
        if not indices:
            return compiled

        def run(*args):
            inputs = list(args)
            if torch.is_grad_enabled():
                for i in indices:  # autograd may save these: keep them apart from the write-back
                    inputs[i] = args[i].clone()
            outputs = compiled(*inputs)
            for i, new in zip(indices, outputs[n_outputs:]):
                old = args[i]
                differentiable = new.requires_grad and not (old.is_leaf and old.requires_grad)
                with torch.set_grad_enabled(differentiable):
                    old.copy_(new)
            result = list(outputs[:n_outputs])
            for k, i in aliased.items():  # eager returns the written input itself
                result[k] = args[i]
            return type(outputs)(result) if isinstance(outputs, tuple) else result

        return run

    return wrap


def _identity(compiled: Callable) -> Callable:
    return compiled


def _target_of(placeholder: torch.fx.Node) -> tuple[str, str]:
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    return qualified_name_of(source) if source is not None else ("input", placeholder.name)


def _mark(mutation: Mutation, written: set[tuple[str, str]]) -> Mutation:
    target = mutation.target
    if target.kind == "intermediate":
        rewrite = "rewritten"
    elif (target.kind, target.name) in written:
        rewrite = f"written back to {target.kind}"
    else:
        raise AssertionError(f"fxinplace: functionalize found no write-back for {target} ({mutation.node})")
    hazards = tuple(_removed(h) if h.code in _REMOVED else h for h in mutation.hazards)
    if any(h.code in _REMOVED for h in mutation.hazards):
        rewrite += " (removes " + ", ".join(sorted({h.code for h in mutation.hazards if h.code in _REMOVED})) + ")"
    return dataclasses.replace(mutation, rewrite=rewrite, hazards=hazards)


def _removed(hazard: Hazard) -> Hazard:
    # The write no longer happens to the saved tensor: what is left is a note, not an error.
    return dataclasses.replace(hazard, severity="info", message=f"removed by functionalize: {hazard.message}")
