"""The printed table at real size: it fits the terminal, repeats are grouped, the file keeps all."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxinplace
from conftest import quiet_audit
from fxinplace import render


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


BLOCKS = 14


class DeepTwoHeads(nn.Module):
    """A trunk of 14 conv-BN-ReLU(inplace) blocks (58 parameters; 62 with the heads) shared by two heads."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[Block(8) for _ in range(BLOCKS)])
        self.seg, self.depth = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 1, 1)

    def forward(self, x):
        h = self.trunk(x) * 0.5  # a scalar mul saves nothing: the write below is safe
        h[:, 0] = 0.0
        return {"seg": self.seg(h), "depth": self.depth(h)}


class ScaleAfterUse(nn.Module):
    """An error row beside the repeats: `mul_` overwrites what `sigmoid` saved."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(*[Block(4) for _ in range(5)])
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        h = torch.sigmoid(self.trunk(x))
        h.mul_(2)
        return {"out": self.head(h)}


def _graph(model, x):
    torch.manual_seed(0)
    (graph,) = quiet_audit(model, x).graphs
    return graph


@pytest.mark.parametrize("width", [80, 100, 140])
def test_the_table_fits_the_width_and_keeps_every_write(width):
    graph = _graph(DeepTwoHeads(), torch.randn(2, 3, 16, 16))
    text = render.render_graph(graph, width=width, every_row=True)
    assert max(len(line) for line in text.splitlines()) <= width
    rows = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == len(graph.mutations)


def test_repeats_of_a_safe_write_are_one_row_with_their_count():
    torch.manual_seed(0)
    model, x = DeepTwoHeads(), torch.randn(2, 3, 16, 16)
    graph = _graph(model, x)
    # PyTorch's own count: the buffers a training forward changes, one write each.
    before = {n: b.clone() for n, b in model.named_buffers()}
    model(x)
    changed = [n for n, b in model.named_buffers() if not torch.equal(b, before[n])]
    assert len(changed) == 3 * BLOCKS and len([m for m in graph.mutations if m.target.kind == "buffer"]) == len(changed)
    text = render.render_graph(graph, width=100, every_row=False)
    counts = {line.split()[1]: int(line.split()[0][1:]) for line in text.splitlines() if line.startswith("x")}
    assert counts == {"add_": BLOCKS, "batch_norm": BLOCKS, "relu(inplace=True)": BLOCKS}
    assert "buffer" in text and "*.running_mean" in text and "*.num_batches_tracked" in text
    singles = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert len(singles) + sum(counts.values()) + BLOCKS == len(graph.mutations)  # + the second batch_norm row per module
    trunk = [p for p, _ in model.named_parameters() if p.startswith("trunk.")]
    assert f"trunk.* ({len(trunk)} parameters: depth, seg)" in text and len(list(model.parameters())) >= 60


def test_rows_with_a_warning_or_an_error_are_never_grouped():
    graph = _graph(ScaleAfterUse(), torch.randn(2, 4, 8, 8))
    text = render.render_graph(graph, width=100, every_row=False)
    (error,) = [m for m in graph.mutations if m.severity == "error"]
    assert error.op == "mul_"
    assert any(line.split()[:2] == [str(graph.mutations.index(error)), "mul_"] for line in text.splitlines())
    assert "ERROR [saved-then-mutated]" in text


def test_the_printed_table_fits_and_the_file_keeps_every_row(tmp_path, capsys):
    path = tmp_path / "tables.txt"
    backend = fxinplace.InplaceAudit(compiler="eager", file=str(path), width=90)
    torch.manual_seed(0)
    torch.compile(DeepTwoHeads(), backend=backend)(torch.randn(2, 3, 16, 16))
    printed = capsys.readouterr().out
    assert max(len(line) for line in printed.splitlines()) <= 90
    assert any(line.startswith(f"x{BLOCKS} ") for line in printed.splitlines())
    (graph,) = backend.report.graphs
    kept = path.read_text()
    assert kept.strip() == graph.render().strip()  # the whole table, one line per row
    assert sum(1 for line in kept.splitlines() if line[:4].strip().isdigit()) == len(graph.mutations)


@pytest.mark.parametrize("options, error", [({"rows": "some"}, "`rows` must be"), ({"width": -1}, "`width` must be"),
                                            ({"width": True}, "`width` must be")])
def test_bad_table_options_say_what_is_allowed(options, error):
    with pytest.raises(ValueError, match=error):
        fxinplace.InplaceAudit(**options)


class EvalThenTrain(nn.Module):
    """Eval-mode batch norm saves the running statistics; a training-mode call then updates
    both in place, hidden from autograd: eager's gradients silently change."""

    def __init__(self, twin: bool = False):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.twin = twin

    def forward(self, x):
        h = self.lin(x)
        y = torch.nn.functional.batch_norm(h, self.rm, self.rv, training=False)
        rm, rv = (self.rm.clone(), self.rv.clone()) if self.twin else (self.rm, self.rv)
        z = torch.nn.functional.batch_norm(h * 2, rm, rv, training=True, momentum=0.5)
        return {"y": y, "z": z}


def test_one_op_overwriting_two_saved_statistics_is_one_message():
    torch.manual_seed(0)
    model, twin, x = EvalThenTrain(), EvalThenTrain(twin=True), torch.randn(5, 4)
    twin.load_state_dict(model.state_dict())
    grads = []
    for m in (copy.deepcopy(model), twin):
        out = m(x)
        (out["y"].sum() + out["z"].pow(2).sum()).backward()
        grads.append(m.lin.weight.grad)
    assert not torch.allclose(*grads)  # PyTorch: silently different gradients
    graph = _graph(model, x)
    errors = [h for h in graph.all_hazards() if h.severity == "error"]
    assert sorted((h.code.value, h.target.name) for h in errors) == [
        ("hidden-write-to-saved", "rm"), ("hidden-write-to-saved", "rv")]
    lines = [line for line in render.render_graph(graph, width=100).splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "buffer `rm` and buffer `rv` were saved" in lines[0]


def test_names_in_the_table_are_the_ones_the_user_wrote():
    # `inplace=True` reaches `F.relu` as a keyword and `F.hardswish` positionally: one spelling.
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.Hardswish(inplace=True))
    (graph,) = quiet_audit(model, torch.randn(2, 4)).graphs
    assert [m.op for m in graph.mutations] == ["relu(inplace=True)", "hardswish(inplace=True)"]
    assert graph.function == "forward"  # not Dynamo's wrapper `inner`


def test_an_intermediate_torch_named_is_shown_by_the_op_that_made_it():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x) * 2
            h.add_(1)  # `h`: the user's variable
            return nn.functional.relu(self.fc(h), inplace=True)  # writes what `linear` made

    (graph,) = quiet_audit(Named(), torch.randn(2, 4)).graphs
    first, second = graph.mutations
    assert (first.target.name, first.target.user_named) == ("h", True)
    assert (second.target.produced_by, second.target.user_named) == ("linear", False)
    text = render.render_graph(graph)
    assert "intermediate h" in text and "intermediate (output of linear)" in text


class ScaleInOneHead(nn.Module):
    """Both heads read `scale`; the depth head rescales it after seg used it (an error too)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.seg, self.depth = nn.Linear(4, 2), nn.Linear(4, 1)

    def forward(self, x):
        h = self.trunk(x)
        seg = self.seg(h * self.scale)
        with torch.no_grad():
            self.scale.clamp_(0.5, 2.0)
        return {"seg": seg, "depth": self.depth(h * self.scale)}


def test_a_write_by_one_task_to_a_shared_parameter_names_the_other_readers():
    # (Which tasks read a parameter is held to eager's gradients in test_tasks.py.)
    torch.manual_seed(0)
    (graph,) = quiet_audit(ScaleInOneHead(), torch.randn(3, 4)).graphs
    (mutation,) = graph.mutations
    assert graph.tasks_of(mutation) == ("depth",) and set(graph.shared_parameters["scale"]) == {"seg", "depth"}
    assert render._tasks_cell(graph.tasks_of(mutation), mutation, graph.shared_parameters,
                              graph.task_names) == "depth (read by seg too)"


class ScaleBufferInOneHead(ScaleInOneHead):
    """The same write to a buffer: no gradient says who reads it, the values do."""

    def __init__(self):
        super().__init__()
        del self.scale
        self.register_buffer("scale", torch.ones(4))


def test_a_write_by_one_task_to_a_buffer_another_reads_names_the_other_reader():
    torch.manual_seed(0)
    model, x = ScaleBufferInOneHead(), torch.randn(3, 4)
    before = model(x)
    model.scale.fill_(3.0)  # eager PyTorch: both heads' values move with the buffer
    after = model(x)
    assert all(not torch.equal(before[k], after[k]) for k in ("seg", "depth"))
    (graph,) = quiet_audit(model, x).graphs
    (mutation,) = graph.mutations
    assert mutation.target.kind == "buffer" and graph.tasks_of(mutation) == ("depth",)
    assert render._tasks_cell(graph.tasks_of(mutation), mutation, graph.shared_parameters,
                              graph.task_names) == "depth (read by seg too)"
    assert graph.to_dict()["mutations"][0]["read_by"] == ["depth", "seg"]
