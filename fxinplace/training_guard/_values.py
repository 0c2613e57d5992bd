"""The value check (`guard(check_values=True)`): a fingerprint of each saved tensor at pack,
compared at unpack, for the writes no version counter sees.

A `.data` write in code the guard does not watch (the given model's forward, compiled code,
an optimizer's own step), a fused or foreign kernel that writes its input, a custom op that
does not declare `mutates_args`: each changes a saved tensor's values and not its version, and
backward silently computes gradients from the new values. The fingerprint is the tensor's sum
and its 2-norm (for a floating or complex tensor; the sum for an integer one), compared bit by
bit, so that a NaN compares equal to itself. It misses a change that keeps both (a
permutation of the values; a change that happens to cancel), and costs two reads of each saved
tensor. On a GPU the comparison stays on the device: one flag per saved tensor, read once at
the end of each backward call (one synchronization per backward, not per tensor).
"""

from __future__ import annotations

import torch

from .._compat import DisableTorchFunction

__all__ = ["fingerprint", "changed"]


def fingerprint(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor's fingerprint, as bytes on its device; None for a tensor without values here
    (fake or meta: Dynamo tracing) or of a kind not checked (sparse, a tensor subclass)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta" or t.layout is not torch.strided:
        return None
    with torch.no_grad(), DisableTorchFunction():
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.is_floating_point():
            found = torch.stack((t.sum(), torch.linalg.vector_norm(t)))
        else:
            found = t.sum().reshape(1)
        return found.view(torch.uint8)


def changed(before: torch.Tensor, t: torch.Tensor) -> bool | torch.Tensor:
    """Whether `t`'s values differ from those `before` was taken of: a bool on the CPU, a
    one-element bool tensor on another device (read later, with the others)."""
    now = fingerprint(t)
    if now is None or now.shape != before.shape:
        return False
    with torch.no_grad(), DisableTorchFunction():
        if now.device.type == "cpu":
            return not torch.equal(now, before)
        return (now != before).any()
