"""Where a node came from: the user's file and line, its module path, a parameter's name."""

from __future__ import annotations

import functools
import linecache
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Protocol, TypeVar, overload

import torch
import torch.fx

from ._compat import dynamo_output_scopes, graph_break_frames, nn_module_stack, stack_trace
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')
# Dynamo module paths look like "L['self'].heads.seg" or "L['model'].trunk.0".
_ROOT = re.compile(r"^[LG]\['[^']*'\]\.?")


@dataclass(frozen=True)
class SourceLocation:
    file: str
    line: int
    code: str
    function: str = ""

    def __str__(self) -> str:
        return f"{_short_path(self.file)}:{self.line}"


def source_of(node: torch.fx.Node) -> SourceLocation | None:
    """The innermost user frame of `node` (the innermost frame at all if none is the user's).

    Dynamo leaves out frames in `torch/nn/modules`, but keeps those of the torch functions it
    inlines: `F.threshold(..., inplace=True)` ends in `nn/functional.py`, `nn.init.zeros_` in
    `nn/init.py`.
    """
    trace = stack_trace(node)
    if not trace:
        return None
    frames = list(_FRAME.finditer(trace))
    if not frames:
        return None
    frame = next((f for f in reversed(frames) if not is_internal_file(f["file"])), frames[-1])
    return line_of(frame["file"], int(frame["line"]), frame["fn"])


def line_of(file: str, line: int, function: str = "") -> SourceLocation:
    """`file:line` with its source text."""
    return SourceLocation(file, line, linecache.getline(file, line).strip(), function)


def break_source(gm: torch.fx.GraphModule) -> SourceLocation | None:
    """The user's line where Dynamo broke `gm` off: the call it runs itself after the graph."""
    frames = graph_break_frames(gm)
    frame = next((f for f in reversed(frames) if not is_internal_file(f.filename)), None)
    if frame is None:
        return None
    return SourceLocation(frame.filename, frame.lineno, (frame.line or "").strip(), frame.name)


@functools.cache
def _internal_dirs() -> tuple[str, ...]:
    # Where the torch and fxinplace packages really are, each ending in a separator: a user
    # whose project lies in a folder named `torch` or `fxinplace` keeps their lines, and
    # `torchvision` is not torch. fxinplace's own tests/ and examples/ are user code.
    packages = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    return tuple(os.path.join(os.path.realpath(d), "") for d in packages)


# By file name: the training guard asks for every frame it walks, so the answer is kept
# (`known_internal_files.get(name)` first, for the fastest path).
known_internal_files: dict[str, bool] = {}


def is_internal_file(filename: str) -> bool:
    """Is `filename` (a code object's or a stack trace's) torch's, fxinplace's, or code FX
    generated (``<eval_with_key>.N``)?"""
    flag = known_internal_files.get(filename)
    if flag is None:
        if len(known_internal_files) > 4096:  # "<eval_with_key>.N": one name per FX graph module
            known_internal_files.clear()
        if filename.startswith("<"):  # "<string>", "<stdin>": no file
            flag = filename.startswith("<eval_with_key>")
        else:
            flag = os.path.realpath(filename).startswith(_internal_dirs())
        known_internal_files[filename] = flag
    return flag


class FrameLike(Protocol):
    """A frame as `traceback` summarizes it (`FrameSummary`): its file is enough here."""

    filename: str


_Summary = TypeVar("_Summary", bound=FrameLike)


@overload
def user_frame(frames: FrameType | None) -> FrameType | None: ...
@overload
def user_frame(frames: Iterable[_Summary]) -> _Summary | None: ...
def user_frame(frames):
    """The innermost frame outside torch and fxinplace (see `is_internal_file`), or None.

    `frames` is a live frame, walked outwards along ``f_back`` (the training guard, from
    ``sys._getframe``), or frames with a ``filename``, innermost first (a traceback's
    `FrameSummary` list, reversed). Code FX generated counts as internal.
    """
    # The guard calls this once per op that saves tensors: the live walk reads the cache
    # directly, with no generator or key function in between. Frames are classified by file
    # name, not by code object: a code object hashes its bytecode and constants (about a
    # microsecond for `Module._call_impl`); a file name is a string that keeps its hash.
    known = known_internal_files
    if frames is None or isinstance(frames, FrameType):
        frame = frames
        while frame is not None:
            name = frame.f_code.co_filename
            flag = known.get(name)
            if flag is None:
                flag = is_internal_file(name)
            if not flag:
                return frame
            frame = frame.f_back
        return None
    for frame in frames:
        if not is_internal_file(frame.filename):
            return frame
    return None


def is_dynamo_file(filename: str) -> bool:
    """Is `filename` in Dynamo's own package (its wrappers: `external_utils.inner`)?"""
    return os.path.realpath(filename).startswith(os.path.join(_internal_dirs()[0], "_dynamo", ""))


def module_path_of(node: torch.fx.Node) -> str:
    """The dotted path of the innermost module that ran `node` ("" for the top level)."""
    stack = nn_module_stack(node)
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _ROOT.sub("", str(path))


def module_type_of(node: torch.fx.Node) -> str:
    """The class name of the innermost module that ran `node` ("" for the top level)."""
    stack = nn_module_stack(node)
    if not stack:
        return ""
    _, kind = list(stack.values())[-1]
    return getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1].strip("'>")


def qualified_name_of(source) -> tuple[str, str]:
    """(kind, name) for a Dynamo `Source`: parameters and buffers by fully qualified name.

    Reads the `_modules` / `_parameters` / `_buffers` lookups Dynamo records, e.g.
    ``L['self']._modules['trunk']._modules['1']._buffers['running_mean']``, skipping the
    wrapper sources (`UnspecializedNNModuleSource`, ...) that carry neither.
    """
    steps: list[tuple[str, str]] = []
    src = source
    while getattr(src, "base", None) is not None:
        if getattr(src, "member", None) is not None:
            steps.append(("member", str(src.member)))
        elif getattr(src, "index", None) is not None:
            steps.append(("index", str(src.index)))
        src = src.base
    steps.reverse()
    parts: list[str] = []
    kind = "input"
    i = 0
    while i < len(steps):
        step, value = steps[i]
        if step == "member" and value in _CONTAINERS and i + 1 < len(steps) and steps[i + 1][0] == "index":
            parts.append(steps[i + 1][1])
            kind = _CONTAINERS[value]
            i += 2
        elif step == "member":
            parts.append(value)
            i += 1
        else:
            break
    if i == len(steps) and parts and kind in ("parameter", "buffer"):
        return kind, ".".join(parts)
    name = source.name if isinstance(getattr(source, "name", None), str) else str(source)
    local = re.fullmatch(r"L\['([^']+)'\]", name)
    return "input", local.group(1) if local else name


_CONTAINERS = {"_modules": "module", "_parameters": "parameter", "_buffers": "buffer"}


def state_names(module: torch.nn.Module) -> dict[int, tuple[str, str, tuple[str, ...]]]:
    """id(tensor) -> (kind, name, aliases) for every parameter and buffer of `module`.

    The name is the one `named_parameters()` / `named_buffers()` give (the first registration
    met, since they skip a tensor seen before); the aliases are its other names, in
    `remove_duplicate=False` order. Dynamo names a tensor by the path it happened to reach it by.
    """
    names: dict[int, tuple[str, str, tuple[str, ...]]] = {}
    for kind, named in (("parameter", module.named_parameters), ("buffer", module.named_buffers)):
        every: dict[int, list[str]] = {}
        for name, t in named(remove_duplicate=False):
            every.setdefault(id(t), []).append(name)
        for name, t in named():
            if id(t) not in names:
                names[id(t)] = (kind, name, tuple(n for n in every.get(id(t), ()) if n != name))
    return names


def root_modules(sources) -> list[torch.nn.Module]:
    """The modules Dynamo's sources start from (`L['self']`, `G['model']`), in the frame it compiles.

    Read from the scope of the frame Dynamo is tracing (as Dynamo itself finds `self`); empty
    when called outside a Dynamo compile or when Dynamo's internals have moved.
    """
    try:
        scopes = dynamo_output_scopes()
    except Exception:  # not inside Dynamo: the caller keeps Dynamo's names
        return []
    found: list[torch.nn.Module] = []
    for source in sources:
        while getattr(source, "base", None) is not None:
            source = source.base
        for attribute, scope in scopes.items():
            obj = scope.get(getattr(source, attribute, None)) if isinstance(scope, dict) else None
            if isinstance(obj, torch.nn.Module) and all(obj is not m for m in found):
                found.append(obj)
    return found


def _short_path(file: str) -> str:
    parts = file.replace("\\", "/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else file
