"""`fxinplace.audit`: run a model once through the backend and return its report."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from ._compat import dynamo_reset, pytree
from ._sources import SourceLocation, source_of, user_frame
from .backend import InplaceAudit, emit_tables
from .facts import DEFAULT_SEVERITY, Hazard, HazardCode, OutputKind, Site
from .options import parse_options
from .passes.split_tasks import task_name
from .report import GraphReport, Report

__all__ = ["audit"]

# Autograd refuses these while Dynamo traces; we turn them into report entries.
_TRACE_FAILURES = {
    "a leaf Variable that requires grad is being used in an in-place operation": HazardCode.LEAF_INPLACE,
    "is a view and is being modified inplace": HazardCode.VIEW_INPLACE,
    "A view was created in no_grad mode and is being modified inplace": HazardCode.VIEW_INPLACE,
}


def audit(model: torch.nn.Module | Any, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Run `model(*args, **kwargs)` once through the `inplace_audit` backend; return its `Report`.

    Tasks are named after the keys of the model's output dict (or the positions of a tuple)
    where they can be recovered. `options` are the backend's options; the compiler defaults
    to "eager" here (the audit does not need compiled code) and tables are printed unless
    `options={"print": False}`. The call runs the model for real: parameters, buffers and
    inputs are updated as in any forward call. With `options={"fixes": True}`, each
    error-level hazard also gets a checked fix (`Hazard.patch`; docs/fixes.md), worked out on
    copies of the model and inputs before the audited call.
    """
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise TypeError(f"fxinplace.audit: `model` must be a torch.nn.Module or a callable, got {type(model).__name__}")
    options = {"compiler": "eager", **(options or {})}
    shown = parse_options(options)
    fixes = None
    if shown.fixes:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"fxinplace.audit: option `fixes` needs a torch.nn.Module (the fix is checked on a copy "
                            f"of it), got {type(model).__name__}")
        from .fixes import propose_fixes

        try:  # on copies: the audited call below sees the model as it was
            fixes = propose_fixes(model, *args, **kwargs)
        except Exception as e:  # the fix-its' own failure must not stop the audit
            if shown.strict:
                raise
            warnings.warn(f"fxinplace.audit: proposing fixes failed ({type(e).__name__}: {e}); the report has none",
                          stacklevel=2)
    # Tables come once tasks have names; fixes, above, once per call.
    backend = InplaceAudit(**{**options, "print": False, "file": None, "fixes": False})
    backend.model = model if isinstance(model, torch.nn.Module) else None
    compiled = torch.compile(model, backend=backend)
    try:
        result = compiled(*args, **kwargs)
        backend.settle(result)  # the frame returned: which saves past a break a loss can reach
    except Exception as e:
        failure = _trace_failure(e, [gm for g in backend.graphs if g.gm is not None and (gm := g.gm()) is not None])
        if failure is None:
            raise
        if fixes is not None:
            failure = fixes.attached_to(failure)
        emit_tables(failure, shown)
        return Report((failure,))
    finally:
        dynamo_reset()  # the audit's compiled code must not stay in the user's cache

    paths = _output_paths(result)
    graphs = []
    for graph in backend.graphs:
        report = graph.report.named(_names_from_result(graph.report, graph.outputs, paths, shown.tasks))
        if fixes is not None:
            report = fixes.attached_to(report)
        emit_tables(report, shown)
        graphs.append(report)
    return Report(tuple(graphs))


def _output_paths(result: Any) -> dict[int, str]:
    """id(tensor) -> its path in the model's result, as `_compat.graph_output_roles` writes
    it: "" (the result itself), "seg", "aux.depth", "[1]", "aux[0]"."""
    paths: dict[int, str] = {}
    for path, leaf in pytree.tree_flatten_with_path(result)[0]:
        if isinstance(leaf, torch.Tensor):
            text = ""
            for k in path:
                if hasattr(k, "idx"):
                    text += f"[{k.idx}]"
                else:
                    key = getattr(k, "key", getattr(k, "name", k))
                    text += f".{key}" if text else str(key)
            paths.setdefault(id(leaf), text)
    return paths


def _names_from_result(graph: GraphReport, outputs: Sequence[int], paths: dict[int, str],
                       tasks: dict[str, str]) -> list[str | None]:
    # The backend named what the graph returns; the model's result also places what a graph
    # before a break passed on, or what Dynamo could not place (the same naming rule).
    names: list[str | None] = []
    for i, tensor_id in enumerate(outputs):
        role = graph.outputs[i] if i < len(graph.outputs) else None
        known = role is not None and role.kind is OutputKind.RETURNED
        names.append(task_name(paths[tensor_id], tasks) if not known and tensor_id in paths else None)
    return names


def _trace_failure(e: BaseException, graphs: Sequence[torch.fx.GraphModule] = ()) -> GraphReport | None:
    text = str(e)
    for needle, code in _TRACE_FAILURES.items():
        if needle in text:
            source = _user_frame(e, graphs)
            site = Site("?", source) if source is not None else None
            hazard = Hazard(code, DEFAULT_SEVERITY[code], mutated_by=site, pytorch_said=needle)
            return GraphReport("?", "?", "tracing failed", hazards=(hazard,))
    return None


def _user_frame(e: BaseException, graphs: Sequence[torch.fx.GraphModule] = ()) -> SourceLocation | None:
    stack = getattr(e, "real_stack", None)
    frames = list(stack) if stack else []
    if not frames:
        import traceback

        frames = traceback.extract_tb(e.__traceback__)
    innermost_first = list(reversed(frames))
    for frame in innermost_first:
        if frame.filename.startswith("<eval_with_key>"):
            # Dynamo traced the graph, but running it raised (the fakes did not refuse what the
            # real tensors do): the line is in the graph's generated code, its node knows ours.
            source = _graph_source(frame, graphs)
            if source is not None:
                return source
    frame = user_frame(innermost_first)
    if frame is None:
        return None
    return SourceLocation(frame.filename, frame.lineno, (frame.line or "").strip(), frame.name)


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
