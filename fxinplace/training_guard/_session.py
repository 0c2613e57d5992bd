"""One entry into a `guard`: builds the mode, the saved-tensor log, the write log and the
optimizer watch, gives each what it needs, installs their hooks and takes them off again."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from ._facts import StaleSavedTensor
from ._fsdp import ShardWatch
from ._mode import Mode
from ._names import Names, name_outputs
from ._optimizer_watch import OptimizerWatch, Step
from ._runtime import getframe, is_compiling, report_failure, user_at
from ._saved_log import SavedLog, SavedLines
from ._write_log import WriteLog

__all__ = ["Session"]


class Session:
    """The state of one entry into a `guard`: hooks, the mode, and what they recorded.

    Args:
        names: the guard's models, optimizers and named losses.
        tasks: the guard's open `task` blocks (the list itself: blocks open and close while
            the session runs).
        on_stale: says ``"raise"`` or ``"warn"``; found: takes each finding;
        tasks_from_outputs: says whether to name tasks by the keys of the models' output
            dicts. The three read the guard's attributes when asked, so that a change made
            while the guard is active counts.
        check_values: fingerprint saved tensors too (`_values`).
        lines: learns, as backward unpacks them, which lines saved the parameters and
            buffers, for the entries the hooks will not watch (`check="fast"`, `"sampled"`).
    """

    def __init__(self, names: Names, tasks: list[str],
                 on_stale: Callable[[], Literal["raise", "warn"]],
                 found: Callable[[StaleSavedTensor], None],
                 tasks_from_outputs: Callable[[], bool], check_values: bool = False,
                 lines: SavedLines | None = None) -> None:
        self.names = names
        self.check_values = check_values
        self.lines = lines
        self.tasks_from_outputs = tasks_from_outputs
        self.failed: set[str] = set()
        self.undo: list[Callable[[], Any]] = []
        self.mode = Mode()
        steps: list[Step] = []  # the optimizer steps under way: the watch's, read by the write log
        self.writes = WriteLog(self.mode, steps, self.warn_once)
        self.saved = SavedLog(self.mode, self.writes, names, tasks, on_stale, found,
                              self.warn_once)
        # Steps go through the FSDP2 watch, which adds the all-gather's hidden write (`_fsdp`).
        shards = ShardWatch(names.modules, self.writes, self.warn_once)
        self.optimizers = OptimizerWatch(self.mode, steps, shards.record, names.optimizer,
                                         self.warn_once)
        self.steps = steps
        self.mode.serve(inplace=self.writes.on_inplace, backward=self.saved.on_backward,
                        data_get=self.writes.on_data_get, data_set=self.writes.on_data_set)

    # entering and leaving ------------------------------------------------------------------

    def start(self) -> None:
        # Per entry, so per step for a decorated step function: plain handles, no ExitStack.
        undo = self.undo
        try:
            undo.extend(self.optimizers.hook())
            for _, module in self.names.modules:
                undo.append(module.register_forward_pre_hook(self.on_model_call).remove)
                undo.append(
                    module.register_forward_hook(self.on_model_output, always_call=True).remove)
            for _, opt in self.names.optimizers:
                try:
                    undo.append(self.optimizers.lift_zero_grad(opt))
                except Exception as e:  # then `zero_grad` runs under the mode, as any code
                    self.warn_once("zero_grad", e)
            for cls in dict.fromkeys(type(module) for _, module in self.names.modules):
                undo.append(self.optimizers.lift_model_zero_grad(cls))
            saved = self.saved
            pack, unpack = (saved.pack_values, saved.unpack_values) if self.check_values else (saved.pack, saved.unpack)
            if self.lines is not None:
                unpack = self.lines.learning(unpack, self.names.storage_keys())
            hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
            hooks.__enter__()
            undo.append(functools.partial(hooks.__exit__, None, None, None))
            self.mode.__enter__()
            undo.append(functools.partial(self.mode.__exit__, None, None, None))
        except BaseException:
            self.close()
            raise

    def stop(self) -> None:
        try:
            self.saved.check_pending()  # a backward the mode did not see (run by compiled code)
        finally:
            self._stop()

    def _stop(self) -> None:
        self.steps.clear()
        self.mode.forget()
        self.mode.land()
        self.close()  # in reverse: the mode, the saved-tensor hooks, then the other hooks
        self.mode.retire()

    def close(self) -> None:
        undo, self.undo = self.undo, []
        error: BaseException | None = None
        for step in reversed(undo):
            try:
                step()
            except BaseException as e:  # undo the rest, then raise the first failure
                error = error or e
        if error is not None:
            raise error

    # the given models ----------------------------------------------------------------------

    # The hooks on the given models are traced away under Dynamo (no graph break): the hooks of
    # a compiled module (`torch.compile(m)`) run outside its graph; those of the module inside
    # it do nothing. Name tasks with `guard.losses` / `guard.task` there.

    def on_model_call(self, module: torch.nn.Module, args: Any) -> None:
        if not is_compiling():
            # The loop's line that called the model (`netD(fake)`): a model run several times a
            # step saves from the same forward line each time.
            calls = self.mode.calls
            try:
                calls.append(user_at(getframe(1)) if not calls else calls[-1])
            except Exception as e:
                calls.append(None)
                self.warn_once("model call", e)
            self.mode.lift()

    def on_model_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if is_compiling():
            return
        if self.mode.calls:
            self.mode.calls.pop()
        try:
            if self.tasks_from_outputs() and isinstance(output, Mapping):
                name_outputs(output)
        except Exception as e:
            self.warn_once("output names", e)
        finally:
            self.mode.unlift()  # after the names: with the mode on, each call above would go through it

    def warn_once(self, where: str, e: Exception) -> None:
        report_failure(self.failed, where, e)
