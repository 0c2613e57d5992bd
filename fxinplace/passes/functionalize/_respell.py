"""Respell, before `torch.func.functionalize`, the in-place ops whose out-of-place twins get
autograd wrong (`op_knowledge.RESPELLED` says which, and why)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..op_knowledge import RESPELLED, out_of_place_twin

__all__ = ["respell", "is_complex"]

_aten = torch.ops.aten


def is_complex(arg: Any) -> bool:
    val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def respell(gm: torch.fx.GraphModule) -> None:
    """Respell the ops of `RESPELLED` (see there) with ops whose functional twins compute
    eager's values and gradients."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in RESPELLED]:
        how, self_ = RESPELLED[node.target], node.args[0]
        training = node.args[4] if len(node.args) > 4 else node.kwargs.get("training", False)
        if how == "rrelu" and not training:
            continue  # in eval mode: leaky relu, whose twin's derivative is right
        if how == "real no-op":
            val = self_.meta.get("val")
            if isinstance(val, torch.Tensor) and not val.is_complex():
                node.replace_all_uses_with(self_)
                graph.erase_node(node)
            continue

        def call(target, *args, **kwargs):
            new = graph.call_function(target, args, kwargs)
            new.meta = dict(node.meta)  # `from_node` and the stack trace of the op respelled
            return new

        with graph.inserting_before(node):
            if how == "compare":
                value = call(out_of_place_twin(node.target), *node.args, **node.kwargs)
                written = self_.meta.get("val")
                for other in node.args[1:]:
                    val = other.meta.get("val") if isinstance(other, torch.fx.Node) else None
                    # (a complex `other` only into a complex `self`: `copy_` would drop its imaginary part)
                    if isinstance(val, torch.Tensor) and (val.is_floating_point() or (
                            val.is_complex() and isinstance(written, torch.Tensor) and written.is_complex())):
                        false = call(_aten.scalar_tensor.default, False, dtype=torch.bool, device=val.device)
                        value = call(_aten.where.self, false, other, value)
                call(_aten.copy_.default, self_, value)
            elif how == "fill":
                fresh = call(_aten.empty_like.default, self_)
                call(_aten.copy_.default, self_, call(node.target, fresh, *node.args[1:], **node.kwargs))
            elif how == "untracked":
                # For complex operands the twin is a composite whose in-place temporaries the
                # next trace would leave below `functionalize`; nonzero-ness is all it reads.
                operands = [call(_aten.ne.Scalar, a, 0) if is_complex(a) else a for a in node.args]
                value = call(out_of_place_twin(node.target), *operands, **node.kwargs)
                call(_aten.copy_.default, call(_aten.detach.default, self_), value)
            else:
                noise = node.args[1]
                call(_aten.rrelu_with_noise.default, call(_aten.detach.default, self_), *node.args[1:], **node.kwargs)
                result = call(_aten.mul_.Tensor if node.target is _aten.rrelu_with_noise_.default else _aten.mul.Tensor,
                              self_, noise)
        # An in-place op returns `self`; its readers read `self`, which now holds the new value.
        node.replace_all_uses_with(result if how == "rrelu" and node.target is _aten.rrelu_with_noise.default else self_)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()

