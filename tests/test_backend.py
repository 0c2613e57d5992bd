"""The backend: options, hand-off, never breaking training, tables, the entry point."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext as does_not_raise

import pytest
import torch
from torch import nn

import fxinplace
import fxinplace.backend
from conftest import assert_close_at_scale, quiet_audit


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.a = nn.Linear(8, 2)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.trunk(x)
        h = h * 2
        h.add_(1)
        return {"a": self.a(h), "b": self.b(h)}


def _compile(model, **options):
    return torch.compile(model, backend="inplace_audit", options={"print": False, **options})


@pytest.mark.parametrize(
    "options, expectation",
    [
        ({"compiler": "eager"}, does_not_raise()),
        ({"compiler": "aot_eager", "print": False, "strict": True}, does_not_raise()),
        ({"tasks": {"seg": "a"}, "raise_on": "error", "functionalize": "hazards"}, does_not_raise()),
        ({"colour": True}, pytest.raises(ValueError, match=r"unknown option\(s\) `colour`.*Allowed options")),
        ({"print": "yes"}, pytest.raises(ValueError, match=r"`print` must be True or False, got 'yes'")),
        ({"raise_on": "fatal"}, pytest.raises(ValueError, match=r"`raise_on` must be None or one of 'info'")),
        ({"functionalize": "some"}, pytest.raises(ValueError, match=r"`functionalize` must be False, True")),
        ({"tasks": ["a"]}, pytest.raises(ValueError, match=r"`tasks` must be a dict mapping task names")),
        ({"compiler": "no_such_backend"}, pytest.raises(ValueError, match=r"names no registered backend.*inductor")),
        ({"compiler": "inplace_audit"}, pytest.raises(ValueError, match=r"another backend than inplace_audit")),
        ({"file": 3}, pytest.raises(ValueError, match=r"`file` must be a file path")),
        ({"table": "compact"}, does_not_raise()),
        ({"table": "short"}, pytest.raises(ValueError, match=r'`table` must be "full" or "compact", got \'short\'')),
    ],
    ids=["eager", "aot_eager strict", "tasks raise_on functionalize", "unknown key", "bad bool", "bad severity",
         "bad functionalize", "bad tasks", "unknown compiler", "itself", "bad file", "compact table", "bad table"],
)
def test_options_are_validated(options, expectation):
    with expectation:
        fxinplace.InplaceAudit(**options)


def test_bad_options_through_torch_compile_name_the_option():
    compiled = torch.compile(TwoHeads(), backend="inplace_audit", options={"colour": True})
    with pytest.raises(Exception, match="unknown option"):
        compiled(torch.randn(2, 4))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_audit_does_not_change_what_the_compiler_computes(compiler):
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(5, 4)
    reference = copy.deepcopy(model)
    ours = _compile(model, compiler=compiler)(x)
    theirs = torch.compile(reference, backend=compiler)(x)
    # Exact on purpose: the audit hands the compiler the very graph Dynamo gave it, so the
    # same kernels run on the same tensors in the same order; any bit that moved means the
    # audit changed the graph.
    for key in ("a", "b"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    sum(o.sum() for o in ours.values()).backward()
    sum(o.sum() for o in theirs.values()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_reports_of_a_compiled_model_are_kept_on_the_backend_object():
    backend = fxinplace.InplaceAudit(compiler="eager", print=False)
    torch.compile(TwoHeads(), backend=backend)(torch.randn(2, 4))
    (graph,) = backend.report.graphs
    assert [m.op for m in graph.mutations] == ["add_"]
    assert graph.tasks == ("a", "b")  # the output dict's keys name the tasks
    assert backend.report.to_dict()["graphs"][0]["mutations"][0]["node"] == graph.mutations[0].node


def _broken_trace(*args, **kwargs):
    raise RuntimeError("injected failure")


def test_an_analysis_failure_warns_and_training_goes_on(monkeypatch):
    monkeypatch.setattr(fxinplace.backend, "trace_mutations", _broken_trace)
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(5, 4)
    reference = copy.deepcopy(model)
    with pytest.warns(fxinplace.AnalysisWarning, match="injected failure"):
        out = _compile(model, compiler="aot_eager")(x)
    sum(o.sum() for o in out.values()).backward()
    expected = reference(x)
    assert_close_at_scale(out["a"], expected["a"])  # aot_eager against eager: other kernels
    assert all(p.grad is not None for p in model.parameters())


def test_strict_mode_turns_an_analysis_failure_into_an_error(monkeypatch):
    monkeypatch.setattr(fxinplace.backend, "trace_mutations", _broken_trace)
    with pytest.raises(Exception, match="AnalysisError.*injected failure"):
        _compile(TwoHeads(), compiler="eager", strict=True)(torch.randn(2, 4))


def test_one_table_per_graph_and_graph_breaks(capsys):
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            h.relu_()
            torch._dynamo.graph_break()
            return (h * 3).sum()

    torch.compile(Breaks(), backend="inplace_audit", options={"compiler": "eager"})(torch.randn(2, 4))
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("fxinplace: graph")]
    assert len(heads) == 2
    assert "graph break" in heads[0] and "torch_dynamo_resume_in_forward" in heads[1]
    assert "no in-place mutations" in out.split(heads[1])[1]


def test_tables_can_go_to_a_file_and_be_silenced(tmp_path, capsys):
    path = tmp_path / "tables.txt"
    torch.compile(TwoHeads(), backend="inplace_audit", options={"compiler": "eager", "print": False, "file": str(path)})(
        torch.randn(2, 4)
    )
    assert capsys.readouterr().out == ""
    assert path.read_text().startswith("fxinplace: graph 0/0 `forward`")


def test_table_rendering_is_exact():
    class Tiny(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)
            return y

    report = quiet_audit(Tiny(), torch.randn(3))
    line = Tiny.forward.__code__.co_firstlineno + 2
    assert 100 <= line < 1000, "the expected table below assumes a 3-digit line number"
    expected = textwrap.dedent(f"""\
        fxinplace: graph 0/0 `forward` (graph ended: return_value)
        tasks: output
          #  op    writes          via    where                      code       module    tasks    hazard
        ---  ----  --------------  -----  -------------------------  ---------  --------  -------  ------------
          0  add_  intermediate y  -      tests/test_backend.py:{line}  y.add_(1)  -         output   safe-inplace""")
    assert report.render() == expected
    compact = textwrap.dedent(f"""\
        fxinplace: graph 0/0 `forward` (graph ended: return_value)
        tasks: output
          #  op    writes          where                      tasks    hazard
        ---  ----  --------------  -------------------------  -------  ------------
          0  add_  intermediate y  tests/test_backend.py:{line}  output   safe-inplace""")
    assert report.render(compact=True) == compact


def test_compact_table_option_reaches_the_printed_table(capsys):
    torch.compile(TwoHeads(), backend="inplace_audit", options={"compiler": "eager", "table": "compact"})(torch.randn(2, 4))
    header = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("#"))
    assert header.split() == ["#", "op", "writes", "where", "tasks", "hazard"]


def test_entry_point_works_in_a_fresh_process_without_importing_fxinplace(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        assert "fxinplace" not in sys.modules
        def f(x):
            y = x * 2
            y.add_(1)
            return y
        out = torch.compile(f, backend="inplace_audit", options={"compiler": "eager"})(torch.ones(2))
        assert out.tolist() == [3.0, 3.0], out
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fxinplace: graph 0/0 `f`" in result.stdout and "add_" in result.stdout


def test_json_has_the_documented_fields():
    report = quiet_audit(TwoHeads(), torch.randn(2, 4))
    import json

    data = json.loads(report.to_json())
    mutation = data["graphs"][0]["mutations"][0]
    assert set(mutation) >= {"node", "op", "target", "source", "module", "tasks", "shared", "hazards"}
    assert set(mutation["target"]) >= {"kind", "name"}
    assert set(mutation["source"]) == {"file", "line", "code"}
    assert mutation["tasks"] == ["a", "b"] and mutation["shared"] is True
