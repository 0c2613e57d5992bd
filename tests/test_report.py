"""The report as data: its JSON against the published schema, its facts against eager PyTorch."""

from __future__ import annotations

import json
import pathlib
import warnings

import jsonschema
import pytest
import torch
from torch import nn

import fxinplace
from fxinplace.facts import FixKind, FixStatus, NoFixReason
from conftest import SCHEMA, eager_backward_error, marked_line, quiet_audit
from test_hazards import LeafInPlace



class SigmoidThenScale(nn.Module):
    """`sigmoid` saves its output; `mul_` overwrites it: eager's backward raises."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.head_a, self.head_b = nn.Linear(4, 2), nn.Linear(4, 1)

    def forward(self, x):
        y = torch.sigmoid(self.trunk(x))
        out = {"a": self.head_a(y)}
        y.mul_(2)  # CULPRIT
        out["b"] = self.head_b(y)
        return out


class Break(nn.Module):
    """A save crosses a graph break and is written after it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.sigmoid(self.fc(x))
        torch._dynamo.graph_break()
        h.add_(1)
        return h


class Ema(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return self.fc(x).relu_()


def _reports():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    yield "saved-then-mutated, two tasks", quiet_audit(SigmoidThenScale(), x)
    yield "across a graph break", quiet_audit(Break(), x)
    yield "tracing refused", quiet_audit(LeafInPlace(), torch.randn(3, 3))
    yield "buffer and safe writes", quiet_audit(Ema(), x)
    yield "functionalized", quiet_audit(SigmoidThenScale(), x, functionalize=True)
    backend = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize="hazards")
    torch.compile(Ema(), backend=backend)(x)
    yield "kept in place", backend.report


@pytest.mark.parametrize("name, report", list(_reports()), ids=lambda v: v if isinstance(v, str) else "")
def test_real_reports_match_the_published_schema(name, report):
    data = json.loads(report.to_json())
    jsonschema.validate(data, SCHEMA)
    assert data["schema_version"] == SCHEMA["properties"]["schema_version"]["const"]
    assert data["graphs"] and (any(g["mutations"] for g in data["graphs"]) or any(g["hazards"] for g in data["graphs"]))


def test_the_schema_lists_exactly_the_codes_the_library_has():
    defs = SCHEMA["$defs"]
    assert set(defs["hazard"]["properties"]["code"]["enum"]) == {c.value for c in fxinplace.HazardCode}
    assert set(defs["hazard"]["properties"]["severity"]["enum"]) == set(fxinplace.SEVERITIES)
    assert set(defs["hazard"]["properties"]["detail"]["enum"]) == {d.value for d in fxinplace.Detail} | {None}
    assert set(defs["rewrite"]["properties"]["kind"]["enum"]) == {k.value for k in fxinplace.RewriteKind}
    assert set(defs["rewrite"]["properties"]["reason"]["enum"]) == {r.value for r in fxinplace.KeptReason} | {None}
    patch = defs["patch"]["properties"]
    assert set(patch["status"]["enum"]) == {s.value for s in FixStatus}
    assert set(patch["kind"]["enum"]) == {k.value for k in FixKind} | {None}
    assert set(patch["reason"]["enum"]) == {r.value for r in NoFixReason} | {None}


def test_a_hazard_in_json_names_the_saving_and_the_mutating_sites_eager_blames():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    assert "modified by an inplace operation" in eager_backward_error(SigmoidThenScale(), x)
    data = quiet_audit(SigmoidThenScale(), x).to_dict()
    errors = [h for g in data["graphs"] for m in g["mutations"] for h in m["hazards"] if h["severity"] == "error"]
    # `sigmoid` saved its output for its backward, head a's `linear` its input for the weight's.
    assert sorted(e["saved_by"]["op"] for e in errors) == ["linear", "sigmoid"]
    (error,) = [e for e in errors if e["saved_by"]["op"] == "sigmoid"]
    assert error["code"] == "saved-then-mutated" and not error["removed_by_rewrite"]
    assert error["mutated_by"]["op"] == "mul_" and error["mutated_by"]["line"] == marked_line(SigmoidThenScale, "CULPRIT")
    assert error["mutated_by"]["file"] == __file__
    assert error["saved_by"]["op"] == "sigmoid" and error["saved_by"]["tasks"] == ["a", "b"]
    assert error["target"] == {"kind": "intermediate", "name": "y", "produced_by": "sigmoid"}  # Dynamo's name: the variable
    assert error["fix"] and "out of place" in error["fix"]


def test_naming_tasks_changes_names_only():
    # `fxinplace.audit` reports the backend's facts, tasks named by the same rule (the output keys).
    torch.manual_seed(0)
    model, x = SigmoidThenScale(), torch.randn(3, 4)
    audited = quiet_audit(model, x).graphs[0]
    backend = fxinplace.InplaceAudit(compiler="eager", print=False)
    torch.compile(model, backend=backend)(x)
    compiled = backend.report.graphs[0]
    assert audited.mutations == compiled.mutations and audited.shared == compiled.shared
    assert audited.tasks == compiled.tasks == ("a", "b")
    assert audited == compiled.named(["a", "b"]) == compiled


@pytest.mark.parametrize("error, base", [
    (fxinplace.HazardError, fxinplace.FxInplaceError),
    (fxinplace.AnalysisError, fxinplace.FxInplaceError),
    (fxinplace.StaleSavedTensorError, fxinplace.FxInplaceError),
    (fxinplace.AnalysisWarning, fxinplace.FxInplaceWarning),
    (fxinplace.StaleSavedTensorWarning, fxinplace.FxInplaceWarning),
])
def test_every_error_has_the_one_base_class(error, base):
    assert issubclass(error, base)


def test_a_strict_analysis_failure_is_caught_as_the_base_class(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(fxinplace.backend, "trace_mutations", broken)
    backend = fxinplace.InplaceAudit(compiler="eager", print=False, strict=True)
    with pytest.raises(Exception, match="a bug of ours") as info:
        torch.compile(nn.Linear(2, 2), backend=backend)(torch.randn(1, 2))
    assert isinstance(info.value.inner_exception, fxinplace.FxInplaceError)  # Dynamo wraps what backends raise
    torch._dynamo.reset()
    backend = fxinplace.InplaceAudit(compiler="eager", print=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(nn.Linear(2, 2), backend=backend)(torch.randn(1, 2))
    assert any(issubclass(w.category, fxinplace.FxInplaceWarning) for w in caught)


def test_the_documented_example_matches_the_schema():
    text = (pathlib.Path(__file__).parent.parent / "docs" / "report.md").read_text()
    example = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    jsonschema.validate(example, SCHEMA)
