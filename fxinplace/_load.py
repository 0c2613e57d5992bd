"""A saved report back as records: the inverse of `fxinplace.render`'s dicts (`Report.from_dict`).

Tasks are output positions underneath; a saved graph names them, so each name becomes the
position of its first place in the graph's `tasks`, and `render` names it as it was. A
report of schema version 2 lacks some of the facts its messages were made of (what a hazard
saved, the readers of a cross-task write): they load empty, and those messages say less.
Version 4 added each hazard's checked fix (`patch`, null unless fixes were asked for) and
each mutation's `read_by`.
"""

from __future__ import annotations

import re
from typing import Any

from ._sources import SourceLocation
from .facts import (Detail, EagerReason, FixKind, FixStatus, Hazard, HazardCode, KeptReason, Mutation, NoFixReason,
                    OutputKind, OutputRole, Patch, Rewrite, RewriteKind, Saved, Severity, Site, Target)

__all__ = ["report_from_dict", "LOADABLE_VERSIONS"]

LOADABLE_VERSIONS = (2, 3, 4)

_OUTPUT = re.compile(r"output\[(\d+)\]")  # how `render.task_names` names a position it has no name for


def report_from_dict(data: Any):
    """`Report.to_dict()`'s output (or the parsed JSON) back as a `Report`; a `ValueError` says
    which field is missing or wrong, and what was expected there."""
    from .report import Report

    _expect(isinstance(data, dict), "the report", "a JSON object with `schema_version` and `graphs`", data)
    version = data.get("schema_version")
    versions = ", ".join(map(str, LOADABLE_VERSIONS[:-1])) + f" or {LOADABLE_VERSIONS[-1]}"
    _expect(version in LOADABLE_VERSIONS, "`schema_version`", f"{versions} (a report written by `Report.to_json()`)",
            version)
    graphs = _field(data, "graphs", "the report", list)
    return Report(tuple(_graph(g, f"graphs[{i}]") for i, g in enumerate(graphs)))


def _graph(data: Any, where: str):
    from .report import GraphReport

    _expect(isinstance(data, dict), where, "an object", data)
    tasks = tuple(_field(data, "tasks", where, list))
    positions = _Positions(tasks)
    shared = {p: positions(names) for p, names in _field(data, "shared_parameters", where, dict).items()}
    mutations = tuple(_mutation(m, f"{where}.mutations[{i}]", positions)
                      for i, m in enumerate(_field(data, "mutations", where, list)))
    hazards = tuple(_hazard(h, f"{where}.hazards[{i}]", positions) for i, h in enumerate(_field(data, "hazards", where, list)))
    return GraphReport(
        _field(data, "compile_id", where, str), _field(data, "function", where, str), _field(data, "reason", where, str),
        mutations=mutations, task_names=tasks, shared=shared, hazards=hazards,
        outputs=tuple(_output(o, f"{where}.outputs[{i}]") for i, o in enumerate(data.get("outputs") or ())),
        analysis_error=data.get("analysis_error"), functionalized=bool(data.get("functionalized", False)),
        compile_error=data.get("compile_error"), ran_eagerly=_eager_reason(data),
    )


def _eager_reason(data: dict) -> EagerReason | None:
    # `ran_eagerly_because` came after `ran_eagerly`: a report without it names the reason of then.
    if not data.get("ran_eagerly"):
        return None
    because = data.get("ran_eagerly_because")
    if because is not None:
        return _enum(EagerReason, because, "ran_eagerly_because")
    return EagerReason.COMPILER_FAILED if data.get("compile_error") else EagerReason.REFUSED_WHEN_RUN


class _Positions:
    """Task names -> output positions, for one graph."""

    def __init__(self, tasks: tuple[str, ...]) -> None:
        self.first = {}
        for i, name in enumerate(tasks):
            self.first.setdefault(name, i)

    def __call__(self, names: Any) -> frozenset[int]:
        found = set()
        for name in names or ():
            if name in self.first:
                found.add(self.first[name])
            elif (unnamed := _OUTPUT.fullmatch(str(name))) is not None:
                found.add(int(unnamed.group(1)))
        return frozenset(found)


def _output(data: Any, where: str) -> OutputRole | None:
    if data is None:
        return None
    _expect(isinstance(data, dict) and "kind" in data, where, "null or an object with `kind` and `path`", data)
    return OutputRole(_enum(OutputKind, data["kind"], f"{where}.kind"), str(data.get("path", "")))


def _mutation(data: Any, where: str, positions: _Positions) -> Mutation:
    _expect(isinstance(data, dict), where, "an object", data)
    site = Site(
        _field(data, "op", where, str), _source(data.get("source")), data.get("module") or "",
        positions(data.get("tasks")), hidden=not data.get("autograd_visible", True),
        no_grad=bool(data.get("under_no_grad", False)), module_type=data.get("module_type") or "",
    )
    target = _target(data.get("target"), f"{where}.target")
    _expect(target is not None, f"{where}.target", "an object with `kind` and `name`", None)
    hazards = tuple(_hazard(h, f"{where}.hazards[{i}]", positions) for i, h in enumerate(_field(data, "hazards", where, list)))
    return Mutation(_field(data, "node", where, str), target, site, tuple(data.get("view_chain") or ()),
                    bool(data.get("shared", False)), hazards, _rewrite(data.get("rewrite"), f"{where}.rewrite"),
                    positions(data.get("read_by")))


def _hazard(data: Any, where: str, positions: _Positions) -> Hazard:
    _expect(isinstance(data, dict), where, "an object", data)
    code = _enum(HazardCode, _field(data, "code", where, str), f"{where}.code")
    return Hazard(
        code, _enum(Severity, _field(data, "severity", where, str), f"{where}.severity"),
        target=_target(data.get("target"), f"{where}.target"),
        mutated_by=_site(data.get("mutated_by"), positions),
        saved_by=_site(data.get("saved_by"), positions),
        saved=tuple(Saved(_target(s.get("target"), f"{where}.saved"), _site(s.get("made_at"), positions))
                    for s in data.get("saved") or ()),
        detail=_enum(Detail, data["detail"], f"{where}.detail") if data.get("detail") else None,
        readers=tuple((r["when"], _site(r["site"], positions)) for r in data.get("readers") or ()),
        other_tasks=positions(data.get("other_tasks")),
        pytorch_said=data.get("pytorch_said"),
        removed_by_rewrite=bool(data.get("removed_by_rewrite", False)),
        stored_only=bool(data.get("stored_only", False)),
        patch=_patch(data.get("patch"), f"{where}.patch"),
    )


def _patch(data: Any, where: str) -> Patch | None:
    if data is None:
        return None
    _expect(isinstance(data, dict), where, "an object or null", data)
    kind, reason = data.get("kind"), data.get("reason")
    return Patch(_enum(FixStatus, _field(data, "status", where, str), f"{where}.status"),
                 _enum(FixKind, kind, f"{where}.kind") if kind else None, data.get("file"), data.get("line"),
                 data.get("diff") or "", _enum(NoFixReason, reason, f"{where}.reason") if reason else None,
                 data.get("detail") or "", tuple(_source(s) for s in data.get("gradients_from") or ()))


def _site(data: Any, positions: _Positions) -> Site | None:
    if data is None:
        return None
    source = SourceLocation(data["file"], data["line"], "") if data.get("file") is not None else None
    return Site(data["op"], source, data.get("module") or "", positions(data.get("tasks")), graph=data.get("graph"),
                hidden=bool(data.get("hidden", False)), no_grad=bool(data.get("no_grad", False)),
                module_type=data.get("module_type") or "")


def _target(data: Any, where: str) -> Target | None:
    if data is None:
        return None
    _expect(isinstance(data, dict) and "kind" in data and "name" in data, where, "an object with `kind` and `name`", data)
    return Target(data["kind"], data["name"], data.get("produced_by"), tuple(data.get("aliases") or ()),
                  user_named=data.get("user_named", True))


def _source(data: Any) -> SourceLocation | None:
    if data is None:
        return None
    return SourceLocation(data["file"], data["line"], data.get("code") or "")


def _rewrite(data: Any, where: str) -> Rewrite | None:
    if data is None:
        return None
    reason = data.get("reason")
    return Rewrite(_enum(RewriteKind, data.get("kind"), f"{where}.kind"),
                   _enum(KeptReason, reason, f"{where}.reason") if reason else None,
                   tuple(data.get("detail") or ()), bool(data.get("saved_earlier", False)),
                   bool(data.get("checkpoints_inlined", False)))


def _enum(kind, value: Any, where: str):
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in kind)
        raise ValueError(f"fxinplace report: {where} must be one of {allowed}, got {value!r}") from None


def _field(data: dict, key: str, where: str, kind: type) -> Any:
    if key not in data:
        raise ValueError(f"fxinplace report: {where} has no field `{key}` (its fields: {', '.join(sorted(data)) or 'none'})")
    value = data[key]
    _expect(isinstance(value, kind), f"{where}.{key}", f"a JSON {_JSON_NAMES[kind]}", value)
    return value


_JSON_NAMES = {list: "array", dict: "object", str: "string"}


def _expect(ok: bool, where: str, expected: str, found: Any) -> None:
    if not ok:
        shown = repr(found)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ValueError(f"fxinplace report: {where} must be {expected}, got {shown}")
