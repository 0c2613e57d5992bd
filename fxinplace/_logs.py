"""Small helpers for the backend's debug log (`TORCH_LOGS="+fxinplace"`): values that format
themselves only when a line is actually logged."""

from __future__ import annotations

import time
from typing import Iterable

__all__ = ["PassTimes", "Counts"]


class PassTimes:
    """The wall time of each step of one graph's audit, for the debug log (text only when logged)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in self.times)


class Counts:
    """`error 2, warning 1` (`none` when empty), formatted only when logged."""

    def __init__(self, items: Iterable[str]) -> None:
        self.items = list(items)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item] = counts.get(item, 0) + 1
        return ", ".join(f"{k} {n}" for k, n in counts.items()) or "none"
