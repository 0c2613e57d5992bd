"""Storages and version counters: how the passes tell which tensors share memory, and when they changed."""

from __future__ import annotations

from typing import Any

import torch

from .._compat import StorageWeakRef, unset_fake_temporarily

__all__ = ["StorageKey", "storage_key", "version_of", "overlaps"]

StorageKey = StorageWeakRef


def storage_key(value: Any) -> StorageKey | None:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


def version_of(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Can `a` and `b` (same storage) touch the same elements? True when unsure."""
    try:
        ranges = []
        for t in (a, b):
            start = int(t.storage_offset()) * t.element_size()
            if t.numel() == 0:
                return False
            extent = sum((int(s) - 1) * abs(int(st)) for s, st in zip(t.shape, t.stride()))
            ranges.append((start, start + (extent + 1) * t.element_size()))
    except (TypeError, RuntimeError):  # symbolic sizes: stay conservative
        return True
    (a0, a1), (b0, b1) = ranges
    if not (a0 < b1 and b0 < a1):
        return False
    # Interleaved strided views (two columns of one matrix) share a range but no element.
    if a.element_size() != b.element_size() or a.numel() + b.numel() > _EXACT_OVERLAP_LIMIT:
        return True
    with unset_fake_temporarily():
        return bool(torch.isin(_element_offsets(a), _element_offsets(b)).any())


_EXACT_OVERLAP_LIMIT = 1 << 22  # elements of both views, up to which they are compared one by one


def _element_offsets(t: torch.Tensor) -> torch.Tensor:
    offsets = torch.tensor([int(t.storage_offset())], dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(int(size), dtype=torch.int64) * int(stride)).flatten()
    return offsets
