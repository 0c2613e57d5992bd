"""What real models bring: graph breaks, recompiles, dynamic shapes, grad modes, custom ops and
autograd Functions, odd outputs and dtypes, several models, DDP, faults in every stage."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fxinplace
import fxinplace.backend
from conftest import assert_close_at_scale, eager_backward_error, eager_writes, marked_line, quiet_audit

AUTOGRAD_ERROR = "modified by an inplace operation"


def strict_backend(**options):
    return fxinplace.InplaceAudit(compiler="eager", print=False, strict=True, **options)


class SavedAcrossBreak(nn.Module):
    def __init__(self, oop=False):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.oop = oop

    def forward(self, x):
        h = torch.sigmoid(self.fc(x))  # sigmoid saves its output
        torch._dynamo.graph_break()
        if self.oop:
            h = h * 2
        else:
            h.mul_(2)  # CULPRIT
        return h


@pytest.mark.parametrize("oop", [False, True], ids=["in place", "out of place"])
def test_tensor_saved_in_one_graph_and_mutated_in_the_next(oop):
    model, x = SavedAcrossBreak(oop), torch.randn(2, 3)
    raises = eager_backward_error(model, x) is not None
    assert raises == (not oop)
    backend = strict_backend()
    out = torch.compile(model, backend=backend)(x)
    assert len(backend.report.graphs) == 2
    errors = backend.report.hazards("error")
    assert bool(errors) == raises
    if raises:
        assert errors[0].source.line == marked_line(SavedAcrossBreak, "CULPRIT")
        assert errors[0].detail is fxinplace.Detail.CROSSED_BREAK
        with pytest.raises(RuntimeError, match=AUTOGRAD_ERROR):
            out.sum().backward()


class SavesInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x


class SavesNothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


@pytest.mark.parametrize("function", [SavesInput, SavesNothing], ids=lambda f: f.__name__)
def test_custom_autograd_function(function):
    class Model(nn.Module):
        def forward(self, x):
            h = x * 1.5
            y = function.apply(h)
            h.add_(1)
            return y

    x = torch.randn(3, requires_grad=True)
    raises = eager_backward_error(Model(), x) is not None
    assert raises == (function is SavesInput)  # PyTorch: only a saved input breaks backward
    assert bool(quiet_audit(Model(), x).hazards("error")) == raises


@torch.library.custom_op("fxinplace_test::add_one_", mutates_args=("t",))
def add_one_(t: torch.Tensor) -> None:
    t.add_(1)


@add_one_.register_fake
def _(t):
    return None


def test_custom_op_with_mutable_argument_on_a_saved_tensor():
    class Model(nn.Module):
        def forward(self, x):
            h = x.exp()  # exp saves its output
            add_one_(h)
            return h

    x = torch.randn(3, requires_grad=True)
    assert AUTOGRAD_ERROR in eager_backward_error(Model(), x)
    (mutation,) = quiet_audit(Model(), x).mutations
    assert mutation.op == "fxinplace_test.add_one_.default"
    assert [h.code for h in mutation.hazards] == ["saved-then-mutated"]


def test_recompilation_and_dynamic_shapes_keep_one_report_per_graph():
    def f(x):
        h = x.sigmoid()
        h[:, 0] = 0
        return h

    backend = strict_backend()
    compiled = torch.compile(f, backend=backend, dynamic=True)
    for n in (3, 5, 7):
        compiled(torch.randn(n, 4, requires_grad=True))
    assert len(backend.report.graphs) == 1  # dynamic: one graph for all sizes
    assert [h.code for h in backend.report.hazards("error")] == ["saved-then-mutated"]

    torch._dynamo.reset()
    backend = strict_backend()
    compiled = torch.compile(f, backend=backend, dynamic=False)
    compiled(torch.randn(3, 4))
    compiled(torch.randn(3, 4, dtype=torch.float64))  # dtype change: recompiles
    assert [g.compile_id for g in backend.report.graphs] == ["0/0", "0/1"]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_grad_modes(mode):
    def f(x):
        h = x.exp()
        h.add_(1)
        return h

    x = torch.randn(3, requires_grad=True)
    backend = strict_backend()
    with mode():
        expected = f(x.clone())
        out = torch.compile(f, backend=backend)(x)
    assert_close_at_scale(out, expected)
    (mutation,) = backend.report.mutations
    assert mutation.under_no_grad and backend.report.hazards("error") == []


class OddOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        h.relu_()
        return {"seg": [h * 2, (h.sum(), 3)], "name": "model", "nothing": None, "depth": h.mean()}


def test_nested_and_non_tensor_outputs_name_tasks_by_path():
    report = quiet_audit(OddOutputs(), torch.randn(2, 3))
    assert set(report.graphs[0].tasks) == {"seg[0]", "seg[1][0]", "depth"}
    (mutation,) = report.mutations
    assert set(report.graphs[0].tasks_of(mutation)) == {"seg[0]", "seg[1][0]", "depth"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(6).reshape(2, 3),
        lambda: torch.tensor([[True, False, True], [False, True, True]]),
        lambda: torch.randn(2, 3, dtype=torch.cfloat),
        lambda: torch.randn(0, 3),
        lambda: torch.randn(1, 3, 2, 2).to(memory_format=torch.channels_last),
    ],
    ids=["int64", "bool", "complex64", "empty", "channels_last"],
)
def test_dtypes_and_layouts(make):
    def f(x):
        y = x.clone()
        y.mul_(2) if x.dtype != torch.bool else y.logical_not_()
        x[..., 0] = y[..., 0]
        return y

    x = make()
    expected_writes = eager_writes(_Wrap(f), {"x": x}, __file__)
    backend = strict_backend()
    torch.compile(f, backend=backend)(x.clone())
    found = {(m.target.kind, m.target.name if m.target.kind != "intermediate" else None) for m in backend.report.mutations}
    assert found == set(expected_writes)


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_several_models_in_one_process_keep_their_reports_apart():
    a, b = strict_backend(), strict_backend()
    torch.compile(OddOutputs(), backend=a)(torch.randn(2, 3))
    torch.compile(SavedAcrossBreak(), backend=b)(torch.randn(2, 3))
    assert len(a.report.graphs) == 1 and len(b.report.graphs) == 2
    assert a.report.mutations[0].op == "relu_" and b.report.mutations[0].op == "mul_"


STAGES = [
    "fxinplace.backend.trace_mutations",
    "fxinplace.backend.split_tasks",
    "fxinplace.backend.find_hazards",
    "fxinplace.backend.saves_for_later_graphs",
    "fxinplace.render.render_graph",
]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.rsplit(".", 1)[1])
def test_a_fault_in_any_stage_warns_and_the_model_still_trains(stage, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(f"injected into {stage}")

    monkeypatch.setattr(stage, broken)
    torch.manual_seed(0)
    model, x = SavedAcrossBreak(oop=True), torch.randn(2, 3)
    reference = copy.deepcopy(model)
    backend = fxinplace.InplaceAudit(compiler="aot_eager")
    with pytest.warns(fxinplace.AnalysisWarning, match="injected into"):
        out = torch.compile(model, backend=backend)(x)
    out.sum().backward()
    reference(x).sum().backward()
    assert_close_at_scale(out, reference(x))
    assert_close_at_scale(model.fc.weight.grad, reference.fc.weight.grad)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="injected into"):
        torch.compile(copy.deepcopy(reference), backend=fxinplace.InplaceAudit(compiler="eager", strict=True))(x)


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="file://" + sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    import fxinplace
    backend = fxinplace.InplaceAudit(compiler="aot_eager", file=sys.argv[3])
    # In torch 2.13 Dynamo skips DDP's own forward (`_inside_ddp_forward`), so
    # torch.compile(ddp) hands no graph to any backend: compile the module inside DDP.
    compiled = nn.parallel.DistributedDataParallel(torch.compile(model, backend=backend), bucket_cap_mb=1)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    losses = []
    for step in range(3):
        torch.manual_seed(step)
        out = compiled(torch.randn(8, 512))
        loss = out.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    print(f"rank {rank} graphs {len(backend.report.graphs)} losses {losses}")
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    init, tables = tmp_path / "init", str(tmp_path / "tables-{rank}.txt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(init), tables], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for r in range(2)
    ]
    results = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    graphs = [int(out.split("graphs ")[1].split()[0]) for out, _ in results]
    assert all(g > 1 for g in graphs), "DDP should split the graph at bucket boundaries"
    for rank in range(2):
        text = (tmp_path / f"tables-{rank}.txt").read_text()
        heads = [line for line in text.splitlines() if "fxinplace: graph" in line]
        assert len(heads) == graphs[rank] and all(h.startswith(f"[rank {rank}] ") for h in heads)


def test_an_augmented_assignment_under_inference_mode_is_a_write():
    # `h += 1` (operator.iadd in Dynamo's graph) under inference_mode: found, and the model computes as eager.
    def f(x):
        h = x.exp()
        h += 1
        return h

    x = torch.randn(3)
    backend = strict_backend()
    with torch.inference_mode():
        expected = f(x.clone())
        out = torch.compile(f, backend=backend)(x)
    assert_close_at_scale(out, expected)
    (mutation,) = backend.report.mutations
    assert mutation.op == "+=" and mutation.target.kind == "intermediate"
