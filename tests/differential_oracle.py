"""Eager PyTorch as the oracle for generated programs, and the audit's report checked against it.

For one program, eager PyTorch decides:

- whether forward raises, and with which of the errors the audit must report
  (`leaf-inplace`, `view-inplace`) at which line;
- which parameters, buffers and caller inputs were written: by op schema (a dispatch mode
  sees every ATen op that writes their storage) or by value;
- whether backward raises the version-counter error (or its variant for saved views);
- whether backward silently computed from a saved tensor that changed after it was saved.
  A second run saves every tensor autograd saves as a clone taken at save time
  (`saved_tensors_hooks`); at unpack time it compares the live tensor with that clone, and
  its gradients are the reference: what backward computes when every saved value is the
  one the forward used. Gradients that differ from the reference (at its scale, not in the
  last bits: docs/reliability.md, "How floats are compared") are silently wrong. A custom
  Function's saves are cloned when `save_for_backward` is called (PyTorch packs them only
  after its forward returned), and a changed save backward never reads (training-mode batch
  norm's running statistics) does not count.

`torch.autograd.graph.allow_mutation_on_saved_tensors()` would give the same reference,
but it recognises a saved tensor by `data_ptr()`, so a write through a view at another
offset (`h[2:].mul_(10)` after `h` was saved) slips past it and its "reference" is wrong
too; cloning at save time has no such blind spot.

The report must agree: the same written targets; an error-level hazard exactly when eager
raises or backward read a changed saved tensor; none otherwise. `check_functionalized` holds
`functionalize=True` to eager's values and gradients the same way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import multiprocessing
import multiprocessing.util
import pathlib
import re
import shutil
import tempfile
import traceback
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef

import fxinplace
from conftest import WriteRecorder, close_at_scale, identical
from program_gen import Program, forward_error_code, generate

__all__ = ["EagerVerdict", "Checked", "SeedResult", "eager_verdict", "check", "check_functionalized", "disagreements",
           "outcome", "run_seeds", "fast_dynamo", "minimize"]

# Backward errors that mean "a saved tensor was modified in place". The second is the same
# check reached another way: unpacking a saved view of a multi-output view (`chunk`,
# `unbind`) or of a view made under no_grad, whose base was written since, regenerates the
# view's history, and that refuses before the version check.
BACKWARD_ERRORS = (
    "modified by an inplace operation",
    "its base or another view of its base has been modified inplace",
)


@dataclass(frozen=True)
class EagerVerdict:
    forward_error: str | None = None  # the hazard code eager's forward error calls for
    forward_line: int | None = None
    written: frozenset[tuple[str, str]] = frozenset()  # (kind, name) of state written
    backward_error: bool = False  # the version-counter error
    stale_saved: bool = False  # backward read a saved tensor whose value changed after saving
    grads_differ: bool = False  # gradients differ from the save-time reference

    @property
    def broken(self) -> bool:
        return self.backward_error or self.stale_saved


def _state(model: torch.nn.Module, args: tuple) -> Iterator[tuple[tuple[str, str], torch.Tensor]]:
    for name, p in model.named_parameters():
        yield ("parameter", name), p
    for name, b in model.named_buffers():
        yield ("buffer", name), b
    for i, x in enumerate(args):
        yield ("input", f"x{i}"), x


def _loss(out: dict, seed: int) -> torch.Tensor | None:
    # Random weights: a plain sum would hide some wrong gradients (softmax's sum is 1).
    g = torch.Generator().manual_seed(seed * 7 + 3)
    loss = None
    for value in out.values():
        weight = torch.randn(value.shape, generator=g)
        if value.requires_grad:
            term = (value * weight).sum()
            loss = term if loss is None else loss + term
    return loss


def _grads(model: torch.nn.Module, leaves: dict) -> dict[str, torch.Tensor | None]:
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads.update({n: x.grad for n, x in leaves.items()})
    return grads


def _error_line(e: BaseException, file: str) -> int | None:
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == file]
    return lines[-1] if lines else None


def eager_verdict(program: Program, loaded) -> EagerVerdict:
    """What eager PyTorch says `program` does (`loaded`: `program.load(...)`)."""
    cls, make_inputs = loaded
    file = cls.forward.__code__.co_filename

    model = cls()
    args, leaves = make_inputs()
    before = {key: t.detach().clone() for key, t in _state(model, args)}
    owners = {StorageWeakRef(t.untyped_storage()): key for key, t in _state(model, args)}
    recorder = WriteRecorder(user_file=None)
    try:
        with recorder:
            out = model(*args)
    except RuntimeError as e:
        code = forward_error_code(e)
        if code is None:
            raise AssertionError(f"generated program {program.seed} fails in eager forward: {e}") from e
        return EagerVerdict(forward_error=code, forward_line=_error_line(e, file))
    written = {owners[storage] for storage, _ in recorder.writes if storage in owners}
    written |= {key for key, t in _state(model, args) if not identical(before[key], t.detach())}  # vs a copy

    loss = _loss(out, program.seed)
    if loss is None:
        return EagerVerdict(written=frozenset(written))
    try:
        loss.backward()
    except RuntimeError as e:
        if not any(needle in str(e) for needle in BACKWARD_ERRORS):
            raise AssertionError(f"generated program {program.seed} fails in eager backward: {e}") from e
        return EagerVerdict(written=frozenset(written), backward_error=True)
    grads = _grads(model, leaves)

    stale: list[int] = []
    reference = _reference_grads(program, loaded, stale)
    # Computed twice, the second time from clones: a clone of a strided view (`expand`) is
    # contiguous, its backward may take another kernel and sum in another order.
    differ = any(not close_at_scale(grads[n], reference[n]) for n in grads)
    if stale and not differ and not _gradients_read(program, loaded, set(stale)):
        stale = []  # unpacked, never read (training-mode batch norm's running statistics)
    return EagerVerdict(written=frozenset(written), stale_saved=bool(stale), grads_differ=differ)


def _reference_grads(program: Program, loaded, stale: list[int] | None = None,
                     poison: tuple[set[int], Callable] | None = None,
                     computed: list | None = None, functions_at_save: bool = True) -> dict[str, torch.Tensor | None]:
    """Eager gradients with every saved tensor frozen at save time. `stale` collects, per
    unpack, the save's index (in the order of saving) where the live tensor had changed
    since; `poison` (indices, fn) hands backward `fn(value at save time)` for those saves;
    `computed` collects every gradient each backward node computes, in the order they run.
    `functions_at_save=False`: a custom Function's saves are frozen when autograd packs them,
    at the end of its forward, after the forward's own writes (the documented limit's program)."""
    cls, make_inputs = loaded
    index = itertools.count()

    def pack(t):
        live = _FUNCTION_SAVES.get(id(t))
        if live is not None and live[0] is t:  # a custom Function's save, cloned as it saved it
            return next(index), live[1], t
        return next(index), t, t.detach().clone()

    def unpack(saved):
        i, t, at_save = saved
        if stale is not None and not identical(t.detach(), at_save):  # vs its copy: any change counts
            stale.append(i)
        if poison is not None and i in poison[0]:
            return poison[1](at_save)
        return at_save

    model = cls()
    args, leaves = make_inputs()
    at_save = _function_saves_at_save_time() if functions_at_save else contextlib.nullcontext()
    with at_save, torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = model(*args)
    loss = _loss(out, program.seed)
    if loss is not None:
        if computed is not None:
            _record_node_gradients(loss, computed)
        loss.backward()
    return _grads(model, leaves)


def _record_node_gradients(loss: torch.Tensor, computed: list) -> None:
    # Only the gradients that go somewhere: a node's output with no edge (an input autograd
    # gave the node none for) is dropped by the engine, whatever it holds.
    def recorder(edges):
        def record(grad_inputs, grad_outputs):
            computed.extend(g.detach().clone() for g, (to, _) in zip(grad_inputs, edges) if g is not None and to is not None)
        return record

    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.register_hook(recorder(node.next_functions))
        stack.extend(n for n, _ in node.next_functions)


def _gradients_read(program: Program, loaded, indices: set[int]) -> bool:
    """Does backward read any of the saves `indices`: does a gradient some backward node
    computes move when backward gets NaN for them (passed on by any arithmetic, even times
    zero) or random values (seen by a comparison, as `relu`'s backward makes)? Each node's
    gradients count, not only the leaves': a later node may mask what a read gave
    (`t[t > 0] = -1.0` passes no gradient where it wrote). A backward may unpack a tensor it
    never reads: training-mode batch norm gets the running statistics it saved before
    updating them."""
    g = torch.Generator().manual_seed(program.seed)
    fills = (lambda t: torch.full_like(t, float("nan")),
             lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype) * (1 + t.abs().max()))
    computed: list = []
    _reference_grads(program, loaded, computed=computed)
    for fill in fills:
        poisoned: list = []
        try:
            _reference_grads(program, loaded, poison=(indices, fill), computed=poisoned)
        except RuntimeError:
            return True
        if len(poisoned) != len(computed) or any(not close_at_scale(a, b) for a, b in zip(poisoned, computed)):
            return True
    return False


# A custom `autograd.Function` hands its saves to autograd only after its forward returns, so
# `saved_tensors_hooks` see them as they are then: a forward that writes its input after
# saving it (`x.data.mul_(2)`, as a fused kernel may) would be packed already written. While
# the reference runs, `save_for_backward` saves a clone taken when it is called; `pack` maps
# the clone back to the live tensor (id(clone) -> (clone, live)).
_FUNCTION_SAVES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@contextlib.contextmanager
def _function_saves_at_save_time() -> Iterator[None]:
    original = torch.autograd.function.FunctionCtx.save_for_backward

    def save_for_backward(ctx, *tensors):
        clones = []
        for t in tensors:
            if isinstance(t, torch.Tensor):
                clone = t.detach().clone()
                _FUNCTION_SAVES[id(clone)] = (clone, t)
                t = clone
            clones.append(t)
        original(ctx, *clones)

    torch.autograd.function.FunctionCtx.save_for_backward = save_for_backward
    try:
        yield
    finally:
        torch.autograd.function.FunctionCtx.save_for_backward = original
        _FUNCTION_SAVES.clear()


@dataclass(frozen=True)
class Checked:
    """One program checked: eager's verdict, the disagreements, and what the report held."""

    verdict: EagerVerdict
    findings: list[str]
    target_kinds: frozenset[str] = frozenset()  # kinds of the targets the report says were written
    codes: frozenset[str] = frozenset()  # hazard codes in the report


def disagreements(program: Program, directory: pathlib.Path) -> list[str]:
    """Where the audit's report of `program` and eager PyTorch disagree (empty: they agree)."""
    return check(program, directory).findings


def check(program: Program, directory: pathlib.Path) -> Checked:
    loaded = program.load(directory)
    verdict = eager_verdict(program, loaded)
    found = []
    if verdict.grads_differ and not verdict.stale_saved:
        found.append("oracle: gradients differ from the reference, yet no saved tensor changed")

    cls, make_inputs = loaded
    args, _ = make_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fxinplace.AnalysisWarning)
        try:
            report = fxinplace.audit(cls(), *args, options={"print": False})
        except Exception as e:  # noqa: BLE001 - any failure of the audit is a finding
            first_line = str(e).splitlines()[0] if str(e) else ""
            return Checked(verdict, found + [f"audit-raised: {type(e).__name__}: {first_line}"])
    found += [f"analysis-failed: {w.message}" for w in caught if issubclass(w.category, fxinplace.AnalysisWarning)]
    found += [f"analysis-failed: {g.analysis_error}" for g in report.graphs if g.analysis_error]
    errors = report.hazards("error")
    kinds = frozenset(m.target.kind for m in report.mutations)
    codes = frozenset(h.code for h in report.hazards())

    if verdict.forward_error is not None:
        error_codes = {h.code for h in errors}
        lines = sorted(h.source.line for h in errors if h.source is not None)
        if verdict.forward_error not in error_codes:
            found.append(f"forward-error: eager raises ({verdict.forward_error}), audit errors {sorted(error_codes)}")
        elif verdict.forward_line not in lines:
            found.append(f"forward-error-line: eager raises at line {verdict.forward_line}, audit says {lines}")
        return Checked(verdict, found, kinds, codes)

    named = {(m.target.kind, m.target.name) for m in report.mutations if m.target.kind != "intermediate"}
    if named != verdict.written:
        found.append(f"mutated-targets: eager {sorted(verdict.written)}, audit {sorted(named)}")
    if verdict.broken and not errors:
        why = "backward raises" if verdict.backward_error else "backward reads a changed saved tensor"
        found.append(f"missed-error: {why}, audit has no error")
    if errors and not verdict.broken:
        found.append(f"false-error: eager trains with the reference gradients, audit says "
                     f"{sorted({(h.code.value, h.source.line if h.source else None) for h in errors})}")
    return Checked(verdict, found, kinds, codes)


def outcome(verdict: EagerVerdict) -> str:
    """What eager PyTorch did, in one word, for the tallies."""
    if verdict.forward_error:
        return "forward-error"
    if verdict.backward_error:
        return "backward-error"
    if verdict.stale_saved:
        return "silently-wrong" if verdict.grads_differ else "stale-but-same-gradients"
    return "trains"


@dataclass(frozen=True)
class SeedResult:
    seed: int
    outcome: str  # `outcome(verdict)`, or "oracle-failed"
    findings: tuple[str, ...]
    target_kinds: frozenset[str] = frozenset()
    codes: frozenset[str] = frozenset()


def check_seed(seed: int, directory: pathlib.Path, functionalize: bool = False) -> SeedResult:
    """The program of `seed`, checked (the audit, or `functionalize=True`); a program the
    oracle cannot judge is a finding too."""
    program = generate(seed)
    try:
        if functionalize:
            found = check_functionalized(program, directory)
            return SeedResult(seed, "forward-error" if found is None else "compared", tuple(found or ()))
        checked = check(program, directory)
    except AssertionError as e:
        return SeedResult(seed, "oracle-failed", (f"oracle: {e}",))
    return SeedResult(seed, outcome(checked.verdict), tuple(checked.findings), checked.target_kinds, checked.codes)


def run_seeds(seeds: Iterable[int], jobs: int = 1, functionalize: bool = False) -> Iterator[SeedResult]:
    """`check_seed` over `seeds`, in this process (`jobs=1`) or in `jobs` worker processes."""
    seeds = list(seeds)
    if jobs <= 1:
        with fast_dynamo(), tempfile.TemporaryDirectory() as directory:
            for seed in seeds:
                yield check_seed(seed, pathlib.Path(directory), functionalize)
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of a threaded torch
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init)
    work = functools.partial(_worker_check, functionalize=functionalize)
    try:
        yield from pool.map(work, seeds, chunksize=max(1, min(25, len(seeds) // (jobs * 8))))
    finally:  # a caller that stops early does not wait for the rest
        pool.shutdown(wait=True, cancel_futures=True)


_worker: dict = {}


def _worker_init() -> None:
    _worker["fast"] = fast_dynamo()  # kept referenced: collecting it would undo the patch
    _worker["fast"].__enter__()
    _worker["directory"] = pathlib.Path(tempfile.mkdtemp(prefix="fxinplace-differential-"))
    # A worker ends through multiprocessing's exit, which runs its own finalizers, not atexit's.
    multiprocessing.util.Finalize(None, shutil.rmtree, args=(_worker["directory"],),
                                  kwargs={"ignore_errors": True}, exitpriority=10)
    warnings.filterwarnings("ignore", category=UserWarning)


def _worker_check(seed: int, functionalize: bool = False) -> SeedResult:
    return check_seed(seed, _worker["directory"], functionalize)


@contextlib.contextmanager
def fast_dynamo() -> Iterator[None]:
    """Cheaper compiles for thousands of tiny programs; nothing the audit sees changes.

    Dynamo times every new guard set once after a cache flush, only for a debug log line;
    on these programs that flush is most of the compile (about 75 ms of 100 ms). Tensors
    have a dozen elements, so one thread beats a pool.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                _patch(torch._dynamo.guards, "profile_guard_manager", lambda *args, **kwargs: 0.0)
            )
            yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _patch(owner, name: str, value) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _kind(finding: str) -> str:
    return finding.split(":", 1)[0]


def minimize(program: Program, directory: pathlib.Path, check: Callable[[Program], list[str]] | None = None) -> Program:
    """The smallest program (greedy: drop statements and heads) with the same kind of disagreement."""
    check = check or (lambda p: disagreements(p, directory))
    wanted = {_kind(f) for f in check(program)}
    if not wanted:
        return program

    def still_fails(candidate: Program) -> bool:
        try:
            return bool(wanted & {_kind(f) for f in check(candidate)})
        except (AssertionError, NameError, AttributeError, TypeError, UnboundLocalError, SyntaxError, IndexError):
            return False  # not a valid program any more (a name it needs is gone, ...)

    changed = True
    while changed:
        changed = False
        for i in reversed(range(len(program.statements))):
            candidate = replace(program, statements=program.statements[:i] + program.statements[i + 1:])
            if still_fails(candidate):
                program, changed = candidate, True
        for i in reversed(range(len(program.outputs))):
            if len(program.outputs) > 1:
                candidate = replace(program, outputs=program.outputs[:i] + program.outputs[i + 1:])
                if still_fails(candidate):
                    program, changed = candidate, True
    return program


def check_functionalized(program: Program, directory: pathlib.Path, compiler: str = "aot_eager") -> list[str] | None:
    """`functionalize=True` against eager: None when there is nothing to compare (eager's forward
    raises, or an in-place op of it reads what it writes out of order: `OverlapRecorder`).

    Forward values and the caller-visible state after the call must equal eager's. So must
    the gradients where eager trains; where eager's backward fails, they must equal the
    reference (saved values as they were when saved: the gradients of the out-of-place
    program), unless the program writes under `no_grad` or through `.data` / `.detach()`.
    Eager hides those writes from autograd, so "the out-of-place program" is ambiguous
    there: `with no_grad: t = t.clamp(...)` cuts the graph where `t.clamp_()` does not.
    """
    loaded = program.load(directory)
    verdict = eager_verdict(program, loaded)
    if verdict.forward_error is not None:
        return None
    cls, make_inputs = loaded
    model = cls()
    args, eager_leaves = make_inputs()
    overlaps, aliases = OverlapRecorder(), DetachedAliasWrites()
    with overlaps, aliases:
        expected = model(*args)
    if overlaps.found:
        return None  # eager's own result depends on its kernel's loop order: nothing to compare
    sources = [p for p in model.parameters()] + list(eager_leaves.values())
    expected_state = {key: t.detach().clone() for key, t in _state(model, args)}

    audit = fxinplace.InplaceAudit(compiler=compiler, print=False, functionalize=True, strict=True)
    model = cls()
    args, leaves = make_inputs()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxinplace.CompilerFallbackWarning)  # the report says it, below
            got = torch.compile(model, backend=audit)(*args)
    except Exception as e:  # noqa: BLE001 - any failure is a finding
        inner = getattr(e, "inner_exception", None) or e
        return [f"functionalize-raised: {type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''}"]
    finally:
        torch._dynamo.reset()
    found = _compare_functionalized(program, loaded, verdict, (expected, expected_state, sources, aliases),
                                    (model, args, leaves, got), compiler)
    # docs/functionalize.md, Limits: a Function given one tensor twice runs outside every graph
    # (Dynamo breaks the graph there), so a `ScaleFused` that writes what it saved keeps eager's
    # silently wrong gradients: no rewrite reaches it. Only where the rewrite's gradients are
    # exactly eager's, wrong as they are: any other difference is not this limit's.
    # The same where the Function ran in a graph: the rewrite keeps its own forward's write, as
    # the report says (`KeptReason.INSIDE_FUNCTION`), with eager's gradients; and where the
    # graph was kept whole because its written inputs share memory (`KeptReason.SHARED_INPUT`).
    kept = any(m.rewrite is not None and m.rewrite.reason in _KEPT_AS_EAGER and not m.removed
               for m in audit.report.mutations)
    # Where eager's backward raises (another write), the rewrite's gradients must be those of
    # the program with that Function's own write kept: its saves as its forward left them.
    if (found and (kept or _FUSED_OUTSIDE.search(program.source))
            and all(f.startswith("functionalize-grad:") for f in found)):
        ours, eager_grads = _grads(model, leaves), _eager_grads(program, loaded)
        if _same_gradients(ours, eager_grads if eager_grads is not None
                           else _reference_grads(program, loaded, functions_at_save=False)):
            return [f"known-limit: {finding}" for finding in found]
    # A graph ran op by op (`GraphReport.ran_eagerly`): counted apart where it agrees with eager
    # and the compiler refuses the program as written too (or would refuse it when it runs,
    # which the backend foresees and runs op by op unasked); a disagreement stays one.
    refused = [g.compile_error for g in audit.report.graphs if g.ran_eagerly and g.compile_error]
    if refused and not found and _compiled_grads(program, loaded, compiler) is not None:
        return [f"functionalize-ran-eagerly: the compiler refused the rewritten graph ({refused[0]}), not the "
                "program as written"]
    if not found and any(g.ran_eagerly for g in audit.report.graphs):
        why = refused[0] if refused else next(str(g.ran_eagerly) for g in audit.report.graphs if g.ran_eagerly)
        return [f"ran-eagerly: {why}; the graph ran op by op and agrees"]
    return found


def _eager_grads(program: Program, loaded) -> dict[str, torch.Tensor | None] | None:
    """Eager's own gradients (None where its backward raises)."""
    cls, make_inputs = loaded
    model = cls()
    args, leaves = make_inputs()
    try:
        loss = _loss(model(*args), program.seed)
        if loss is not None:
            loss.backward()
    except RuntimeError:
        return None
    return _grads(model, leaves)


def _same_gradients(ours: dict, theirs: dict | None) -> bool:
    return theirs is not None and ours.keys() == theirs.keys() and all(
        close_at_scale(_zeros_if_none(ours[n], theirs[n]), _zeros_if_none(theirs[n], ours[n])) for n in theirs)


def _compare_functionalized(program: Program, loaded, verdict: EagerVerdict, eager: tuple, compiled: tuple,
                            compiler: str) -> list[str]:
    expected, expected_state, sources, aliases = eager
    model, args, leaves, got = compiled
    found = []
    for task, value in expected.items():
        if not close_at_scale(got[task], value):
            found.append(f"functionalize-forward: output {task!r} differs from eager's")
        elif value.requires_grad != got[task].requires_grad and _carries_gradient(value, sources):
            found.append(f"functionalize-forward: output {task!r} requires_grad={got[task].requires_grad}, "
                         f"eager's {value.requires_grad}")
    for key, t in _state(model, args):
        if not close_at_scale(t.detach(), expected_state[key]):
            found.append(f"functionalize-state: {key[0]} {key[1]} differs from eager's after the call")
    hides = any(".data" in s or ".detach()" in s or "torch.no_grad()" in s for s in program.statements)
    if verdict.broken and hides:
        return _known_limit(found, aliases)
    try:
        loss = _loss(got, program.seed)  # reading an output can raise too (a multi-output view written)
        if loss is not None:
            loss.backward()
    except RuntimeError as e:  # the rewrite left a write that autograd refuses
        return _known_limit(found + [f"functionalize-backward-raised: {str(e).splitlines()[0]}"], aliases)
    grads = _grads(model, leaves)
    reference = _reference_grads(program, loaded)
    plain = None  # the compiler's own gradients, computed at the first mismatch
    for name in reference:
        # None and zeros count as equal, both ways: AOTAutograd gives an input it writes a zero
        # gradient where eager gives none, and a tensor whose every later use was overwritten
        # (`t.copy_(src)`) passes eager a zero gradient, the functional program none.
        ours, theirs = grads[name], reference[name]
        if close_at_scale(_zeros_if_none(ours, theirs), _zeros_if_none(theirs, ours)):
            continue
        if plain is None and not verdict.broken:
            plain = _compiled_grads(program, loaded, compiler) or {}
        if plain and close_at_scale(ours, plain[name]):
            continue  # the compiler alone computes this gradient so: not the rewrite's doing
        found.append(f"functionalize-grad: gradient of {name} differs from "
                     f"{'the out-of-place reference' if verdict.broken else 'eager'}")
    return _known_limit(found, aliases)


_KEPT_AS_EAGER = (fxinplace.KeptReason.INSIDE_FUNCTION, fxinplace.KeptReason.SHARED_INPUT)
_FUSED_OUTSIDE = re.compile(r"ScaleFused\.apply\((\w+), \1\)")


def _known_limit(found: list[str], aliases: "DetachedAliasWrites") -> list[str]:
    # docs/functionalize.md, Limits: a value with history written through a `.data` /
    # `.detach()` alias gives the alias a history of its own in eager, not out of place.
    if found and aliases.found:
        return [f"known-limit: {finding}" for finding in found]
    return found


class DetachedAliasWrites(torch.overrides.TorchFunctionMode):
    """Notes a write under grad mode that gives a `.data` / `.detach()` alias (or a view of
    one) a history of its own: the one known limit of `functionalize` (FUNCTIONALIZE_LIMITS)."""

    def __init__(self):
        super().__init__()
        self.aliases: dict[int, weakref.ref] = {}  # by id: tensors compare elementwise
        self.found = False

    def _is_alias(self, t: torch.Tensor | None) -> bool:
        return t is not None and (ref := self.aliases.get(id(t))) is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        before = target is not None and target.requires_grad
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.detach, torch.Tensor.data.__get__) and isinstance(out, torch.Tensor):
            self.aliases[id(out)] = weakref.ref(out)
        elif isinstance(out, torch.Tensor) and self._is_alias(target) and out._base is target:
            self.aliases[id(out)] = weakref.ref(out)  # a view of an alias
        if (target is not None and not before and target.requires_grad and torch.is_grad_enabled()
                and (self._is_alias(target) or self._is_alias(target._base))):
            self.found = True
        return out


class OverlapRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Notes an in-place op that reads memory it also writes, other than element for element
    (`t.add_(t[:, :1])`): eager's values then depend on the order its kernel visits elements,
    which no out-of-place program reproduces."""

    def __init__(self):
        super().__init__()
        self.found = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written, read = [], []
        for i, argument in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            tensors = [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
            (written if argument.alias_info is not None and argument.alias_info.is_write else read).extend(tensors)
        for w in written:
            for r in read:
                if _partially_overlap(w, r):
                    self.found = True
        return func(*args, **kwargs)


def _partially_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or a.numel() == 0 or b.numel() == 0:
        return False
    if (a.storage_offset(), a.shape, a.stride()) == (b.storage_offset(), b.shape, b.stride()):
        return False  # the same elements, read and written one by one
    return bool(_offsets(a) & _offsets(b))


def _offsets(t: torch.Tensor) -> set[int]:
    offsets = torch.tensor([t.storage_offset()])
    for size, stride in zip(t.shape, t.stride()):
        offsets = (offsets[:, None] + torch.arange(size)[None, :] * stride).reshape(-1)
    return set(offsets.tolist())


def _carries_gradient(value: torch.Tensor, sources: list[torch.Tensor]) -> bool:
    """Does a gradient flow from `value` to any parameter or input leaf (in eager)?

    Eager gives a view taken under `no_grad` of a tensor that requires grad (and what is
    computed from it) `requires_grad=True` but no path to any leaf; the rewrite detaches
    such a view (`_cut_no_grad_view`). Only a flag that changes a gradient counts.
    """
    if not value.requires_grad:
        return True
    try:
        grads = torch.autograd.grad(value.sum(), sources, allow_unused=True, retain_graph=True)
    except RuntimeError:
        return True  # e.g. eager's backward fails here: the flag may matter
    return any(g is not None for g in grads)


def _compiled_grads(program: Program, loaded, compiler: str) -> dict[str, torch.Tensor | None] | None:
    """Gradients from `compiler` alone, on a program eager trains (None if it fails).

    The rewrite hands its graph to that compiler, and inherits the compiler's own gradient
    bugs: two outputs viewing one intermediate, one view taken under `no_grad`, get a
    gradient from both (AOTAutograd regenerates the views under grad mode; see
    test_differential.py::test_compiler_bug_the_oracle_forgives).
    """
    cls, make_inputs = loaded
    model = cls()
    args, leaves = make_inputs()
    try:
        loss = _loss(torch.compile(model, backend=compiler)(*args), program.seed)
        if loss is not None:
            loss.backward()
    except Exception:  # noqa: BLE001 - no second opinion, then
        return None
    finally:
        torch._dynamo.reset()
    return _grads(model, leaves)


def _zeros_if_none(a: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return torch.zeros_like(like) if a is None and like is not None and not like.any() else a

