"""Per-task subgraphs: task names, which parameters tasks share, which tasks a write touches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


def _tasks_reaching(model, x) -> dict[str, set[str]]:
    """PyTorch's answer: for each parameter, the tasks whose loss gives it a gradient."""
    reached: dict[str, set[str]] = {}
    for task in ("seg", "depth", "normal"):
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


def test_without_output_keys_tasks_are_named_by_head_module():
    backend_tasks = _compiled_tasks(ThreeTasks())
    assert backend_tasks == ("heads.seg", "heads.depth", "heads.normal")


@pytest.mark.parametrize(
    "tasks, expected",
    [
        ({"S": "heads.seg", "D": "heads.depth", "N": "heads.normal"}, ("S", "D", "N")),
        ({"S": "heads.seg"}, ("S", "heads.depth", "heads.normal")),
    ],
    ids=["all named", "one named"],
)
def test_tasks_option_names_tasks_by_module_prefix(tasks, expected):
    assert _compiled_tasks(ThreeTasks(), tasks=tasks) == expected


def test_tasks_option_names_tasks_by_output_key_in_audit():
    graph = quiet_audit(ThreeTasks(), torch.randn(5, 4), tasks={"segmentation": "seg"}).graphs[0]
    assert graph.tasks == ("segmentation", "depth", "normal")


def _compiled_tasks(model, **options):
    import fxinplace

    backend = fxinplace.InplaceAudit(compiler="eager", print=False, **options)
    torch.compile(model, backend=backend)(torch.randn(5, 4))
    return backend.report.graphs[0].tasks
