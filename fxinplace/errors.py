"""The exception and warning types fxinplace raises, under one base class each.

Catch `FxInplaceError` for every error fxinplace raises (hazards, a failed analysis in
strict mode, a stale saved tensor), `FxInplaceWarning` for every warning it gives.
"""

from __future__ import annotations

__all__ = ["FxInplaceError", "FxInplaceWarning", "AnalysisError", "AnalysisWarning", "CompilerFallbackWarning"]


class FxInplaceError(RuntimeError):
    """Base class of the errors fxinplace raises."""


class FxInplaceWarning(UserWarning):
    """Base class of the warnings fxinplace gives."""


class AnalysisError(FxInplaceError):
    """The audit itself failed on a graph and `strict` was set."""


class AnalysisWarning(FxInplaceWarning):
    """The audit itself failed on a graph; the graph was compiled without it."""


class CompilerFallbackWarning(FxInplaceWarning):
    """With `functionalize`, the compiler (AOTAutograd, Inductor) failed on a graph: it runs op by
    op in eager instead, as rewritten, so it trains with the out-of-place program's gradients."""
