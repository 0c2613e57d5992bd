"""An entry the guard's hooks do not watch: PyTorch checks, the guard names what it found.

On the entries after the first of `check="fast"` (and the unsampled ones of `check="sampled"`)
no saved-tensor hook and no function mode is installed, so autograd runs its own version check
on every saved tensor, at no cost to the guard. When that check raises its in-place error, the
backward has stopped at the node that needed the changed tensor, and the graph it started from
is still there (frames keep the arguments of the `backward` / `autograd.grad` call): the guard
finds the saved tensor that fails the check, names it (the parameter or buffer it views, the
node, the versions, the backward's line and task), with the optimizer steps it logged
(`log_steps`) who moved it, and the forward line that the watched entries saw save it, where
they saw one (`SavedLines`; said as what they saw, not as this entry's fact). What only the hooks see is not known here: writes other than
optimizer steps, writes through `.data`, and the tasks of `guard.task` blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from .._compat import failed_backward, gradient_edge_node, inplace_error_versions, sequence_nr, stale_saves_of_node
from ._facts import StaleSavedTensor
from ._mode import Mode
from ._names import Names, backward_task
from ._optimizer_watch import OptimizerWatch, Step, StepWritten
from ._render import tensor_words
from ._saved_log import SavedLines
from ._runtime import forward_op, location, storage_key, user_at
from ._write_log import guard_writes

__all__ = ["Unwatched"]

_MAX_NODES = 1_000_000  # the walk of a failed backward's graph, on the error path only
_MAX_STEPS = 256  # the steps of one entry kept: a guard entered once per epoch steps many times


class Unwatched:
    """The unwatched entries of a guard, one at a time: optionally the optimizer step log (from
    `start` to `stop`), and `explain` for their errors.

    Args:
        names: the guard's models, optimizers and named losses.
        lines: the lines that saved parameters and buffers on the watched entries.
        warn_once: reports a failure of the bookkeeping, once per place.
        log_steps: install the global optimizer step hooks, to name a step that moved the
            changed tensor.
    """

    def __init__(self, names: Names, lines: SavedLines | None, warn_once: Callable[[str, Exception], None],
                 log_steps: bool) -> None:
        self.names = names
        self.lines = lines
        self.stepped: deque[StepWritten] = deque(maxlen=_MAX_STEPS)
        self.undo: list[Callable[[], Any]] = []
        self._watch = None
        if log_steps:
            steps: list[Step] = []
            # A mode never entered: the watch's lift and unlift find it off the stack and do nothing.
            self._watch = OptimizerWatch(Mode(), steps, self.stepped.append, names.optimizer, warn_once)

    def start(self) -> None:
        self.stepped.clear()
        if self._watch is not None:
            self.undo = self._watch.hook()

    def stop(self) -> None:
        """Take the step hooks off; the steps stay for `explain` until `forget`."""
        undo, self.undo = self.undo, []
        for remove in undo:
            remove()

    def forget(self) -> None:
        self.stepped.clear()

    def explain(self, error: BaseException) -> StaleSavedTensor | None:
        """The finding behind PyTorch's in-place error `error`, or None for another error (or
        one whose tensor is no longer in the graph)."""
        if not isinstance(error, RuntimeError):
            return None
        message = str(error)
        versions = inplace_error_versions(message)
        call = failed_backward(error.__traceback__) if versions else None
        if call is None:
            return None
        kind, roots, inputs, frame = call
        found = _failing_save(roots, inputs, message)
        if found is None:
            return None
        node, t = found
        node_seq = sequence_nr(node)
        key = storage_key(t)
        what, name, is_view = self.names.tensor(t, key)
        node_name = node.name()
        op = forward_op(node_name)
        shape = tuple(t.shape)
        now, saved = versions
        seen_at, seen_called = (self.lines.saved_by(node_name, key) if self.lines is not None and name is not None
                                else (None, None))
        return StaleSavedTensor(
            tensor=tensor_words(what, name, is_view, shape, op), name=name, shape=shape, op=op,
            node=node_name, saved_at=None, seen_saved_at=seen_at, seen_called_at=seen_called, saved_for=None,
            version_saved=saved, version_now=now,
            writes=guard_writes([w for w in self.stepped if w.node_seq > node_seq and w.touches(t, key)], t),
            needed_for=backward_task(self.names, roots), backward=kind,
            backward_at=location(user_at(frame)), hidden=False, watched=False, steps_logged=self._watch is not None,
        )


def _failing_save(roots: list[torch.Tensor], inputs: list[torch.Tensor] | None,
                  message: str) -> tuple[Any, torch.Tensor] | None:
    """The node and saved tensor whose version check raised `message`.

    Of the nodes the backward runs (with `inputs`, only those with a path to one of them), the
    engine runs a graph's nodes, on one thread and device, in decreasing sequence number (a
    node's consumers are made after it) and stops at the first whose check fails; the nodes it
    ran before passed theirs (or freed their saves). So among the saves that fail the check now
    with the same words, the one it stopped at is the highest-numbered node's.
    """
    head = message.split(" Hint:")[0]
    nodes = _nodes_run(roots, inputs)
    best: tuple[int, Any, torch.Tensor] | None = None
    for node in nodes:
        for t, words in stale_saves_of_node(node):
            if words.split(" Hint:")[0] == head:
                seq = sequence_nr(node)
                if best is None or seq > best[0]:
                    best = (seq, node, t)
    return (best[1], best[2]) if best is not None else None


def _nodes_run(roots: list[torch.Tensor], inputs: list[torch.Tensor] | None) -> list[Any]:
    """The nodes a backward from `roots` runs: all it reaches, or with `inputs` those from which
    an input's gradient edge is reached (the engine runs no other)."""
    children: dict[Any, list[Any]] = {}
    todo = [r.grad_fn for r in roots if r.grad_fn is not None]
    while todo and len(children) < _MAX_NODES:
        node = todo.pop()
        if node in children:
            continue
        children[node] = [n for n, _ in node.next_functions if n is not None]
        todo.extend(children[node])
    if inputs is None:
        return list(children)
    targets = {gradient_edge_node(t) for t in inputs}
    runs: dict[Any, bool] = {}
    for start in children:  # iterative post-order: a graph can be deeper than Python's stack
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in runs:
                continue
            kids = children.get(node, [])
            if expanded:
                runs[node] = any(k in targets or runs.get(k, False) for k in kids)
            else:
                stack.append((node, True))
                stack.extend((k, False) for k in kids if k not in runs)
    return [node for node, run in runs.items() if run]
