"""Watch a whole run: every `torch.compile` in it audited, the training-loop guard on throughout.

`fxinplace run` and the pytest plugin enter one `Watch` around the user's code::

    with Watch(namespace=script_globals) as watch:
        exec(script)                    # unmodified: its own torch.compile calls, its own backend
    watch.report                        # a GraphReport per graph compiled
    watch.stale                         # what the guard found (StaleSavedTensor)

While it is active, `torch.compile(model, backend=b, mode=m, options=o)` compiles with
`InplaceAudit(compiler=<what torch.compile would have built from b, m, o>, print=False)`, so the
program computes what it computed before, and its reports are kept here. `nn.Module.compile()`
calls `torch.compile` too. A call that already names the audit (`backend="inplace_audit"`, an
`InplaceAudit`) is left as it is, and its reports are collected.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch

from ._compat import compile_backend, default_backend
from .backend import InplaceAudit, inplace_audit
from .report import GraphReport, Report
from .training_guard import StaleSavedTensor, guard

__all__ = ["Watch"]


class Watch:
    """Audit every `torch.compile` and guard the training loop until exit.

    Args:
        namespace: the globals of the code watched (a script's `__main__` dict), read when a
            message needs a name: its modules name parameters and buffers (`disc.2.weight`),
            its optimizers name steps (`opt_d.step()`). Modules given to `torch.compile` name
            them too.
        on_stale: the guard's `on_stale`: "raise" keeps PyTorch's failure (named), "warn" lets
            the run go on and records it.
    """

    def __init__(self, namespace: Mapping[str, Any] | None = None, on_stale: str = "raise") -> None:
        self.namespace = namespace if namespace is not None else {}
        self.on_stale = on_stale
        self.audits: list[InplaceAudit] = []  # ours, then the user's own, in the order first seen
        self.guard: guard | None = None
        self._compiled: list[torch.nn.Module] = []
        self._shared_from = 0  # graphs the global `inplace_audit` had before we started
        self._original: Callable | None = None
        self._undo: list[Callable[[], Any]] = []

    # entering and leaving ------------------------------------------------------------------

    def __enter__(self) -> Watch:
        if self._original is not None:
            raise RuntimeError("this `Watch` is already active")
        self._shared_from = len(inplace_audit.graphs)
        self.guard = guard(on_stale=self.on_stale)  # type: ignore[arg-type]
        # The guard names what its `Names` lists; ours are read live from the script.
        self.guard._names.modules = _LiveModules(self)  # type: ignore[assignment]
        self.guard._names.optimizers = _LiveOptimizers(self)  # type: ignore[assignment]
        self._original = torch.compile

        @functools.wraps(self._original)
        def compile(model: Any = None, **kwargs: Any) -> Any:
            return self._compile(model, **kwargs)

        torch.compile = compile
        try:
            self.guard.__enter__()
        except BaseException:
            torch.compile, self._original = self._original, None
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            undo, self._undo = self._undo, []
            for remove in undo:
                remove()
            if self.guard is not None:
                self.guard.__exit__(*exc)
        finally:
            if self._original is not None:
                torch.compile, self._original = self._original, None

    # what was found ------------------------------------------------------------------------

    @property
    def graphs(self) -> list[GraphReport]:
        graphs = [g.report for a in self.audits for g in a.graphs]
        return graphs + [g.report for g in inplace_audit.graphs[self._shared_from:]]

    @property
    def report(self) -> Report:
        """A `GraphReport` per graph compiled while watching, by every audit."""
        return Report(tuple(self.graphs))

    @property
    def stale(self) -> list[StaleSavedTensor]:
        """What the guard found: saved tensors that changed before the backward needing them."""
        return list(self.guard.hazards) if self.guard is not None else []

    # torch.compile, audited ----------------------------------------------------------------

    def _compile(self, model: Any = None, **kwargs: Any) -> Any:
        original = self._original
        assert original is not None, "Watch._compile called while the watch is inactive"
        if model is None:  # `@torch.compile(...)` as a decorator
            return lambda fn: self._compile(fn, **kwargs) if fn is not None else original(None, **kwargs)(fn)
        backend = kwargs.get("backend")
        backend = default_backend() if backend is None else backend
        mode, options = kwargs.get("mode"), kwargs.get("options")
        if backend == "inplace_audit" or isinstance(backend, InplaceAudit):
            if isinstance(backend, InplaceAudit) and backend is not inplace_audit and backend not in self.audits:
                self.audits.append(backend)
            return original(model, **kwargs)
        if mode is not None and options is not None:
            return original(model, **kwargs)  # torch's own error for both
        options = dict(options) if options else options
        # torch.compile takes these two out of `options` itself, and the audit has no use for them.
        passed = {k: options.pop(k) for k in ("guard_filter_fn", "use_aoti") if options and k in options}
        if passed.get("use_aoti"):
            return original(model, **kwargs)  # AOTInductor is not audited
        hand_off = compile_backend(backend, mode, options, kwargs.get("dynamic"), kwargs.get("name"))
        audit = InplaceAudit(compiler=hand_off, print=False)
        module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
        if isinstance(module, torch.nn.Module):  # `nn.Module.compile()` compiles its `_call_impl`
            audit.model = module
            self._compiled.append(module)
        self.audits.append(audit)
        rest = {k: v for k, v in kwargs.items() if k not in ("backend", "mode", "options")}
        if _is_module_compile(model):
            # `nn.Module.compile()` compiles `_call_impl`, a frame Dynamo (torch 2.13) gives up on
            # under the guard's saved-tensor hooks: it traces the hook, and runs the whole
            # forward eagerly. Compile the module's `forward` instead (its hooks run eagerly
            # around it) until the watch ends; `_compiled_call_impl` stays None.
            module.forward = self._lifting(original(module.forward, backend=audit, options=passed or None, **rest))
            self._undo.append(lambda: module.__dict__.pop("forward", None))
            return None
        return self._lifting(original(model, backend=audit, options=passed or None, **rest))

    def _lifting(self, compiled: Any) -> Any:
        """`compiled`, running with the guard's mode off the stack, as the guard runs a model it
        is given: else Dynamo guards on the mode stack, recompiles under the guard, and traces
        the mode's `__torch_function__` into the graph."""
        if isinstance(compiled, torch.nn.Module):  # its hooks run outside its graph
            lifted: list[bool] = []
            pre = compiled.register_forward_pre_hook(lambda module, args: lifted.append(self._lift()))
            post = compiled.register_forward_hook(
                lambda module, args, out: self._unlift(lifted.pop() if lifted else False), always_call=True)
            self._undo += [pre.remove, post.remove]
            return compiled
        if not callable(compiled):
            return compiled

        @functools.wraps(compiled)
        def run(*args: Any, **kwargs: Any) -> Any:
            lifted = self._lift()
            try:
                return compiled(*args, **kwargs)
            finally:
                self._unlift(lifted)

        return run

    def _lift(self) -> bool:
        session = self.guard._session if self.guard is not None else None
        if session is None or torch.compiler.is_compiling():
            return False
        session.mode.lift()
        return True

    def _unlift(self, lifted: bool) -> None:
        session = self.guard._session if self.guard is not None else None
        if lifted and session is not None:
            session.mode.unlift()

    # names, read when a message needs one ---------------------------------------------------

    def modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        seen = set()
        for name, value in list(self.namespace.items()):
            if isinstance(value, torch.nn.Module) and not name.startswith("_"):
                seen.add(id(value))
                yield f"{name}.", value
        for module in self._compiled:
            if id(module) not in seen:
                yield "", module

    def optimizers(self) -> Iterator[tuple[str, torch.optim.Optimizer]]:
        for name, value in list(self.namespace.items()):
            if isinstance(value, torch.optim.Optimizer) and not name.startswith("_"):
                yield name, value


def _is_module_compile(model: Any) -> bool:
    module = getattr(model, "__self__", None)
    return isinstance(module, torch.nn.Module) and getattr(model, "__func__", None) is torch.nn.Module._call_impl


class _LiveModules:
    def __init__(self, watch: Watch) -> None:
        self.watch = watch

    def __iter__(self) -> Iterator[tuple[str, torch.nn.Module]]:
        return self.watch.modules()


class _LiveOptimizers:
    def __init__(self, watch: Watch) -> None:
        self.watch = watch

    def __iter__(self) -> Iterator[tuple[str, torch.optim.Optimizer]]:
        return self.watch.optimizers()
