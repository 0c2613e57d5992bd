"""`python -m fxinplace run / show` on real training scripts, each run in a fresh interpreter.

The verdicts come from PyTorch: each script's model or loop is first run plainly (in this
process, or as `python script.py`), and what PyTorch raises there is what `run` must name.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jsonschema
import pytest
import torch

from conftest import SCHEMA
from fxinplace import cli
from test_compat import SavedThenWritten  # sigmoid saves s, then `s[:, 0] = 1.0`

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}

ROOT = pathlib.Path(__file__).resolve().parents[1]
GAN = (ROOT / "examples" / "gan_step.py").read_text()
MULTITASK = (ROOT / "examples" / "multitask_eval.py").read_text()
DOC = (ROOT / "docs" / "cli.md").read_text()

CLEAN = """\
import sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
model.compile(backend="aot_eager")
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    loss = model(torch.randn(5, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(step, repr(loss.item()), repr(sum(p.sum().item() for p in model.parameters())))
print("argv", sys.argv[1:], __name__)
sys.exit(3)
"""


def _fxinplace(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxinplace", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def _line(source: str, marker: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if f"# {marker}" in line)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _shown(command: str) -> list[str]:
    """The lines docs/cli.md shows for `$ command`."""
    return re.search(rf"```text\n\$ {re.escape(command)}\n(.*?)\n```", DOC, flags=re.S).group(1).splitlines()


def test_a_gan_step_between_backwards_fails_naming_the_parameter_and_the_step():
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # PyTorch's verdict
        exec(compile(GAN, "gan_step.py", "exec"), {"__name__": "__main__"})
    result = _fxinplace("run", "examples/gan_step.py", cwd=ROOT)
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert err.startswith("Traceback (most recent call last):\n"
                          f"  File \"examples/gan_step.py\", line {_line(GAN, 'STEP') + 1}, in <module>\n")
    assert "StaleSavedTensorError: fxinplace.guard: one of the variables needed for gradient computation" in err
    assert "a [16, 1] view of parameter `disc.2.weight`" in err
    assert f"changed by: `opt_d.step()` (Adam) at examples/gan_step.py:{_line(GAN, 'STEP')}" in err
    assert "fxinplace run: 0 graphs audited; hazards: 0 error, 0 warning, 0 info; training-loop guard: " \
           "1 stale saved tensor" in err
    # docs/cli.md shows this run (the frames inside torch and fxinplace left out)
    lines, shown = err.splitlines(), _shown("python -m fxinplace run examples/gan_step.py")
    assert shown[:3] == lines[:3]
    cut = next(i for i, line in enumerate(shown) if line.startswith("fxinplace.training_guard._errors"))
    assert shown[cut:] == lines[lines.index(shown[cut]):]


def test_a_saved_then_mutated_shared_parameter_fails_the_run_and_is_in_the_json(tmp_path):
    namespace = {"__name__": "multitask_eval"}
    exec(compile(MULTITASK, "multitask_eval.py", "exec"), namespace)
    out = namespace["model"](namespace["x"])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # PyTorch's verdict
        (out["seg"].sum() + out["depth"].sum()).backward()
    saved = tmp_path / "report.json"
    result = _fxinplace("run", "--json", str(saved), "--fail-on", "error", "examples/multitask_eval.py", cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert result.stdout == "{'seg': (4, 4), 'depth': (4, 1)}\n"  # the script ran
    data = json.loads(saved.read_text())
    jsonschema.validate(data, SCHEMA)
    hazards = [h for g in data["graphs"] for m in g["mutations"] for h in m["hazards"]]
    (error,) = [h for h in hazards if h["code"] == "saved-then-mutated"]
    assert error["severity"] == "error" and error["target"]["name"] == "scale"
    assert error["mutated_by"]["line"] == _line(MULTITASK, "MUTATES") and error["mutated_by"]["op"] == "mul_"
    assert "fxinplace run: 1 graph audited; hazards: 1 error," in result.stderr
    assert _flat(f"ERROR [saved-then-mutated] {error['message']}") in _flat(result.stderr)
    assert result.stderr.rstrip().endswith("fxinplace run: exit 1: hazards at or above `error` (--fail-on error)")
    shown = _shown("python -m fxinplace run --json report.json examples/multitask_eval.py")
    assert shown == (result.stdout + result.stderr.replace(str(saved), "report.json")).splitlines()

    # (d) `show` renders the saved report: the same hazard, in the same words, as docs/cli.md shows.
    rendered = _show(saved, "--width", "100")
    assert "fxinplace: graph 0/0 `forward` (graph ended: return_value)" in rendered
    assert _flat(f"ERROR [saved-then-mutated] {error['message']}") in _flat(rendered)
    assert rendered.splitlines() == _shown("python -m fxinplace show report.json --width 100")

    # The same run in this process, with --fail-on never: the script's own exit code (0).
    original = torch.compile
    assert cli.main(["run", "--fail-on", "never", str(ROOT / "examples" / "multitask_eval.py")]) == 0
    assert torch.compile is original and not hasattr(original, "__wrapped__")  # given back


def _show(path: pathlib.Path, *extra: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["show", str(path), *extra]) == 0
    return out.getvalue()


def test_a_clean_script_keeps_its_outputs_and_its_exit_code(tmp_path):
    (tmp_path / "clean.py").write_text(CLEAN)
    plain = subprocess.run([sys.executable, "clean.py", "a", "--b"], cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 3, plain.stderr
    watched = _fxinplace("run", "clean.py", "a", "--b", cwd=tmp_path)
    assert watched.returncode == 3, watched.stderr
    assert watched.stdout == plain.stdout  # the same losses and parameters, bit for bit
    assert "argv ['a', '--b'] __main__" in watched.stdout
    # Silent but for the summary: graphs audited (forward and backward of each compile), no hazard.
    assert re.fullmatch(r"fxinplace run: [1-9]\d* graphs? audited; hazards: 0 error, 0 warning, \d+ info; "
                        r"training-loop guard: 0 stale saved tensors\n", watched.stderr), watched.stderr


def test_bad_input_says_what_was_expected(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "missing.py")]) == 2
    assert "fxinplace run: SCRIPT must be a Python file, got" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["show", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "is not JSON (Expecting property name" in err and "expected a report written by" in err
    (tmp_path / "other.json").write_text('{"schema_version": 3, "graphs": [{"compile_id": "0/0"}]}')
    assert cli.main(["show", str(tmp_path / "other.json")]) == 2
    assert "is not a report: fxinplace report: graphs[0] has no field `tasks`" in capsys.readouterr().err
    assert cli.main(["show", str(tmp_path / "nowhere.json")]) == 2
    assert "fxinplace show: cannot read REPORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--fail-on", "sometimes", "x.py"])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Error detected in")
def test_when_the_audit_saw_nothing_the_compilers_error_points_to_the_guard_and_run(monkeypatch):
    # The write is in the graph here, but hide it from the audit: what the message says when a
    # write it cannot see (outside the graph) breaks what the graph saved.
    import fxinplace

    monkeypatch.setattr(fxinplace.backend, "find_hazards", lambda *args: [])
    audit = fxinplace.InplaceAudit(compiler="aot_eager", print=False)
    with pytest.raises(Exception, match="the compiler failed with PyTorch's in-place autograd error") as info:
        torch.compile(SavedThenWritten(), backend=audit)(torch.randn(2, 4))
    ours = info.value.inner_exception  # Dynamo wraps what a backend raises
    assert isinstance(ours, fxinplace.HazardError)
    assert isinstance(ours.__cause__, RuntimeError) and "modified by an inplace operation" in str(ours.__cause__)
    said = str(ours)
    assert "and the audit found no hazard in this graph: the write happened outside it" in said
    assert "`fxinplace.guard`" in said and "`python -m fxinplace run train.py`" in said


THREADED = """\
import threading
import torch

w = torch.randn(3, requires_grad=True)
out = {}
thread = threading.Thread(target=lambda: out.update(y=torch.sigmoid(w * 2)))  # saved in another thread
thread.start()
thread.join()
y = out["y"]
with torch.no_grad():
    y.mul_(2)
y.sum().backward()
"""


def test_an_error_from_what_nothing_watched_says_so(tmp_path, capsys):
    # Saved-tensor hooks and function modes are per thread: a forward in another thread is
    # outside what the guard sees, and PyTorch's own check raises.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # PyTorch's verdict
        exec(compile(THREADED, "threaded.py", "exec"), {"__name__": "__main__"})
    (tmp_path / "threaded.py").write_text(THREADED)
    assert cli.main(["run", str(tmp_path / "threaded.py")]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: one of the variables needed for gradient computation has been modified by an inplace" in err
    assert "neither the audit of the compiled graphs nor the training-loop guard saw the write" in err
    assert "See docs/guard.md (`fxinplace.guard`)" in err


THREADED_COMPILED = """\
import threading
import torch


def forward(w):
    s = torch.sigmoid(w * 2)
    s.mul_(2)  # sigmoid saved s
    return s


w = torch.randn(3, requires_grad=True)
out = {}
step = torch.compile(forward, backend="eager")
thread = threading.Thread(target=lambda: out.update(y=step(w)))
thread.start()
thread.join()
out["y"].sum().backward()
"""


def test_an_error_the_audit_predicted_says_which_hazard(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # PyTorch's verdict
        exec(compile(THREADED_COMPILED, "threaded.py", "exec"), {"__name__": "__main__"})
    torch._dynamo.reset()
    (tmp_path / "threaded.py").write_text(THREADED_COMPILED)
    assert cli.main(["run", str(tmp_path / "threaded.py")]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: one of the variables needed for gradient computation has been modified by an inplace" in err
    assert "fxinplace: the audit of the compiled graphs predicted this error:\n  ERROR [saved-then-mutated] `s`" in err


def test_the_console_script_is_the_cli():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "fxinplace"]
    assert script.value == "fxinplace.cli:main" and script.load() is cli.main
