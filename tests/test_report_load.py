"""A saved report loads back as the same records: `Report.from_dict` inverts `Report.to_dict`."""

from __future__ import annotations

import json

import pytest

import fxinplace
from test_report import _reports


@pytest.mark.parametrize("name, report", list(_reports()), ids=lambda v: v if isinstance(v, str) else "")
def test_a_real_report_survives_json(name, report):
    data = json.loads(report.to_json())
    loaded = fxinplace.Report.from_dict(data)
    assert loaded.to_dict() == data
    assert loaded.render() == report.render()  # one renderer: the table and the messages as printed
    assert loaded.messages() == report.messages()


@pytest.mark.parametrize("data, said", [
    ([], "the report must be a JSON object"),
    ({"graphs": []}, "`schema_version` must be 2, 3 or 4"),
    ({"schema_version": 3}, "the report has no field `graphs`"),
    ({"schema_version": 3, "graphs": {}}, "the report.graphs must be a JSON array"),
    ({"schema_version": 3, "graphs": [{"compile_id": "0/0"}]}, "graphs[0] has no field `tasks`"),
])
def test_a_bad_report_says_what_was_expected(data, said):
    with pytest.raises(ValueError, match=r"^fxinplace report: ") as info:
        fxinplace.Report.from_dict(data)
    assert said in str(info.value)


@pytest.mark.parametrize("reason", list(fxinplace.EagerReason), ids=str)
def test_why_a_graph_ran_op_by_op_survives_json(reason):
    error = "RuntimeError: x" if reason is fxinplace.EagerReason.COMPILER_FAILED else None
    graph = fxinplace.GraphReport("1/0", "forward", "return_value", functionalized=True, compile_error=error,
                                  ran_eagerly=reason)
    data = json.loads(fxinplace.Report((graph,)).to_json())
    assert data["graphs"][0]["ran_eagerly"] is True and data["graphs"][0]["ran_eagerly_because"] == reason.value
    assert fxinplace.Report.from_dict(data).graphs[0].ran_eagerly is reason
    # Written before `ran_eagerly_because` existed: the reason of then, told by `compile_error`.
    del data["graphs"][0]["ran_eagerly_because"]
    old = fxinplace.EagerReason.COMPILER_FAILED if error else fxinplace.EagerReason.REFUSED_WHEN_RUN
    assert fxinplace.Report.from_dict(data).graphs[0].ran_eagerly is old
