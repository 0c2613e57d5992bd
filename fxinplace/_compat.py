"""The torch internals fxinplace leans on, in one place: tested releases and private APIs.

`functionalize` leans on torch internals (functionalization, AOTAutograd's input mutations,
`make_fx`, Dynamo's graph metadata) that change between releases, and a change there shows as
wrong gradients, not as an error. On a release outside the tested range it refuses: the graph
is compiled unchanged unless the user opts in (option `untested_torch`). The audit only reads;
it runs and says once that the release is untested.

Below the version gate, each private behaviour we rely on has one function here, with the
releases it differs between; `tests/test_compat.py` states each behaviour against torch.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch._vendor.packaging.version import Version

__all__ = [
    "TESTED_TORCH", "torch_is_tested", "tested_range", "warn_untested_once",
    "SHALLOW_COPY_DATA", "is_data_assignment_op", "is_version_fixup", "make_fx_aten",
]

TESTED_TORCH = ((2, 13), (2, 14))  # the (major, minor) releases tested: README's "Supported torch versions"


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


# -- Dynamo's spelling of `t.data = v` ----------------------------------------------------------
# torch 2.13: `set_(t, v)`, then `_lower_version_count_by_1(t)` to undo `set_`'s version bump.
# torch 2.14: one op, `aten.shallow_copy_data_(t, v)` (no bump, no fix-up); it does not exist
# in 2.13. On fake tensors it need not move `t` onto `v`'s storage as eager does.
SHALLOW_COPY_DATA = getattr(torch.ops.aten, "shallow_copy_data_", None)


def is_data_assignment_op(target: Any) -> bool:
    """Is `target` torch 2.14's one-op spelling of `t.data = v`?"""
    return SHALLOW_COPY_DATA is not None and (target is SHALLOW_COPY_DATA or target is SHALLOW_COPY_DATA.default)


def is_version_fixup(target: Any) -> bool:
    """Is `target` the version fix-up torch 2.13's Dynamo puts after the `set_` of `t.data = v`?"""
    return getattr(target, "__name__", None) == "_lower_version_count_by_1"


# -- make_fx ---------------------------------------------------------------------------------------
def make_fx_aten(fn: Callable, decompositions: dict | None = None) -> Callable:
    """`make_fx` to ATen ops (no pre-dispatch), with `decompositions` and nothing more.

    torch 2.14's `make_fx`, given no table, adds `aten.detach -> aten.alias`: the graph would
    lose every `.detach()` / `.data` cut. An explicit table (even empty) keeps `detach`.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, dict(decompositions or {}), pre_dispatch=False)
