"""How the guard's messages name things: parameters and buffers, optimizers, and tasks (from the
losses `guard.losses` named, or from the keys of a model's output dict)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ._fsdp import unwrapped
from ._runtime import storage_key

__all__ = ["Names", "name_outputs", "heads_reached", "backward_task"]


class Names:
    """The guard's models, optimizers and named losses, asked by the session's pieces."""

    def __init__(self, modules: list[tuple[str, torch.nn.Module]],
                 optimizers: list[tuple[str, torch.optim.Optimizer]]) -> None:
        self.modules = modules  # (prefix, module): "" for a single module, "gen." in a dict
        self.optimizers = optimizers
        self.losses: dict[int, tuple[weakref.ref, str]] = {}  # id(loss) -> (loss, task)

    def add_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(losses, Mapping):
            raise TypeError(f"`losses` must be a mapping from task name to loss tensor, got "
                            f"{type(losses).__name__}")
        if len(self.losses) > 256:
            self.losses = {k: v for k, v in self.losses.items() if v[0]() is not None}
        for name, loss in losses.items():
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"`losses[{name!r}]` must be a tensor, got {type(loss).__name__}")
            self.losses[id(loss)] = (weakref.ref(loss), str(name))

    def forget_losses(self) -> None:
        self.losses.clear()

    def loss_task(self, roots: list[torch.Tensor]) -> str | None:
        """The tasks of the named losses among `roots`, joined; None if none is named."""
        named = [self._loss_name(r) for r in roots]
        return ", ".join(n for n in named if n) or None

    def _loss_name(self, t: torch.Tensor) -> str | None:
        entry = self.losses.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def storage_keys(self) -> set[int]:
        """The storages of the given models' parameters and buffers, and the optimizers' parameters."""
        tensors = [t for _, module in self.modules for m in (unwrapped(module),)
                   for t in (*m.parameters(), *m.buffers())]
        tensors += [p for _, opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        return {key for key in map(storage_key, tensors) if key is not None}

    def optimizer(self, opt: torch.optim.Optimizer) -> str:
        for name, known in self.optimizers:
            if known is opt:
                return name
        return type(opt).__name__.lower()

    def tensor(self, t: torch.Tensor, key: int | None) -> tuple[str, str | None, bool]:
        """(kind, qualified name, is a view) of the parameter or buffer `t` is or views."""
        named: list[tuple[str, str, torch.Tensor]] = []
        for prefix, module in self.modules:
            module = unwrapped(module)
            for n, p in module.named_parameters(remove_duplicate=False):
                named.append(("parameter", prefix + n, p))
            for n, b in module.named_buffers(remove_duplicate=False):
                named.append(("buffer", prefix + n, b))
        for opt_name, opt in self.optimizers:
            for gi, group in enumerate(opt.param_groups):
                for pi, p in enumerate(group["params"]):
                    named.append(("parameter", f"{opt_name}.param_groups[{gi}]['params'][{pi}]", p))
        for kind, n, p in named:
            if p is t:
                return kind, _clean(n), False
        if key is not None:
            for kind, n, p in named:
                if storage_key(p) == key:
                    return kind, _clean(n), True
        return "tensor", None, False


def _clean(name: str) -> str:
    return name.replace("_orig_mod.", "")


# Task names from a model's output keys: each output's key goes on the autograd node that made
# it, by output slot (no hook, nothing held); a finding reads the keys its backward reaches.
_HEADS = "fxinplace.guard.heads"  # node.metadata key: {output slot: (position, output key)}


def name_outputs(output: Mapping[Any, Any]) -> None:
    for position, (key, value) in enumerate(output.items()):
        if isinstance(value, torch.Tensor):
            node = value.grad_fn
            if node is not None:
                heads = node.metadata.setdefault(_HEADS, {})
                heads[value.output_nr] = (position, str(key))


def heads_reached(roots: list[torch.Tensor]) -> list[str]:
    """The model output keys whose nodes a backward from `roots` reaches, in output order."""
    found: dict[str, int] = {}
    seen: set[Any] = set()
    todo = [(r.grad_fn, r.output_nr) for r in roots if r.grad_fn is not None]
    while todo:
        node, slot = todo.pop()
        heads = node.metadata.get(_HEADS)
        if heads and slot in heads:
            position, key = heads[slot]
            found.setdefault(key, position)
        if node in seen:
            continue
        seen.add(node)
        todo.extend((n, i) for n, i in node.next_functions if n is not None)
    return sorted(found, key=found.__getitem__)


def backward_task(names: Names, roots: list[torch.Tensor]) -> str | None:
    """The task of a backward from `roots`: its named losses', else the model outputs it reaches."""
    return names.loss_task(roots) or ", ".join(heads_reached(roots)) or None
