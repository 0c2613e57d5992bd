"""What the guard's pieces share at run time: one clock, the user's frame, a tensor's storage."""

from __future__ import annotations

import itertools
import logging
import linecache
import re
import sys
from types import CodeType, FrameType
from typing import Any

import torch

from .._sources import SourceLocation, user_frame

log = logging.getLogger(__name__)

# One clock for saves and writes: a write changes a saved tensor only if it came after the save.
next_seq = itertools.count().__next__

getframe = sys._getframe
# Bound once for the hot path; Dynamo still sees `torch.compiler.is_compiling` and folds it.
is_compiling = torch.compiler.is_compiling

# Where the user is: a frame's code and the offset of the instruction it runs. No line-table
# walk while training; `location` turns it into a line on a finding.
At = tuple[CodeType, int]


def report_failure(failed: set[str], where: str, e: Exception) -> None:
    """Log a failure of the guard's bookkeeping once per place (`failed` holds the places so far)."""
    if where not in failed:
        failed.add(where)
        log.warning("fxinplace.guard: bookkeeping failed in %s (%s); continuing without it", where, e, exc_info=True)


def user_at(frame: FrameType | None) -> At | None:
    """The innermost frame outside torch and fxinplace from `frame` outwards, as an `At`."""
    found = user_frame(frame)
    return (found.f_code, found.f_lasti) if found is not None else None


def location(at: At | None) -> SourceLocation | None:
    if at is None:
        return None
    code, lasti = at
    line = _line_of(code, lasti)
    return SourceLocation(code.co_filename, line, linecache.getline(code.co_filename, line).strip(),
                          code.co_name)


def _line_of(code: CodeType, lasti: int) -> int:
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


def storage_key(t: Any) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # sparse, nested, some subclasses: no plain storage
        return None
    return ptr or None


def tensors_in(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name in ("__get__", "__set__"):
        descriptor = getattr(func, "__self__", None)
        return f"{getattr(descriptor, '__name__', '?')}.{name}"
    return name


def forward_op(node: str | None) -> str | None:
    """The op a backward node differentiates: "AddmmBackward0" -> "addmm"."""
    if not node or node.startswith("CompiledFunction"):
        return None
    name = re.sub(r"Backward\d*$", "", node)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() or None
