"""The README and docs say what the code does: every snippet runs, the example output is real."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
from torch._vendor.packaging.version import Version

from fxinplace._compat import TESTED_TORCH

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [
    pytest.param(code, id=f"{path.name}:{i}")
    for path in DOCS
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))
]


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def test_readme_shows_the_examples_real_output():
    result = subprocess.run(
        [sys.executable, "examples/multitask.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "100"},  # what a terminal 100 wide (or a pipe) gets
    )
    assert result.returncode == 0, result.stderr
    shown = re.search(r"Its run prints:\n\n```text\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    assert shown.strip() == result.stdout.strip()


def test_readme_shows_the_first_snippets_real_output():
    readme = (ROOT / "README.md").read_text()
    code, shown = re.search(r"```python\n(.*?)```\n\nprints .*?```text\n(.*?)```", readme, flags=re.S).groups()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    assert shown.strip() == result.stdout.strip()


def test_ci_runs_the_readme_test_command_on_every_supported_release():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"Run the tests:\n\n    (.*)\n", readme).group(1)
    install_and_test = command.split("&& pip install torch==2.13.0 && ")[1]
    # CI installs, then runs the tests in the background (the two releases side by side).
    for step in install_and_test.split(" && "):
        assert step in ci, step
    releases = re.findall(r"^suite \S+ torch==(\S+)", ci, flags=re.M)
    assert {Version(v).release[:2] for v in releases} == set(TESTED_TORCH)  # CI tests what we call tested
    for release in releases:
        assert f"torch=={release}" in readme
    low, high = re.search(r'"torch>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text()).groups()
    assert min(TESTED_TORCH) == Version(low).release[:2] and max(TESTED_TORCH) < Version(high).release[:2]
