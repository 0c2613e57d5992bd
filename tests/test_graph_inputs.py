"""One record per graph input (`fxinplace.passes._graph_io`), held to the real inputs."""

from __future__ import annotations

import torch
from torch import nn

import fxinplace
import fxinplace.backend
import fxinplace.passes._graph_io as graph_io
from fxinplace.passes._graph_io import GraphInput, describe_inputs, graph_inputs


class _Bank(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("memory", torch.zeros(3))

    def forward(self, x, view):
        self.memory.mul_(self.fc.weight.sum())  # the buffer takes history: a non-leaf by the end
        view.add_(1)
        return self.fc(x).sum() + self.memory.sum()


def _capture(model, *args):
    seen = []

    def compiler(gm, example_inputs):
        # (the real inputs' flags now: the call changes the buffer's)
        flags = [(t.requires_grad, t.is_leaf) for t in example_inputs]
        seen.append((gm, list(example_inputs), flags, describe_inputs(gm, example_inputs)))
        return gm.forward

    torch.compile(model, backend=compiler)(*args)
    return seen[0]


def test_the_records_say_how_each_input_starts():
    model = _Bank()
    base = torch.randn(4, 3)
    gm, reals, flags, records = _capture(model, base, base[1])
    by_name = {r.name: r for r in records}
    assert [r.index for r in records] == list(range(len(reals)))
    assert (by_name["fc.weight"].kind, by_name["memory"].kind) == ("parameter", "buffer")
    assert [(r.requires_grad, r.is_leaf) for r in records] == flags
    # Dynamo's fake shows the end of tracing: the buffer took history from the weight there.
    memory = by_name["memory"]
    assert not memory.requires_grad and memory.grad_by_end
    # Aliasing from the real inputs' storages: `x` and its row share one; nothing else does.
    storage = [real.untyped_storage().data_ptr() for real in reals]
    for record in records:
        sharing = [j for j, s in enumerate(storage) if s == storage[record.index]]
        assert record.alias_group == (sharing[0] if len(sharing) > 1 else None)
    assert sum(r.alias_group is not None for r in records) == 2


def test_the_backend_describes_the_inputs_once_and_the_passes_read_them(monkeypatch):
    calls = []

    def counting(gm, example_inputs, fake_mode=None):
        calls.append(gm)
        return describe_inputs(gm, example_inputs, fake_mode)

    monkeypatch.setattr(fxinplace.backend, "describe_inputs", counting)
    monkeypatch.setattr(graph_io, "describe_inputs", counting)
    audit = fxinplace.InplaceAudit(compiler="eager", print=False, functionalize=True)
    gms = []

    def backend(gm, inputs):
        gms.append(gm)
        return audit(gm, inputs)

    torch.compile(_Bank(), backend=backend)(torch.randn(4, 3), torch.randn(3))
    assert calls == gms  # once per graph: the trace and functionalize read the stored records
    assert audit.report.graphs[0].functionalized
    stored = [p.meta["fxinplace"] for p in gms[0].graph.find_nodes(op="placeholder")]
    assert all(isinstance(r, GraphInput) for r in stored)
    assert graph_inputs(gms[0], [None] * len(stored)) == stored
