"""What `fxinplace fix` proposes fixes for: the first call of each top-level module a script
runs (one no other module's forward called), with its inputs, up to the first backward.

The training step's forward has run by then; the script stops there (`StopScript`), so that a
long training run costs one step. Inputs are kept as detached copies (a tensor computed by an
earlier module, `D(G(z))`, cannot be deep-copied with its graph), the module as a deep copy
taken before its forward ran, or, where it holds what cannot be copied, the module itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from .._compat import pytree

__all__ = ["FirstCalls", "StopScript", "FirstCall"]


class StopScript(BaseException):
    """Raised at the script's first backward once a module ran: the step to fix is captured.
    A BaseException, so that the script's own `except Exception` lets it through."""


@dataclass
class FirstCall:
    module: torch.nn.Module
    args: tuple


@dataclass
class FirstCalls:
    calls: list[FirstCall] = field(default_factory=list)
    _depth: int = 0
    _seen: set = field(default_factory=set)

    def __enter__(self) -> FirstCalls:
        self._handles = [register_module_forward_pre_hook(self._before),
                         register_module_forward_hook(self._after, always_call=True)]
        self._backward, self._grad = torch.autograd.backward, torch.autograd.grad

        def backward(*args: Any, **kwargs: Any) -> Any:
            self._stop()
            return self._backward(*args, **kwargs)

        def grad(*args: Any, **kwargs: Any) -> Any:
            self._stop()
            return self._grad(*args, **kwargs)

        torch.autograd.backward, torch.autograd.grad = backward, grad
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.autograd.backward, torch.autograd.grad = self._backward, self._grad
        for handle in self._handles:
            handle.remove()

    def _stop(self) -> None:
        if self.calls:
            raise StopScript()

    def _before(self, module: torch.nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth > 1 or torch.compiler.is_compiling():
            return
        module = getattr(module, "_orig_mod", module)  # a compiled module: the model it compiles
        if id(module) in self._seen:
            return
        self._seen.add(id(module))
        try:
            snapshot = copy.deepcopy(module)
        except Exception:  # a module holding a non-leaf tensor (a cache): the live one will do
            snapshot = module
        self.calls.append(FirstCall(snapshot, pytree.tree_map(_detached, args)))

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value
