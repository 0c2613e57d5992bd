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
from fxinplace.fixes._edits import move_step
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
assert CLIPPED != GAN


def _script(directory: pathlib.Path, text: str) -> pathlib.Path:
    directory.mkdir(exist_ok=True)
    path = directory / "train.py"
    path.write_text(text)
    return path


def _line(text: str, code: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.strip().startswith(code))


def _replaced(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def _run(directory: pathlib.Path, text: str) -> dict:
    return runpy.run_path(str(_script(directory, text)), run_name="__main__")


def _assert_same_parameters(got: dict, expected: dict, names) -> None:
    for name in names:
        torch.testing.assert_close(got[name], expected[name], msg=name)


PER_TASK_STEPS = "    loss_seg.backward(retain_graph=True)\n    opt.step()  # one step per task\n    loss_depth.backward()\n"
SUMMED = "    (loss_seg + loss_depth).backward()\n    opt.step()\n"


def test_a_step_per_task_moves_after_the_last_backward_and_then_takes_both_tasks_gradients(tmp_path):
    path = _script(tmp_path, PER_TASK_STEP)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        runpy.run_path(str(path), run_name="__main__")  # eager PyTorch fails
    (fix,) = loop_fixes(path)[0]
    assert fix.status is FixStatus.CHECKED and fix.kind is FixKind.MOVE_STEP
    assert fix.line == _line(PER_TASK_STEP, "opt.step()")
    assert {f.name for f in fix.findings} >= {"trunk.2.weight"}
    assert {f.backward_at.line for f in fix.findings} == {_line(PER_TASK_STEP, "loss_depth.backward()")}
    depth = _line(PER_TASK_STEP, "loss_depth.backward()")
    assert [(s.code, s.line) for s in fix.gradients_from] == [("loss_depth.backward()", depth)]
    assert "the step now also takes the gradients `loss_depth.backward()`" in FixReport((fix,)).render()
    assert path.read_text() == PER_TASK_STEP  # proposing writes nothing

    FixReport((fix,)).apply()
    patched = runpy.run_path(str(path), run_name="__main__")["result"]  # eager PyTorch trains it
    # What the fix says the step now takes, from PyTorch: each step on both tasks' summed loss.
    reference = _run(tmp_path / "reference", _replaced(PER_TASK_STEP, PER_TASK_STEPS, SUMMED))["result"]
    _assert_same_parameters(patched, reference, reference)


def test_an_optimizer_inside_a_function_is_measured_too(tmp_path):
    # The script's globals hold no optimizer: the gradients are read from what the backward reaches.
    text = "def main():\n" + textwrap.indent(PER_TASK_STEP, "    ") + "    return result\n\n\nresult = main()\n"
    (fix,) = loop_fixes(_script(tmp_path, text))[0]
    depth = _line(text, "loss_depth.backward()")
    assert fix.status is FixStatus.CHECKED and [(s.code, s.line) for s in fix.gradients_from] == \
        [("loss_depth.backward()", depth)]


def test_backward_calls_written_alike_are_told_apart_by_their_line(tmp_path):
    text = _replaced(PER_TASK_STEP, PER_TASK_STEPS,
                     "    loss_seg.backward(retain_graph=True)\n    opt.step()\n    loss_seg.backward(retain_graph=True)\n")
    (fix,) = loop_fixes(_script(tmp_path, text))[0]
    second = [i for i, line in enumerate(text.splitlines(), 1) if "loss_seg.backward" in line][1]
    assert fix.status is FixStatus.CHECKED and [s.line for s in fix.gradients_from] == [second]


def test_a_move_that_would_lose_a_tasks_gradient_is_refused(tmp_path):
    # `trunk.zero_grad()` between: moved after it, the step would no longer take loss_seg's gradient
    # on the trunk. PyTorch agrees: the moved loop's trunk trains on the depth loss alone.
    text = _replaced(PER_TASK_STEP, "    opt.step()  # one step per task\n",
                     "    opt.step()  # one step per task\n    trunk.zero_grad()\n")
    (fix,) = loop_fixes(_script(tmp_path, text))[0]
    assert (fix.status, fix.reason) == (FixStatus.CHECK_FAILED, NoFixReason.LOSES_GRADIENTS)
    assert "`loss_seg.backward(retain_graph=True)`" in fix.detail
    assert "no checked fix" in FixReport((fix,)).render()
    moved = move_step(text, fix.line, _line(text, "loss_depth.backward()"))
    depth_only = _replaced(PER_TASK_STEP, PER_TASK_STEPS, "    loss_depth.backward()\n    opt.step()\n")
    got, expected = _run(tmp_path / "moved", moved.text)["result"], _run(tmp_path / "depth", depth_only)["result"]
    _assert_same_parameters(got, expected, [n for n in expected if n.startswith(("0.", "2."))])  # the trunk's


@pytest.mark.parametrize("between", ["    sched.step()\n", "    opt.zero_grad()\n", "    h = h * 1\n"])
def test_a_step_is_not_moved_over_anything_but_backward_calls_and_other_zero_grads(tmp_path, between):
    text = _replaced(PER_TASK_STEP, "    opt.step()  # one step per task\n",
                     "    opt.step()  # one step per task\n" + between)
    text = _replaced(text, "for step in", "sched = torch.optim.lr_scheduler.StepLR(opt, 1)\nfor step in")
    (fix,) = loop_fixes(_script(tmp_path, text))[0]
    assert (fix.status, fix.reason, fix.diff) == (FixStatus.NO_SAFE_EDIT, NoFixReason.MOVES_OVER, "")


def test_a_discriminator_step_moves_and_then_takes_the_generators_gradients(tmp_path):
    path = _script(tmp_path, GAN)
    (fix,) = loop_fixes(path)[0]  # one entry for the two weights the step changed
    assert fix.status is FixStatus.CHECKED and fix.line == _line(GAN, "opt_d.step()")
    assert {f.name for f in fix.findings} == {"D.0.weight", "D.2.weight"}
    assert [(s.code, s.line) for s in fix.gradients_from] == [("loss_g.backward()", _line(GAN, "loss_g.backward()"))]
    changed = [line for line in fix.diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ["-    opt_d.step()", "+    opt_d.step()"]
    data = FixReport((fix,)).to_dict()
    assert {f["tensor"] for f in data["fixes"][0]["findings"]} == {"D.0.weight", "D.2.weight"}
    assert data["fixes"][0]["hazards"] == [] and data["fixes"][0]["gradients_from"][0]["code"] == "loss_g.backward()"
    # PyTorch: after one moved step, D is where a step on the gradients of loss_d + loss_g puts it.
    FixReport((fix,)).apply()
    one_step = _replaced(path.read_text(), "for step in range(3):", "for step in range(1):")
    block = ("    opt_d.zero_grad()\n    loss_d.backward(retain_graph=True)\n    opt_d.step()\n    opt_g.zero_grad()\n"
             "    loss_g.backward()\n    opt_g.step()\n")
    reference = _replaced(_replaced(GAN, "for step in range(3):", "for step in range(1):"), block,
                          "    summed = torch.autograd.grad(loss_d + loss_g, list(D.parameters()), retain_graph=True)\n"
                          "    opt_g.zero_grad()\n    loss_g.backward()\n"
                          "    for p, g in zip(D.parameters(), summed):\n        p.grad = g\n"
                          "    opt_d.step()\n    opt_g.step()\n")
    got, expected = _run(tmp_path / "moved", one_step), _run(tmp_path / "summed", reference)
    _assert_same_parameters(got["D"].state_dict(), expected["D"].state_dict(), expected["D"].state_dict())


FROZEN_FOR_G = _replaced(GAN, "    out_fake = D(fake)\n    loss_d = bce(D(real), torch.ones(16, 1)) + bce(out_fake, torch.zeros(16, 1))\n"
                         "    loss_g = bce(out_fake, torch.ones(16, 1))\n",
                         "    loss_d = bce(D(real), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))\n"
                         "    D.requires_grad_(False)\n    loss_g = bce(D(fake), torch.ones(16, 1))\n"
                         "    D.requires_grad_(True)\n")


def test_a_step_whose_parameters_the_later_backward_does_not_reach_keeps_the_same_gradients(tmp_path):
    # D is frozen for the generator's forward: loss_g's backward reads D's weights, adds nothing to them.
    path = _script(tmp_path, FROZEN_FOR_G)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        runpy.run_path(str(path), run_name="__main__")
    (fix,) = loop_fixes(path)[0]
    assert fix.status is FixStatus.CHECKED and fix.gradients_from == ()
    assert "same gradients: the step runs after the backward" in FixReport((fix,)).render()
    # PyTorch: one moved step leaves D where a step on loss_d alone does.
    FixReport((fix,)).apply()
    got = _run(tmp_path / "moved", _replaced(path.read_text(), "range(3)", "range(1)"))
    alone = _replaced(_replaced(FROZEN_FOR_G, "range(3)", "range(1)"), "    loss_g.backward()\n", "")
    expected = _run(tmp_path / "alone", alone)
    _assert_same_parameters(got["D"].state_dict(), expected["D"].state_dict(), expected["D"].state_dict())


def test_a_write_that_is_no_step_gets_the_guards_advice_and_no_edit(tmp_path):
    path = _script(tmp_path, CLIPPED)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        runpy.run_path(str(path), run_name="__main__")
    fixes = loop_fixes(path)[0]
    assert {(f.status, f.reason) for f in fixes} == {(FixStatus.NO_SAFE_EDIT, NoFixReason.NOT_A_STEP)}
    assert {w.kind for f in fixes for s in f.findings for w in s.writes} == {WriteKind.OPTIMIZER, WriteKind.INPLACE}
    shown = FixReport(tuple(fixes)).render()
    assert "no safe edit: not every write to it is an optimizer step" in shown
    assert f"advice: {advice(fixes[0].findings[0])}" in shown


def test_a_loop_that_trains_needs_no_fix(tmp_path):
    path = _script(tmp_path, _replaced(PER_TASK_STEP, PER_TASK_STEPS,
                                       "    loss_seg.backward(retain_graph=True)\n    loss_depth.backward()\n"
                                       "    opt.step()\n"))
    runpy.run_path(str(path), run_name="__main__")  # eager PyTorch trains it
    assert loop_fixes(path)[0] == []


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


def test_a_script_that_fails_when_watched_says_how_far_its_loop_was_checked(tmp_path, capsys):
    from fxinplace import cli

    text = _replaced(PER_TASK_STEP, PER_TASK_STEPS, "    loss_seg.backward(retain_graph=True)\n"
                     "    loss_depth.backward()\n    opt.step()\n    raise ValueError('no more data')\n")
    path = _script(tmp_path, text)
    with pytest.raises(ValueError, match="no more data"):
        runpy.run_path(str(path), run_name="__main__")
    assert cli.main(["fix", str(path)]) == 0  # nothing to fix, and no in-place error unexplained
    err = capsys.readouterr().err
    assert "the script failed when run watched for its loop's findings (ValueError: no more data)" in err
