"""Check a patch before it is shown: the patched model, run in eager PyTorch, must audit clean
of the hazard, raise no new error, and train like the functionalized original (the same
program written out of place): same outputs, gradients and buffers.

The patched code runs without touching the user's files or model: each run is on a deep copy;
the patched method, compiled from the patched file's text, stands in for the class's own
while the check runs (a module's constructor edit becomes the attribute it sets,
`inplace=False`, on the copy's modules).
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

import torch

from .._compat import pytree

__all__ = ["method_at", "patched_method", "method_swapped", "outcome_of", "difference", "Outcome"]


@dataclass(frozen=True)
class MethodSite:
    owner: type  # the class defining the method
    name: str
    function: types.FunctionType
    first: int  # the `def` line, and the last line, of its source in the file
    last: int


def method_at(model: torch.nn.Module, file: str, line: int) -> MethodSite | None:
    """The method of one of the model's module classes whose source covers `file:line`."""
    seen: set[type] = set()
    for module in model.modules():
        for owner in type(module).__mro__:
            if owner in seen or owner is torch.nn.Module or not issubclass(owner, torch.nn.Module):
                continue
            seen.add(owner)
            for name, fn in vars(owner).items():
                fn = getattr(fn, "__func__", fn)
                code = getattr(fn, "__code__", None)
                if code is None or code.co_filename != file:
                    continue
                try:
                    lines, first = inspect.getsourcelines(fn)
                except (OSError, TypeError):
                    continue
                if first <= line < first + len(lines):
                    return MethodSite(owner, name, fn, first, first + len(lines) - 1)
    return None


def patched_method(site: MethodSite, patched_file: str, shift: int) -> types.FunctionType:
    """The method compiled from the patched file's text (its lines keep their numbers; the
    method is `shift` lines longer), with the original's globals and `super()` working."""
    wrapper = MetadataWrapper(cst.parse_module(patched_file))
    positions = wrapper.resolve(PositionProvider)
    found = [n for n in positions if isinstance(n, cst.FunctionDef) and n.name.value == site.function.__name__
             and positions[n].start.line <= site.first + (1 if n.decorators else 0) <= positions[n].end.line]
    if not found:
        raise LookupError(f"no method `{site.name}` at line {site.first} in the patched file")
    node = found[0]
    start = positions[node].start.line
    text = textwrap.dedent(cst.Module(body=[node.with_changes(decorators=[], leading_lines=[])]).code)
    # Compiled inside a function with a `__class__` cell, so that zero-argument `super()` works.
    body = textwrap.indent(text, "    ")
    source = "\n" * (start - 2) + f"def _make(__class__):\n{body}\n    return {node.name.value}\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, site.function.__code__.co_filename, "exec"), site.function.__globals__, namespace)
    return namespace["_make"](site.owner)


@contextlib.contextmanager
def method_swapped(site: MethodSite, function: types.FunctionType) -> Iterator[None]:
    """The class runs `function` as `site.name` inside the block (subclasses calling it through
    `super()` too); the original comes back after it."""
    original = vars(site.owner)[site.name]
    setattr(site.owner, site.name, function)
    try:
        yield
    finally:
        setattr(site.owner, site.name, original)


@dataclass(frozen=True)
class Outcome:
    error: str | None  # the exception training raised, if it did
    outputs: list[torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]


def outcome_of(run: Callable[[], Any], model: torch.nn.Module, seed: int = 0,
               inputs: Sequence[torch.Tensor] = ()) -> Outcome:
    """One training step: the outputs, the gradients of the parameters and of `inputs`, and the
    buffers. The loss weighs each output element by a fixed random number: under a plain sum,
    the gradient through a softmax is zero, and any edit upstream of it would look right."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    try:
        result = run()
        outputs = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        weights = torch.Generator().manual_seed(seed + 1)
        loss = sum((t.float() * torch.randn(t.shape, generator=weights).to(t.device)).sum()
                   for t in outputs if t.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    except Exception as e:
        return Outcome(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", [], {}, {})
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    grads.update({f"input {i}": (t.grad.clone() if t.grad is not None else None) for i, t in enumerate(inputs)})
    return Outcome(None, [t.detach().clone() for t in outputs], grads,
                   {n: b.detach().clone() for n, b in model.named_buffers()})


def difference(ours: Outcome, reference: Outcome) -> str | None:
    """What differs between two outcomes (None: nothing, at each tensor's own scale)."""
    if ours.error or reference.error:
        return None if ours.error == reference.error else f"{ours.error or 'trains'} vs {reference.error or 'trains'}"
    if len(ours.outputs) != len(reference.outputs):
        return "a different number of outputs"
    pairs = [(f"output {i}", a, b) for i, (a, b) in enumerate(zip(ours.outputs, reference.outputs))]
    pairs += [(f"the gradient of `{n}`", ours.grads[n], reference.grads.get(n)) for n in ours.grads]
    pairs += [(f"buffer `{n}`", ours.buffers[n], reference.buffers.get(n)) for n in ours.buffers]
    for what, a, b in pairs:
        if (a is None) != (b is None):
            return f"{what}: {'none' if a is None else 'some'} vs {'none' if b is None else 'some'}"
        if a is not None:
            try:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max()) if b.numel() else 1.0))
            except AssertionError:
                return what
    return None
