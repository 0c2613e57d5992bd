"""PyTorch's own operator catalogue (`op_db`) as a source of in-place and `out=` cases.

A `Case` is one OpInfo, one dtype and one of its sample inputs on the CPU; `call` performs the
op on a tensor of our choosing (the write's target) with the sample's other arguments. The
sweeps (`opinfo_audit.py`, `opinfo_functionalize.py`) build their programs around it.

Which ops, samples and dtypes:
- in place: every OpInfo with an `inplace_variant`, and every functional op with an
  `inplace=` keyword (`F.relu(x, inplace=True)`) whose OpInfo has none;
- `out=`: every OpInfo with `supports_out`, the out tensors shaped like eager's result (a
  tuple of them for ops returning several);
- float32 where the op supports it, else its first integral dtype (bitwise ops, gcd); the long
  mode adds float64, bfloat16 and complex64 where supported;
- the first `per_op` samples that do not broadcast their input (an in-place op cannot grow
  its `self`), generated under a seed of their own so every run sees the same values.
"""

from __future__ import annotations

import functools
import inspect
import random
import types
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

__all__ = ["Case", "inplace_cases", "out_cases", "seeded_share", "op_db", "traceable"]

LONG_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.complex64)


@functools.cache
def op_db() -> tuple:
    from torch.testing._internal.common_methods_invocations import op_db as ops

    return tuple(ops)


@dataclass(frozen=True)
class Case:
    op_name: str  # OpInfo name, with its variant: "div.trunc_rounding"
    kind: str  # "inplace" | "out"
    dtype: torch.dtype
    index: int  # position of the sample among the op's usable samples
    opinfo: Any = field(compare=False, repr=False)
    sample: Any = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.op_name}[{self.index}]-{str(self.dtype).removeprefix('torch.')}-{self.kind}"

    @property
    def inplace(self) -> Callable:
        return _inplace_variant(self.opinfo)

    def arguments(self) -> tuple[list, dict]:
        """The sample's arguments after `self`, as fresh clones (a run may write them)."""
        return _cloned(list(self.sample.args)), _cloned(dict(self.sample.kwargs))

    def input(self) -> torch.Tensor:
        return self.sample.input.clone()

    def out_like(self) -> Any:
        """Empty out tensors shaped like what the op returns for this sample (eager decides)."""
        result = self.opinfo.op(self.input(), *self.arguments()[0], **self.arguments()[1])
        if isinstance(result, torch.Tensor):
            return torch.empty_like(result)
        return tuple(torch.empty_like(r) for r in result)


def traceable(op: Callable) -> Callable:
    """`op` without OpInfo's `wrapper_set_seed` (it saves and restores the RNG state, which
    Dynamo cannot trace: the op would run eagerly after a graph break). Runs seed themselves."""
    code = getattr(op, "__code__", None)
    if code is None or "wrapper_set_seed" not in code.co_names:
        return op
    return types.FunctionType(code, {**op.__globals__, "wrapper_set_seed": _call_in(code.co_filename)}, op.__name__,
                              op.__defaults__, op.__closure__)


@functools.cache
def _call_in(filename: str) -> Callable:
    # The stand-in for `wrapper_set_seed` is compiled as part of the file that holds OpInfo's
    # lambda (torch's own), as the original is: the user's line stays the one calling `op`.
    namespace: dict = {}
    exec(compile("def call(op, *args, **kwargs):\n    return op(*args, **kwargs)\n", filename, "exec"), namespace)
    return namespace["call"]


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value


def _name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def _has_inplace_keyword(fn: Callable) -> bool:
    try:
        return "inplace" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a Python signature
        return False


def _inplace_variant(op) -> Callable | None:
    if op.inplace_variant is not None:
        return op.inplace_variant
    if _has_inplace_keyword(op.op):
        return functools.partial(op.op, inplace=True)
    return None


def _dtypes(op, long: bool) -> list[torch.dtype]:
    supported = op.supported_dtypes("cpu")
    if not long:
        if torch.float32 in supported:
            return [torch.float32]
        integral = sorted((d for d in supported if not d.is_floating_point and not d.is_complex and d != torch.bool),
                          key=str)
        return [torch.int64] if torch.int64 in supported else integral[:1]
    wanted = [d for d in LONG_DTYPES if d in supported]
    return wanted or _dtypes(op, long=False)


def _samples(op, dtype: torch.dtype, per_op: int) -> Iterator[tuple[int, Any]]:
    torch.manual_seed(zlib.crc32(f"{_name(op)}-{dtype}".encode()))
    usable = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=False):
        if sample.broadcasts_input or not isinstance(sample.input, torch.Tensor) or sample.input.layout != torch.strided:
            continue
        yield usable, sample
        usable += 1
        if usable == per_op:
            return


def inplace_cases(per_op: int = 3, long: bool = False) -> list[Case]:
    cases = []
    for op in op_db():
        if _inplace_variant(op) is None:
            continue
        for dtype in _dtypes(op, long):
            cases += [Case(_name(op), "inplace", dtype, i, op, s) for i, s in _samples(op, dtype, per_op)]
    return cases


def out_cases(per_op: int = 3, long: bool = False) -> list[Case]:
    cases = []
    for op in op_db():
        if not op.supports_out:
            continue
        for dtype in _dtypes(op, long):
            cases += [Case(_name(op), "out", dtype, i, op, s) for i, s in _samples(op, dtype, per_op)]
    return cases


def seeded_share(cases: list[Case], share: float, seed: int = 0) -> list[Case]:
    """A reproducible `share` of `cases`, at least one sample of every op."""
    rng = random.Random(seed)
    by_op: dict[str, list[Case]] = {}
    for case in cases:
        by_op.setdefault(case.op_name, []).append(case)
    chosen = []
    for op_cases in by_op.values():
        first, rest = op_cases[0], op_cases[1:]
        chosen.append(first)
        chosen += [c for c in rest if rng.random() < share]
    return chosen
