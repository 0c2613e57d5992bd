"""PyTorch's operator catalogue (`op_db`) against the audit: is every in-place and `out=` write
named, with its real target, at the user's line?

For every in-place case (`opinfo_cases.inplace_cases`) the write is aimed at six targets, each a
program written as real Python source in a file of its own, so that the user's line is known:

- `intermediate`: `t = x.clone()`, then the op writes `t`;
- `intermediate view`: `base = torch.stack([x, x])`, the op writes `base[0]`;
- `input`: the compiled function's argument `x`, written directly;
- `buffer`: a registered buffer `buf` of an `nn.Module`;
- `buffer view`: `self.buf[0]` of a `(2, *shape)` buffer;
- `parameter`: a parameter `w` under `torch.no_grad()` (floating and complex dtypes only).

For every `out=` case the out tensors (a tuple of them for ops returning several) are the target:
`intermediate out` (clones made in the program), `input out` (arguments `z0`, `z1`, ...) and
`buffer out` (buffers `o0`, `o1`, ...). The sample's other tensors are further arguments `a0`, ...

The truth is eager PyTorch's: the program runs eagerly on fresh copies, and a candidate (the
input, each tensor argument, the buffer, the parameter, the out tensors, the intermediate the
program made) was written when its `_version` moved or the bytes of its storage changed. The
audit (`InplaceAudit(compiler="eager")`, `torch.compile(..., fullgraph=False)`) must name every
written target by kind and name at the user's line, and nothing eager did not write.

Each program lands in one category (`CATEGORIES`):

- `ok`;
- `missed target`: eager wrote a target inside a compiled graph, and the audit did not name it;
- `wrong target`: the audit named a target eager did not write (an intermediate other than the
  one the program made counts only when eager wrote no storage but the candidates' at all);
- `wrong line`: the right target, at another line than the user's;
- `audit raised`: compiling or running with the audit raised, or a graph has an `analysis_error`;
- `compile raised`: Dynamo itself fails on the program, with the plain `eager` backend too;
- `compiled differs`: eager wrote a target the compiled program (graphs and eager code between
  them) did not write at all: Dynamo changed the program, the audit saw what ran;
- `eager refuses`: eager PyTorch raises on the program (a result dtype the op cannot cast into);
- `outside the graph`: Dynamo graph-broke around the op, which ran in eager between graphs, so
  no graph holds the write the audit misses. Decided at run time: a dispatch mode, entered only
  while a compiled graph runs, records the storages its ATen ops write (with the graph inputs
  whose `_version` moved); a write eager made that no graph made ran outside every graph.

    python tests/opinfo_audit.py            # the short mode: float32, 2 samples per op
    python tests/opinfo_audit.py --long     # every op, sample and long-mode dtype
    python tests/opinfo_audit.py --ops t,add --show 't[0]-float32-inplace:input'   # one program

Figures, and why the long mode's few wrong targets are eager's: docs/reliability.md, "PyTorch's
operator catalogue".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch._dynamo.utils import counters
from torch.multiprocessing.reductions import StorageWeakRef

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxinplace  # noqa: E402
from conftest import WriteRecorder, identical  # noqa: E402
from differential_oracle import fast_dynamo  # noqa: E402
from opinfo_cases import Case, inplace_cases, out_cases, seeded_share, traceable  # noqa: E402

__all__ = ["CATEGORIES", "EXCLUDED", "Program", "Outcome", "build", "programs", "run_program", "sweep", "summary",
           "short_cases", "long_cases", "report_of", "SHORT_PER_OP", "LONG_PER_OP"]

CATEGORIES = ("ok", "missed target", "wrong target", "wrong line", "audit raised", "compile raised",
              "compiled differs", "eager refuses", "outside the graph")
# Honest exclusions: eager itself refuses, or no graph holds the write.
EXCLUDED = ("eager refuses", "outside the graph")

INPLACE_TARGETS = ("intermediate", "intermediate view", "input", "buffer", "buffer view", "parameter")
OUT_TARGETS = ("intermediate out", "input out", "buffer out")

SHORT_PER_OP = 2
SHOW: set[str] = set()  # program ids whose source and report `--show` prints
LONG_PER_OP = 10_000  # every usable sample


# -- programs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    case: Case
    target: str  # one of INPLACE_TARGETS / OUT_TARGETS
    source: str
    line: int  # the user's line: where the op is called
    n_args: int  # tensors a0, a1, ... of the sample
    n_outs: int  # out tensors (0 for in-place programs)

    @property
    def id(self) -> str:
        return f"{self.case.id}:{self.target}"

    @property
    def is_module(self) -> bool:
        return self.target.startswith(("buffer", "parameter"))


class _Spelling:
    """The sample's arguments as source text: tensors become arguments `a0`, `a1`, ..., other
    values literals or entries of the program's constant table `C`."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []
        self.constants: list[Any] = []

    def __call__(self, value: Any) -> str:
        if isinstance(value, torch.Tensor):
            self.tensors.append(value)
            return f"a{len(self.tensors) - 1}"
        if isinstance(value, list):
            return "[" + ", ".join(self(v) for v in value) + "]"
        if isinstance(value, tuple):
            return "(" + "".join(self(v) + ", " for v in value) + ")"
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return "{" + ", ".join(f"{k!r}: {self(v)}" for k, v in value.items()) + "}"
        if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            return repr(value)
        self.constants.append(value)
        return f"C[{len(self.constants) - 1}]"


def _call_text(fn: str, first: str | None, case: Case, spell: _Spelling, out: str | None = None) -> str:
    args, kwargs = case.arguments()
    parts = ([first] if first is not None else []) + [spell(a) for a in args]
    parts += [f"{k}={spell(v)}" for k, v in kwargs.items()]
    if out is not None:
        parts.append(f"out={out}")
    return f"{fn}({', '.join(parts)})"


def _eager_result(case: Case) -> Any:
    """What the functional op returns for the sample: the out tensors are shaped like it."""
    return case.opinfo.op(case.input(), *case.arguments()[0], **case.arguments()[1])


def _out_text(result: Any, prefix: str, counter: list[int]) -> str:
    # The out= argument spelled like the result: one tensor bare, a tuple or list of them as
    # such (nested as the op nests them: `histogramdd` returns a tensor and a list).
    if isinstance(result, torch.Tensor):
        counter[0] += 1
        return f"{prefix}{counter[0] - 1}"
    inner = [_out_text(r, prefix, counter) for r in result]
    return "[" + ", ".join(inner) + "]" if isinstance(result, list) else "(" + "".join(i + ", " for i in inner) + ")"


def build(case: Case, target: str) -> tuple[Program, list]:
    """The program's source and its constant table."""
    spell = _Spelling()
    lines: list[str] = ["import torch", ""]
    n_outs = 0
    if case.kind == "inplace":
        first = {"intermediate": "t", "intermediate view": "base[0]", "input": "x", "buffer": "self.buf",
                 "buffer view": "self.buf[0]", "parameter": "self.w"}[target]
        call = _call_text("inplace", first, case, spell)
        params = ", ".join(f"a{i}" for i in range(len(spell.tensors)))
        if target.startswith(("buffer", "parameter")):
            init = {"buffer": 'self.register_buffer("buf", x)',
                    "buffer view": 'self.register_buffer("buf", torch.stack([x, x]))',
                    "parameter": "self.w = torch.nn.Parameter(x)"}[target]
            lines += ["class Program(torch.nn.Module):", "    def __init__(self, x):", "        super().__init__()",
                      f"        {init}", "", f"    def forward(self{', ' if params else ''}{params}):"]
            if target == "parameter":
                lines += ["        with torch.no_grad():"]
                lines += [f"            {call}"]
            else:
                lines += [f"        {call}"]
            line = len(lines)
        else:
            lines += [f"def program(x{', ' if params else ''}{params}):"]
            if target == "intermediate":
                lines += ["    t = x.clone()"]
            elif target == "intermediate view":
                lines += ["    base = torch.stack([x, x])"]
            lines += [f"    {call}"]
            line = len(lines)
            lines += {"intermediate": ["    return t"], "intermediate view": ["    return base"]}.get(target, [])
    else:
        names = {"intermediate out": "o", "input out": "z", "buffer out": "self.o"}[target]
        counter = [0]
        out = _out_text(_eager_result(case), names, counter)
        n_outs = counter[0]
        outs = [f"{names}{i}" for i in range(n_outs)]
        call = _call_text("op", "x", case, spell, out=out)
        params = ["x"] + [f"a{i}" for i in range(len(spell.tensors))]
        if target == "buffer out":
            lines += ["class Program(torch.nn.Module):", "    def __init__(self, *outs):", "        super().__init__()",
                      "        for i, o in enumerate(outs):", '            self.register_buffer(f"o{i}", o)', "",
                      f"    def forward(self, {', '.join(params)}):", f"        {call}"]
            line = len(lines)
        else:
            templates = [f"z{i}" for i in range(n_outs)]
            lines += [f"def program({', '.join(params + templates)}):"]
            if target == "intermediate out":
                lines += [f"    o{i} = z{i}.clone()" for i in range(n_outs)]
            lines += [f"    {call}"]
            line = len(lines)
            if target == "intermediate out":
                lines += [f"    return {', '.join(outs)}"]
    source = "\n".join(lines) + "\n"
    return Program(case, target, source, line, len(spell.tensors), n_outs), spell.constants


def programs(cases: list[Case]) -> Iterator[tuple[Case, str]]:
    """(case, target) for every program of `cases`."""
    for case in cases:
        if case.kind == "inplace":
            for target in INPLACE_TARGETS:
                if target == "parameter" and not (case.dtype.is_floating_point or case.dtype.is_complex):
                    continue
                yield case, target
        else:
            for target in OUT_TARGETS:
                yield case, target


# -- running one program -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    id: str
    category: str
    detail: str = ""


def _storage(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    # The whole storage as bytes: NaN-safe, and it sees a write outside the tensor's own view.
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone()


def _snapshot(t: torch.Tensor) -> tuple:
    return t._version, _storage_bytes(t), tuple(t.shape), tuple(t.stride()), t.storage_offset()


def _was_written(t: torch.Tensor, before: tuple) -> bool:
    # A write shows in the version counter or in the bytes; a metadata write (`t_`, `resize_`)
    # moves the version counter (measured: every one of them does).
    version, data = before[0], before[1]
    return t._version != version or not identical(_storage_bytes(t), data)


def _sentinel(like: torch.Tensor) -> torch.Tensor:
    # An out tensor with known bytes: -7 is a value few ops return, and a write shows anyway.
    # Contiguous, as a user allocates it: eager's result may be column-major (`cholesky`), and
    # Dynamo graph-breaks on a non-contiguous `out=` tensor.
    return torch.full_like(like, True if like.dtype == torch.bool else -7, memory_format=torch.contiguous_format)


class _Instance:
    """One fresh set of the program's tensors, and the callable to run on them."""

    def __init__(self, program: Program, namespace: dict):
        case = program.case
        self.x = case.input()
        args, kwargs = case.arguments()
        self.args = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        assert len(self.args) == program.n_args, (program.id, len(self.args), program.n_args)
        self.outs: list[torch.Tensor] = []
        if case.kind == "out":
            like = torch.utils._pytree.tree_leaves(_eager_result(case))
            self.outs = [_sentinel(o) for o in like if isinstance(o, torch.Tensor)]
        self.module: torch.nn.Module | None = None
        self.candidates: dict[tuple[str, str], torch.Tensor] = {}
        if program.target in ("buffer", "buffer view", "parameter"):
            self.module = namespace["Program"](self.x)
            self.call_args = list(self.args)
            name = "w" if program.target == "parameter" else "buf"
            kind = "parameter" if program.target == "parameter" else "buffer"
            self.candidates[(kind, name)] = getattr(self.module, name)
        elif program.target == "buffer out":
            self.module = namespace["Program"](*self.outs)
            self.call_args = [self.x, *self.args]
            self.candidates["input", "x"] = self.x
            self.candidates.update({("buffer", f"o{i}"): getattr(self.module, f"o{i}") for i in range(len(self.outs))})
        else:
            self.call_args = [self.x, *self.args, *self.outs]
            self.candidates["input", "x"] = self.x
            if program.target == "input out":
                self.candidates.update({("input", f"z{i}"): o for i, o in enumerate(self.outs)})
        self.candidates.update({("input", f"a{i}"): a for i, a in enumerate(self.args)})
        self.fn: Callable = self.module if self.module is not None else namespace["program"]

    def initial_intermediates(self, program: Program) -> list[torch.Tensor]:
        """What the program's own intermediates hold when made (before the op writes them)."""
        if program.target == "intermediate":
            return [self.x.clone()]
        if program.target == "intermediate view":
            return [torch.stack([self.x, self.x])]
        if program.target == "intermediate out":
            return [o.clone() for o in self.outs]
        return []


def _intermediates(program: Program, result) -> list[torch.Tensor]:
    if not program.target.startswith("intermediate"):
        return []
    return [result] if isinstance(result, torch.Tensor) else list(result)


@dataclass
class _Effects:
    written: set  # candidate keys, ("intermediate", i) for the program's own intermediates
    storages: dict  # key -> storage, for the candidates and intermediates
    other_writes: bool = False  # some ATen op wrote a storage that is no candidate's (eager only)


def _effects(program: Program, inst: _Instance, result, before: dict) -> _Effects:
    written = {key for key, t in inst.candidates.items() if _was_written(t, before[key])}
    storages = {key: _storage(t) for key, t in inst.candidates.items()}
    initial = inst.initial_intermediates(program)
    for i, (t, at_start) in enumerate(zip(_intermediates(program, result), initial)):
        fresh = _snapshot(at_start)
        # Made by `clone`/`stack` at the version a fresh one has (0), with its bytes.
        if t._version != at_start._version or not identical(_storage_bytes(t), fresh[1]):
            written.add(("intermediate", i))
        storages["intermediate", i] = _storage(t)
    return _Effects(written, storages)


def _load(program: Program, constants: list, directory: str) -> tuple[dict, str]:
    name = program.id.translate({ord(c): "_" for c in "[]:. -"}) + ".py"
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(program.source)
    namespace = {"inplace": traceable(program.case.inplace), "op": traceable(program.case.opinfo.op), "C": constants,
                 "__name__": f"opinfo_program_{abs(hash(path))}"}
    exec(compile(program.source, path, "exec"), namespace)
    return namespace, path


def _eager(program: Program, namespace: dict) -> tuple[_Effects | None, str | None]:
    inst = _Instance(program, namespace)
    before = {key: _snapshot(t) for key, t in inst.candidates.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = inst.fn(*inst.call_args)
    except Exception as e:  # eager refuses: a dtype the op cannot cast into, an integer-only op
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    effects = _effects(program, inst, result, before)
    # A second run under a dispatch mode: does the op write storages no candidate owns (its own
    # temporaries)? Then the audit may name intermediates we did not make.
    inst = _Instance(program, namespace)
    recorder = WriteRecorder(user_file=None)
    with warnings.catch_warnings(), recorder:
        warnings.simplefilter("ignore")
        result = inst.fn(*inst.call_args)
    known = {_storage(t) for t in inst.candidates.values()} | {_storage(t) for t in _intermediates(program, result)}
    effects.other_writes = any(s not in known for s, _ in recorder.writes)
    return effects, None


class _GraphWrites:
    """A backend around the audit that records, while each compiled graph runs, which storages
    its ops write (and which graph inputs' version counters move): what ran inside a graph."""

    def __init__(self, audit: Callable):
        self.audit = audit
        self.storages: set[StorageWeakRef] = set()
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kwargs):
        compiled = self.audit(gm, example_inputs, **kwargs)
        self.graphs += 1

        def run(*args):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            before = [_snapshot(t) for t in tensors]
            recorder = WriteRecorder(user_file=None)
            with recorder:
                out = compiled(*args)
            self.storages |= {s for s, _ in recorder.writes}
            # Writes no schema shows (`native_batch_norm`'s running statistics) move bytes.
            self.storages |= {_storage(t) for t, b in zip(tensors, before) if _was_written(t, b)}
            return out

        return run


def _compiled(program: Program, namespace: dict, backend: Callable):
    inst = _Instance(program, namespace)
    before = {key: _snapshot(t) for key, t in inst.candidates.items()}
    compiled = torch.compile(inst.fn, backend=backend, fullgraph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compiled(*inst.call_args)
    return _effects(program, inst, result, before)


def report_of(audit: fxinplace.InplaceAudit) -> fxinplace.Report:
    # One place the sweep reads the audit: the perturbation tests hand it a doctored report.
    return audit.report


def _graph_breaks() -> str:
    # Dynamo's own account of why it broke the graph (or skipped the frame), first lines only.
    reasons = [r for key in ("graph_break", "unimplemented") for r in counters.get(key, {})]
    return "; ".join(sorted({_reason(r) for r in reasons}))


def _reason(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0][:160] if lines else ""


def _audit_key(mutation) -> tuple[str, str]:
    return mutation.target.kind, mutation.target.name


def _is_own(mutation, program: Program, i: int) -> bool:
    """Is `mutation`'s target the program's intermediate `i`: the node Dynamo named after the
    program's variable (`t`, `base`, `o0`, ...), made by the op that made it?"""
    name, made_by = {"intermediate": ("t", "clone"), "intermediate view": ("base", "stack"),
                     "intermediate out": (f"o{i}", "clone")}[program.target]
    target = mutation.target
    return target.kind == "intermediate" and target.name == name and target.produced_by == made_by


def run_program(program: Program, constants: list, directory: str) -> Outcome:
    namespace, path = _load(program, constants, directory)
    truth, refused = _eager(program, namespace)
    if truth is None:
        return Outcome(program.id, "eager refuses", refused)

    torch._dynamo.reset()
    counters.clear()
    audit = fxinplace.InplaceAudit(compiler="eager", print=False)
    backend = _GraphWrites(audit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ran = _compiled(program, namespace, backend)
    except Exception as e:
        message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        torch._dynamo.reset()
        try:  # Dynamo's own failure, or the audit's?
            _compiled(program, namespace, "eager")
        except Exception:
            return Outcome(program.id, "compile raised", message)
        return Outcome(program.id, "audit raised", message + "\n" + traceback.format_exc(limit=-3))
    finally:
        torch._dynamo.reset()
    breaks = _graph_breaks()
    report = report_of(audit)
    if program.id in SHOW:
        print(f"--- {program.id} ({path}, line {program.line})\n{program.source}\n{report.render()}\n"
              f"eager wrote {sorted(truth.written, key=str)}; graphs wrote {len(backend.storages)} storages; "
              f"compiled run wrote {sorted(ran.written, key=str)}; graph breaks: {breaks}")
    failed = [g.analysis_error for g in report.graphs if g.analysis_error]
    if failed:
        return Outcome(program.id, "audit raised", "; ".join(failed))

    mutations = report.mutations
    problems: dict[str, list[str]] = collections.defaultdict(list)
    outside: list[str] = []
    for key in sorted(truth.written, key=str):
        if key[0] == "intermediate":
            found = [m for m in mutations if _is_own(m, program, key[1])]
        else:
            found = [m for m in mutations if _audit_key(m) == key]
        if not found:
            if ran.storages[key] in backend.storages:
                problems["missed target"].append(f"{key[0]} {key[1]}")
            elif key not in ran.written:  # Dynamo's program does not do what eager's does
                problems["compiled differs"].append(f"{key[0]} {key[1]} written in eager only")
            else:
                outside.append(f"{key[0]} {key[1]}")
            continue
        for m in found:
            if m.source is None or m.source.file != path or m.source.line != program.line:
                where = f"{m.source.file}:{m.source.line}" if m.source else "no line"
                problems["wrong line"].append(f"{key[0]} {key[1]} ({m.op}) at {where}, not line {program.line}")
    named = {key for key in truth.written if key[0] != "intermediate"}
    own = [key for key in truth.written if key[0] == "intermediate"]
    for m in mutations:
        if m.target.kind == "intermediate":
            if any(_is_own(m, program, i) for _, i in own) or truth.other_writes:
                continue
            problems["wrong target"].append(f"{m.target} ({m.op}) at line {m.source.line if m.source else '?'}")
        elif _audit_key(m) not in named:
            problems["wrong target"].append(f"{m.target.kind} {m.target.name} ({m.op}), eager did not write it")
    for category in ("missed target", "wrong target", "wrong line", "compiled differs"):
        if problems[category]:
            return Outcome(program.id, category, "; ".join(problems[category]))
    if outside and not breaks:  # a write outside every graph, and Dynamo admits no break?
        return Outcome(program.id, "missed target", f"{', '.join(outside)}: no graph wrote it, yet no graph break")
    if outside:
        return Outcome(program.id, "outside the graph",
                       f"{', '.join(outside)} ({backend.graphs} graphs; graph breaks: {breaks or 'none'})")
    return Outcome(program.id, "ok")


# -- the sweep -----------------------------------------------------------------------------------


def sweep(cases: list[Case], progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    todo = list(programs(cases))
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="fxinplace-opinfo-") as directory, fast_dynamo(), _quiet():
        for i, (case, target) in enumerate(todo):
            try:
                program, constants = build(case, target)
            except Exception as e:  # the sample itself fails in eager while we shape the program
                outcomes.append(Outcome(f"{case.id}:{target}", "eager refuses", f"{type(e).__name__}: {e}"))
                continue
            outcomes.append(run_program(program, constants, directory))
            if progress is not None:
                progress(i + 1, len(todo))
    return outcomes


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging

    loggers = [logging.getLogger(n) for n in ("fxinplace", "torch._dynamo", "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def short_cases() -> list[Case]:
    return inplace_cases(SHORT_PER_OP) + out_cases(SHORT_PER_OP)


def long_cases() -> list[Case]:
    return inplace_cases(LONG_PER_OP, long=True) + out_cases(LONG_PER_OP, long=True)


def summary(outcomes: list[Outcome], details: bool = True) -> str:
    counts = collections.Counter(o.category for o in outcomes)
    lines = [f"{len(outcomes)} programs"] + [f"  {c:18} {counts.get(c, 0)}" for c in CATEGORIES]
    if details:
        for category in CATEGORIES[1:]:
            chosen = [o for o in outcomes if o.category == category]
            if chosen:
                lines.append(f"\n{category} ({len(chosen)}):")
                lines += [f"  {o.id}: {o.detail.splitlines()[0] if o.detail else ''}" for o in chosen]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="every op, sample and long-mode dtype")
    parser.add_argument("--share", type=float, default=1.0, help="a seeded share of the cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default="", help="comma-separated OpInfo names to keep")
    parser.add_argument("--show", default="", help="comma-separated program ids: print their source and report")
    args = parser.parse_args(argv)
    SHOW.update(filter(None, args.show.split(",")))
    torch.set_num_threads(1)
    cases = long_cases() if args.long else short_cases()
    if args.ops:
        keep = set(args.ops.split(","))
        cases = [c for c in cases if c.op_name in keep]
    if args.share < 1:
        cases = seeded_share(cases, args.share, args.seed)
    start = time.monotonic()

    def progress(done, total):
        if done % 200 == 0 or done == total:
            print(f"[{time.monotonic() - start:7.0f} s] {done}/{total}", file=sys.stderr, flush=True)

    outcomes = sweep(cases, progress)
    print(summary(outcomes))
    print(f"\n{len(cases)} cases, {time.monotonic() - start:.0f} s")
    return 0 if all(o.category in ("ok", *EXCLUDED) for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
