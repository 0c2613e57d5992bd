"""DDP and FSDP2 (`fully_shard`): the user's model inside DDP's wrapper, and the write to a saved
unsharded parameter that FSDP's all-gather makes without a version bump.

Under FSDP2 the registered parameters are sharded DTensors; the forward runs on an unsharded
parameter that FSDP all-gathers into a tensor of its own, and that is what autograd saves (or a
view of it: `nn.Linear` saves ``weight.t()``). An optimizer step moves the shard only. When the
parameter is resharded by then (after every backward; after the forward too, except for the
root module and `reshard_after_forward=False`), the next backward's all-gather copies the stepped values into
the same unsharded tensor while keeping its version counter (FSDP does this on purpose), so
PyTorch's check passes and that backward computes gradients from the new values. `ShardWatch`
records such a step as a hidden write to the unsharded tensor, which the saved-tensor log's
unpack hook asks about as it asks about `.data` writes.

FSDP2's private state is read through `fxinplace._compat` (`fsdp_params`, `fsdp_gathered`); any
failure means no FSDP knowledge, never a failed step.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._compat import fsdp_gathered, fsdp_params
from ._facts import WriteKind
from ._write_log import Written, WriteLog

__all__ = ["ShardWatch", "unwrapped"]


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP's and `torch.compile`'s wrappers, whose names the messages use
    (`0.weight`, not `module.0.weight`), as `state_dict` users strip them."""
    ddp = _ddp_class()
    # Not imported here: until Dynamo is, no module is compiled.
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    while True:
        if ddp is not None and isinstance(module, ddp):
            module = module.module
        elif compiled is not None and isinstance(module, compiled):
            module = module._orig_mod
        else:
            return module


class ShardWatch:
    """Takes the optimizer watch's records; adds, for each step that moved the shard of a
    resharded FSDP2 parameter, a hidden write to its unsharded tensor (see the module docstring).

    Args:
        modules: the guard's models, as ``(prefix, module)``.
        writes: the write log that keeps both records.
        warn_once: reports a failure of the bookkeeping, once per place.
    """

    def __init__(self, modules: list[tuple[str, torch.nn.Module]], writes: WriteLog,
                 warn_once: Callable[[str, Exception], None]) -> None:
        self.modules = modules
        self.writes = writes
        self.warn_once = warn_once
        self.by_shard: dict[int, Any] | None = None  # id(sharded parameter) -> FSDPParam
        self.rebuilt = False

    def record(self, written: Written) -> None:
        self.writes.add(written)
        dtensor = _dtensor_class()
        if dtensor is None:
            return  # no DTensor anywhere: a plain model's step pays this dict look-up
        try:
            shards = [p for p in (r() for r in written.refs) if type(p) is dtensor]
            gathered = [u for u in map(self.unsharded_of, shards) if u is not None]
        except Exception as e:
            self.warn_once("FSDP step", e)
            return
        if gathered:
            self.writes.hidden.append(Written(
                written.seq, WriteKind.OPTIMIZER, written.op, written.by, written.at,
                written.optimizer, tuple(map(weakref.ref, gathered)), ()))

    def unsharded_of(self, shard: torch.Tensor) -> torch.Tensor | None:
        if self.by_shard is None or (id(shard) not in self.by_shard and not self.rebuilt):
            # Once per entry, again once if a shard is new (a model sharded since)
            self.rebuilt = self.by_shard is not None
            self.by_shard = {id(p.sharded_param): p for p in _fsdp_params(self.modules)}
        fsdp_param = self.by_shard.get(id(shard))
        if fsdp_param is None or fsdp_param.sharded_param is not shard:
            return None  # a DTensor FSDP does not manage (tensor parallel): its own business
        # Still unsharded (the root, `reshard_after_forward=False`, before its backward): the
        # saved tensor keeps the values gathered for the forward until FSDP reshards.
        return fsdp_gathered(fsdp_param)


def _fsdp_params(modules: list[tuple[str, torch.nn.Module]]) -> Iterator[Any]:
    for _, top in modules:
        for m in top.modules():
            yield from fsdp_params(m)


def _dtensor_class() -> type | None:
    # The sharded parameters' class (an `nn.Parameter` of a DTensor is a DTensor). Not imported
    # here: until something else imports it, no tensor is a DTensor.
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _ddp_class() -> type | None:
    return getattr(torch.nn.parallel, "DistributedDataParallel", None)
