"""PyTorch's logging: `TORCH_LOGS="+fxinplace"` shows the backend's debug log, and `TORCH_TRACE`
gets each graph's report as the structured artifact `fxinplace_report` (what tlparse shows),
under that graph's compile id. Both are read when torch is imported: each case runs in a fresh
process."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest

from conftest import SCHEMA

ROOT = pathlib.Path(__file__).resolve().parents[1]
GRAPH_SCHEMA = {"$ref": "#/$defs/graph", "$defs": SCHEMA["$defs"]}

# Graph 0/0 writes what sigmoid saved (eager's backward fails); graph 1/0, after the break,
# writes an intermediate nothing saved. It prints the reports, and how often a graph's JSON was
# made while compiling (the artifact's payload is made only when TORCH_TRACE is on).
SCRIPT = """
import json, sys
import torch
import fxinplace
from fxinplace import render

made = [0]
broken = [len(sys.argv) > 2]  # a fault injected into the artifact's payload
graph_dict = render.graph_dict
def counted(graph):
    made[0] += 1
    if broken[0]:
        raise ValueError("injected")
    return graph_dict(graph)
render.graph_dict = counted

def step(x, w):
    s = torch.sigmoid(x @ w)
    s.mul_(2)
    torch._dynamo.graph_break()
    return (s * 3).relu_().sum()

compiled = torch.compile(step, backend="inplace_audit", options={"compiler": sys.argv[1], "print": False})
try:
    compiled(torch.randn(2, 3), torch.randn(3, 4, requires_grad=True)).backward()
except Exception as e:
    print("failed:", type(e).__name__, str(e).splitlines()[0], file=sys.stderr)
made_while_compiling, broken[0] = made[0], False
graphs = [g.to_dict() for g in fxinplace.inplace_audit.report.graphs]
print(json.dumps({"graphs": graphs, "made": made_while_compiling}))
"""


def _run(tmp_path, compiler="eager", *extra, **env):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT)
    base = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE", "TORCH_COMPILE_DEBUG")}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(script), compiler, *extra], capture_output=True, text=True, timeout=300,
                            env={**base, **env}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def structured_log(trace_dir: pathlib.Path) -> list[tuple[dict, str | None]]:
    """(metadata, payload) of each record of the one structured log in `trace_dir`: a glog prefix,
    `] `, the metadata's JSON on one line, then the payload's lines, each led by a tab."""
    [path] = trace_dir.glob("*.log")
    records: list[tuple[dict, list[str]]] = []
    for line in path.read_text().splitlines():
        if line.startswith("\t"):
            records[-1][1].append(line[1:])
        else:
            records.append((json.loads(line.split("] ", 1)[1]), []))
    out = []
    for meta, lines in records:
        payload = "\n".join(lines) if "has_payload" in meta else None
        if payload is not None:  # the log's own checksum: the payload was read back whole
            assert hashlib.md5(payload.encode()).hexdigest() == meta["has_payload"], meta
        out.append((meta, payload))
    return out


def _compile_id(meta: dict) -> str:
    return f"{meta['frame_id']}/{meta['frame_compile_id']}"


def _attempt(meta: dict) -> tuple[str, int]:
    return _compile_id(meta), meta.get("attempt", 0)  # Dynamo restarts a frame's analysis at a graph break


def _reports(records):
    return [(meta, payload) for meta, payload in records if meta.get("artifact", {}).get("name") == "fxinplace_report"]


# -- TORCH_LOGS ------------------------------------------------------------------------------------
DEBUG_LINES = [
    r"inplace_audit: graph 0/0 `step` \(graph break: Call to `torch._dynamo.graph_break\(\)`\): \d+ nodes, 2 inputs",
    r"inplace_audit: graph 0/0 passes: describe_inputs [\d.]+ ms, trace_mutations [\d.]+ ms, .*cross_graph [\d.]+ ms",
    r"inplace_audit: graph 0/0: 1 mutation\(s\), 1 hazard\(s\) \(error 1\); tasks: ",
    r"inplace_audit: graph 0/0 compiled by eager in [\d.]+ ms",
    r"inplace_audit: graph 1/0 `torch_dynamo_resume_in_step_at_\d+` \(return_value\)",
    r"inplace_audit: graph 1/0: 1 mutation\(s\), 1 hazard\(s\) \(info 1\)",
]


def test_torch_logs_plus_fxinplace_shows_the_backends_debug_log(tmp_path):
    reports, stderr = _run(tmp_path, TORCH_LOGS="+fxinplace")
    for line in DEBUG_LINES:
        assert re.search(line, stderr), (line, stderr)
    # torch's own formatter: level V (debug), our file, the graph's compile id (and Dynamo's
    # attempt: `_1` after the restart a graph break causes).
    assert re.search(r"^V\d{4} [\d:.]+ \d+ fxinplace/backend\.py:\d+\] \[0/0(_\d+)?\] inplace_audit: graph 0/0", stderr, re.M)
    # the loop itself ran as it does without the audit: eager's in-place error at backward
    assert "failed: RuntimeError one of the variables needed for gradient computation" in stderr
    assert [g["compile_id"] for g in reports["graphs"]] == ["0/0", "1/0"]


@pytest.mark.parametrize("torch_logs", [None, "fxinplace", "+dynamo"], ids=["unset", "info", "dynamo-debug"])
def test_without_debug_for_fxinplace_the_backend_logs_nothing(tmp_path, torch_logs):
    env = {} if torch_logs is None else {"TORCH_LOGS": torch_logs}
    reports, stderr = _run(tmp_path, **env)
    assert "inplace_audit: graph" not in stderr and not re.search(r"fxinplace/\S+\.py:\d+\]", stderr), stderr
    assert len(reports["graphs"]) == 2  # the audit did run


@pytest.mark.parametrize("torch_logs", ["+fxinplace", "+fxinplace.backend", "fxinplace,+dynamo", "-fxinplace"])
def test_import_torch_and_compile_work_with_fxinplace_in_torch_logs(tmp_path, torch_logs):
    # `+fxinplace` is a qualified module name to TORCH_LOGS: `import torch` finds the package,
    # imports it and its subpackages, and gives `fxinplace` a handler and the level asked for.
    code = ("import logging, torch; log = logging.getLogger('fxinplace.backend');"
            "print(log.getEffectiveLevel(), torch.compile(lambda t: t.add_(1), backend='inplace_audit',"
            " options={'compiler': 'eager', 'print': False})(torch.zeros(2)).tolist())")
    env = {**os.environ, "TORCH_LOGS": torch_logs, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    level = {"+": 10, "-": 40}.get(torch_logs[0], 20)
    assert result.stdout.split() == [str(level), "[1.0,", "1.0]"]


# -- TORCH_TRACE -----------------------------------------------------------------------------------
def test_torch_trace_gets_each_graphs_report_under_its_compile_id(tmp_path):
    trace_dir = tmp_path / "trace"
    reports, _ = _run(tmp_path, TORCH_TRACE=str(trace_dir))
    records = structured_log(trace_dir)
    artifacts = _reports(records)
    assert [meta["artifact"]["encoding"] for meta, _ in artifacts] == ["json", "json"]
    payloads = [json.loads(payload) for _, payload in artifacts]
    for payload in payloads:
        jsonschema.validate(payload, GRAPH_SCHEMA)
    assert payloads == reports["graphs"]  # the report the backend kept, whole
    [hazard] = payloads[0]["mutations"][0]["hazards"]
    assert hazard["code"] == "saved-then-mutated" and hazard["severity"] == "error"
    # tlparse groups by compile id: ours is the id Dynamo's own graph artifact has for that graph
    dynamo_graphs = [_attempt(meta) for meta, _ in records if "dynamo_output_graph" in meta]
    assert [_attempt(meta) for meta, _ in artifacts] == dynamo_graphs == [("0/0", 1), ("1/0", 0)]
    assert [p["compile_id"] for p in payloads] == ["0/0", "1/0"]
    assert reports["made"] == 2  # one graph dict per graph, for the artifact


def test_the_artifact_has_the_final_report_when_the_compiler_fails(tmp_path):
    # aot_eager fails on graph 0/0 with PyTorch's in-place error: the report, and its artifact,
    # record that the graph never ran as audited.
    trace_dir = tmp_path / "trace"
    reports, _ = _run(tmp_path, compiler="aot_eager", TORCH_TRACE=str(trace_dir))
    [(meta, payload)] = _reports(structured_log(trace_dir))
    assert _compile_id(meta) == "0/0"
    payload = json.loads(payload)
    assert payload["compile_error"] is not None and "HazardError" in payload["compile_error"]
    assert [payload] == reports["graphs"]


def test_a_failure_to_write_the_artifact_never_fails_the_compile(tmp_path):
    trace_dir = tmp_path / "trace"
    reports, stderr = _run(tmp_path, "eager", "broken", TORCH_TRACE=str(trace_dir))
    assert "AnalysisWarning: fxinplace: could not write the report to the TORCH_TRACE log (ValueError: injected)" in stderr
    # both graphs compiled and ran: the loop failed where eager fails, at backward
    assert "failed: RuntimeError one of the variables needed for gradient computation" in stderr
    assert [g["compile_id"] for g in reports["graphs"]] == ["0/0", "1/0"] and reports["made"] == 2
    assert not _reports(structured_log(trace_dir))


def test_without_torch_trace_no_payload_is_made(tmp_path):
    reports, _ = _run(tmp_path)
    assert reports["made"] == 0
    assert not list(tmp_path.glob("**/*.log"))


@pytest.mark.skipif(shutil.which("tlparse") is None, reason="tlparse is not installed (pip install tlparse)")
def test_tlparse_shows_the_report_beside_dynamos_artifacts(tmp_path):
    trace_dir = tmp_path / "trace"
    reports, _ = _run(tmp_path, TORCH_TRACE=str(trace_dir))
    [log] = trace_dir.glob("*.log")
    out = tmp_path / "tl"
    subprocess.run(["tlparse", str(log), "-o", str(out), "--no-browser"], check=True, capture_output=True, timeout=120)
    # one folder per compile id and attempt (`-_0_0_1`: frame 0, compile 0, attempt 1)
    shown = sorted(out.glob("*/fxinplace_report_*.json"))
    assert [p.parent.name for p in shown] == ["-_0_0_1", "-_1_0_0"]
    for graph, path in zip(reports["graphs"], shown):
        assert list(path.parent.glob("dynamo_output_graph_*.txt"))
        assert json.loads(path.read_text()) == graph


# -- docs/usage.md shows real output ---------------------------------------------------------------
def _section(title: str) -> str:
    text = (ROOT / "docs" / "usage.md").read_text()
    return re.search(rf"^## {title}\n(.*?)(?=^## )", text, flags=re.S | re.M).group(1)


def _message(line: str) -> str:
    # the glog prefix (time, pid, file:line) and timings vary from run to run
    return re.sub(r"[\d.]+ ms", "N ms", line.split("] ", 1)[1])


def test_usage_shows_the_logs_a_run_of_its_example_writes(tmp_path):
    section = _section("Logging and tlparse")
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    shown_log, shown_trace = re.findall(r"```text\n(.*?)```", section, flags=re.S)
    script = tmp_path / "step.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE", "TORCH_COMPILE_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    trace_dir = tmp_path / "trace"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**env, "TORCH_LOGS": "+fxinplace", "TORCH_TRACE": str(trace_dir)})
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if re.search(r"fxinplace/\S+\.py:\d+\]", line)]
    assert [_message(line) for line in ours] == [_message(line) for line in shown_log.splitlines()]
    meta_line, *payload_lines = shown_trace.splitlines()
    [(meta, payload)] = _reports(structured_log(trace_dir))
    shown_meta = json.loads(meta_line.split("] ", 1)[1])
    assert {**shown_meta, "has_payload": None} == {**meta, "has_payload": None}
    assert payload.splitlines()[:len(payload_lines)] == [line[1:] for line in payload_lines]
