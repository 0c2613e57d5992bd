"""`functionalize=True` against eager on PyTorch's in-place ops (`opinfo_functionalize.py`).

One test per op of a seeded share of the short cases (float32, the first 3 usable samples
an op): `SHARE` of the samples after each op's first, which is always in. The share is 0.5:
about 290 cases, 3 programs each, about 2 minutes here (the full short mode takes about
3 minutes: `python tests/opinfo_functionalize.py`; `--long` runs everything).

An op passes when every program of its cases is "ok" or in a category that is not
functionalize's to fix (`EXCLUDED`): eager itself refuses, plain aot_eager fails the same
way, or Dynamo broke the graph and plain aot_eager breaks it too. An op in `KNOWN` fails
today because of a library bug: its test checks that it still fails, only in the programs
named, so a fix shows up as a failure asking to remove the entry.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import opinfo_functionalize as harness
from opinfo_cases import seeded_share

SHARE = 0.5

EXCLUDED = {"ok", "eager refuses", "aot_eager fails too"}


@dataclasses.dataclass(frozen=True)
class Known:
    programs: str  # the programs that fail today ("abc": all of them)
    reason: str


# Empty: every op the sweep found failing was fixed in the library (tests/test_functionalize_ops.py
# keeps a minimized regression for each). An entry here is an op that fails today, by a library bug.
KNOWN: dict[str, Known] = {}

# The long mode's remaining findings (`--long`; docs/reliability.md, "PyTorch's operator
# catalogue"): nn.functional.silu.complex (no correct out-of-place program to rewrite to: kept in
# place, with a warning), bfloat16 rounding in elu/celu/selu/addcdiv/addcmul, and program b of
# random ops whose draws differ (no buffer replay yet).


def _by_op() -> dict[str, list]:
    cases: dict[str, list] = {}
    for case in seeded_share(harness.float_cases(), SHARE, seed=0):
        cases.setdefault(case.op_name, []).append(case)
    return cases


CASES = _by_op()


def _excluded(outcome: harness.Outcome) -> bool:
    if outcome.category in EXCLUDED:
        return True
    # A graph break plain aot_eager makes too (an in-place op on a buffer Dynamo will not
    # trace, a data-dependent op) leaves nothing compiled to test.
    return outcome.category == "op not compiled" and "plain aot_eager breaks too" in outcome.note


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("op_name", sorted(CASES))
def test_functionalize_matches_eager(op_name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = harness.sweep(CASES[op_name])
    failing = [o for o in outcomes if not _excluded(o)]
    known = KNOWN.get(op_name)
    if known is None:
        assert not failing, "functionalize differs from eager:\n" + "\n".join(f"  {o}" for o in failing)
        return
    unexpected = [o for o in failing if o.program not in known.programs]
    assert not unexpected, f"beyond KNOWN[{op_name!r}] ({known.programs}):\n" + "\n".join(f"  {o}" for o in unexpected)
    fixed = sorted(set(known.programs) - {o.program for o in failing})
    assert not fixed, (f"KNOWN[{op_name!r}] expects programs {known.programs} to fail ({known.reason}), but "
                       f"{', '.join(fixed)} passed: remove them from KNOWN")


def test_known_ops_are_in_the_share():
    assert set(KNOWN) <= set(CASES), sorted(set(KNOWN) - set(CASES))


# ---------------------------------------------------------------------------------------
# The comparison can fail


def _eager_run(op_name: str, program: str = "a") -> tuple[harness.Run, object]:
    case = CASES[op_name][0]
    run, _, _ = harness._eager(case, program)
    assert run.forward_error is None and run.backward_error is None
    return run, case


def test_compare_agrees_with_itself():
    run, _ = _eager_run("mul")
    assert harness.compare(run, run) == []


def test_compare_detects_a_perturbed_gradient():
    run, _ = _eager_run("mul")
    grads = dict(run.grads)
    grads["x"] = grads["x"] * (1 + 1e-3)
    found = harness.compare(dataclasses.replace(run, grads=grads), run)
    assert [what for what, _ in found] == ["grad"], found


def test_compare_detects_none_against_zeros_both_ways():
    run, _ = _eager_run("mul")
    zeros = dataclasses.replace(run, grads={**run.grads, "x": torch.zeros_like(run.grads["x"])})
    missing = dataclasses.replace(run, grads={**run.grads, "x": None})
    assert [what for what, _ in harness.compare(missing, zeros)] == ["None-vs-zeros"]
    assert [what for what, _ in harness.compare(zeros, missing)] == ["None-vs-zeros"]
    assert [what for what, _ in harness.compare(missing, run)] == ["grad"]  # None vs a non-zero gradient


def test_compare_detects_requires_grad_output_and_buffer_differences():
    run, _ = _eager_run("mul")
    detached = dataclasses.replace(run, requires_grad=[False] + run.requires_grad[1:])
    assert [what for what, _ in harness.compare(detached, run)] == ["requires_grad"]
    shifted = dataclasses.replace(run, outputs=[run.outputs[0] + 1] + run.outputs[1:])
    assert [what for what, _ in harness.compare(shifted, run)] == ["output"]
    assert [what for what, _ in harness.compare(shifted, run, values=False)] == []  # random ops: values left out
    buffered, case = _eager_run("mul", "b")
    written = dataclasses.replace(buffered, buffers={"buf": buffered.buffers["buf"] * 2 + 1})
    assert [what for what, _ in harness.compare(written, buffered)] == ["buffer"]


def test_compare_detects_a_backward_that_raises_only_on_one_side():
    run, _ = _eager_run("mul")
    raised = dataclasses.replace(run, backward_error="RuntimeError: boom")
    assert [what for what, _ in harness.compare(raised, run)] == ["backward"]


def test_random_ops_are_found_by_asking_pytorch():
    assert harness._is_random(CASES["uniform"][0])
    assert harness._is_random(CASES["nn.functional.rrelu"][0])
    assert not harness._is_random(CASES["mul"][0])
    assert harness._is_homogeneous(CASES["nn.functional.rrelu"][0])
    assert not harness._is_homogeneous(CASES["uniform"][0])
