"""`functionalize=True` held to eager PyTorch on every in-place op of PyTorch's `op_db`.

For every in-place case (`opinfo_cases.inplace_cases`) with a floating or complex dtype,
three programs put the op where a functionalizing rewrite has work to do:

- `a` (intermediate): `t = x * 2; t.<op>_(...)`; outputs `t * 3` and `t`. `x` is a leaf
  requiring grad, and so are the sample's floating tensor arguments where eager can
  differentiate the op with respect to them (eager decides: if forward or backward refuses
  with them requiring grad, they are passed without);
- `b` (buffer): the sample input is a registered buffer, written in place in forward;
  the output is `buffer * w` for a parameter `w`;
- `c` (saved, then written): `t = x * 2; y = t * t` (saves `t`), then `t.<op>_(...)`;
  outputs `y` and `t`. Eager raises in backward; the oracle is eager under
  `torch.autograd.graph.allow_mutation_on_saved_tensors()`, forward and backward in it.

Each is run eagerly (the oracle) and compiled with
`fxinplace.InplaceAudit(compiler="aot_eager", functionalize=True, strict=True)`, from the same
`torch.manual_seed`. The loss is a fixed random weighting of every output that requires grad
(not a plain sum: a gradient of ones hides wrong gradients that happen to be uniform).
Compared: each output's value (`torch.testing.assert_close` defaults, NaNs equal), dtype,
shape and `requires_grad`; every leaf's gradient (None is not zeros: optimizers with
momentum or weight decay skip a None gradient); buffers after the call; whether backward
raises.

Random ops (PyTorch decides which: eager under two seeds gives two results) are compared
the same way first; only when their values then differ (the compiled program drew its
random numbers in another order) are output and buffer values left out, and gradients are
held instead to a replay: the same program in eager with the op replaced by
`t.mul_(out / in)`, the ratio read off the compiled run's own output. That is the op's
derivative exactly when the op is homogeneous in its input for fixed noise
(`op(2t) == 2 op(t)` under one seed: rrelu, dropout, dropout2d/3d); for the others
(alpha dropout, `normal_` and the other fills) gradients must equal eager's.

A result is one `Outcome` category (`CATEGORIES`): "ok"; "mismatch" (with what: output,
requires_grad, grad, None-vs-zeros, buffer, backward); "functionalize crashed"; "backward
raised" (under functionalize, where the oracle trains); "eager refuses" (eager's forward
raises, or its backward cannot differentiate the op in place or out of place: nothing to
hold the rewrite to; where only the in-place variant has no derivative, e.g. `acosh_`, the
rewrite is held to the out-of-place twin instead); "aot_eager fails too" (programs `a` and `b`: plain
`torch.compile(backend="aot_eager")` crashes or mismatches eager the same way, so the
finding is not functionalize's; for `c` plain aot_eager is expected to raise, that is the
hazard, so it is asked about the out-of-place twin instead); "op not compiled" (Dynamo broke the graph, e.g. after the backend failed on a
data-dependent op such as a boolean-mask `index_put_`, and the op ran eagerly: nothing was
tested).

    python tests/opinfo_functionalize.py            # float32, 3 samples an op
    python tests/opinfo_functionalize.py --long     # every sample; float64, bfloat16, complex64 too
    python tests/opinfo_functionalize.py --only rrelu --verbose
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

import fxinplace

try:
    from opinfo_cases import Case, inplace_cases, seeded_share, traceable
except ImportError:  # run as `python tests/opinfo_functionalize.py` from the repository root
    from tests.opinfo_cases import Case, inplace_cases, seeded_share, traceable

__all__ = ["CATEGORIES", "PROGRAMS", "Outcome", "Run", "check_case", "compare", "float_cases", "sweep", "summarize"]

PROGRAMS = ("a", "b", "c")
CATEGORIES = ("ok", "mismatch", "functionalize crashed", "backward raised", "eager refuses", "aot_eager fails too",
              "op not compiled")
SEED = 1234


# ---------------------------------------------------------------------------------------
# The three programs


def _split_arguments(case: Case) -> tuple[list, Callable[[tuple], tuple[list, dict]]]:
    """(the sample's tensor arguments, a function putting tensors back into (args, kwargs))."""
    leaves, spec = pytree.tree_flatten(case.arguments())
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    constants = [None if i in positions else leaf for i, leaf in enumerate(leaves)]

    def rebuild(tensors: tuple) -> tuple[list, dict]:
        filled = list(constants)
        for i, t in zip(positions, tensors):
            filled[i] = t
        return pytree.tree_unflatten(filled, spec)

    return [leaves[i] for i in positions], rebuild


class _Program(torch.nn.Module):
    def __init__(self, op: Callable, rebuild: Callable):
        super().__init__()
        self.op, self.rebuild = op, rebuild


class Intermediate(_Program):  # program a
    def forward(self, x, *tensors):
        args, kwargs = self.rebuild(tensors)
        t = x * 2
        t = self.op(t, *args, **kwargs)
        return t * 3, t


class BufferWrite(_Program):  # program b
    def __init__(self, op: Callable, rebuild: Callable, buffer: torch.Tensor):
        super().__init__(op, rebuild)
        self.register_buffer("buf", buffer)
        self.w = torch.nn.Parameter(torch.full((), 1.5, dtype=buffer.dtype))

    def forward(self, x, *tensors):  # x: unused, keeps one calling convention for all programs
        args, kwargs = self.rebuild(tensors)
        self.op(self.buf, *args, **kwargs)
        return (self.buf * self.w,)


class SavedThenWritten(_Program):  # program c
    def forward(self, x, *tensors):
        args, kwargs = self.rebuild(tensors)
        t = x * 2
        y = t * t
        t = self.op(t, *args, **kwargs)
        return y, t


def in_place(op: Callable) -> Callable:
    """The in-place op as `t -> t` (what some in-place variants return is not `t`)."""

    def write(t, *args, **kwargs):
        op(t, *args, **kwargs)
        return t

    return write


def _build(program: str, case: Case, op: Callable) -> torch.nn.Module:
    _, rebuild = _split_arguments(case)
    if program == "a":
        return Intermediate(op, rebuild)
    if program == "b":
        return BufferWrite(op, rebuild, case.input())
    return SavedThenWritten(op, rebuild)


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


# ---------------------------------------------------------------------------------------
# One run: eager, eager under allow_mutation_on_saved_tensors, or compiled


@dataclass
class Run:
    forward_error: str | None = None
    backward_error: str | None = None
    outputs: list = field(default_factory=list)  # detached clones
    requires_grad: list = field(default_factory=list)
    grads: dict = field(default_factory=dict)  # leaf name -> tensor or None
    buffers: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # leaf name -> value before the call
    graphs: int = 0  # graphs the audit compiled
    mutations: int = 0  # mutations the audit found in them
    graph_breaks: list = field(default_factory=list)  # Dynamo's reasons (a backend failure on a
    # data-dependent op falls back to eager with a graph break too)


def _graph_breaks() -> list[str]:
    """Dynamo's graph breaks in the last call, and the frames it gave up on after a backend
    failure (a data-dependent op such as `nonzero` makes the whole frame run eagerly)."""
    counters = torch._dynamo.utils.counters
    found = [reason.splitlines()[0] for reason in counters["graph_break"]]
    for reason in counters["unimplemented"]:
        lines = [line.strip() for line in reason.splitlines()]
        found.append(next((line for line in lines if line.startswith("Explanation:")), lines[0]))
    return found


def first_line(e: BaseException) -> str:
    inner = getattr(e, "inner_exception", None)
    if inner is not None and not isinstance(e, fxinplace.AnalysisError):
        e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _weights(case: Case, program: str, outputs: list) -> list:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.id}/{program}".encode()))
    weights = []
    for o in outputs:
        dtype = torch.complex128 if o.is_complex() else torch.float64
        weights.append(torch.randn(o.shape, generator=gen, dtype=dtype))
    return weights


def _loss(outputs: list, weights: list) -> torch.Tensor | None:
    terms = [(o.to(w.dtype) * w).real.sum() for o, w in zip(outputs, weights)
             if o.requires_grad and o.shape == w.shape]
    return sum(terms) if terms else None


def execute(case: Case, program: str, op: Callable, backend: Any, arg_grad: bool,
            weights: list | None = None, oracle: bool = False, seed: int = SEED) -> tuple[Run, list]:
    """Forward and backward of one program; returns the run and the loss weights it used."""
    run = Run()
    model = _build(program, case, op)
    tensors, _ = _split_arguments(case)
    x = case.input()
    if program != "b":
        x.requires_grad_(True)
    if arg_grad and program != "b":
        tensors = [t.requires_grad_(True) if _differentiable(t) else t for t in tensors]
    leaves = {"x": x, **{f"arg{i}": t for i, t in enumerate(tensors)}}
    leaves.update({n: p for n, p in model.named_parameters()})
    run.inputs = {n: t.detach().clone() for n, t in leaves.items()}
    fn = model
    audit = None
    torch._dynamo.utils.counters.clear()
    if backend == "functionalize":
        audit = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True, strict=True)
        fn = torch.compile(model, backend=audit)
    elif backend is not None:
        fn = torch.compile(model, backend=backend)
    torch._dynamo.reset()
    context = torch.autograd.graph.allow_mutation_on_saved_tensors() if oracle else contextlib.nullcontext()
    with context:
        torch.manual_seed(seed)
        try:
            outputs = list(fn(x, *tensors))
        except Exception as e:
            run.forward_error = first_line(e)
            return run, weights or []
        finally:
            if audit is not None:
                run.graphs = len(audit.graphs)
                run.mutations = sum(len(g.report.mutations) for g in audit.graphs)
            run.graph_breaks = _graph_breaks()
        if weights is None:
            weights = _weights(case, program, outputs)
        run.outputs = [o.detach().clone() for o in outputs]
        run.requires_grad = [o.requires_grad for o in outputs]
        loss = _loss(outputs, weights)
        if loss is not None:
            try:
                loss.backward()
            except Exception as e:
                run.backward_error = first_line(e)
    run.grads = {n: (None if t.grad is None else t.grad.detach().clone()) for n, t in leaves.items() if t.requires_grad}
    run.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return run, weights


# ---------------------------------------------------------------------------------------
# Comparison


def _close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None = None) -> str | None:
    """None if close (assert_close defaults, NaNs equal), else the first line of the difference."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} vs eager {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} vs eager {expected.dtype}"
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    try:
        torch.testing.assert_close(actual, expected, equal_nan=True)
    except AssertionError as e:
        lines = [line.strip() for line in str(e).splitlines() if "Greatest" in line or "Mismatched" in line]
        return "; ".join(lines) or str(e).splitlines()[0]
    return None


def _is_zeros(t: torch.Tensor) -> bool:
    return bool((t == 0).all())


def compare(ours: Run, eager: Run, values: bool = True, grads_from: Run | None = None,
            grad_masks: dict | None = None) -> list[tuple[str, str]]:
    """[(what, detail)] where `ours` differs from `eager`; empty if they agree.

    `values=False` leaves out output and buffer values (random ops whose draws differ);
    `grads_from` holds gradients to another reference (the replay), `grad_masks` limits
    a gradient's comparison to where the reference is defined."""
    found = []
    if (ours.backward_error is None) != (eager.backward_error is None):
        found.append(("backward", f"ours: {ours.backward_error}; eager: {eager.backward_error}"))
    if len(ours.outputs) != len(eager.outputs):
        return found + [("output", f"{len(ours.outputs)} outputs vs eager {len(eager.outputs)}")]
    for i, (o, e) in enumerate(zip(ours.outputs, eager.outputs)):
        if ours.requires_grad[i] != eager.requires_grad[i]:
            found.append(("requires_grad", f"output {i}: requires_grad {ours.requires_grad[i]} vs eager "
                                           f"{eager.requires_grad[i]}"))
        if o.shape != e.shape or o.dtype != e.dtype or values:
            diff = _close(o, e)
            if diff:
                found.append(("output", f"output {i}: {diff}"))
    for name, e in eager.buffers.items():
        o = ours.buffers.get(name)
        if o is None:
            found.append(("buffer", f"buffer {name} missing"))
        elif o.shape != e.shape or o.dtype != e.dtype or values:
            diff = _close(o, e)
            if diff:
                found.append(("buffer", f"buffer {name}: {diff}"))
    if ours.backward_error is None and eager.backward_error is None:
        reference = grads_from or eager
        for name, e in reference.grads.items():
            o = ours.grads.get(name)
            if (o is None) != (e is None):
                present = o if o is not None else e
                what = "None-vs-zeros" if _is_zeros(present) else "grad"
                found.append((what, f"grad of {name}: {'None' if o is None else 'tensor'} vs eager "
                                    f"{'None' if e is None else 'tensor'}"
                                    f"{' of zeros' if _is_zeros(present) else ''}"))
            elif o is not None:
                diff = _close(o, e, (grad_masks or {}).get(name))
                if diff:
                    found.append(("grad", f"grad of {name}: {diff}"))
    return found


# ---------------------------------------------------------------------------------------
# One case


@dataclass(frozen=True)
class Outcome:
    case_id: str  # "<case id>/<program>"
    op_name: str
    program: str
    category: str
    detail: str = ""
    what: tuple = ()  # mismatch kinds, sorted
    random: str = ""  # "" | "values matched" | "replayed" | "grads vs eager"
    note: str = ""

    def __str__(self) -> str:
        extra = f" [{', '.join(self.what)}]" if self.what else ""
        rnd = f" (random: {self.random})" if self.random else ""
        return f"{self.case_id}: {self.category}{extra}{rnd}: {self.detail}{' ' + self.note if self.note else ''}"


def _is_random(case: Case) -> bool:
    """PyTorch decides: two seeds, two results."""
    results = []
    for seed in (0, 1):
        t = case.input()
        args, kwargs = case.arguments()
        torch.manual_seed(seed)
        try:
            with torch.no_grad():
                in_place(traceable(case.inplace))(t, *args, **kwargs)
        except Exception:
            return False
        results.append(t)
    return not torch.equal(torch.nan_to_num(results[0]), torch.nan_to_num(results[1]))


def _is_homogeneous(case: Case) -> bool:
    """op(2t) == 2 op(t) under one seed: out / in is then the op's derivative for that noise."""
    results = []
    for scale in (1, 2):
        t = case.input() * scale
        args, kwargs = case.arguments()
        torch.manual_seed(0)
        with torch.no_grad():
            in_place(traceable(case.inplace))(t, *args, **kwargs)
        results.append(t)
    return bool(torch.allclose(results[1], 2 * results[0], equal_nan=True))


def _eager(case: Case, program: str) -> tuple[Run, list, bool]:
    """The oracle's run, its loss weights, and whether the arguments required grad."""
    oracle = program == "c"
    first = None
    for arg_grad in (True, False):
        run, weights = execute(case, program, in_place(traceable(case.inplace)), None, arg_grad, oracle=oracle)
        first = first or run
        if run.forward_error is None and run.backward_error is None:
            return run, weights, arg_grad
    return (run, weights, False) if run.forward_error is None else (first, weights, True)


def _replay(case: Case, program: str, ours: Run, weights: list, arg_grad: bool) -> tuple[Run, dict] | None:
    """Eager with the op replaced by `t.mul_(out / in)` read off `ours`; None where it cannot be."""
    if program == "b" or len(ours.outputs) != 2:
        return None
    before = ours.inputs["x"] * 2
    after = ours.outputs[1]
    if after.shape != before.shape:
        return None
    nonzero = before != 0
    ratio = torch.where(nonzero, after / torch.where(nonzero, before, torch.ones_like(before)), torch.zeros_like(after))
    run, _ = execute(case, program, lambda t, *a, **k: t.mul_(ratio), None, arg_grad, weights=weights,
                     oracle=program == "c")
    return run, {"x": nonzero}


def _categorize(ours: Run, eager: Run, values: bool, replay: tuple | None) -> tuple[str, str, tuple]:
    if ours.forward_error is not None:
        return "functionalize crashed", ours.forward_error, ()
    if ours.backward_error is not None and eager.backward_error is None:
        return "backward raised", ours.backward_error, ()
    found = compare(ours, eager, values=values, grads_from=replay[0] if replay else None,
                    grad_masks=replay[1] if replay else None)
    if not found:
        return "ok", "", ()
    return "mismatch", "; ".join(f"{d}" for _, d in found), tuple(sorted({w for w, _ in found}))


def check_case(case: Case, program: str, random: bool | None = None) -> Outcome:
    case_id = f"{case.id}/{program}"

    def outcome(category: str, detail: str = "", what: tuple = (), **kw) -> Outcome:
        return Outcome(case_id, case.op_name, program, category, detail, what, **kw)

    eager, weights, arg_grad = _eager(case, program)
    if eager.forward_error is not None:
        return outcome("eager refuses", eager.forward_error)
    oracle_note = ""
    if eager.backward_error is not None and program != "b":
        # Eager cannot differentiate the in-place variant ("the derivative for 'inplace version
        # of acosh' is not implemented"): the rewrite is held to the out-of-place twin instead,
        # the program it is meant to be.
        twin, _ = execute(case, program, traceable(case.opinfo.op), None, arg_grad, weights=weights)
        if twin.forward_error is None and twin.backward_error is None:
            eager, oracle_note = twin, f"(oracle: out-of-place twin; eager backward: {eager.backward_error})"
        elif "modified by an inplace operation" not in eager.backward_error:
            # Neither variant differentiates ("derivative for aten::floor_divide_ is not
            # implemented"): there are no gradients to hold the rewrite to.
            return outcome("eager refuses", f"backward: {eager.backward_error}")
    random = _is_random(case) if random is None else random
    ours, _ = execute(case, program, in_place(traceable(case.inplace)), "functionalize", arg_grad, weights=weights)
    note = oracle_note
    category, detail, what = _categorize(ours, eager, True, None)
    rnd = ""
    if random:
        rnd = "values matched"
        if category == "mismatch" and set(what) <= {"output", "buffer", "grad"}:
            replay = _replay(case, program, ours, weights, arg_grad) if _is_homogeneous(case) else None
            if replay is not None and replay[0].forward_error is None:
                rnd = "replayed"
            else:
                replay, rnd = None, "grads vs eager"
            category, detail, what = _categorize(ours, eager, False, replay)
    if ours.forward_error is None and ours.graph_breaks:  # eager ran the op: nothing was tested
        plain, _ = execute(case, program, in_place(traceable(case.inplace)), "aot_eager", arg_grad, weights=weights)
        also = "plain aot_eager breaks too" if plain.graph_breaks else "plain aot_eager compiles it"
        reason = re.sub(r" object at 0x[0-9a-f]+", "", ours.graph_breaks[0])
        return outcome("op not compiled", f"graph break: {reason[:200]}", what, random=rnd,
                       note=f"({also}; comparison: {category} {detail})" if category != "ok" else f"({also})")
    if ours.forward_error is None and not ours.mutations:
        note = f"{note} (the audit reported no mutation)".strip()
    if category == "functionalize crashed" and program == "c":
        # Plain aot_eager is expected to raise the in-place error on `c` (that is the hazard);
        # one that raises this same other error (an ATen op AOTAutograd cannot differentiate)
        # shows the crash is not functionalize's.
        plain, _ = execute(case, program, in_place(traceable(case.inplace)), "aot_eager", arg_grad, weights=weights)
        inner = (plain.forward_error or "").split(": ", 1)[-1][:80]  # ours may be wrapped in AnalysisError
        if plain.forward_error and inner in detail and "modified by an inplace operation" not in detail:
            return outcome("aot_eager fails too", detail, what, random=rnd, note=note)
    if category == "mismatch" and program == "c":
        # Plain aot_eager cannot run `c` (that is the hazard); a mismatch of its own on the
        # out-of-place twin, the program the rewrite is meant to be, shows the fault is
        # AOTAutograd's (an output that is an overlapping `as_strided` view of an intermediate).
        plain, _ = execute(case, program, traceable(case.opinfo.op), "aot_eager", arg_grad, weights=weights)
        p_category, _, p_what = _categorize(plain, eager, not random, None)
        if p_category == category and p_what == what:
            return outcome("aot_eager fails too", detail, what, random=rnd,
                           note=f"{note} (plain aot_eager on the out-of-place twin: the same mismatch)".strip())
    if category != "ok" and program in ("a", "b"):
        plain, _ = execute(case, program, in_place(traceable(case.inplace)), "aot_eager", arg_grad, weights=weights)
        p_category, p_detail, p_what = _categorize(plain, eager, not random, None)
        if random and p_category == "mismatch" and set(p_what) <= {"output", "buffer", "grad"}:
            p_category = "ok"  # plain aot_eager is not held to the replay: its values differ only by RNG
        if p_category == category and p_what == what:
            return outcome("aot_eager fails too", detail, what, random=rnd, note=note)
        if p_category != "ok":
            note = f"{note} (plain aot_eager: {p_category} {list(p_what)} {p_detail})".strip()
    return outcome(category, detail, what, random=rnd, note=note)


# ---------------------------------------------------------------------------------------
# The sweep


def float_cases(per_op: int = 3, long: bool = False) -> list[Case]:
    return [c for c in inplace_cases(per_op, long) if c.dtype.is_floating_point or c.dtype.is_complex]


def sweep(cases: list[Case], programs=PROGRAMS, progress: bool = False) -> list[Outcome]:
    results = []
    start = time.time()
    for n, case in enumerate(cases):
        random = _is_random(case)
        for program in programs:
            try:
                results.append(check_case(case, program, random))
            except Exception as e:  # the harness's own failure: a finding too, never a silent skip
                traceback.print_exc()
                results.append(Outcome(f"{case.id}/{program}", case.op_name, program, "harness error", first_line(e)))
        if progress and (n + 1) % 25 == 0:
            print(f"  {n + 1}/{len(cases)} cases, {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return results


def summarize(results: list[Outcome], verbose: bool = False) -> str:
    counts = collections.Counter(r.category for r in results)
    lines = [f"{len(results)} programs ({len({r.case_id.rsplit('/', 1)[0] for r in results})} cases)"]
    for category in CATEGORIES + tuple(sorted(set(counts) - set(CATEGORIES))):
        lines.append(f"  {category:24s} {counts.get(category, 0)}")
    by_what = collections.Counter(w for r in results if r.category == "mismatch" for w in r.what)
    if by_what:
        lines.append("  mismatch kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(by_what.items())))
    random = collections.Counter(r.random for r in results if r.random)
    if random:
        lines.append("  random ops checked: " + ", ".join(f"{k} {v}" for k, v in sorted(random.items())))
        for how in sorted(random):
            ops = sorted({r.op_name for r in results if r.random == how})
            lines.append(f"    {how}: {', '.join(ops)}")
    for category in CATEGORIES[1:] + tuple(sorted(set(counts) - set(CATEGORIES))):
        chosen = [r for r in results if r.category == category]
        if not chosen:
            continue
        lines.append(f"\n{category} ({len(chosen)}):")
        if verbose or category in ("mismatch", "functionalize crashed", "backward raised", "harness error"):
            lines += [f"  {r}" for r in chosen]
        else:
            by_op = collections.Counter(r.op_name for r in chosen)
            lines.append("  " + ", ".join(f"{op} ({n})" for op, n in sorted(by_op.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="every sample; float64, bfloat16, complex64 too")
    parser.add_argument("--only", default=None, help="ops whose name contains this")
    parser.add_argument("--programs", default="abc")
    parser.add_argument("--share", type=float, default=None, help="a seeded share of the cases")
    parser.add_argument("--verbose", action="store_true")
    ns = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = float_cases(per_op=10**6 if ns.long else 3, long=ns.long)
    if ns.only:
        cases = [c for c in cases if ns.only in c.op_name]
    if ns.share is not None:
        cases = seeded_share(cases, ns.share)
    start = time.time()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = sweep(cases, tuple(ns.programs), progress=True)
    print(summarize(results, ns.verbose))
    print(f"\n{time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
