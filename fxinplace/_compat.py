"""Which torch releases fxinplace was tested on, and what it does on the others.

`functionalize` leans on torch internals (functionalization, AOTAutograd's input mutations,
`make_fx`, Dynamo's graph metadata) that change between releases, and a change there shows as
wrong gradients, not as an error. On a release outside the tested range it refuses: the graph
is compiled unchanged unless the user opts in (option `untested_torch`). The audit only reads;
it runs and says once that the release is untested.
"""

from __future__ import annotations

import warnings

import torch
from torch._vendor.packaging.version import Version

__all__ = ["TESTED_TORCH", "torch_is_tested", "tested_range", "warn_untested_once"]

TESTED_TORCH = ((2, 13),)  # the (major, minor) releases tested: README's "Supported torch versions"


def torch_is_tested(version: str | None = None) -> bool:
    """Is this torch release (default: the one imported) a tested one? Nightlies and release
    candidates count as their release; a local build tag (`+cpu`, `+cu128`) does not matter."""
    return Version(version or torch.__version__).release[:2] in TESTED_TORCH


def tested_range() -> str:
    return " or ".join(f"=={major}.{minor}.*" for major, minor in TESTED_TORCH)


_warned = False


def warn_untested_once() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"fxinplace: torch {torch.__version__} is outside the tested range (torch {tested_range()}): the audit "
        "runs, but its facts were not checked on this release; `functionalize` compiles graphs unchanged "
        "unless you pass options={'untested_torch': True}.",
        UserWarning,
        stacklevel=3,
    )
