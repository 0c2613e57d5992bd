"""The same facts on a CUDA device: skipped where there is no GPU.

CUDA tensors take other kernels, another fake-tensor device and (under Inductor) Triton code
instead of C++, so each check that the CPU suite makes against PyTorch is repeated here on
`cuda`: the writes eager makes, the hazards eager raises or silently computes wrongly, the
hand-off to Inductor, and the training-loop guard.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxinplace
from conftest import assert_close_at_scale, eager_backward_error, eager_effects, eager_writes, marked_line, quiet_audit, total_loss
from test_hazards import HAZARDOUS, SharedLatent, Decoder, _pytorch_says_hazardous
import test_mutations
from test_mutations import CASES, _model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda(args):
    return tuple(a.cuda() for a in args)


@pytest.mark.parametrize("body, kw", CASES.values(), ids=CASES.keys())
def test_mutations_match_eager_on_cuda(body, kw):
    model, x = _model(body, **kw).cuda(), torch.randn(3, 4, device="cuda")
    written = eager_writes(model, {"x": x}, test_mutations.__file__)
    effects = eager_effects(model, {"x": x})
    report = quiet_audit(model, x.clone())

    expected = {k for k in written if k[0] != "intermediate"} | set(effects.changed)
    assert {(m.target.kind, m.target.name) for m in report.mutations if m.target.kind != "intermediate"} == expected
    for key, lines in written.items():
        ours = [m for m in report.mutations if (m.target.kind, m.target.name if key[1] else None) == key]
        assert {m.source.line for m in ours} == lines, f"lines of {key}"
    for m in report.mutations:
        if m.target.kind != "intermediate":
            # autograd sees a write exactly when the version counter of the target moved.
            assert m.autograd_visible == ((m.target.kind, m.target.name) in effects.version_moved)


@pytest.mark.parametrize("cls, make_args", HAZARDOUS.values(), ids=HAZARDOUS.keys())
def test_hazards_on_cuda_match_pytorch(cls, make_args):
    torch.manual_seed(0)
    model, args = cls().cuda(), _cuda(make_args())
    twin = cls(oop=True).cuda()
    twin.load_state_dict(model.state_dict())
    assert _pytorch_says_hazardous(model, twin, args)

    errors = quiet_audit(copy.deepcopy(model), *[a.clone() for a in args]).hazards("error")
    culprit = marked_line(cls if cls is not SharedLatent else Decoder, "CULPRIT")
    assert culprit in {h.source.line for h in errors}
    assert eager_backward_error(twin, *args) is None
    assert quiet_audit(copy.deepcopy(twin), *[a.clone() for a in args]).hazards("error") == []


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True))
        self.a, self.b = nn.Linear(32, 4), nn.Linear(32, 2)

    def forward(self, x):
        h = self.trunk(x)
        h = h * 0.5
        h.add_(1.0)  # safe: the scalar multiply saved nothing
        return {"a": self.a(h), "b": self.b(h).sigmoid()}


def test_audit_hands_inductor_the_graph_and_triton_runs_it():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    ours, plain = Heads().cuda(), Heads().cuda()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(8, 16, device="cuda")
    backend = fxinplace.InplaceAudit(compiler="inductor", print=False)
    out, (code, *_) = run_and_get_code(torch.compile(ours, backend=backend), x)
    assert "triton" in code  # Inductor generated GPU code, not C++
    expected = torch.compile(plain, backend="inductor")(x)
    for key in expected:
        assert_close_at_scale(out[key], expected[key])
    total_loss(out).backward()
    total_loss(expected).backward()
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        assert_close_at_scale(p.grad, q.grad, msg=name)
    (graph,) = backend.report.graphs
    assert {m.target.name for m in graph.mutations if m.target.kind == "buffer"} >= {"trunk.1.running_mean"}


def test_guard_on_cuda_names_the_parameter_the_step_wrote():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6)).cuda()
    disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)).cuda()
    opt_d = torch.optim.Adam(disc.parameters())
    z, real = torch.randn(8, 4, device="cuda"), torch.randn(8, 6, device="cuda")

    def loop():
        fake = gen(z)
        loss_d = disc(real).mean() - disc(fake.detach()).mean()
        loss_g = disc(fake).mean()
        loss_d.backward()
        opt_d.step()
        loss_g.backward()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loop()  # PyTorch itself, unguarded
    with pytest.raises(fxinplace.StaleSavedTensorError) as info:
        with fxinplace.guard({"gen": gen, "disc": disc}, optimizers={"opt_d": opt_d}):
            loop()
    assert info.value.stale.name == "disc.2.weight"
    assert info.value.stale.writes[0].by == "`opt_d.step()` (Adam)"
