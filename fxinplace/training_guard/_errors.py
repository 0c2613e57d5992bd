"""The error and the warning the guard gives for a stale saved tensor."""

from __future__ import annotations

from ..errors import FxInplaceError, FxInplaceWarning
from ._facts import StaleSavedTensor
from ._render import explain

__all__ = ["StaleSavedTensorError", "StaleSavedTensorWarning"]


class StaleSavedTensorError(FxInplaceError):
    """A backward needed a saved tensor that had been changed since it was saved.

    ``.stale`` holds the facts as a `StaleSavedTensor`.
    """

    def __init__(self, stale: StaleSavedTensor) -> None:
        self.stale = stale
        super().__init__(explain(stale))


class StaleSavedTensorWarning(FxInplaceWarning):
    """`guard(on_stale="warn")`: the same finding as `StaleSavedTensorError`, not raised."""
