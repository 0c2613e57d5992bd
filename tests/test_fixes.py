"""Fix-its: each error gets a patch of the user's file that is checked before it is shown, or a
reason why none is. The truth: eager PyTorch fails on the original, trains on the patched file,
and the patched file trains with the gradients of the functionalized original (the same
program written out of place)."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import torch

import fxinplace
from fxinplace.fixes import FixKind, FixStatus, NoFixReason, propose_fixes

MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    import torch.nn.functional as F


    class ScaleAfterSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            h.mul_(2)  # sigmoid saved h
            return h.sum(1)


    class TwoWrites(ScaleAfterSigmoid):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            h.mul_(2)
            g = self.block(h)
            g += 1  # tanh saved g
            return {"a": g.sum(1), "b": super().forward(x)}


    class SliceAfterSigmoid(ScaleAfterSigmoid):
        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            h[:, 0] = 0.0
            return h.sum(1)


    class ReluModuleAfterSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.ReLU(inplace=True))

        def forward(self, x):
            return self.trunk(x).sum(1)


    class FunctionalInplace(ScaleAfterSigmoid):
        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            F.relu(h, inplace=True)
            return h.sum(1)


    class TorchFunctionInplace(ScaleAfterSigmoid):
        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            torch.relu_(h)  # a function of the module `torch`, which must not be rebound
            return h.sum(1)


    class WritesAView(ScaleAfterSigmoid):
        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            v = h[:, :2]
            v.mul_(2)  # written out of place, `h` would keep its values: no fix
            return h.sum(1)


    class WritesAnUnnamedView(ScaleAfterSigmoid):
        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            h[:, 0].mul_(2)  # a view of h, written: a clone of h first
            return h.sum(1)


    class WritesModuleState(ScaleAfterSigmoid):
        def forward(self, x):
            self.h = torch.sigmoid(self.fc(x))
            self.h.mul_(2)  # an attribute: a new tensor would rebind the module's state
            return self.h.sum(1)


    class FlagNamedInplace(ScaleAfterSigmoid):
        def __init__(self, inplace=True):
            super().__init__()
            self.inplace = inplace  # the user's own flag: not an `nn.ReLU(inplace=True)`

        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            if self.inplace:
                h.mul_(2)
            return h.sum(1)


    class HoldsFlagNamedInplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = FlagNamedInplace()

        def forward(self, x):
            return self.inner(x)


    class NoGradWriteOfInputs(nn.Module):
        def forward(self, x):
            h = torch.tanh(x)
            with torch.no_grad():
                h[h > 0] = 1.0  # tanh saved h; a copy made here would have no history
            return h * 2


    class SavedAcrossBreak(ScaleAfterSigmoid):
        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            torch._dynamo.graph_break()
            h.mul_(2)  # saved in the first graph, written in the second
            return h.sum(1)


    class SavedAcrossBreakTwin(ScaleAfterSigmoid):
        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            h = h * 2
            return h.sum(1)
''')


def _load(path, name="models_under_fix"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path, _load(path)


def _step(model, x, run=None):
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    out = (run if run is not None else model)(x)
    loss = sum(t.sum() for t in (out.values() if isinstance(out, dict) else [out]))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _functionalized_step(model, x):
    compiled = torch.compile(model, backend=fxinplace.InplaceAudit(compiler="eager", functionalize=True, print=False))
    return _step(model, x, compiled)


@pytest.mark.parametrize("name, kind, edited", [
    ("ScaleAfterSigmoid", FixKind.OUT_OF_PLACE, ["-        h.mul_(2)  # sigmoid saved h",
                                                 "+        h = h.mul(2)  # sigmoid saved h"]),
    ("SliceAfterSigmoid", FixKind.CLONE_FIRST, ["+        h = h.clone()"]),
    ("WritesAnUnnamedView", FixKind.CLONE_FIRST, ["+        h = h.clone()"]),
    ("HoldsFlagNamedInplace", FixKind.OUT_OF_PLACE, ["-            h.mul_(2)", "+            h = h.mul(2)"]),
    ("FunctionalInplace", FixKind.INPLACE_FALSE, ["-        F.relu(h, inplace=True)",
                                                  "+        h = F.relu(h, inplace=False)"]),
    ("TorchFunctionInplace", FixKind.OUT_OF_PLACE, [
        "-        torch.relu_(h)  # a function of the module `torch`, which must not be rebound",
        "+        h = torch.relu(h)  # a function of the module `torch`, which must not be rebound"]),
    ("ReluModuleAfterSigmoid", FixKind.INPLACE_FALSE, [
        "-        self.trunk = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.ReLU(inplace=True))",
        "+        self.trunk = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.ReLU(inplace=False))"]),
])
def test_a_checked_fix_makes_the_model_train_like_the_functionalized_original(models, name, kind, edited):
    path, module = models
    torch.manual_seed(0)
    model, x = getattr(module, name)(), torch.randn(3, 4)
    reference = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _step(model, x)  # eager PyTorch fails on the original
    (fix,) = propose_fixes(model, x).fixes
    assert fix.status is FixStatus.CHECKED and fix.kind is kind and fix.file == str(path)
    changed = [line for line in fix.diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == edited
    assert path.read_text() == MODELS  # proposing writes nothing
    fxinplace.fixes.FixReport((fix,)).apply()
    patched = getattr(_load(path), name)()
    patched.load_state_dict(reference)
    model.load_state_dict(reference)
    expected = _functionalized_step(model, x)
    got = _step(patched, x)  # eager PyTorch trains the patched file
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], msg=n)


def test_the_fixes_of_one_file_apply_together(models):
    # Three writes: two in `TwoWrites.forward`, one in the base class's forward it calls.
    path, module = models
    torch.manual_seed(0)
    model, x = module.TwoWrites(), torch.randn(3, 4)
    report = propose_fixes(model, x)
    assert [f.status for f in report.fixes] == [FixStatus.CHECKED] * 3 and len({f.line for f in report.fixes}) == 3
    assert report.apply() == [str(path)]
    text = path.read_text()
    assert "h = h.mul(2)\n" in text and "h = h.mul(2)  # sigmoid saved h" in text and "g = g + 1  # tanh saved g" in text
    fixed = _load(path).TwoWrites()
    fixed.load_state_dict(model.state_dict())
    torch.testing.assert_close(_step(fixed, x), _functionalized_step(model, x))


def test_an_edit_that_changes_what_the_model_computes_is_not_proposed(models):
    # Written out of place, `v` no longer aliases `h`: the output would lose the doubling.
    _, module = models
    torch.manual_seed(0)
    (fix,) = propose_fixes(module.WritesAView(), torch.randn(3, 4)).fixes
    assert fix.status is FixStatus.CHECK_FAILED and fix.reason is NoFixReason.DIFFERENT_GRADIENTS
    assert "no checked fix" in fxinplace.fixes.FixReport((fix,)).render()


def test_an_edit_that_cuts_the_gradient_of_an_input_is_not_proposed(models):
    # Under no_grad, `h = h.clone()` has no history: the caller's `x` would get no gradient.
    path, module = models
    model, x = module.NoGradWriteOfInputs(), torch.randn(3, 4, requires_grad=True)
    (fix,) = propose_fixes(model, x).fixes
    assert fix.status is FixStatus.CHECK_FAILED and fix.reason is NoFixReason.DIFFERENT_GRADIENTS, fix
    assert "input 0" in fix.detail and x.grad is None
    path.write_text(fix.patched_source)  # PyTorch's verdict on the edit, and on the program kept out of place
    assert not _load(path).NoGradWriteOfInputs()(x).requires_grad
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_statement_without_a_safe_edit_says_so(models):
    _, module = models
    (fix,) = propose_fixes(module.WritesModuleState(), torch.randn(3, 4)).fixes
    assert fix.status is FixStatus.NO_SAFE_EDIT and fix.reason is NoFixReason.UNKNOWN_STATEMENT
    assert fix.diff == "" and "advice: write the op out of place" in fxinplace.fixes.FixReport((fix,)).render()


def test_a_write_in_the_graph_after_the_save_gets_a_fix_checked_against_the_out_of_place_twin(models):
    # The check's reference is the step of a program that keeps what it saves; across the break
    # the functionalized original is one too (the code after the break gets a clone of `h`).
    path, module = models
    torch.manual_seed(0)
    model, x = module.SavedAcrossBreak(), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _step(model, x)
    reference = module.SavedAcrossBreakTwin()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(_functionalized_step(model, x), _step(reference, x))
    (fix,) = propose_fixes(model, x).fixes
    assert fix.status is FixStatus.CHECKED and fix.kind is FixKind.OUT_OF_PLACE, fix
    fxinplace.fixes.FixReport((fix,)).apply()
    patched, twin = _load(path).SavedAcrossBreak(), module.SavedAcrossBreakTwin()
    patched.load_state_dict(model.state_dict())
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(_step(patched, x), _step(twin, x))


def test_an_input_the_caller_computed_is_copied_for_the_check(models):
    # A non-leaf input cannot be deep-copied; it is copied as a tensor that again has a grad_fn.
    path, module = models
    torch.manual_seed(0)
    model, leaf = module.ScaleAfterSigmoid(), torch.randn(3, 4, requires_grad=True)
    x = leaf * 1.5
    (fix,) = propose_fixes(model, x).fixes
    assert fix.status is FixStatus.CHECKED and fix.kind is FixKind.OUT_OF_PLACE, fix
    assert x.grad_fn is not None and leaf.grad is None  # the caller's tensors are left as they were
    fxinplace.fixes.FixReport((fix,)).apply()
    patched = _load(path).ScaleAfterSigmoid()
    patched.load_state_dict(model.state_dict())
    torch.testing.assert_close(_step(patched, x.detach()), _functionalized_step(model, x.detach()))


def test_a_model_without_errors_needs_no_fix(models):
    _, module = models
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True))
    report = propose_fixes(model, torch.randn(2, 4))
    assert report.fixes == () and report.render() == "fxinplace: no error-level hazard, nothing to fix"


def _apply_diff(text: str, diff: str) -> str:
    # The changed lines of a unified diff, at the line numbers of the original (context unchecked,
    # so that several diffs of one file, each against the original, apply bottom up).
    changes, number = [], 0
    for line in diff.splitlines(True):
        if line.startswith("@@"):
            number = int(line.split()[1].split(",")[0][1:])
        elif line.startswith(("---", "+++")):
            continue
        elif line.startswith("-"):
            changes.append((number, line[1:], None))
            number += 1
        elif line.startswith("+"):
            changes.append((number, None, line[1:]))
        else:
            number += 1
    lines = text.splitlines(True)
    for at, removed, added in sorted(changes, key=lambda c: (c[0], c[1] is None), reverse=True):
        if removed is not None:
            assert lines[at - 1] == removed, (at, removed)
            del lines[at - 1]
        else:
            lines.insert(at - 1, added)
    return "".join(lines)


def test_the_audit_with_fixes_carries_each_errors_checked_patch_and_the_patches_train(models, capsys):
    import jsonschema

    from conftest import SCHEMA

    path, module = models
    torch.manual_seed(0)
    model, x = module.TwoWrites(), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _step(module.TwoWrites(), x)  # eager PyTorch fails
    report = fxinplace.audit(model, x, options={"fixes": True, "width": 0})
    printed = capsys.readouterr().out
    errors = report.hazards("error")
    assert len(errors) >= 3 and all(h.patch is not None and h.patch.status is FixStatus.CHECKED for h in errors)
    assert all((h.patch.file, h.patch.line) == (h.source.file, h.source.line) for h in errors)
    patches = list(dict.fromkeys(h.patch for h in errors))
    assert len(patches) == 3 and printed.count("\n    fix (out-of-place) at ") == 3
    data = report.to_dict()
    jsonschema.validate(data, SCHEMA)
    assert fxinplace.Report.from_dict(data).to_dict() == data

    # The report's own diffs, applied to the file: eager PyTorch trains it like the functionalized original.
    text = MODELS
    for patch in patches:
        text = _apply_diff(text, patch.diff)
    path.write_text(text)
    fixed = _load(path).TwoWrites()
    fixed.load_state_dict(model.state_dict())
    torch.testing.assert_close(_step(fixed, x), _functionalized_step(model, x))


def test_the_audit_with_fixes_leaves_the_random_stream_as_it_was(models):
    _, module = models
    drawn = []
    for fixes in (False, True):
        torch.manual_seed(0)
        model, x = module.ScaleAfterSigmoid(), torch.randn(3, 4)
        report = fxinplace.audit(model, x, options={"fixes": fixes, "print": False})
        assert all((h.patch is not None) is fixes for h in report.hazards("error"))
        drawn.append(torch.rand(3))
    torch.testing.assert_close(drawn[0], drawn[1], rtol=0, atol=0)


def test_a_failure_to_propose_fixes_warns_and_the_audit_goes_on(models, monkeypatch):
    import fxinplace.fixes

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(fxinplace.fixes, "propose_fixes", broken)
    _, module = models
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"proposing fixes failed \(RuntimeError: broken on purpose\)"):
        report = fxinplace.audit(module.ScaleAfterSigmoid(), x, options={"fixes": True, "print": False})
    assert report.hazards("error") and all(h.patch is None for h in report.hazards("error"))
    with pytest.raises(RuntimeError, match="broken on purpose"):
        fxinplace.audit(module.ScaleAfterSigmoid(), x, options={"fixes": True, "print": False, "strict": True})


def test_fixes_need_the_model_and_its_inputs_so_the_backend_refuses_them():
    with pytest.raises(ValueError, match=r"option `fixes` needs the model and its inputs.*fxinplace\.audit"):
        fxinplace.InplaceAudit(fixes=True)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(Exception, match=r"option `fixes` needs the model and its inputs"):
        torch.compile(model, backend="inplace_audit", options={"fixes": True})(torch.randn(1, 2))
    with pytest.raises(TypeError, match=r"option `fixes` needs a torch.nn.Module"):
        fxinplace.audit(lambda t: t * 2, torch.randn(2), options={"fixes": True})


TRAIN = textwrap.dedent('''
    import torch
    from models import TwoWrites

    torch.manual_seed(0)
    model = TwoWrites()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        out = model(torch.randn(3, 4))
        loss = out["a"].pow(2).mean() + out["b"].abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("trained")
''')


def _python(*args, cwd):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_fix_on_the_command_line_patches_a_training_script_that_then_trains(models):
    path, module = models
    (path.parent / "train.py").write_text(TRAIN)
    plain = _python("train.py", cwd=path.parent)
    assert plain.returncode == 1 and "modified by an inplace operation" in plain.stderr  # PyTorch's verdict

    shown = _python("-m", "fxinplace", "fix", "--json", "fixes.json", "train.py", cwd=path.parent)
    assert shown.returncode == 0, shown.stderr
    data = json.loads((path.parent / "fixes.json").read_text())
    assert data["checked"] == data["total"] == 3 and {f["status"] for f in data["fixes"]} == {"checked"}
    assert {h["code"] for f in data["fixes"] for h in f["hazards"]} == {"saved-then-mutated"}
    assert any("+        g = g + 1  # tanh saved g" in f["diff"] for f in data["fixes"])
    assert "checked fixes: 3 of 3" in shown.stdout and "+        g = g + 1  # tanh saved g" in shown.stdout
    assert path.read_text() == MODELS  # shown, not written

    applied = _python("-m", "fxinplace", "fix", "--apply", "train.py", cwd=path.parent)
    assert applied.returncode == 0 and f"wrote the checked fixes to {path}" in applied.stderr
    trained = _python("train.py", cwd=path.parent)
    assert trained.returncode == 0 and trained.stdout.strip() == "trained", trained.stderr
    torch.manual_seed(0)
    original, x = module.TwoWrites(), torch.randn(3, 4)
    fixed = _load(path).TwoWrites()
    fixed.load_state_dict(original.state_dict())
    torch.testing.assert_close(_step(fixed, x), _functionalized_step(original, x))
