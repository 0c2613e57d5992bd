"""The pytest plugin, through its entry point: `pytest --fxinplace` in a fresh pytest process.

The verdicts come from PyTorch: the eager test crashes with PyTorch's error in both modes
(with the flag, named), and the compiled model's hazard is the one eager's backward raises on
(`test_the_compiled_hazard_is_real`), though the test never runs that backward.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest_plugins = ["pytester"]

TESTS = '''
import torch
from torch import nn


class WritesWhatSigmoidSaved(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        s = torch.sigmoid(self.fc(x))
        s[:, 0] = 1.0  # WRITE
        return s


class MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.scale = nn.Parameter(torch.ones(1))
        self.seg, self.depth = nn.Linear(16, 4), nn.Linear(16, 1)

    def forward(self, x):
        h = self.trunk(x)
        seg = self.seg(h) * self.scale
        with torch.no_grad():
            self.scale.mul_(2)  # MUTATES
        return {"seg": seg, "depth": self.depth(h) * self.scale}


def test_eager_step_that_pytorch_refuses():
    model = WritesWhatSigmoidSaved()
    model(torch.randn(2, 4)).sum().backward()


def test_compiled_forward_only():
    out = torch.compile(MultiTask(), backend="eager")(torch.randn(4, 8))
    assert set(out) == {"seg", "depth"}


def test_clean_training_step():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.compile(model, backend="eager")(torch.randn(3, 4)).sum().backward()
    opt.step()


def test_nothing_is_patched_without_the_flag(request):
    flag = request.config.getoption("fxinplace")
    assert hasattr(torch.compile, "__wrapped__") is flag  # the watch's stand-in wraps torch.compile
    assert (torch._C._len_torch_function_stack() == 0) is not flag


def test_the_fixture_watches_explicitly(fxinplace_watch):
    torch.compile(lambda x: x.mul(2).add_(1), backend="eager")(torch.ones(2))
    assert [m.op for m in fxinplace_watch.report.mutations] == ["add_"]
'''


def test_the_compiled_hazard_is_real():
    namespace: dict = {}
    exec(compile(TESTS, "test_models.py", "exec"), namespace)
    torch.manual_seed(0)
    out = namespace["MultiTask"]()(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out["seg"].sum() + out["depth"].sum()).backward()


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch) -> pytest.Pytester:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("COLUMNS", "300")  # whole lines in the short summary
    pytester.makepyfile(test_models=TESTS)
    return pytester


def _line(marker: str) -> int:
    return next(i for i, line in enumerate(TESTS.splitlines(), 0) if f"# {marker}" in line)


def test_without_the_flag_the_plugin_does_nothing(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_models.py::test_eager_step_that_pytorch_refuses - RuntimeError: one of"
                                 " the variables needed for gradient computation has been modified by an inplace*"])


def test_with_the_flag_a_hazard_fails_its_test_naming_it(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--fxinplace")
    result.assert_outcomes(passed=3, failed=2)
    out = result.stdout.str()
    # The eager crash, named: the op that changed the saved tensor, and its line.
    assert "FAILED test_models.py::test_eager_step_that_pytorch_refuses - " \
           "fxinplace.training_guard._errors.StaleSavedTensorError" in out
    assert re.search(rf"changed by: in-place `__setitem__` at \S*test_models.py:{_line('WRITE')} ", out)
    # The compiled model's hazard, though the test never backwards through it.
    assert "FAILED test_models.py::test_compiled_forward_only - Failed: fxinplace: in-place hazards at or above `error`" in out
    assert re.search(r"ERROR \[saved-then-mutated\] parameter `scale` was saved for backward by `mul` at "
                     rf"\S*test_models.py:{_line('MUTATES') - 2} .* then modified in place by `mul_` at "
                     rf"\S*test_models.py:{_line('MUTATES')}:", " ".join(out.split()))
    assert "test_clean_training_step" not in out.split("short test summary info")[-1]


def test_the_plugin_is_registered_by_its_entry_point():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="pytest11") if e.name == "fxinplace"]
    assert plugin.value == "fxinplace.pytest_plugin"
    assert os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") is None  # the subprocess runs find it so
