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
