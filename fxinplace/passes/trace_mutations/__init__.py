"""Run a Dynamo graph once on fake tensors and record what PyTorch itself does.

Instead of keeping a table of every spelling of "in place" (`add_`, `x += y`, `x[m] = 0`,
`out=`, `inplace=True`, custom ops with mutable schemas, ...), the run watches the
version counters of each node's tensor arguments: any op that writes a tensor bumps its
counter, whatever it is called. Two kinds of writes leave the counter alone and are
caught otherwise: writes through `.data` (the alias has its own counter, so the root's
counter does not move: that is what makes them invisible to autograd) and the writes that
PyTorch's schemas hide (batch norm's running statistics, `op_knowledge.HIDDEN_WRITES`). Every
tensor passed in `out=` is written, whether or not a counter shows it (`_interpreter`).
`p.data = v` (Dynamo: `set_` and a version fix-up) rebinds `p` to another storage: it is a write
of `p`, hidden from autograd (`TracingInterpreter._record_rebind`).

The same run installs `saved_tensors_hooks`, so it sees exactly which tensors autograd
saves, for which node, at which version: the facts behind the "modified by an inplace
operation" error, observed rather than guessed.

The run is `_tracing_interpreter.TracingInterpreter`; autograd's side of it is in
`_saved_tensors`; higher-order ops' bodies are dry-run in `_hop_runs` and read in `_hop_facts`;
storages and version counters are compared in `_storage`.
"""

from __future__ import annotations

import torch
import torch.fx

from ..._compat import fake_mode_of, ignore_fresh_unbacked_symbols
from .._graph_io import fresh_fakes, graph_inputs, output_nodes
from ._facts import MutationTrace, SavedTensor, Write
from .._storage import StorageKey, overlaps, storage_key
from ._interpreter import TracingInterpreter, is_data_assignment

__all__ = ["trace_mutations", "MutationTrace", "Write", "SavedTensor", "output_nodes", "is_data_assignment",
           "StorageKey", "storage_key", "overlaps"]


def trace_mutations(gm: torch.fx.GraphModule, example_inputs: list, fake_mode=None) -> MutationTrace:
    """Run `gm` once on fake tensors and return the writes and saved tensors it observed.

    Expects a Dynamo graph (placeholders carry `example_value`). Never touches the user's
    tensors: every input is a fresh fake tensor in Dynamo's fake mode.
    """
    if fake_mode is None:
        fake_mode = fake_mode_of(example_inputs)
    interpreter = TracingInterpreter(gm, fake_mode)
    inputs = graph_inputs(gm, example_inputs, fake_mode)
    interpreter.trace.inputs = dict(zip(gm.graph.find_nodes(op="placeholder"), inputs))
    fakes = fresh_fakes(inputs, fake_mode)
    # `.item()` on a fake makes an unbacked symbol that a tracer would bind to its graph
    # node; ours is no tracer, and a symbol left pending breaks the next `make_fx` of the
    # graph (functionalize, AOTAutograd) with `PendingUnbackedSymbolNotFound`.
    with fake_mode, ignore_fresh_unbacked_symbols(fake_mode), torch.autograd.graph.saved_tensors_hooks(interpreter.pack, interpreter.unpack):
        with torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad():
            interpreter.run(*fakes)
    interpreter.record_backward_reach([interpreter.env.get(a) for a in output_nodes(gm)])
    return interpreter.trace
