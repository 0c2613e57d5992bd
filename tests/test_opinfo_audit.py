"""The op_db sweep (tests/opinfo_audit.py): every in-place and `out=` write of PyTorch's own
operator catalogue is named, with its real target, at the user's line, as eager PyTorch says."""

from __future__ import annotations

import dataclasses
import functools
import tempfile

import pytest

import opinfo_audit
from opinfo_audit import EXCLUDED, Outcome, build, run_program, summary, sweep
from opinfo_cases import inplace_cases, out_cases, seeded_share

# 20 % of the short mode's cases beyond the first sample of every op (`seeded_share` keeps
# that one): 496 of its 947 cases (543 at 30 %, 145 s on a slow day, the longest test of the
# suite; CI must stay under 30 minutes for both releases). The whole short mode and the long
# one run from `tests/opinfo_audit.py` (docs/reliability.md).
CI_SHARE = 0.2
CI_SEED = 0

# Where Dynamo itself breaks the graph around the write, so that no graph holds it (the
# sweep decides that at run time; this table only keeps a new break from passing unseen):
# op -> the first lines of Dynamo's reasons. (OpInfo's `wrapper_set_seed`, which Dynamo skips,
# is taken out of the random ops by `opinfo_cases.traceable`: they are audited in the graph.)
_INPUT_VIEW = ("Inplace op on input tensor",)
KNOWN_OUTSIDE = {
    "as_strided": _INPUT_VIEW,
    "as_strided.partial_views": _INPUT_VIEW,
    "squeeze": _INPUT_VIEW,
    "squeeze.multiple": _INPUT_VIEW,
    "unsqueeze": _INPUT_VIEW,
    "transpose": _INPUT_VIEW,
    "t": _INPUT_VIEW,
    "resize_": _INPUT_VIEW + ("Unsupported Tensor.resize_() call",),
    "masked_select": ("Dynamic shape operator",),
    "nonzero": ("Dynamic shape operator",),
    "linalg.lstsq": ("Dynamic shape operator",),
}


@functools.cache
def _short_cases():
    return tuple(inplace_cases(opinfo_audit.SHORT_PER_OP) + out_cases(opinfo_audit.SHORT_PER_OP))


def _op(outcome: Outcome) -> str:
    return outcome.id.split("[", 1)[0]


def test_the_audit_names_every_write_eager_makes_in_op_db():
    cases = seeded_share(list(_short_cases()), CI_SHARE, CI_SEED)
    outcomes = sweep(cases)
    failing = [o for o in outcomes if o.category not in ("ok", *EXCLUDED)]
    assert not failing, summary(failing)

    outside = [o for o in outcomes if o.category == "outside the graph"]
    unknown = [o for o in outside if not any(r in o.detail for r in KNOWN_OUTSIDE.get(_op(o), ()))]
    assert not unknown, "writes outside every graph, not known to KNOWN_OUTSIDE:\n" + summary(unknown)
    # The sweep must not pass by excluding: nearly every program is checked in full.
    ok = sum(o.category == "ok" for o in outcomes)
    assert ok >= 0.9 * len(outcomes), summary(outcomes, details=False)


# -- the harness can fail ------------------------------------------------------------------


def _case(case_id: str):
    (case,) = [c for c in _short_cases() if c.id == case_id]
    return case


def _run(case_id: str, target: str) -> Outcome:
    program, constants = build(_case(case_id), target)
    with tempfile.TemporaryDirectory() as directory, opinfo_audit._quiet():
        return run_program(program, constants, directory)


def _doctored(monkeypatch, change):
    honest = opinfo_audit.report_of

    def doctored(audit):
        report = honest(audit)
        graphs = tuple(dataclasses.replace(g, mutations=tuple(change(list(g.mutations)))) for g in report.graphs)
        return dataclasses.replace(report, graphs=graphs)

    monkeypatch.setattr(opinfo_audit, "report_of", doctored)


def _moved(m):
    return dataclasses.replace(m, site=dataclasses.replace(m.site, source=dataclasses.replace(m.source, line=m.source.line + 1)))


def _extra_input(ms):
    fake = dataclasses.replace(ms[0], target=dataclasses.replace(ms[0].target, kind="input", name="a0"))
    return ms + [fake]


PROGRAMS = [
    ("add[0]-float32-inplace", "intermediate view"),
    ("index_put[0]-float32-inplace", "buffer view"),
    ("nn.functional.relu[0]-float32-inplace", "parameter"),
    ("max.reduction_with_dim[0]-float32-out", "buffer out"),
]
# A doctored report, and the category the sweep must then give. The extra target is an input
# `a0` eager did not write (the op reads it, or there is none).
DOCTORED = {
    "missed target": lambda ms: [],
    "wrong line": lambda ms: [_moved(m) for m in ms],
    "wrong target": _extra_input,
}


@pytest.mark.parametrize("case_id, target", PROGRAMS, ids=[f"{c}:{t}" for c, t in PROGRAMS])
@pytest.mark.parametrize("category", DOCTORED)
def test_a_doctored_report_is_caught(case_id, target, category, monkeypatch):
    assert _run(case_id, target).category == "ok"
    _doctored(monkeypatch, DOCTORED[category])
    outcome = _run(case_id, target)
    assert outcome.category == category, outcome


def test_a_write_outside_every_graph_is_told_from_a_miss(monkeypatch):
    # `x.t_()` on an input: Dynamo skips the frame, the write runs in eager.
    outcome = _run("t[0]-float32-inplace", "input")
    assert outcome.category == "outside the graph" and "Inplace op on input tensor" in outcome.detail
    # On an intermediate a graph holds the write: there, an empty report is a miss.
    assert _run("t[0]-float32-inplace", "intermediate").category == "ok"
    _doctored(monkeypatch, DOCTORED["missed target"])
    assert _run("t[0]-float32-inplace", "intermediate").category == "missed target"


def test_what_eager_refuses_is_decided_by_eager():
    outcome = _run("float_power[0]-float32-inplace", "input")
    assert outcome.category == "eager refuses" and "requires dtype Double" in outcome.detail
