"""Fix-its on every hazardous model of the test suite: a checked fix for each error, or a reason.

    python benchmarks/fix_sweep.py                 # the test suite's models and 20 raising programs
    python benchmarks/fix_sweep.py --programs 50   # more generated programs
    python benchmarks/fix_sweep.py --programs 0 -v # the test models only, each entry printed

The models: every `nn.Module` class defined in the test files named below, built with no
arguments (or as the file's own tables build it, `HAZARDOUS = {name: (cls, make_args)}`), run on
the inputs the file's table gives it or, failing that, on the first of a few usual shapes its
forward accepts; and the generated differential programs (`tests/program_gen.py`) whose eager
backward raises the in-place error. Those whose audit has an error-level hazard are swept:
`fxinplace.propose_fixes` runs on each, and each entry is counted as checked, no safe edit or
check failed, by reason.

Each checked fix is then verified apart from fxinplace's own check: every checked patch of the
model is applied (`FixReport.apply`) to a copy of its file in a temporary directory, the copy is
imported, the patched model is loaded with the original's weights and trained one step in eager
PyTorch, which must not raise, and its outputs and gradients (of the parameters and of the
inputs that require grad) must equal those of the functionalized original
(`torch.compile(model, backend=InplaceAudit(compiler="eager", functionalize=True))`) at
`torch.testing.assert_close`'s default tolerances, or, where the functionalized original still
fails (a tensor saved before a graph break and written after it) or differs, those of an
eager step that saves a copy of every tensor autograd saves (the out-of-place program's
gradients; the entry says which). Where some error of the model has no checked fix, eager
PyTorch may still refuse it: the patched copy is then compared functionalized (or saving
copies) too. The files under tests/ are only read.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import importlib
import importlib.util
import inspect
import linecache
import pathlib
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import fxinplace  # noqa: E402
from fxinplace.fixes import FixReport, FixStatus, NoFixReason, propose_fixes  # noqa: E402

# The files whose models are swept: the bug-report models, the real architectures, and the
# other test files that define models with in-place writes.
TEST_FILES = (
    "test_hazards", "test_real_world", "test_real_models", "test_shared_modules", "test_functionalize",
    "test_graph_breaks", "test_subgraphs", "test_tasks", "test_torchvision", "test_render", "test_backend",
    "test_report", "test_cli", "test_pytest_plugin", "test_mutations", "test_guard", "test_graph_inputs",
    "test_sources", "test_compat", "test_functionalize_ops",
)

# Constructors the file's tables do not give (the buggy variant of a model built twice).
EXTRA = {
    ("test_real_world", "ResNetMultiTask"): [((), {"buggy": True}, lambda: (torch.randn(2, 3, 8, 8),))],
    ("test_torchvision", "ResNetTwoTasks"): [((), {"buggy": True}, lambda: (torch.randn(2, 3, 64, 64),))],
}

# Inputs tried, in order, for a class no table gives inputs for.
SHAPES = ((3, 4), (2, 3, 8, 8), (4, 6), (3, 6), (8, 4), (2, 4), (4, 4), (2, 5, 8), (4, 3, 6, 6), (2, 3, 6, 6),
          (3, 8), (4,), (2, 3, 4, 4), (4, 8), (3, 3))

AUTOGRAD_ERROR = "modified by an inplace operation"


@dataclass
class Case:
    name: str
    file: str  # the model's file, which the patches are applied to (a copy of it)
    module: Any
    cls_name: str
    ctor_args: tuple
    ctor_kwargs: dict
    make_inputs: Callable[[], tuple]

    def build(self, module=None) -> nn.Module:
        module = module if module is not None else self.module
        torch.manual_seed(0)
        return getattr(module, self.cls_name)(*self.ctor_args, **self.ctor_kwargs).train()

    def inputs(self) -> tuple:
        torch.manual_seed(1)
        return self.make_inputs()


def _call_factory(make: Callable) -> Callable[[], tuple]:
    try:
        takes = len(inspect.signature(make).parameters)
    except (TypeError, ValueError):
        takes = 0
    if takes == 0:
        return lambda: tuple(make())
    return lambda: tuple(make(0))  # `_x6(step)` and the like


def _tables(module) -> dict[type, list[Callable[[], tuple]]]:
    # `NAME = {id: (cls, make_args, ...)}` tables of the test file.
    found: dict[type, list[Callable[[], tuple]]] = {}
    for value in vars(module).values():
        entries = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for entry in entries:
            if (isinstance(entry, tuple) and len(entry) >= 2 and isinstance(entry[0], type)
                    and issubclass(entry[0], nn.Module) and callable(entry[1]) and not isinstance(entry[1], type)):
                found.setdefault(entry[0], []).append(_call_factory(entry[1]))
    return found


def _forward_runs(model: nn.Module, args: tuple) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*_copy_args(args))
    except Exception:
        return False
    return True


def test_cases() -> list[Case]:
    cases = []
    for name in TEST_FILES:
        try:
            module = importlib.import_module(name)
        except BaseException as e:  # pytest.importorskip raises a BaseException: torchvision missing
            print(f"skipped {name}: {type(e).__name__}: {e}")
            continue
        tables = _tables(module)
        for cls_name, cls in list(vars(module).items()):
            if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == name):
                continue
            variants = [((), {}, make) for make in tables.get(cls, [])] + EXTRA.get((name, cls_name), [])
            if not variants:
                variants = [((), {}, (lambda s=s: (torch.randn(*s),))) for s in SHAPES]
            for args, kwargs, make in variants:
                case = Case(f"{name}.{cls_name}" + (f"({kwargs})" if kwargs else ""), module.__file__, module,
                            cls_name, args, kwargs, make)
                try:
                    model, inputs = case.build(), case.inputs()
                except Exception:
                    continue
                if _forward_runs(model, inputs):
                    cases.append(case)
                    break
    return cases


def _program_raises(program_cls, make_inputs) -> bool:
    model = program_cls()
    args, _ = make_inputs()
    try:
        out = model(*args)
        loss = sum(v.sum() for v in out.values() if v.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    except RuntimeError as e:
        return AUTOGRAD_ERROR in str(e)
    return False


class _ModuleOf:
    # A loaded program is in no `sys.modules`: its class stands for its module.
    def __init__(self, cls: type) -> None:
        self.Program = cls


def program_cases(n: int, directory: pathlib.Path) -> tuple[list[Case], int]:
    from program_gen import generate

    cases, seed = [], 0
    while len(cases) < n:
        program = generate(seed)
        program_cls, make_inputs = program.load(directory)
        if _program_raises(program_cls, make_inputs):
            module = sys.modules.get(program_cls.__module__) or _ModuleOf(program_cls)
            cases.append(Case(f"program {seed}", program_cls.forward.__code__.co_filename, module, "Program", (), {},
                              lambda make=make_inputs: make()[0]))
        seed += 1
    return cases, seed


def _copy_args(args: tuple) -> tuple:
    # A program's x2 is computed by the caller (a non-leaf): copied as one again.
    return tuple(a.detach().clone().requires_grad_(a.requires_grad).clone()
                 if isinstance(a, torch.Tensor) and not a.is_leaf else copy.deepcopy(a) for a in args)


def _leaves(args: tuple) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_leaf and a.requires_grad]


def _step(model: nn.Module, run: Callable, args: tuple):
    """Outputs and gradients (parameters, then the leaf inputs) of one step, or the error."""
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    try:
        out = run(*args)
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        g = torch.Generator().manual_seed(3)
        loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in outputs if t.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads.update({f"input {i}": x.grad for i, x in enumerate(_leaves(args))})
    return [t.detach() for t in outputs], grads


def _functionalized(model: nn.Module, args: tuple):
    backend = fxinplace.InplaceAudit(compiler="eager", functionalize=True, print=False)
    try:
        return _step(model, torch.compile(model, backend=backend), args)
    finally:
        torch._dynamo.reset()


def _references(model: nn.Module, args: tuple):
    """The out-of-place program's step two ways: the functionalized original's, and eager's with
    each saved tensor copied when saved (the only one where the functionalized original still
    fails: the save and the write in two graphs)."""
    functionalized = _functionalized(copy.deepcopy(model), _copy_args(args))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        saved = _step(model, model, _copy_args(args))
    if isinstance(functionalized, str) and AUTOGRAD_ERROR in functionalized:
        functionalized = None
    return functionalized, saved


def _compare(ours, theirs) -> str | None:
    if isinstance(ours, str) or isinstance(theirs, str):
        return f"{ours if isinstance(ours, str) else 'trains'} vs {theirs if isinstance(theirs, str) else 'trains'}"
    (outs, grads), (outs_e, grads_e) = ours, theirs
    if len(outs) != len(outs_e):
        return "a different number of outputs"
    pairs = [(f"output {i}", a, b) for i, (a, b) in enumerate(zip(outs, outs_e))]
    pairs += [(f"gradient of {n}", grads.get(n), g) for n, g in grads_e.items()]
    for what, a, b in pairs:
        if (a is None) != (b is None):
            return f"{what}: {'none' if a is None else 'some'} vs {'none' if b is None else 'some'}"
        if a is not None:
            try:
                torch.testing.assert_close(a, b)
            except AssertionError as e:
                return f"{what}: {str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}"
    return None


def verify(case: Case, report: FixReport, directory: pathlib.Path) -> tuple[str | None, str]:
    """Apply the checked patches to a copy of the model's file and train it: None when it trains
    like the functionalized original, else what went wrong; and how it was run and compared."""
    checked = report.checked
    if any(f.file != case.file for f in checked):
        return "a patch is in another file than the model's", ""
    copy_dir = pathlib.Path(tempfile.mkdtemp(dir=directory))
    patched_file = copy_dir / pathlib.Path(case.file).name
    if pathlib.Path(case.file).parent == ROOT / "tests":
        # The test file's own paths (`../docs/...`) must resolve from the copy as from the original.
        patched_file = copy_dir / "tests" / pathlib.Path(case.file).name
        patched_file.parent.mkdir()
        for entry in ROOT.iterdir():
            if entry.name != "tests":
                (copy_dir / entry.name).symlink_to(entry)
    shutil.copyfile(case.file, patched_file)
    FixReport(tuple(dataclasses.replace(f, file=str(patched_file)) for f in checked)).apply()
    name = f"patched_{pathlib.Path(case.file).stem}_{copy_dir.name}"
    spec = importlib.util.spec_from_file_location(name, patched_file)
    patched_module = importlib.util.module_from_spec(spec)
    sys.modules[name] = patched_module
    spec.loader.exec_module(patched_module)

    original, patched = case.build(), case.build(patched_module)
    patched.load_state_dict(original.state_dict())
    args = case.inputs()
    functionalized, saved = _references(original, args)
    if len(checked) == len(report.fixes):
        got = _step(patched, patched, _copy_args(args))  # eager PyTorch, nothing in between
        how = "eager"
    elif functionalized is not None:
        got = _functionalized(patched, _copy_args(args))
        how = "functionalized, other errors remain"
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            got = _step(patched, patched, _copy_args(args))
        how = "eager saving copies, other errors remain"
    if functionalized is None:
        return _compare(got, saved), f"{how}, vs eager saving copies: the functionalized original fails"
    differs = _compare(got, functionalized)
    if differs is not None and _compare(got, saved) is None:
        return None, f"{how}, vs eager saving copies only: the functionalized original differs ({differs})"
    return differs, f"{how}, vs the functionalized original"


def _statement_kind(fix) -> str:
    """What the statement fxinplace does not rewrite is, from its text: the figures' breakdown."""
    text = linecache.getline(fix.file, fix.line).split("#")[0].strip() if fix.file else ""
    if ".data" in text:
        return "`.data` write"
    if "out=" in text:
        return "`out=` write"
    if re.match(r"(self|[\w.]*\.(weight|bias|running_\w+))\.", text) or re.match(r"[\w.]+\.\w+\[.*\]\s*=", text):
        return "write to module state"
    if re.match(r"\w+(\[[^]]*\]|\.view\([^)]*\))+(\.\w+_\(|\[.*\]\s*=)", text):
        return "write to an unnamed view"
    if re.match(r"\w+\.(copy|zero|fill)_\(", text):
        return "copy_/zero_/fill_ (no twin)"
    if re.search(r"\bif\b.*\belse\b", text):
        return "conditional expression"
    if re.search(r"(= |^)(self\.\w+|[\w.]*batch_norm)\(", text):
        return "write inside a call"
    return f"other: `{text}`"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=20,
                        help="generated programs whose eager backward raises (default 20)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each entry")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = 64
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        groups = {"test models": test_cases()}
        (directory / "programs").mkdir()
        programs, seeds = program_cases(args.programs, directory / "programs") if args.programs else ([], 0)
        if args.programs:
            groups["programs"] = programs
        rows = {}
        for group, cases in groups.items():
            figures: collections.Counter[str] = collections.Counter()
            for case in cases:
                try:
                    report = propose_fixes(case.build(), *case.inputs())
                except Exception as e:
                    figures["models"] += 1
                    figures["propose_fixes crashed"] += 1
                    print(f"{case.name}: propose_fixes raised {type(e).__name__}: {e}")
                    if args.verbose:
                        traceback.print_exc()
                    continue
                torch._dynamo.reset()
                if not report.fixes:
                    continue
                figures["models"] += 1
                figures["errors"] += sum(1 + len(f.also) for f in report.fixes)
                figures["entries (writes)"] += len(report.fixes)
                for fix in report.fixes:
                    if fix.status is FixStatus.CHECKED:
                        figures["checked"] += 1
                    elif fix.reason is NoFixReason.UNKNOWN_STATEMENT:
                        figures[f"{fix.status.value}: {_statement_kind(fix)}"] += 1
                    else:
                        figures[f"{fix.status.value}: {fix.reason.value}"] += 1
                    if args.verbose:
                        why = "" if fix.status is FixStatus.CHECKED else f" {fix.reason.value} {fix.detail}"
                        print(f"  {case.name} {fix.hazard.code.value} at line {fix.line}: {fix.status.value}"
                              f"{' ' + fix.kind.value if fix.kind else ''}{why}")
                if report.checked:
                    try:
                        failure, how = verify(case, report, directory)
                    except Exception as e:
                        failure, how = f"{type(e).__name__}: {e}", ""
                    if failure is None:
                        figures[f"verified: {how.split(':')[0]}"] += len(report.checked)
                        if "only" in how:
                            print(f"{case.name}: verified {how}")
                    else:
                        figures["verification failed"] += len(report.checked)
                        print(f"{case.name}: verification failed ({how}): {failure}")
            rows[group] = figures
    elapsed = time.perf_counter() - started

    print(f"\nswept: {len(groups['test models'])} test models that run"
          + (f", {len(programs)} programs that raise in eager (seeds 0..{seeds - 1})" if args.programs else ""))
    keys = ["models", "errors", "entries (writes)", "checked"]
    keys += sorted({k for f in rows.values() for k in f if k not in keys})
    width = max(len(k) for k in keys)
    print(f"{'':{width}}  " + "  ".join(f"{g:>12}" for g in rows))
    for key in keys:
        print(f"{key:{width}}  " + "  ".join(f"{rows[g].get(key, 0):>12}" for g in rows))
    print(f"time: {elapsed:.0f} s, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
