"""Per-task subgraphs: task names, which parameters tasks share, which tasks a write touches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxinplace
from conftest import quiet_audit


class ThreeTasks(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"seg": nn.Linear(8, 2), "depth": nn.Linear(8, 1), "normal": nn.Linear(8, 3)})
        self.bridge = nn.Parameter(torch.ones(8))  # read by seg and depth only

    def forward(self, x):
        h = self.trunk(x)
        g = h * self.bridge
        g.add_(1)  # feeds seg and depth
        return {
            "seg": self.heads["seg"](g),
            "depth": self.heads["depth"](g),
            "normal": self.heads["normal"](h),
        }


def _tasks_reaching(model, x, tasks=("seg", "depth", "normal")) -> dict[str, set[str]]:
    """PyTorch's answer: for each parameter, the tasks whose loss gives it a gradient."""
    reached: dict[str, set[str]] = {}
    for task in tasks:
        model.zero_grad()
        model(x)[task].sum().backward()
        for name, p in model.named_parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                reached.setdefault(name, set()).add(task)
    return reached


def test_shared_parameters_match_the_gradients_of_each_task():
    torch.manual_seed(0)
    model, x = ThreeTasks(), torch.randn(5, 4)
    expected = {name: tasks for name, tasks in _tasks_reaching(model, x).items() if len(tasks) > 1}
    graph = quiet_audit(model, x).graphs[0]
    assert {name: set(tasks) for name, tasks in graph.shared_parameters.items()} == expected
    assert graph.tasks == ("seg", "depth", "normal")


def test_a_write_belongs_to_the_tasks_that_read_it():
    torch.manual_seed(0)
    (graph,) = quiet_audit(ThreeTasks(), torch.randn(5, 4)).graphs
    (mutation,) = graph.mutations
    assert graph.tasks_of(mutation) == ("depth", "seg") and mutation.shared


def test_the_backend_names_tasks_by_output_key_as_the_audit_does():
    # One rule: the key a task's tensor is returned under, whoever reports it.
    torch.manual_seed(0)
    model, x = ThreeTasks(), torch.randn(5, 4)
    assert _compiled_tasks(model) == quiet_audit(model, x).graphs[0].tasks == ("seg", "depth", "normal")


class TupleOfHeads(ThreeTasks):
    def forward(self, x):
        out = super().forward(x)
        return out["seg"], out["depth"], out["normal"]


def test_without_output_keys_tasks_are_named_by_head_module():
    torch.manual_seed(0)
    model, x = TupleOfHeads(), torch.randn(5, 4)
    assert _compiled_tasks(model) == quiet_audit(model, x).graphs[0].tasks == ("heads.seg", "heads.depth", "heads.normal")


@pytest.mark.parametrize(
    "tasks, expected",
    [
        ({"S": "heads.seg", "D": "heads.depth", "N": "heads.normal"}, ("S", "D", "N")),
        ({"S": "heads.seg"}, ("S", "heads.depth", "heads.normal")),
    ],
    ids=["all named", "one named"],
)
def test_tasks_option_names_tasks_by_module_prefix(tasks, expected):
    assert _compiled_tasks(TupleOfHeads(), tasks=tasks) == expected


def test_tasks_option_names_tasks_by_output_key():
    graph = quiet_audit(ThreeTasks(), torch.randn(5, 4), tasks={"segmentation": "seg"}).graphs[0]
    assert graph.tasks == ("segmentation", "depth", "normal")
    assert _compiled_tasks(ThreeTasks(), tasks={"segmentation": "seg"}) == graph.tasks


def _compiled_tasks(model, **options):
    import fxinplace

    backend = fxinplace.InplaceAudit(compiler="eager", print=False, **options)
    torch.compile(model, backend=backend)(torch.randn(5, 4))
    return backend.report.graphs[0].tasks


class StoresAttention(nn.Module):
    """A forward that keeps a tensor on `self` (an attention map for visualisation): no loss
    comes from it, so it is no task, though Dynamo returns it from the graph."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({"seg": nn.Linear(8, 2), "depth": nn.Linear(8, 1)})

    def forward(self, x):
        h = self.trunk(x)
        g = h * 2
        self.last_attention = torch.softmax(g @ g.T, dim=-1)  # reads g before the write
        g.add_(1)
        return {"seg": self.heads["seg"](g), "depth": self.heads["depth"](h)}


def test_a_tensor_stored_on_the_module_is_no_task():
    torch.manual_seed(0)
    model, x = StoresAttention(), torch.randn(5, 4)
    result = model(x)
    expected = {name: tasks for name, tasks in _tasks_reaching(model, x, tuple(result)).items() if len(tasks) > 1}
    graph = _compiled_graph(model)
    assert graph.tasks == tuple(result) == ("seg", "depth")
    assert {name: set(tasks) for name, tasks in graph.shared_parameters.items()} == expected
    (write,) = graph.mutations
    # Before: the stored map was task `output[2]`, and `g.add_` a cross-task write between it and seg.
    assert graph.tasks_of(write) == ("seg",) and not write.shared
    (hazard,) = write.hazards
    assert hazard.code.value == "saved-then-mutated" and hazard.stored_only and hazard.severity.value == "warning"
    # PyTorch's answer: the tasks' losses train; only a loss from the stored map fails.
    result = model(x)
    (result["seg"].sum() + result["depth"].sum()).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model.last_attention.sum().backward()
    assert fxinplace.OutputRole(fxinplace.OutputKind.STORED, "last_attention") in graph.outputs
    assert "stored, not returned (no task's loss comes from them here): `.last_attention`" in graph.render()


class BreaksBetweenHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"seg": nn.Linear(8, 2), "depth": nn.Linear(8, 1)})

    def forward(self, x):
        h = self.trunk(x)
        seg = self.heads["seg"](h)
        torch._dynamo.graph_break()
        return {"seg": seg, "depth": self.heads["depth"](h)}


def test_a_graph_that_ends_in_a_break_says_its_tasks_cannot_be_told():
    torch.manual_seed(0)
    model, x = BreaksBetweenHeads(), torch.randn(5, 4)
    before, after = _compiled_graphs(model)
    # Its outputs are `h` and `seg`, live across the break; before, `h` was a task called `trunk`.
    assert before.tasks == () and {r.path for r in before.outputs} == {"h", "seg"}
    assert "tasks: cannot be told in this graph: it ends at a graph break" in before.render()
    assert after.tasks == ("depth",)
    # `fxinplace.audit` sees the model's result: `seg` left the first graph as it is returned.
    audited_before, audited_after = quiet_audit(model, x).graphs
    assert audited_before.tasks == ("seg",) and audited_after.tasks == ("depth",)


def _compiled_graphs(model, **options):
    backend = fxinplace.InplaceAudit(compiler="eager", print=False, **options)
    torch.compile(model, backend=backend)(torch.randn(5, 4))
    return backend.report.graphs


def _compiled_graph(model, **options):
    (graph,) = _compiled_graphs(model, **options)
    return graph
