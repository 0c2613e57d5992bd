"""Fix-its for the guard's loop findings: a step between two backward calls moves after the
second. The truth: eager PyTorch fails on the original loop and trains the patched one, and the
patched step takes the gradients the fix says it takes (against a step PyTorch computes from
the summed losses)."""

from __future__ import annotations

import os
import pathlib
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

from fxinplace.facts import FixKind, FixStatus, NoFixReason
from fxinplace.fixes import FixReport
from fxinplace.fixes._loop import loop_fixes
from fxinplace.training_guard import WriteKind
from fxinplace.training_guard._render import advice

PER_TASK_STEP = textwrap.dedent('''
    import torch
    from torch import nn

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
    heads = nn.ModuleDict({"seg": nn.Linear(8, 2), "depth": nn.Linear(8, 1)})
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
    for step in range(3):
        h = trunk(torch.randn(8, 4))
        loss_seg = heads["seg"](h).pow(2).mean()
        loss_depth = heads["depth"](h).abs().mean()
        opt.zero_grad()
        loss_seg.backward(retain_graph=True)
        opt.step()  # one step per task
        loss_depth.backward()
    result = {**trunk.state_dict(), **heads.state_dict()}
''')

GAN = textwrap.dedent('''
    import torch
    from torch import nn

    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
    D = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    for step in range(3):
        real, z = torch.randn(16, 4), torch.randn(16, 2)
        fake = G(z)
        out_fake = D(fake)
        loss_d = bce(D(real), torch.ones(16, 1)) + bce(out_fake, torch.zeros(16, 1))
        loss_g = bce(out_fake, torch.ones(16, 1))
        opt_d.zero_grad()
        loss_d.backward(retain_graph=True)
        opt_d.step()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    print("trained")
''')

CLIPPED = GAN.replace("    opt_d.step()\n", "    opt_d.step()\n    with torch.no_grad():\n"
                      "        for p in D.parameters():\n            p.clamp_(-0.01, 0.01)\n")


def _script(directory: pathlib.Path, text: str) -> pathlib.Path:
    directory.mkdir(exist_ok=True)
    path = directory / "train.py"
    path.write_text(text)
    return path


def _line(text: str, code: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.strip().startswith(code))


def test_a_step_per_task_moves_after_the_last_backward_and_then_takes_both_tasks_gradients(tmp_path):
    path = _script(tmp_path, PER_TASK_STEP)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        runpy.run_path(str(path), run_name="__main__")  # eager PyTorch fails
    (fix,) = loop_fixes(path)
    assert fix.status is FixStatus.CHECKED and fix.kind is FixKind.MOVE_STEP
    assert fix.line == _line(PER_TASK_STEP, "opt.step()")
    assert fix.finding.name == "trunk.2.weight" and fix.finding.backward_at.line == _line(PER_TASK_STEP, "loss_depth.backward()")
    assert [(s.code, s.line) for s in fix.gradients_from] == [("loss_depth.backward()", _line(PER_TASK_STEP, "loss_depth.backward()"))]
    assert "the step now also takes the gradients `loss_depth.backward()`" in FixReport((fix,)).render()
    assert path.read_text() == PER_TASK_STEP  # proposing writes nothing

    FixReport((fix,)).apply()
    patched = runpy.run_path(str(path), run_name="__main__")["result"]  # eager PyTorch trains it
    # What the fix says the step now takes, from PyTorch: each step on both tasks' summed loss.
    summed = PER_TASK_STEP.replace(
        "    loss_seg.backward(retain_graph=True)\n    opt.step()  # one step per task\n"
        "    loss_depth.backward()\n", "    (loss_seg + loss_depth).backward()\n    opt.step()\n")
    assert summed != PER_TASK_STEP
    reference = runpy.run_path(str(_script(tmp_path / "reference", summed)), run_name="__main__")["result"]
    for name in reference:
        torch.testing.assert_close(patched[name], reference[name], msg=name)


def test_a_discriminator_step_moves_and_says_it_now_takes_the_generators_gradients(tmp_path):
    path = _script(tmp_path, GAN)
    (fix,) = loop_fixes(path)
    assert fix.status is FixStatus.CHECKED and fix.line == _line(GAN, "opt_d.step()")
    assert [(s.code, s.line) for s in fix.gradients_from] == [("loss_g.backward()", _line(GAN, "loss_g.backward()"))]
    changed = [line for line in fix.diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ["-    opt_d.step()", "+    opt_d.step()"]
    data = FixReport((fix,)).to_dict()
    assert data["fixes"][0]["finding"]["tensor"] == "D.2.weight" and data["fixes"][0]["hazards"] == []
    assert data["fixes"][0]["gradients_from"][0]["code"] == "loss_g.backward()"


def test_a_write_that_is_no_step_gets_the_guards_advice_and_no_edit(tmp_path):
    assert CLIPPED != GAN
    path = _script(tmp_path, CLIPPED)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        runpy.run_path(str(path), run_name="__main__")
    fixes = loop_fixes(path)
    assert [(f.status, f.reason) for f in fixes] == [(FixStatus.NO_SAFE_EDIT, NoFixReason.NOT_A_STEP)]
    assert [w.kind for w in fixes[0].finding.writes][:2] == [WriteKind.OPTIMIZER, WriteKind.INPLACE]
    shown = FixReport(tuple(fixes)).render()
    assert "no safe edit: not every write to it is an optimizer step" in shown
    assert f"advice: {advice(fixes[0].finding)}" in shown


def test_a_loop_that_trains_needs_no_fix(tmp_path):
    text = PER_TASK_STEP.replace("    opt.step()  # one step per task\n    loss_depth.backward()\n",
                                 "    loss_depth.backward()\n    opt.step()\n")
    assert text != PER_TASK_STEP
    path = _script(tmp_path, text)
    runpy.run_path(str(path), run_name="__main__")  # eager PyTorch trains it
    assert loop_fixes(path) == []


def test_fix_apply_on_the_command_line_makes_a_gan_loop_train(tmp_path):
    path = _script(tmp_path, GAN)

    def python(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"})

    plain = python("train.py")
    assert plain.returncode == 1 and "modified by an inplace operation" in plain.stderr  # PyTorch's verdict
    fixed = python("-m", "fxinplace", "fix", "--apply", "train.py")
    assert fixed.returncode == 0, fixed.stderr
    assert "fix (move-step) at train.py:" in fixed.stdout and "checked fixes: 1 of 1" in fixed.stdout
    assert path.read_text() != GAN
    trained = python("train.py")
    assert trained.returncode == 0 and "trained" in trained.stdout, trained.stderr
