"""Find, explain and remove in-place mutation hazards in multi-task PyTorch models.

    import torch, fxinplace
    compiled = torch.compile(model, backend="inplace_audit")   # prints a table per graph
    loss = compiled(x)["seg"].sum()
    report = fxinplace.audit(model, x)                            # the same facts, as objects
    report.assert_no_hazards()                                    # for your own test suite
    with fxinplace.guard(model, optimizers=opt): ...              # catches steps between backwards
"""

from __future__ import annotations

from .api import audit
from .backend import InplaceAudit, inplace_audit
from .errors import AnalysisError, AnalysisWarning, CompilerFallbackWarning, FxInplaceError, FxInplaceWarning
from .facts import (Detail, EagerReason, Fix, Hazard, HazardCode, KeptReason, Mutation, OutputKind, OutputRole, Rewrite,
                    RewriteKind, Saved, Severity, Site, Target)
from .report import SEVERITIES, GraphReport, HazardError, Report
from .training_guard import (
    GuardWrite,
    StaleSavedTensor,
    StaleSavedTensorError,
    StaleSavedTensorWarning,
    WriteKind,
    guard,
)

__all__ = [
    "audit",
    "propose_fixes",
    "inplace_audit",
    "InplaceAudit",
    "Report",
    "GraphReport",
    "Mutation",
    "Hazard",
    "HazardCode",
    "Severity",
    "SEVERITIES",
    "Detail",
    "Fix",
    "Site",
    "Saved",
    "Target",
    "OutputRole",
    "OutputKind",
    "Rewrite",
    "RewriteKind",
    "KeptReason",
    "EagerReason",
    "HazardError",
    "FxInplaceError",
    "FxInplaceWarning",
    "AnalysisError",
    "AnalysisWarning",
    "CompilerFallbackWarning",
    "guard",
    "StaleSavedTensor",
    "StaleSavedTensorError",
    "StaleSavedTensorWarning",
    "GuardWrite",
    "WriteKind",
]


def __getattr__(name: str):
    # The fix-its load libcst: only when asked for.
    if name == "propose_fixes":
        from .fixes import propose_fixes

        return propose_fixes
    raise AttributeError(f"module 'fxinplace' has no attribute {name!r}")
