"""The `inplace_audit` torch.compile backend: audit each graph, then hand it off.

    torch.compile(model, backend="inplace_audit", options={"compiler": "inductor"})

For every graph Dynamo hands over it runs the passes in `fxinplace.passes`, prints a table,
keeps a `GraphReport`, and then compiles the graph, unchanged (unless `functionalize` was
asked for), with the chosen compiler.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch
import torch.fx

from . import render
from ._compat import (StorageWeakRef, current_compile_id, current_sequence_nr, example_value, graph_break_reason,
                      graph_output_roles, hop_name, inductor_compile_fx, inductor_mode_options, is_multi_output_view,
                      lookup_backend, pytree, resumed_at, resumes, trace_artifact, tested_range,
                      torch_is_tested, traced_code, warn_untested_once)
from ._cross_graph import (BetweenSave, CrossGraphState, ForwardWrite, Reach, SavedByForward, forward_writes_saved,
                           reach_after_call,
                           saves_between_graphs, saves_for_later_graphs, writes_after_reads)
from ._logs import Counts, PassTimes
from ._rewrites import mark_kept, mark_rewrites
from ._sources import SourceLocation, break_source, is_dynamo_file, is_internal_file, line_of, root_modules
from .errors import AnalysisError, AnalysisWarning, CompilerFallbackWarning
from .facts import (DEFAULT_SEVERITY, Detail, EagerReason, Hazard, HazardCode, KeptReason, OutputKind, OutputRole,
                    RewriteKind, Saved, Severity, Site, Target)
from .options import AuditOptions, parse_options
from .passes._graph_io import describe_inputs, name_input
from .passes.find_hazards import find_hazards, site_of
from .passes.functionalize import FunctionalizedGraph, clone_outputs, functionalize, unchanged
from .passes.resolve_aliases import name_placeholders, target_of_root
from .passes.split_tasks import split_tasks
from .passes.trace_mutations import MutationTrace, output_nodes, trace_mutations
from .report import GraphReport, HazardError, Report

__all__ = ["InplaceAudit", "inplace_audit", "GraphRecord", "compiled_writes_to"]

log = logging.getLogger(__name__)

_AUTOGRAD_ERROR = "modified by an inplace operation"


@dataclass
class GraphRecord:
    """What the backend keeps of a graph for as long as it lives: the report, not the graph."""

    report: GraphReport
    outputs: tuple[int, ...] = ()  # id() of each tensor the latest call returned (`fxinplace.audit` names tasks)
    gm: weakref.ref | None = None  # the graph module, while Dynamo keeps it
    # (the real parameter, buffer or input written, index in `report.mutations`): the training
    # guard names a compiled write with its audit's facts (`compiled_writes_to`).
    written: tuple[tuple[weakref.ref, int], ...] = ()
    # Saved-tensor errors whose save only outputs of graphs watched per call reach (a graph that
    # ends in a break, under compiler "eager"; a Function's result, also compiled): (index in `report.mutations`, index in its
    # hazards, [(weakref to the watched `GraphSaves`, positions)]). `InplaceAudit.settle` judges
    # them once the frame has returned.
    past_break: tuple[tuple[int, int, tuple[tuple[weakref.ref, frozenset[int]], ...]], ...] = ()
    watched: tuple = ()  # `GraphSaves` of `past_break` entries nothing else keeps alive


@dataclass
class _AuditedGraph:
    """One graph while its compiled code lives (the wrapper keeps it): facts later graphs need."""

    gm: torch.fx.GraphModule
    identity: tuple[str, str, str]
    trace: MutationTrace | None
    record: GraphRecord
    saved_outputs: dict[int, Any] = field(default_factory=dict)  # output position -> its save
    saved_inputs: dict[torch.fx.Node, list] = field(default_factory=dict)  # saved by an earlier graph
    cross: Any = None  # `GraphSaves`: this graph's saves a later graph can invalidate
    placeholder_saves: dict[torch.fx.Node, Any] = field(default_factory=dict)  # placeholder -> its save
    # Why the graph runs op by op without being compiled, if it does: AOTAutograd would fail
    # when it runs (a failure a compile-time fallback cannot catch), or its one backward node
    # would reach code Dynamo ran between graphs that no loss reaches in eager.
    eager_only: EagerReason | None = None
    cloned_outputs: set[int] = field(default_factory=set)  # outputs the latest call handed over as clones

    @property
    def report(self) -> GraphReport:
        return self.record.report

    @report.setter
    def report(self, report: GraphReport) -> None:
        self.record.report = report


def _without_fixes(options: AuditOptions) -> AuditOptions:
    # A fix is checked by running the model on its inputs: only `fxinplace.audit` has them.
    if options.fixes:
        raise ValueError("inplace_audit: option `fixes` needs the model and its inputs, to check each fix on a copy; "
                         "use fxinplace.audit(model, x, options={\"fixes\": True}) or `python -m fxinplace fix "
                         "train.py` instead of torch.compile")
    return options


class InplaceAudit:
    """A torch.compile backend that audits in-place mutations, keeping one report per graph.

    `fxinplace.inplace_audit` is the instance behind `backend="inplace_audit"`; make your
    own to keep a model's reports apart::

        audit = fxinplace.InplaceAudit(compiler="eager", print=False)
        torch.compile(model, backend=audit)(x)
        audit.report.assert_no_hazards()
    """

    def __init__(self, **options: Any) -> None:
        self.options = _without_fixes(parse_options(options))
        _LIVE.add(self)
        self.graphs: list[GraphRecord] = []
        self._cross_graph = CrossGraphState()  # what later graphs must know after a break
        # (autograd's next sequence number, the break's line, the thread) after the latest call
        # of a graph ending in a break: what Dynamo runs itself at the break makes nodes from there
        # on, until the code resuming after that break compiles (sequence numbers are per thread).
        self._break_mark: tuple[int, SourceLocation, int] | None = None
        # Writes after reads in graphs compiled since that mark, in its thread: maybe the forward of
        # a Function Dynamo runs itself at the break, whose saves appear only when it returns.
        self._forward_writes: list[tuple[GraphRecord, ForwardWrite]] = []
        self._returned_since_mark: list[weakref.ref] = []  # what the graphs run since then returned
        # Earlier graphs' reports the latest graph's audit turned out wrong about: one of their
        # writes landed in what that Function saved (`_amend_forward_writes`).
        self._amended: list[GraphRecord] = []
        self.model: torch.nn.Module | None = None  # names parameters and buffers, when set (`fxinplace.audit`)

    @property
    def report(self) -> Report:
        return Report(tuple(g.report for g in self.graphs))

    def clear(self) -> None:
        """Forget the reports kept so far."""
        self.graphs.clear()
        self._cross_graph.clear()
        self._break_mark = None
        self._forward_writes.clear()
        self._returned_since_mark.clear()
        self._amended.clear()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None, **kwargs: Any):
        opts = self.options if not options else _without_fixes(parse_options({**self._explicit_options(), **options}))
        mode = kwargs.pop("mode", None)
        if kwargs:
            log.info("inplace_audit: ignoring unexpected backend arguments %s", sorted(kwargs))
        if not torch_is_tested():
            warn_untested_once()
        graph = self._audit(gm, example_inputs, opts)
        self.graphs.append(graph.record)
        audited, original = graph.report, gm
        wrap = None
        if opts.functionalize_mode:
            gm, wrap = self._functionalize(gm, example_inputs, opts, graph)
        amended, self._amended = self._amended, []
        for record in amended:
            emit_tables(record.report, opts)  # printed before; now with the error
        if opts.raise_on is not None:
            least = Severity(opts.raise_on).rank
            found = [h for g in [*(r.report for r in amended), graph.report] for h in g.all_hazards()
                     if h.severity.rank >= least]
            if found:
                log.debug("inplace_audit: graph %s: raising HazardError for %d hazard(s) (option raise_on=%r)",
                          graph.identity[0], len(found), opts.raise_on)
                self._emit(graph, opts)
                raise HazardError(graph.report, found, f"fxinplace: hazards at or above `{opts.raise_on}` (option raise_on):")
        try:
            if graph.eager_only:
                graph.report = dataclasses.replace(graph.report, ran_eagerly=graph.eager_only)
                compiled = gm.forward
            else:
                compiled = self._compile(gm, example_inputs, opts, mode, graph)
        except Exception as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if opts.functionalize_mode and not isinstance(e, HazardError):
                compiled = self._run_eagerly(gm, graph, opts, error, rewritten=gm is not original)
                return self._runner(gm, graph, compiled, wrap, opts)
            # Dynamo may fall back (a graph break, then eager): the report must not claim a
            # rewrite that never ran, nor hide the hazards it would have removed.
            mutations = graph.report.mutations
            if gm is not original:  # a rewrite that never ran
                mutations = mark_kept(audited.mutations, RewriteKind.NOT_APPLIED)
            graph.report = dataclasses.replace(graph.report, mutations=mutations, compile_error=error)
            self._emit(graph, opts)
            raise
        self._emit(graph, opts)
        return self._runner(gm, graph, compiled, wrap, opts)

    def _run_eagerly(self, gm: torch.fx.GraphModule, graph: _AuditedGraph, opts: AuditOptions, error: str,
                     rewritten: bool) -> Callable:
        # AOTAutograd refuses some graphs the plain compile refuses too (inputs sharing memory
        # that are not views of each other, a failed partition): the graph runs op by op in
        # eager, where autograd differentiates it as it stands, rewritten or kept.
        how = "as rewritten: it trains with the out-of-place program's gradients" if rewritten else "as written"
        warnings.warn(f"fxinplace: the compiler {_name_of(opts.compiler)} failed on graph {graph.identity[0]} "
                      f"`{graph.identity[1]}` ({error}); with functionalize, the graph runs op by op in eager "
                      f"instead, {how}", CompilerFallbackWarning, stacklevel=3)
        graph.report = dataclasses.replace(graph.report, compile_error=error, ran_eagerly=EagerReason.COMPILER_FAILED)
        self._emit(graph, opts)
        return gm.forward

    def _runner(self, gm: torch.fx.GraphModule, graph: _AuditedGraph, compiled: Callable, wrap: Callable | None,
                opts: AuditOptions) -> Callable:
        if wrap is not None:
            compiled = wrap(compiled)
        first_call = [True]
        # A graph that ends in a break is followed by more graphs in the same call: each call
        # saves afresh, and a later graph recompiled on a later call must see that call's saves.
        every_call = _ends_in_break(graph.gm)  # `gm` may be the rewrite, which keeps no break reason
        record = graph.record
        break_at = break_source(graph.gm) if every_call else None

        def run(*args):
            out = compiled(*args)
            flat = out if isinstance(out, (list, tuple)) else (out,)
            mark = self._break_mark  # read once: another thread may take it meanwhile
            if break_at is not None:
                self._break_mark = (current_sequence_nr(), break_at, threading.get_ident())
                self._forward_writes, self._returned_since_mark = [], []
            elif (mark is not None and mark[2] == threading.get_ident()
                  and len(self._returned_since_mark) < _RETURNED_KEPT):
                self._returned_since_mark += [weakref.ref(t) for t in flat if isinstance(t, torch.Tensor)]
            record.outputs = tuple(map(id, flat))
            if graph.trace is not None and (first_call[0] or every_call):
                self._remember_outputs(graph, list(flat), opts)
                first_call[0] = False
            return out

        return run

    def settle(self, returned: Any) -> None:
        """Judge the saved-tensor errors that hang on what the code after a graph break does,
        now that the frame returned `returned` (`fxinplace.audit` calls this after its run).

        Under compiler "eager" a save is unpacked only if a backward runs through the autograd
        nodes of the outputs that reach it. Freed before any backward ran, nothing can: the error
        goes. Alive, but in the history of nothing returned, only a loss computed from what keeps
        them (a caller's tensor written in place, an attribute) would fail: a warning, as for
        a tensor the forward only stores (`stored_only`).
        """
        leaves = pytree.tree_leaves(returned)
        # An object pytree cannot look into may hold tensors a loss comes from: then only freed
        # nodes settle anything.
        known = all(isinstance(v, (torch.Tensor, *_PLAIN)) or v is None for v in leaves)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)] if known else None
        for record in self.graphs:
            if not record.past_break:
                continue
            try:
                record.report = _settled(record, tensors)
            except Exception as e:  # the user's training comes first
                _fall_back(self.options, e, f"could not settle graph {record.report.compile_id}'s saves past a break",
                           "keeping its errors")

    def _emit(self, graph: _AuditedGraph, opts: AuditOptions) -> None:
        emit_tables(graph.report, opts)
        trace_report(graph.report, opts)

    def _remember_outputs(self, graph: _AuditedGraph, outputs: list, opts: AuditOptions) -> None:
        # The next graph after a graph break gets these tensors as inputs: if it writes one,
        # the backward of this graph fails. Checked when that graph compiles.
        if graph.trace is None or graph.cross is None:
            return
        try:
            self._cross_graph.after_call(graph.cross, graph.gm, outputs, graph.trace, graph.saved_outputs,
                                         kept_apart=graph.cloned_outputs)
        except Exception as e:  # the user's training comes first
            _fall_back(opts, e, f"could not record the outputs of graph {graph.identity[0]}", "training goes on")

    def _explicit_options(self) -> dict[str, Any]:
        defaults = AuditOptions().as_dict()
        return {k: v for k, v in self.options.as_dict().items() if v != defaults[k]}

    def _audit(self, gm: torch.fx.GraphModule, example_inputs: list, opts: AuditOptions) -> _AuditedGraph:
        identity = graph_identity(gm)
        log.debug("inplace_audit: graph %s `%s` (%s): %d nodes, %d inputs", identity[0], identity[1],
                  identity[2].splitlines()[0], len(gm.graph.nodes), len(example_inputs))
        passes = PassTimes()
        try:
            describe_inputs(gm, example_inputs)  # once per graph: every pass reads these records
            earlier = self._cross_graph.look_up(gm, example_inputs)
            passes("describe_inputs")
            trace = trace_mutations(gm, example_inputs)
            passes("trace_mutations")
            self._name_state(gm, example_inputs, trace)
            for node, target in earlier.targets.items():  # an earlier graph's name comes first
                name_input(node, target)
            passes("name_placeholders")
            per_op = opts.compiler == "eager"
            saved_inputs = self._cross_graph.saved_inputs(earlier, gm, example_inputs, trace, per_op)
            for node, saves in self._saved_between_graphs(gm, example_inputs, trace, identity, opts, per_op).items():
                saved_inputs.setdefault(node, []).extend(saves)
            report = analyze(gm, trace, identity, opts, saved_inputs=saved_inputs)
            passes("split_tasks+find_hazards")
            saved_outputs, saved_placeholders = saves_for_later_graphs(gm, trace)
            cross, placeholder_saves = self._cross_graph.record_inputs(
                gm, example_inputs, trace, saved_placeholders, identity[0])
            passes("cross_graph")
            log.debug("inplace_audit: graph %s passes: %s", identity[0], passes)
            log_findings(report)
        except Exception as e:  # the user's training comes first
            _fall_back(opts, e, f"the audit failed on graph {identity[0]} `{identity[1]}`", "compiling it without the audit")
            failed = GraphReport(*identity, analysis_error=f"{type(e).__name__}: {e}")
            return _AuditedGraph(gm, identity, None, GraphRecord(failed, gm=weakref.ref(gm)))
        record = GraphRecord(report, gm=weakref.ref(gm), written=_written_state(gm, example_inputs, trace, report),
                             past_break=_past_break(gm, trace, report, saved_inputs, cross) if per_op else ())
        self._note_forward_writes(gm, example_inputs, trace, record, opts)
        return _AuditedGraph(gm, identity, trace, record, saved_outputs=saved_outputs, saved_inputs=saved_inputs,
                             cross=cross, placeholder_saves=placeholder_saves)

    def _saved_between_graphs(self, gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace,
                              identity: tuple[str, str, str], opts: AuditOptions,
                              per_op: bool) -> dict[torch.fx.Node, list]:
        # The code resuming after a break: what Dynamo ran itself at the break (a custom Function
        # given one tensor twice) may have saved one of its inputs, which no graph's trace shows.
        mark, codes = self._break_mark, traced_code()
        if mark is None or not codes or not resumes(codes[0], mark[1].function, mark[1].file):
            return {}
        self._break_mark = None
        pending, self._forward_writes = self._forward_writes, []
        returned = [t for t in (r() for r in self._returned_since_mark) if t is not None]
        self._returned_since_mark = []
        if mark[2] != threading.get_ident():
            return {}
        if resumed_at(codes[0]) != mark[1].line:  # the code after the break broke again at once
            mark = (mark[0], line_of(mark[1].file, resumed_at(codes[0]), mark[1].function), mark[2])
        try:
            self._amend_forward_writes(gm, example_inputs, trace, mark, per_op, pending, returned)
            return saves_between_graphs(gm, example_inputs, trace, mark[0], mark[1], per_op, returned)
        except Exception as e:  # the user's training comes first
            _fall_back(opts, e, f"could not look up saves between graphs for graph {identity[0]}", "auditing it without them")
            return {}

    def _note_forward_writes(self, gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace,
                             record: GraphRecord, opts: AuditOptions) -> None:
        mark, codes = self._break_mark, traced_code()
        if mark is None or mark[2] != threading.get_ident() or not codes:
            return
        try:
            self._forward_writes += [(record, w) for w in writes_after_reads(gm, example_inputs, trace, codes[0])]
        except Exception as e:  # the user's training comes first
            _fall_back(opts, e, f"could not record the writes of graph {record.report.compile_id}", "auditing without them")

    def _amend_forward_writes(self, gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace,
                              mark: tuple[int, SourceLocation, int], per_op: bool,
                              pending: list[tuple[GraphRecord, ForwardWrite]], returned: list) -> None:
        # A graph compiled from the forward of the Function Dynamo ran at the break wrote an input
        # after reading it, and that Function saved the input: only now, after the call, is the
        # save there to see. The error goes to the graph that wrote; op by op, it hangs on the
        # fate of the Function's result, as a save past a break does (`settle`).
        writes = [w for _, w in pending]
        for found in forward_writes_saved(gm, example_inputs, trace, mark[0], per_op, writes, returned):
            record = next(r for r, w in pending if w is found.write)
            record.report, watched = _saved_in_forward(record.report, found, mark[1])
            if watched is not None:
                record.past_break += (watched,)
                record.watched += (found.watched,)
            if record not in self._amended:
                self._amended.append(record)

    def _name_state(self, gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace) -> None:
        # Parameters and buffers by the names `named_parameters()` gives, with their aliases:
        # from the model `fxinplace.audit` was given, else from the module Dynamo's sources
        # start from. Without either, Dynamo's names stay.
        try:
            modules = [self.model] if self.model is not None else []
            name_placeholders(gm, example_inputs, modules + root_modules(trace.sources.values()))
        except Exception:  # names are a nicety: the audit goes on with Dynamo's
            log.debug("inplace_audit: could not name parameters from the model", exc_info=True)

    def _functionalize(self, gm, example_inputs, opts: AuditOptions, graph: _AuditedGraph):
        """(graph to compile, wrapper doing the write-backs or None); marks the report's rewrites.

        The policy is here: on an untested torch nothing is rewritten (unless asked), and with
        option functionalize="hazards" only graphs with an error-level hazard are. That is all or
        nothing per graph: rewriting some mutations would mean re-inplacing the others after
        `torch.func.functionalize`, and Inductor already re-inplaces what is safe.
        """
        report = graph.report
        if not torch_is_tested() and not opts.untested_torch:
            log.debug("inplace_audit: graph %s: functionalize skipped: torch %s is untested (option untested_torch)",
                      graph.identity[0], torch.__version__)
            mutations = mark_kept(report.mutations, RewriteKind.KEPT_IN_PLACE, KeptReason.UNTESTED_TORCH,
                                  (torch.__version__, tested_range()))
            graph.report = dataclasses.replace(report, functionalized=True, mutations=mutations)
            return gm, None
        try:
            start = time.perf_counter()
            kept = _kept_apart(gm, graph)
            if opts.functionalize_mode == "hazards" and not any(m.severity == "error" for m in report.mutations):
                log.debug("inplace_audit: graph %s: functionalize='hazards' and no error-level hazard: compiled unchanged",
                          graph.identity[0])
                done = unchanged(gm, KeptReason.NO_ERROR_HAZARD, (), kept)
            else:
                done = functionalize(gm, example_inputs, kept)
            mutations = self._mark(gm, graph, done)
            log.debug("inplace_audit: graph %s: functionalize took %.1f ms: %s; inputs kept apart: %s", graph.identity[0],
                      1e3 * (time.perf_counter() - start), Counts(str(m.rewrite.kind) for m in mutations if m.rewrite),
                      kept or "none")
        except Exception as e:  # the user's training comes first
            what = f"functionalize failed on graph {graph.identity[0]} `{graph.identity[1]}`"
            _fall_back(opts, e, what, "compiling it unchanged")
            mutations = mark_kept(report.mutations, RewriteKind.KEPT_IN_PLACE, KeptReason.FAILED, (type(e).__name__,))
            graph.report = dataclasses.replace(report, functionalized=True, mutations=mutations)
            return gm, None
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        for i in kept:
            graph.placeholder_saves[placeholders[i]].kept_apart = True
        graph.eager_only = _eager_only(gm, example_inputs, done, graph) if _name_of(opts.compiler) != "eager" else None
        graph.report = dataclasses.replace(report, functionalized=True, mutations=mutations)
        if graph.saved_outputs and _ends_in_break(gm):
            # The code after the break gets a clone of what this graph saved: AOTAutograd runs one
            # backward node for the whole graph, which would read a later graph's write.
            clone, wrap = clone_outputs(sorted(graph.saved_outputs), graph.cloned_outputs), done.wrap
            return done.gm, lambda compiled: clone(wrap(compiled))
        return done.gm, done.wrap

    @staticmethod
    def _mark(gm: torch.fx.GraphModule, graph: _AuditedGraph, done: FunctionalizedGraph):
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        if graph.trace is None:
            targets = [Target("input", p.name) for p in placeholders]
        else:
            targets = [target_of_root(p, graph.trace) for p in placeholders]
        # Saves an earlier graph keeps apart (a clone) no longer see this graph's write-back.
        by_node = dict(zip(placeholders, targets))
        saved_earlier = [by_node[n] for n, saves in graph.saved_inputs.items()
                         if not all(s.kept_apart for s in saves)]
        whole = {n.name: site_of(n) for n in gm.graph.nodes if n.name in done.kept_whole}
        return mark_rewrites(graph.report.mutations, done, targets, saved_earlier, whole)

    def _compile(self, gm, example_inputs, opts: AuditOptions, mode, graph: _AuditedGraph) -> Callable:
        compiler = _resolve_compiler(opts.compiler, mode)
        start = time.perf_counter()
        try:
            compiled = compiler(gm, example_inputs)
            log.debug("inplace_audit: graph %s compiled by %s in %.1f ms", graph.identity[0], _name_of(opts.compiler),
                      1e3 * (time.perf_counter() - start))
            return compiled
        except Exception as e:
            log.debug("inplace_audit: graph %s: the compiler %s failed: %s: %s", graph.identity[0],
                      _name_of(opts.compiler), type(e).__name__, e)
            if opts.explain and _is_autograd_inplace_error(e):
                errors = [h for h in graph.report.all_hazards() if h.severity == "error"]
                written = []
                if not errors:
                    try:
                        written = _checkpoint_outputs_written(graph)
                    except Exception:  # never hide the compiler's own error behind ours
                        log.debug("inplace_audit: no checkpoint note", exc_info=True)
                raise HazardError(graph.report, errors, render.compiler_inplace_error(written, bool(errors))) from e
            raise


_LIVE: weakref.WeakSet[InplaceAudit] = weakref.WeakSet()  # every backend object alive


def compiled_writes_to(t: torch.Tensor) -> list[tuple[GraphReport, Any]]:
    """(graph report, mutation) for each write an audited graph makes to `t`'s memory (a
    parameter, buffer or input it was compiled with): who changed `t`, when compiled code did."""
    storage = t.untyped_storage().data_ptr()
    found = []
    for audit in list(_LIVE):
        for record in audit.graphs:
            for ref, index in record.written:
                written = ref()
                if written is not None and written.untyped_storage().data_ptr() == storage:
                    found.append((record.report, record.report.mutations[index]))
    return found


def _saved_in_forward(report: GraphReport, found: SavedByForward, at: SourceLocation | None) -> tuple:
    # As for a write inside a Function's forward that Dynamo traced (`_hop_facts`): an error,
    # where the graph alone showed a harmless write. (report, its `past_break` entry or None)
    mutation = report.mutations[found.write.mutation]
    detail = Detail.FUNCTION_FORWARD if found.write.visible else Detail.UNSEEN_PATH
    hazard = Hazard(HazardCode.HIDDEN_WRITE_TO_SAVED, Severity.ERROR, mutation.target, mutation.site,
                    saved_by=Site(found.apply, at), saved=(Saved(mutation.target),), detail=detail)
    hazards = (*(h for h in mutation.hazards if h.code is not HazardCode.SAFE_INPLACE), hazard)  # safe-inplace is last
    mutations = list(report.mutations)
    mutations[found.write.mutation] = dataclasses.replace(mutation, hazards=hazards)
    watched = None
    if found.watched is not None:
        watched = (found.write.mutation, len(hazards) - 1,
                   ((weakref.ref(found.watched), frozenset(found.watched.positions)),))
    return dataclasses.replace(report, mutations=tuple(mutations)), watched


def _written_state(gm: torch.fx.GraphModule, example_inputs: list, trace: MutationTrace,
                   report: GraphReport) -> tuple[tuple[weakref.ref, int], ...]:
    try:
        by_target = {}
        for placeholder, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
            if isinstance(value, torch.Tensor):
                by_target.setdefault(target_of_root(placeholder, trace), value)
        return tuple((weakref.ref(by_target[m.target]), i) for i, m in enumerate(report.mutations)
                     if m.target.kind != "intermediate" and m.target in by_target)
    except Exception:  # a nicety for the guard's messages: never the audit's failure
        log.debug("inplace_audit: could not keep the tensors graph %s writes", report.compile_id, exc_info=True)
        return ()


_SAVED_CODES = (HazardCode.SAVED_THEN_MUTATED, HazardCode.HIDDEN_WRITE_TO_SAVED)
_PLAIN = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _past_break(gm: torch.fx.GraphModule, trace: MutationTrace, report: GraphReport, saved_inputs: dict,
                cross) -> tuple:
    """`GraphRecord.past_break` for this graph's report, and the outputs `cross` must watch.

    A save of this graph, written in it, counts once a loss reaches an output whose backward
    runs through it: the outputs of a graph that ends in a break are values the code after it
    goes on with, so which loss reaches them is known only after the frame returns. A save an
    earlier graph made (`Detail.CROSSED_BREAK`) hangs on that graph's outputs alike.
    """
    if cross is None:
        return ()
    ends_in_break = _ends_in_break(gm)
    # The message names one earlier save; the write may invalidate every save of its target.
    earlier = [(target_of_root(node, trace), save) for node, saves in saved_inputs.items() for save in saves]
    found = []
    for i, mutation in enumerate(report.mutations):
        for j, h in enumerate(mutation.hazards):
            if h.code not in _SAVED_CODES or h.severity is not Severity.ERROR or h.saved_by is None:
                continue
            if h.detail is Detail.CROSSED_BREAK:
                saves = [s for target, s in earlier if target == h.target]
                # A save made between the graphs hangs on this graph's outputs that reach it,
                # known only past its own break.
                between = [s for s in saves if s.graph is None]
                if not saves or not all(s.positions for s in saves) or (between and not ends_in_break):
                    continue
                for s in between:
                    cross.positions |= s.positions
                found.append((i, j, tuple((weakref.ref(s.graph or cross), s.positions) for s in saves)))
            elif ends_in_break and h.saved_by.tasks:
                cross.positions |= h.saved_by.tasks
                found.append((i, j, ((weakref.ref(cross), frozenset(h.saved_by.tasks)),)))
    return tuple(found)


# What graphs return after a break is kept (weakly) until the code resuming after it compiles;
# a mark no resume takes (a break in code run once, then steps without any) stops growing here.
_RETURNED_KEPT = 1024


def _settled(record: GraphRecord, returned: list | None) -> GraphReport:
    report = record.report
    fates = {}
    for i, j, watched in record.past_break:
        graphs = [(ref(), positions) for ref, positions in watched]
        if all(g is not None for g, _ in graphs):
            fates[(i, j)] = reach_after_call(graphs, returned)
    if all(f is Reach.REACHED for f in fates.values()):
        return report
    mutations = list(report.mutations)
    for i, mutation in enumerate(report.mutations):
        hazards = []
        for j, h in enumerate(mutation.hazards):
            fate = fates.get((i, j), Reach.REACHED)
            if fate is Reach.UNRETURNED:
                hazards.append(dataclasses.replace(h, severity=Severity.WARNING, stored_only=True))
            elif fate is Reach.REACHED:
                hazards.append(h)
        if not hazards:  # an intermediate whose only hazard went: what any other write to it is
            hazards.append(Hazard(HazardCode.SAFE_INPLACE, DEFAULT_SEVERITY[HazardCode.SAFE_INPLACE], mutation.target,
                                  mutation.hazards[0].mutated_by))
        mutations[i] = dataclasses.replace(mutation, hazards=tuple(hazards))
    return dataclasses.replace(report, mutations=tuple(mutations))


def _kept_apart(gm: torch.fx.GraphModule, graph: _AuditedGraph) -> list[int]:
    """Inputs a graph ending in a break saves for backward, and that a later graph may write.

    Buffers and inputs without grad only (a parameter keeps its save: cloning every weight a
    backward reads would cost a copy of the model per step); none that an output aliases, and
    none the graph writes itself (batch norm's running statistics would land in the clone).
    """
    if graph.trace is None or not _ends_in_break(gm):
        return []
    trace = graph.trace
    returned = set().union(*(trace.storages_made.get(out, set()) for out in output_nodes(gm)))
    written = {w.storage for w in trace.writes}
    kept = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        save = graph.placeholder_saves.get(node)
        if save is None or save.record.storage in returned or save.record.storage in written:
            continue
        if target_of_root(node, trace).kind in ("buffer", "input") and not trace.requires_grad.get(node, True):
            kept.append(i)
    return kept


def _returns_view_of_input(gm: torch.fx.GraphModule) -> bool:
    def storage(node: Any) -> Any:
        value = example_value(node) if isinstance(node, torch.fx.Node) else None
        return StorageWeakRef(value.untyped_storage()) if isinstance(value, torch.Tensor) else None

    inputs = {storage(p) for p in gm.graph.find_nodes(op="placeholder")} - {None}
    return any(storage(out) in inputs for out in output_nodes(gm))


def _eager_only(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], done: FunctionalizedGraph,
                graph: _AuditedGraph) -> EagerReason | None:
    if ((done.kept is KeptReason.SHARED_INPUT and _returns_view_of_input(gm))
            or _writes_multi_output_view(done.written_in_place, example_inputs)):
        return EagerReason.REFUSED_WHEN_RUN
    # A write to what code Dynamo ran between graphs saved (a Function given one tensor twice)
    # breaks its backward, in eager too, but only where a loss reaches it.
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    between = {i for i, p in enumerate(placeholders) if any(isinstance(s, BetweenSave) for s in graph.saved_inputs.get(p, ()))}
    if between & (done.written_back | done.written_in_place):
        return EagerReason.SAVED_BETWEEN_GRAPHS
    return None


def _writes_multi_output_view(written: Collection[int], example_inputs: Sequence[Any]) -> bool:
    # AOTAutograd refuses, when it runs, a graph that writes an input requiring grad made as one
    # of several views (`chunk` items of a parameter returned by the graph before a break), even
    # under `no_grad` or through `.data`, where eager writes it.
    return any(isinstance(t, torch.Tensor) and t.requires_grad and is_multi_output_view(t)
               for t in (example_inputs[i] for i in written))


def _ends_in_break(gm: torch.fx.GraphModule) -> bool:
    return graph_break_reason(gm)[1]


def _checkpoint_outputs_written(graph: _AuditedGraph) -> list:
    """Sites that write a checkpoint region's output after the region.

    Eager recomputes what a checkpoint region saved, so such a write is no hazard there (and
    the audit predicts none); AOTAutograd traces the region as plain code, where it is one.
    """
    trace = graph.trace
    if trace is None:
        return []
    written = []
    for write in trace.writes:
        root = trace.storage_root.get(write.storage)
        if (root is not None and root is not write.node and root.op == "call_function"
                and hop_name(root.target) == "tag_activation_checkpoint"):
            written.append(site_of(write.inner or write.node))
    return written


def _fall_back(opts: AuditOptions, error: Exception, what: str, instead: str) -> None:
    """Raise `AnalysisError` in strict mode; otherwise warn, and the caller carries on without us."""
    if opts.strict:
        raise AnalysisError(f"fxinplace: {what}: {error!r}") from error
    warnings.warn(
        f"fxinplace: {what} ({type(error).__name__}: {error}); {instead}. "
        f"Pass options={{'strict': True}} to raise instead.",
        AnalysisWarning,
        stacklevel=4,
    )
    log.debug("inplace_audit: %s; %s", what, instead, exc_info=True)


def analyze(
    gm: torch.fx.GraphModule,
    trace: MutationTrace,
    identity: tuple[str, str, str],
    opts: AuditOptions,
    saved_inputs: dict[torch.fx.Node, list] | None = None,
) -> GraphReport:
    """Split tasks and classify hazards on an already traced graph (cheap: no tensor runs)."""
    roles = output_roles(gm)
    split = split_tasks(gm, trace, opts.tasks, roles)
    mutations = find_hazards(gm, trace, split, saved_inputs or {})
    return GraphReport(*identity, mutations=tuple(mutations), task_names=split.names, outputs=roles or (),
                       shared=split.shared_parameters)


def output_roles(gm: torch.fx.GraphModule) -> tuple[OutputRole | None, ...] | None:
    """What each output of the graph being compiled is to the user's code; None when Dynamo cannot say."""
    roles = graph_output_roles(gm)
    if roles is None:
        return None
    return tuple(OutputRole(OutputKind(r[0]), r[1]) if r is not None else None for r in roles)


def graph_identity(gm: torch.fx.GraphModule) -> tuple[str, str, str]:
    """(compile id, function name, why the graph ended) for the graph being compiled now."""
    compile_id = current_compile_id()
    function = _traced_function(traced_code())
    reason, at_break = graph_break_reason(gm)
    why = reason or "?"
    if at_break:
        why = f"graph break: {why}"
    return (str(compile_id) if compile_id is not None else "?", function, why)


def _traced_function(codes: list) -> str:
    # The frame's code comes first; compiling a module, that is Dynamo's own wrapper (`inner`):
    # then the first user code traced, or (a torch module's own forward) `forward`.
    if not codes:
        return "?"
    if not is_dynamo_file(codes[0].co_filename):
        return codes[0].co_name
    user = next((c for c in codes if not is_internal_file(c.co_filename)), None)
    if user is not None:
        return user.co_name
    return "forward" if any(c.co_name == "forward" for c in codes) else codes[0].co_name


def emit_tables(report: GraphReport, opts: AuditOptions) -> None:
    """Print the graph's table and/or append it to `opts.file`; never fails the compile.

    Under torch.distributed each table is headed by its rank and written in one call, so
    ranks do not interleave lines; a `{rank}` in the file name gives each rank its own file.
    """
    try:
        compact = opts.table == "compact"
        rank = _rank()
        head = f"[rank {rank}] " if rank is not None else ""
        if opts.print:
            width = shutil.get_terminal_size((100, 24)).columns if opts.width is None else opts.width
            text = render.render_graph(report, compact, width=width or None, every_row=opts.rows == "all")
            sys.stdout.write(head + text + "\n")
            sys.stdout.flush()
        if opts.file:  # the whole table, every row on one line, for grep and diff
            path = opts.file.replace("{rank}", str(rank or 0))
            with open(path, "a", encoding="utf-8") as f:
                f.write(head + render.render_graph(report, compact) + "\n\n")
    except Exception as e:
        _fall_back(opts, e, "could not write the table", "training goes on")


def trace_report(report: GraphReport, opts: AuditOptions) -> None:
    """The graph's report as the JSON artifact `fxinplace_report` in the structured log
    `TORCH_TRACE` writes, under the graph's compile id: tlparse shows it beside Dynamo's and
    Inductor's artifacts. Nothing is rendered without TORCH_TRACE; never fails the compile."""
    try:
        trace_artifact("fxinplace_report", report.to_dict)
    except Exception as e:
        _fall_back(opts, e, "could not write the report to the TORCH_TRACE log", "training goes on")


def log_findings(report: GraphReport) -> None:
    if log.isEnabledFor(logging.DEBUG):
        hazards = report.all_hazards()
        log.debug("inplace_audit: graph %s: %d mutation(s), %d hazard(s) (%s); tasks: %s", report.compile_id,
                  len(report.mutations), len(hazards), Counts(str(h.severity.value) for h in hazards),
                  ", ".join(report.tasks) or "none")


def _name_of(compiler: str | Callable) -> str:
    return compiler if isinstance(compiler, str) else getattr(compiler, "__name__", type(compiler).__name__)


def _rank() -> int | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


def _resolve_compiler(compiler: str | Callable, mode: str | None) -> Callable:
    if compiler == "inductor":
        patches = inductor_mode_options(mode) if mode else None
        return lambda gm, inputs: inductor_compile_fx(gm, inputs, config_patches=patches)
    if callable(compiler):
        return compiler
    return lookup_backend(compiler)


def _is_autograd_inplace_error(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if _AUTOGRAD_ERROR in str(e):
            return True
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
        seen += 1
    return False


inplace_audit = InplaceAudit()
