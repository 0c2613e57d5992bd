"""Shared fixtures and PyTorch oracles: what eager PyTorch itself says a model does."""

from __future__ import annotations

import copy
import inspect
import json
import pathlib
from dataclasses import dataclass

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import fxinplace

# The report's published JSON Schema, which real reports are validated against.
SCHEMA = json.loads((pathlib.Path(__file__).parent.parent / "docs" / "report.schema.json").read_text())


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    fxinplace.inplace_audit.clear()  # the global backend's reports and cross-graph state
    yield
    torch._dynamo.reset()
    fxinplace.inplace_audit.clear()


@dataclass(frozen=True)
class EagerEffects:
    """Which caller-visible tensors one eager call changed, by value and by version counter."""

    changed: frozenset[tuple[str, str]]  # (kind, name) whose values changed
    version_moved: frozenset[tuple[str, str]]  # (kind, name) whose _version moved


def named_state(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    for name, p in model.named_parameters(remove_duplicate=False):
        yield ("parameter", name), p
    for name, b in model.named_buffers(remove_duplicate=False):
        yield ("buffer", name), b
    for name, t in inputs.items():
        yield ("input", name), t


def eager_effects(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> EagerEffects:
    """Run `model(**inputs)` eagerly on copies and report what changed (PyTorch is the oracle)."""
    model = copy.deepcopy(model)
    inputs = {k: v.clone() for k, v in inputs.items()}
    before = {key: (t.detach().clone(), t._version) for key, t in named_state(model, inputs)}
    model(**inputs)
    changed, moved = set(), set()
    for key, t in named_state(model, inputs):
        value, version = before[key]
        if not identical(value, t.detach()):  # vs its copy: any change counts
            changed.add(key)
        if t._version != version:
            moved.add(key)
    return EagerEffects(frozenset(changed), frozenset(moved))


def eager_backward_error(model: torch.nn.Module, *args) -> str | None:
    """The message of the error eager forward+backward raises, or None if it trains."""
    model = copy.deepcopy(model)
    try:
        out = model(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        total_loss(out).backward()
    except RuntimeError as e:
        return str(e)
    return None


def eager_grads(model: torch.nn.Module, args, with_inputs: bool = False) -> dict[str, torch.Tensor | None]:
    """The gradients one eager forward and backward (`total_loss`) gives, on copies of both."""
    model = copy.deepcopy(model)
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    total_loss(model(*args)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if with_inputs:
        grads.update({f"input {i}": a.grad for i, a in enumerate(args)})
    return grads


def eager_verdict(model: torch.nn.Module, twin: torch.nn.Module, args) -> str:
    """PyTorch's verdict: "raises" (the in-place error), "wrong gradients" (they differ from the
    out-of-place twin's, at their own scale) or "trains"."""
    error = eager_backward_error(model, *args)
    if error is not None:
        assert "modified by an inplace operation" in error, error
        return "raises"
    assert eager_backward_error(twin, *args) is None
    ours, theirs = eager_grads(model, args, with_inputs=True), eager_grads(twin, args, with_inputs=True)
    assert ours.keys() == theirs.keys()
    return "trains" if all(close_at_scale(ours[n], theirs[n]) for n in theirs) else "wrong gradients"


def total_loss(out) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    return sum(t.float().sum() for t in leaves)


# How floats are compared (docs/reliability.md): at the scale of the expected tensor. Two
# computations of one value that sum in another order (another kernel, a clone that is
# contiguous where the original was a strided view) differ in the last bits, by up to about
# 1e-7 of the largest value summed; a wrong value differs by far more.
_RTOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-7}


def _tolerances(expected: torch.Tensor, rtol: float | None, atol: float | None) -> tuple[float, float]:
    if not (expected.is_floating_point() or expected.is_complex()):
        return 0.0, 0.0  # integers and booleans: exact
    rtol = _RTOL.get(expected.dtype, 1e-5) if rtol is None else rtol
    atol = rtol / 10 if atol is None else atol
    finite = expected.detach().abs()
    finite = finite[torch.isfinite(finite)]
    scale = finite.max().item() if finite.numel() else 0.0
    return rtol, atol * max(1.0, scale)


def close_at_scale(actual: torch.Tensor | None, expected: torch.Tensor | None, *,
                   rtol: float | None = None, atol: float | None = None) -> bool:
    """`|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|` everywhere,
    NaNs equal; `rtol` by dtype (1e-5 for float32), `atol` = `rtol / 10` unless given; None
    equals only None. For computed values; a copy is compared exactly (`identical`)."""
    if actual is None or expected is None:
        return actual is None and expected is None
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    rtol, atol = _tolerances(expected, rtol, atol)
    return bool(torch.isclose(actual.detach(), expected.detach(), rtol=rtol, atol=atol, equal_nan=True).all())


def assert_close_at_scale(actual: torch.Tensor | None, expected: torch.Tensor | None, *,
                          rtol: float | None = None, atol: float | None = None, msg: str = "") -> None:
    """`close_at_scale`, as an assertion with torch.testing's report of the worst element."""
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{msg}: {actual} vs {expected}"
        return
    rtol, atol = _tolerances(expected, rtol, atol)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=(lambda found: f"{msg}: {found}") if msg else None)


def identical(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bit for bit (NaNs equal): for values that were copied, or compared with their copy."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach()
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def assert_grads_close(ours: dict, theirs: dict) -> None:
    """Every gradient agrees at its own scale (`assert_close_at_scale`); None only with None."""
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        assert_close_at_scale(ours[name], grad, msg=f"gradient of {name}")


def marked_line(obj, marker: str) -> int:
    """The line number of the source line of `obj` that carries `# <marker>`."""
    lines, start = inspect.getsourcelines(obj)
    hits = [start + i for i, line in enumerate(lines) if f"# {marker}" in line]
    assert len(hits) == 1, f"expected exactly one `# {marker}` line in {obj}, found {len(hits)}"
    return hits[0]


def quiet_audit(model, *args, **options) -> fxinplace.Report:
    return fxinplace.audit(model, *args, options={"print": False, **options})


class WriteRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every tensor an ATen op's schema marks as written, with the user's line."""

    def __init__(self, user_file: str | None):
        super().__init__()
        self.user_file = user_file
        self.writes: list[tuple[StorageWeakRef, int | None]] = []  # (storage, line)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(argument.name)
                for t in torch.utils._pytree.tree_leaves(value):
                    if isinstance(t, torch.Tensor):
                        self.writes.append((StorageWeakRef(t.untyped_storage()), self._line()))
        return func(*args, **kwargs)

    def _line(self) -> int | None:
        if self.user_file is None:
            return None
        frame = inspect.currentframe()
        while frame is not None:
            if frame.f_code.co_filename == self.user_file:
                return frame.f_lineno
            frame = frame.f_back
        return None


def eager_writes(model: torch.nn.Module, inputs: dict[str, torch.Tensor], user_file: str):
    """What eager PyTorch writes in one call, by schema: {(kind, name) or ("intermediate", None): {lines}}.

    Uses a dispatch mode (PyTorch's own op schemas), independent of fxinplace's analysis.
    """
    model = copy.deepcopy(model)
    inputs = {k: v.clone() for k, v in inputs.items()}
    owners = {StorageWeakRef(t.untyped_storage()): key for key, t in named_state(model, inputs)}
    recorder = WriteRecorder(user_file)
    with recorder:
        model(**inputs)
    found: dict[tuple[str, str | None], set[int | None]] = {}
    for storage, line in recorder.writes:
        found.setdefault(owners.get(storage, ("intermediate", None)), set()).add(line)
    return found
