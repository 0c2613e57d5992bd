"""What autograd saves outside every audited graph during one `fxinplace.audit` call.

Dynamo runs some code itself, between two graphs: a custom Function given one tensor twice
(`Scale.apply(t, t)`), an op it breaks the graph on. What that code saves for backward no
backend sees, and a later graph may write it: eager's backward then raises, or, for a write
autograd does not see (`.data`), computes from the new values. `OutsideSaves` records each such
save as it is packed (its version and a copy of its values), tells which changed once the model
returned, and which a backward from the returned tensors unpacks; `pin_outside_saves` pins
each on the graph writes that touched its memory after the save.
"""

from __future__ import annotations

import dataclasses
import dis
import functools
import linecache
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ._compat import FakeTensor
from ._sources import SourceLocation, user_frame
from .facts import Detail, Hazard, HazardCode, Saved, Severity, Site

__all__ = ["OutsideSaves", "pin_outside_saves"]

# Where Dynamo gives up on a whole frame, all of it runs outside the graphs: copies of what it
# saves stop here (later saves are judged by their versions only, a `.data` write to them missed).
_VALUE_COPIES_BYTES = 256 << 20


@dataclass(eq=False)
class _Save:
    tensor: torch.Tensor
    version: int
    values: torch.Tensor | None  # a copy at pack time: a write autograd does not see moves no counter
    source: SourceLocation | None
    seq: int  # when it was packed, on the clock `OutsideSaves.tick` advances
    op: str = ""  # the backward node that unpacked it, named as the forward op (set by `reached`)
    function: Any = None  # ... and the custom `autograd.Function` whose node that is, if one

    @functools.cached_property
    def change(self) -> str | None:
        """"visible" (its version moved), "hidden" (only its values did), or None; read once
        the model returned."""
        if self.tensor._version != self.version:
            return "visible"
        if self.values is None:
            return None
        now, then = self.tensor.detach(), self.values
        if now.is_floating_point() or now.is_complex():
            same = bool(((now == then) | (now.isnan() & then.isnan())).all())
        else:
            same = torch.equal(now, then)
        return None if same else "hidden"


@dataclass(eq=False)
class _Packed:
    tensor: torch.Tensor
    save: _Save


@dataclass
class OutsideSaves:
    """`with OutsideSaves() as saves:` around a call; `inside()` marks the audited graphs' runs
    (and compiles), whose saves the audit reads from the graph; `tick()` dates a graph run."""

    saves: list[_Save] = field(default_factory=list)
    runs: list[tuple[Any, int]] = field(default_factory=list)  # (graph record, when it ran)
    _depth: int = 0
    _clock: int = 0
    _hooks: Any = None
    _unpacked: list | None = None  # while `reached` walks: the saves unpacked so far
    _copied: int = 0  # bytes of values copied so far

    def __enter__(self) -> OutsideSaves:
        # Dynamo would try to compile the hooks as frames of their own: it must not see them.
        self._hooks = torch.autograd.graph.saved_tensors_hooks(torch.compiler.disable(self._pack),
                                                               torch.compiler.disable(self._unpack))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def inside(self) -> _Inside:
        return _Inside(self)

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def ran(self, record: Any) -> None:
        """An audited graph (its `GraphRecord`) finished a run."""
        self.runs.append((record, self.tick()))

    def _pack(self, t: torch.Tensor) -> Any:
        if self._depth or isinstance(t, FakeTensor) or t.device.type == "meta":
            return t
        values = None
        size = t.numel() * t.element_size()
        if t.layout is torch.strided and self._copied + size <= _VALUE_COPIES_BYTES:
            with torch.no_grad():
                values = t.detach().clone()
            self._copied += size
        frame = user_frame(sys._getframe())
        source = None
        if frame is not None:
            file, line = frame.f_code.co_filename, frame.f_lineno
            source = SourceLocation(file, line, linecache.getline(file, line).strip(), frame.f_code.co_name)
        save = _Save(t, t._version, values, source, self.tick())
        self.saves.append(save)
        return _Packed(t, save)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Packed):
            if self._unpacked is not None:
                self._unpacked.append(packed.save)
            return packed.tensor
        return packed

    def reached(self, returned: Sequence[torch.Tensor]) -> list[_Save]:
        """The saves a backward from `returned` unpacks, each named by its node's op.

        Backward runs every node the roots reach; a node unpacks what it saved as it runs (a
        custom Function, when its backward reads `ctx.saved_tensors`). Unpacking them here,
        node by node, asks autograd which of our saves those are.
        """
        seen: set = set()
        stack = [t.grad_fn for t in returned if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        found: dict[int, _Save] = {}
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            self._unpacked = []
            try:
                _unpack_all(node)
            finally:
                unpacked, self._unpacked = self._unpacked, None
            for save in unpacked:
                if id(save) not in found:
                    save.op, save.function = _forward_op(node), getattr(node, "_forward_cls", None)
                    found[id(save)] = save
            stack.extend(n for n, _ in node.next_functions)
        return list(found.values())


@dataclass
class _Inside:
    saves: OutsideSaves

    def __enter__(self) -> None:
        self.saves._depth += 1

    def __exit__(self, *exc: Any) -> None:
        self.saves._depth -= 1


def _unpack_all(node: Any) -> None:
    # A custom Function's node is its ctx: `saved_tensors` unpacks all it saved. A built-in
    # node shows each saved variable as a `_saved_<name>` attribute, unpacked when read.
    names = ["saved_tensors"] if hasattr(type(node), "saved_tensors") else [a for a in dir(node) if a.startswith("_saved_")]
    for name in names:
        try:
            getattr(node, name)
        except RuntimeError:  # freed by an earlier backward: it cannot be unpacked again
            pass


def _forward_op(node: Any) -> str:
    function = getattr(node, "_forward_cls", None)
    if function is not None:
        return f"{function.__name__}.apply"
    name = node.name()
    base = name.split("Backward")[0] if "Backward" in name else name
    return base[:1].lower() + base[1:]


def pin_outside_saves(saves: OutsideSaves, returned: Sequence[torch.Tensor]) -> None:
    """Add a saved-tensor error to each graph write that changed a save made outside every
    graph, where a backward from `returned` unpacks that save.

    A write by a graph that ran after the save, to its memory (`GraphRecord.written`): one the
    counter sees fails backward (`SAVED_THEN_MUTATED`), one it does not (`.data`) feeds backward
    the new values (`HIDDEN_WRITE_TO_SAVED`). And a write inside the custom Function's own
    forward, after its `ctx.save_for_backward`: autograd packs what forward saved only once
    forward returned, so the value and version it keeps are the written ones, and backward
    silently computes from them.
    """
    if not saves.saves:
        return
    reached = saves.reached(returned)
    added: dict[int, tuple[Any, dict[int, list[Hazard]]]] = {}

    def add(record: Any, index: int, hazard: Hazard) -> None:
        hazards = added.setdefault(id(record), (record, {}))[1].setdefault(index, [])
        if hazard not in hazards and hazard not in record.report.mutations[index].hazards:
            hazards.append(hazard)

    for save in reached:
        how = save.change
        before = [record for record, tick in saves.runs if tick < save.seq]
        for record, tick in saves.runs:
            if how is None and not (save.function is not None and before and record is before[-1]):
                continue
            if how is not None and tick < save.seq:
                continue
            for index, mutation in _writes_to(record, save.tensor):
                if how is None:  # the graph of the Function's forward, which ran just before the pack
                    if _after_save_for_backward(save.function, mutation.site.source):
                        code = HazardCode.HIDDEN_WRITE_TO_SAVED
                        add(record, index, Hazard(code, Severity.ERROR, mutation.target, mutation.site,
                                                  saved_by=Site(save.op, save.source), saved=(Saved(mutation.target),),
                                                  detail=Detail.FUNCTION_FORWARD))
                    continue
                if mutation.site.hidden != (how == "hidden"):
                    continue
                code = HazardCode.HIDDEN_WRITE_TO_SAVED if mutation.site.hidden else HazardCode.SAVED_THEN_MUTATED
                add(record, index, Hazard(code, Severity.ERROR, mutation.target, mutation.site,
                                          saved_by=Site(save.op, save.source), saved=(Saved(mutation.target),),
                                          detail=Detail.OUTSIDE_GRAPH))
    for record, by_index in added.values():
        mutations = list(record.report.mutations)
        for index, hazards in by_index.items():
            if not hazards:
                continue
            kept = [h for h in mutations[index].hazards if h.code is not HazardCode.SAFE_INPLACE]
            mutations[index] = dataclasses.replace(mutations[index], hazards=tuple(kept + hazards))
        record.report = dataclasses.replace(record.report, mutations=tuple(mutations))


def _writes_to(record: Any, tensor: torch.Tensor) -> list:
    storage = tensor.untyped_storage().data_ptr()
    found = []
    for ref, index in record.written:
        written = ref()
        if written is not None and written.untyped_storage().data_ptr() == storage:
            found.append((index, record.report.mutations[index]))
    return found


def _after_save_for_backward(function: Any, source: SourceLocation | None) -> bool:
    """Is `source` a line of `function.forward` after its first `ctx.save_for_backward`?"""
    code = getattr(getattr(function, "forward", None), "__code__", None)
    if code is None or source is None or os.path.realpath(source.file) != os.path.realpath(code.co_filename):
        return False
    lines = [line for _, _, line in code.co_lines() if line is not None]
    saves = [i.positions.lineno for i in dis.get_instructions(code)
             if i.argval == "save_for_backward" and i.positions is not None and i.positions.lineno is not None]
    return bool(lines and saves) and min(saves) < source.line <= max(lines)
