"""`fxinplace.audit`: run a model once through the backend and return its report."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from ._sources import SourceLocation, is_internal_file, source_of
from .backend import InplaceAudit, analyze, emit_tables
from .passes.functionalize import carry_rewrites
from .report import GraphReport, Hazard, Report

__all__ = ["audit"]

_VIEW_INPLACE = (
    "view-inplace",
    "in-place op on a view that autograd forbids modifying (a view created in no_grad mode, or one of "
    "several views returned by one op such as unbind/split/chunk): clone the view first, or write the op "
    "out of place",
)
_TRACE_FAILURES = {
    # Autograd refuses these while Dynamo traces; we turn them into report entries.
    "a leaf Variable that requires grad is being used in an in-place operation": (
        "leaf-inplace",
        "in-place op on a leaf tensor that requires grad (a parameter or an input with "
        "requires_grad=True) while grad mode is on: autograd forbids it. Wrap it in `torch.no_grad()` if it is "
        "a deliberate update, or write `x = x * 2` instead of `x.mul_(2)`",
    ),
    "is a view and is being modified inplace": _VIEW_INPLACE,
    "A view was created in no_grad mode and is being modified inplace": _VIEW_INPLACE,
}


def audit(model: torch.nn.Module | Any, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Run `model(*args, **kwargs)` once through the `inplace_audit` backend; return its `Report`.

    Tasks are named after the keys of the model's output dict (or the positions of a tuple)
    where they can be recovered. `options` are the backend's options; the compiler defaults
    to "eager" here (the audit does not need compiled code) and tables are printed unless
    `options={"print": False}`. The call runs the model for real: parameters, buffers and
    inputs are updated as in any forward call.
    """
    options = {"compiler": "eager", **(options or {})}
    backend = InplaceAudit(**options)
    backend.defer_tables = True
    backend.capture_outputs = True
    backend.model = model if isinstance(model, torch.nn.Module) else None
    compiled = torch.compile(model, backend=backend)
    try:
        result = compiled(*args, **kwargs)
    except Exception as e:
        failure = _trace_failure(e, [g.gm for g in backend.graphs])
        if failure is None:
            raise
        report = Report((failure,))
        emit_tables(failure, backend.options)
        return report
    finally:
        torch._dynamo.reset()  # the audit's compiled code must not stay in the user's cache

    names = _output_names(result)
    graphs = []
    for graph in backend.graphs:
        report = graph.report
        if graph.trace is not None and graph.outputs:
            output_names = [_task_name(names.get(i), backend.options.tasks) for i in graph.outputs]
            if any(output_names):
                fresh = analyze(
                    graph.gm, graph.trace, graph.identity, backend.options, output_names, graph.saved_inputs
                )
                if report.functionalized:
                    fresh = dataclasses.replace(
                        fresh, functionalized=True, mutations=carry_rewrites(report.mutations, fresh.mutations)
                    )
                report = fresh
                graph.report = report
        emit_tables(report, backend.options)
        graphs.append(report)
    return Report(tuple(graphs))


def _output_names(result: Any) -> dict[int, str]:
    """id(tensor) -> a readable path in the model's output ("seg", "aux.depth", "1")."""
    names: dict[int, str] = {}
    for path, leaf in pytree.tree_flatten_with_path(result)[0]:
        if isinstance(leaf, torch.Tensor):
            parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
            names.setdefault(id(leaf), ".".join(parts) or "output")
    return names


def _task_name(key: str | None, tasks: dict[str, str]) -> str | None:
    if key is None:
        return None
    return next((t for t, wanted in tasks.items() if key == wanted or key.startswith(wanted + ".")), key)


def _trace_failure(e: BaseException, graphs: Sequence[torch.fx.GraphModule] = ()) -> GraphReport | None:
    text = str(e)
    for needle, (code, advice) in _TRACE_FAILURES.items():
        if needle in text:
            source = _user_frame(e, graphs)
            where = f" at {source}" if source else ""
            message = f"{advice}. PyTorch said: {needle}{where}"
            hazard = Hazard(code, "error", message, source)
            return GraphReport("?", "?", "tracing failed", hazards=(hazard,))
    return None


def _user_frame(e: BaseException, graphs: Sequence[torch.fx.GraphModule] = ()) -> SourceLocation | None:
    stack = getattr(e, "real_stack", None)
    frames = list(stack) if stack else []
    if not frames:
        import traceback

        frames = traceback.extract_tb(e.__traceback__)
    for frame in reversed(frames):
        if frame.filename.startswith("<eval_with_key>"):
            # Dynamo traced the graph, but running it raised (the fakes did not refuse what the
            # real tensors do): the line is in the graph's generated code, its node knows ours.
            source = _graph_source(frame, graphs)
            if source is not None:
                return source
        elif not is_internal_file(frame.filename):
            return SourceLocation(frame.filename, frame.lineno, (frame.line or "").strip(), frame.name)
    return None


def _graph_source(frame, graphs: Sequence[torch.fx.GraphModule]) -> SourceLocation | None:
    for gm in graphs:
        code = getattr(type(gm).forward, "__code__", None)
        if code is None or code.co_filename != frame.filename:
            continue
        # `_lineno_map` counts lines from the `def` line, as Dynamo reads it.
        index = (getattr(gm, "_lineno_map", None) or {}).get(frame.lineno - code.co_firstlineno)
        nodes = list(gm.graph.nodes)
        if index is not None and index < len(nodes):
            return source_of(nodes[index])
    return None
