"""The torch internals fxinplace leans on, in one place: tested releases and private APIs.

`functionalize` leans on torch internals (functionalization, AOTAutograd's input mutations,
`make_fx`, Dynamo's graph metadata) that change between releases, and a change there shows as
wrong gradients, not as an error. On a release outside the tested range it refuses: the graph
is compiled unchanged unless the user opts in (option `untested_torch`). The audit only reads;
it runs and says once that the release is untested.

Below the version gate, each private torch API we use (`torch._*`, `torch._C`, Dynamo's node
metadata, `torch.utils._pytree`) has one name here: a small function, or the torch object
itself where a caller is a hot path (the training guard) or an `isinstance` check; with what we
rely on and the releases it differs between. The rest of fxinplace imports them from here, and
`tests/test_compat.py` states each behaviour against torch. Dynamo and Inductor are imported
when first asked for. Left outside: documented tensor attributes (`_version`, `_base`) and the
`meta["val"]` of `make_fx` graphs (the export IR's documented key).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from typing import Any, Callable, ContextManager

import torch
import torch.fx
import torch.fx.traceback
from torch._dispatch.python import enable_python_dispatcher
from torch._vendor.packaging.version import Version
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

__all__ = [
    "TESTED_TORCH", "torch_is_tested", "tested_range", "warn_untested_once",
    "SHALLOW_COPY_DATA", "is_data_assignment_op", "is_version_fixup", "make_fx_aten",
    # ops and schemas
    "OpOverload", "OpOverloadPacket", "HigherOrderOperator", "hop_name", "schema_of", "overload_name",
    "SET_GRAD_ENABLED", "NATIVE_BATCH_NORM_LEGIT", "foreach_copy_", "pytree",
    # graph metadata
    "preserve_node_meta", "origin_names", "stack_trace", "nn_module_stack", "example_value", "graph_arg_source",
    "graph_break_reason", "interpreting",
    # fake tensors
    "FakeTensor", "FakeTensorMode", "detect_fake_mode", "fake_mode_of", "unset_fake_temporarily",
    "fake_from_real", "ignore_fresh_unbacked_symbols", "enable_python_dispatcher",
    # storages and version counters
    "StorageWeakRef", "set_version", "resumes", "resumed_at", "preserve_version_counter", "increment_version",
    # Dynamo, Inductor and the backend registry
    "current_compile_id", "traced_code", "dynamo_output_scopes", "graph_output_roles", "inductor_compile_fx",
    "inductor_mode_options", "lookup_backend", "list_backends", "dynamo_reset", "compile_backend", "default_backend",
    "trace_artifact",
    # the torch-function mode stack and autograd (the training guard)
    "len_torch_function_stack", "torch_function_stack_at", "pop_torch_function_stack",
    "push_torch_function_stack", "current_autograd_node", "TENSOR_DATA", "DisableTorchFunction",
    "inplace_error_versions", "failed_backward", "gradient_edge_node", "stale_saves_of_node",
    # FSDP2 (the training guard)
    "fsdp_params", "fsdp_gathered",
]

TESTED_TORCH = ((2, 13), (2, 14))  # the (major, minor) releases tested: README's "Supported torch versions"


def torch_is_tested(version: str | None = None) -> bool:
    """Is this torch release (default: the one imported) a tested one? Nightlies and release
    candidates count as their release; a local build tag (`+cpu`, `+cu128`) does not matter."""
    return Version(version or torch.__version__).release[:2] in TESTED_TORCH


def tested_range() -> str:
    return " or ".join(f"=={major}.{minor}.*" for major, minor in TESTED_TORCH)


_warned = False


def warn_untested_once() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"fxinplace: torch {torch.__version__} is outside the tested range (torch {tested_range()}): the audit "
        "runs, but its facts were not checked on this release; `functionalize` compiles graphs unchanged "
        "unless you pass options={'untested_torch': True}.",
        UserWarning,
        stacklevel=3,
    )


# -- Dynamo's spelling of `t.data = v` ----------------------------------------------------------
# torch 2.13: `set_(t, v)`, then `_lower_version_count_by_1(t)` to undo `set_`'s version bump.
# torch 2.14: one op, `aten.shallow_copy_data_(t, v)` (no bump, no fix-up); it does not exist
# in 2.13. On fake tensors it need not move `t` onto `v`'s storage as eager does.
SHALLOW_COPY_DATA = getattr(torch.ops.aten, "shallow_copy_data_", None)


def is_data_assignment_op(target: Any) -> bool:
    """Is `target` torch 2.14's one-op spelling of `t.data = v`?"""
    return SHALLOW_COPY_DATA is not None and (target is SHALLOW_COPY_DATA or target is SHALLOW_COPY_DATA.default)


def is_version_fixup(target: Any) -> bool:
    """Is `target` the version fix-up torch 2.13's Dynamo puts after the `set_` of `t.data = v`?"""
    return getattr(target, "__name__", None) == "_lower_version_count_by_1"


# -- make_fx ---------------------------------------------------------------------------------------
def make_fx_aten(fn: Callable, decompositions: dict | None = None) -> Callable:
    """`make_fx` to ATen ops (no pre-dispatch), with `decompositions` and nothing more.

    torch 2.14's `make_fx`, given no table, adds `aten.detach -> aten.alias`: the graph would
    lose every `.detach()` / `.data` cut. An explicit table (even empty) keeps `detach`.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, dict(decompositions or {}), pre_dispatch=False)


# -- ops and schemas -------------------------------------------------------------------------------
# `torch._ops`' classes: the only spelling of the types of `torch.ops.aten.add_.Tensor`,
# `torch.ops.aten.add_` and of higher-order ops (`wrap`, `cond`, `tag_activation_checkpoint`).
OpOverload = torch._ops.OpOverload
OpOverloadPacket = torch._ops.OpOverloadPacket
HigherOrderOperator = torch._ops.HigherOrderOperator


def hop_name(target: Any) -> str | None:
    """The name of a higher-order op (`"wrap"`, `"tag_activation_checkpoint"`), None for anything else."""
    return target.name() if isinstance(target, HigherOrderOperator) else None


def schema_of(op: Any) -> Any:
    """`op`'s `torch._C.FunctionSchema` (its `arguments`, `returns`, each `alias_info` with
    `is_write` and `before_set`, and `name` `"aten::add_"`), None for what has none."""
    return getattr(op, "_schema", None)


def overload_name(op: OpOverload) -> str:
    """`"Tensor"` for `aten.add_.Tensor`, `"default"` for `aten.relu_.default`."""
    return op._overloadname


# Dynamo puts `torch._C._set_grad_enabled(mode)` nodes where `no_grad` / `enable_grad` begin and end.
SET_GRAD_ENABLED = torch._C._set_grad_enabled
# The torch-level spelling of batch norm with its running-stat writes in the schema (Dynamo graphs).
NATIVE_BATCH_NORM_LEGIT = torch._native_batch_norm_legit
# One fused `copy_` over lists of tensors (each `dst[i].copy_(src[i])`; bumps each version).
foreach_copy_ = torch._foreach_copy_
# `pytree` (imported above, `torch.utils._pytree`): `tree_leaves` (None is a leaf),
# `tree_flatten_with_path` (key paths whose entries have `.key`, `.idx` or `.name`).


# -- graph metadata --------------------------------------------------------------------------------
# Under `preserve_node_meta`, `make_fx` gives each node it traces from an FX node's run a
# `meta["from_node"]`: a list of `NodeSource`s, the first naming the node it came from (only
# from a node whose meta is not empty, as Dynamo's never is).
preserve_node_meta = torch.fx.traceback.preserve_node_meta


def origin_names(node: torch.fx.Node) -> list[str]:
    """The names in `node.meta["from_node"]`, the node it came from first; [] without one."""
    return [s.name for s in node.meta.get("from_node", ())]


def origin_sources(node: torch.fx.Node) -> list[tuple[int | None, str]]:
    """(id of the graph it was in, name) for each node in `node.meta["from_node"]`: a node
    of a higher-order op's body (a checkpoint region, inlined by `make_fx`) names its own
    graph, whose node names may repeat the outer graph's."""
    return [(getattr(s, "graph_id", None), s.name) for s in node.meta.get("from_node", ())]


def stack_trace(node: torch.fx.Node) -> str | None:
    """Dynamo's `meta["stack_trace"]`: a traceback's text, innermost frame last."""
    return node.meta.get("stack_trace")


def nn_module_stack(node: torch.fx.Node) -> dict | None:
    """Dynamo's `meta["nn_module_stack"]`: {key: (path, module type)}, innermost module last."""
    return node.meta.get("nn_module_stack")


def example_value(node: torch.fx.Node) -> Any:
    """Dynamo's fake `meta["example_value"]` of a node (None when it set none)."""
    return node.meta.get("example_value")


def graph_arg_source(node: torch.fx.Node) -> Any:
    """The Dynamo `Source` of a placeholder (`meta["grapharg"].source`: `L['x']`,
    `L['self']._modules['fc']._parameters['weight']`), None without one."""
    return getattr(node.meta.get("grapharg"), "source", None)


def graph_break_reason(gm: torch.fx.GraphModule) -> tuple[str | None, bool]:
    """(why Dynamo ended the graph, whether at a graph break) from `gm.compile_subgraph_reason`."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    return getattr(reason, "reason", None), bool(getattr(reason, "graph_break", False))


def graph_break_frames(gm: torch.fx.GraphModule) -> list:
    """The user's stack where Dynamo ended `gm` (`traceback.FrameSummary`s, outer to inner):
    the last is the call Dynamo then runs itself, outside any graph."""
    return list(getattr(getattr(gm, "compile_subgraph_reason", None), "user_stack", None) or [])


def resume_function_name(function: str, line: int) -> str:
    """The name Dynamo gives the code that resumes `function` after a graph break at `line`
    (also after a second break: the first function's name, the later line)."""
    return f"torch_dynamo_resume_in_{function}_at_{line}"


def resumes(code: Any, function: str, file: str) -> bool:
    """Whether `code` is Dynamo's code resuming `function` of `file` after one of its breaks
    (the latest one: where the code resuming after a break breaks again before any op, no
    graph of it is compiled, and the next code compiled resumes after the second break)."""
    return code.co_filename == file and code.co_name.startswith(resume_function_name(function, 0)[:-1])


def resumed_at(code: Any) -> int:
    """The line of the break after which Dynamo's resume code `code` (see `resumes`) goes on."""
    return int(code.co_name.rsplit("_", 1)[1])


def interpreting(interpreter: torch.fx.Interpreter, node: torch.fx.Node) -> ContextManager:
    """`Interpreter.run_node`'s own scope around one node (sets `fx.traceback`'s current node)."""
    return interpreter._set_current_node(node)


# -- fake tensors ----------------------------------------------------------------------------------
FakeTensor = torch._subclasses.FakeTensor
FakeTensorMode = torch._subclasses.FakeTensorMode
unset_fake_temporarily = torch._subclasses.fake_tensor.unset_fake_temporarily
# The fake mode of the fake tensors among `inputs` (Dynamo's example inputs), None without any.
detect_fake_mode = torch._guards.detect_fake_mode


def fake_mode_of(inputs: Any) -> Any:
    """Dynamo's fake mode of `inputs`, or a new `FakeTensorMode` when they hold no fakes."""
    return detect_fake_mode(inputs) or FakeTensorMode()


def fake_from_real(fake_mode: Any, t: torch.Tensor, static_shapes: bool | None = None) -> torch.Tensor:
    """A fake of the real `t` in `fake_mode` (same shape, strides, dtype, device, requires_grad)."""
    if static_shapes is None:
        return fake_mode.from_tensor(t)
    return fake_mode.from_tensor(t, static_shapes=static_shapes)


def ignore_fresh_unbacked_symbols(fake_mode: Any) -> ContextManager:
    """A scope in which `.item()` on a fake leaves no unbacked symbol pending (for a later
    `make_fx`'s `PendingUnbackedSymbolNotFound`); nothing to do for a mode without a shape env."""
    shape_env = getattr(fake_mode, "shape_env", None)
    return shape_env.ignore_fresh_unbacked_symbols() if shape_env is not None else contextlib.nullcontext()


# -- storages and version counters -----------------------------------------------------------------
# `StorageWeakRef` (imported above, `torch.multiprocessing.reductions`): of `t.untyped_storage()`,
# equal and of one hash for every view of one storage.

def set_version(t: torch.Tensor, version: int) -> None:
    """Set `t._version` (shared by every view of `t`) to `version`."""
    torch._C._autograd._unsafe_set_version_counter((t,), (version,))


def is_multi_output_view(t: torch.Tensor) -> bool:
    """Whether `t` is a view autograd made as one of several outputs of one node (`chunk`,
    `unbind`, a compiled graph's outputs): such a view refuses in-place ops with grad on, and
    AOTAutograd refuses a compiled graph that writes one (fake tensors carry the mark too)."""
    multi_output = torch._C._autograd.CreationMeta.MULTI_OUTPUT_NODE
    return t._is_view() and torch._C._autograd._get_creation_meta(t) == multi_output


def current_sequence_nr() -> int:
    """The sequence number autograd gives the next node this thread makes (`Node._sequence_nr()`)."""
    return torch._C._autograd._get_sequence_nr()


def sequence_nr(node: Any) -> int:
    """The sequence number autograd gave `node` (a `grad_fn`) when it made it."""
    return node._sequence_nr()


def saves_of_node(node: Any) -> list[torch.Tensor]:
    """What autograd node `node` saved, read from its raw saved variables without unpacking
    them (no version check, no unpack hook runs). A save made under saved-tensor hooks holds
    what the hook packed, not the tensor: left out; so is one a backward already freed."""
    return [saved.data for _, raws in _raw_saves(node) for saved in raws if not _hooked_or_freed(saved)]


def _raw_saves(node: Any) -> list[tuple[str, list]]:
    """Each saved field of `node` (the name that unpacks it) with its raw saved variables: a
    custom Function's `saved_tensors`, a built-in node's `_saved_<name>` (some hold a list).
    A field a backward already freed (a Function's list then raises) is left out."""
    if function_class_of(node) is not None:
        names = [("_raw_saved_tensors", "saved_tensors")]
    else:
        names = [(name, name[len("_raw"):]) for name in dir(node) if name.startswith("_raw_saved_")]
    fields = []
    for raw_name, field in names:
        try:
            value = getattr(node, raw_name)
        except RuntimeError:
            continue
        fields.append((field, list(value) if isinstance(value, (list, tuple)) else [value]))
    return fields


def _hooked_or_freed(raw: Any) -> bool:
    try:
        return raw.unpack_hook is not None or not isinstance(raw.data, torch.Tensor)
    except (RuntimeError, AttributeError):
        return True


def function_class_of(node: Any) -> type | None:
    """The `torch.autograd.Function` subclass whose `apply` made `node`, or None."""
    return getattr(type(node), "_forward_cls", None)


# `with preserve_version_counter(tensors):` leaves their `_version`s as they were on entry.
preserve_version_counter = torch.autograd._unsafe_preserve_version_counter
# `increment_version(tensors)` bumps each tensor's `_version` by one (public, listed for the fakes' sake).
increment_version = torch.autograd.graph.increment_version


# -- Dynamo, Inductor and the backend registry -----------------------------------------------------
# Dynamo and Inductor are imported when first asked for: `import fxinplace` does not load them.

def current_compile_id() -> Any:
    """The `CompileId` ("0/0", frame/recompile) of the compile under way, None outside one."""
    return torch._guards.CompileContext.current_compile_id()


def traced_code() -> list:
    """The code objects Dynamo is tracing for the graph under way (the frame's code first); [] outside."""
    context = torch._guards.TracingContext.try_get()
    return list(getattr(context, "traced_code", None) or [])


def dynamo_output_scopes() -> dict[str, dict]:
    """{"local_name": f_locals, "global_name": f_globals} of the frame Dynamo is tracing now;
    raises outside a Dynamo trace."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    output = InstructionTranslator.current_tx().output
    return {"local_name": output.local_scope, "global_name": output.global_scope}


def graph_output_roles(gm: torch.fx.GraphModule) -> list[tuple[str, str] | None] | None:
    """What each output of the graph Dynamo is compiling now is, to the user's code; None
    outside a Dynamo trace or when Dynamo's state is not as expected.

    One entry per output position: ("returned", path) for a tensor in the value the frame
    returns (path: "" for the value itself, "seg" for a dict key, "[1]" for a position,
    "aux.depth" / "aux[0]" nested); ("live", name) at a graph break, for a tensor the code
    after the break goes on with (`name`: the local variable holding it, "" for one on the
    stack); ("stored", attr) for a tensor only stored as an attribute (`self.cache = t`); None
    for an output none of these reaches. Read from the instruction translator calling the
    backend: at `return` its stack holds the returned value; at a break, the stack and the
    locals are what the resumed code receives; attribute stores are its pending side effects.
    Read only: nothing here changes what Dynamo compiles.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables import BaseListVariable, ConstDictVariable, TensorVariable

        tx = InstructionTranslator.current_tx()
        out = next(iter(gm.graph.find_nodes(op="output")))
        nodes = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        position = {n.name: i for i, n in enumerate(nodes) if isinstance(n, torch.fx.Node)}
        roles: list[tuple[str, str] | None] = [None] * len(nodes)

        def visit(vt: Any, role: str, path: str, depth: int = 0) -> None:
            # Never realize a lazy tracker: that installs guards and may add graph inputs.
            # One still lazy was never used as a tensor in this graph.
            vt = vt.unwrap() if hasattr(vt, "unwrap") else vt
            if depth > 8 or (hasattr(vt, "is_realized") and not vt.is_realized()):
                return
            if isinstance(vt, TensorVariable):
                i = position.get(vt.as_proxy().node.name)
                if i is not None and roles[i] is None:
                    roles[i] = (role, path)
            elif isinstance(vt, ConstDictVariable):
                for key, value in vt.items.items():
                    name = key.vt.as_python_constant()
                    visit(value, role, f"{path}.{name}" if path else str(name), depth + 1)
            elif isinstance(vt, BaseListVariable):
                for j, item in enumerate(vt.items):
                    visit(item, role, f"{path}[{j}]", depth + 1)

        if graph_break_reason(gm)[1]:
            for name, vt in tx.symbolic_locals.items():
                visit(vt, "live", name)
            for vt in tx.stack:
                visit(vt, "live", "")
        else:
            for vt in tx.stack:
                visit(vt, "returned", "")
        for attrs in tx.output.side_effects.store_attr_mutations.values():
            for attr, vt in attrs.items():
                visit(vt, "stored", attr)
        return roles
    except Exception:  # a Dynamo internal moved: the caller names outputs without it
        return None


def inductor_compile_fx(gm: torch.fx.GraphModule, inputs: Any, config_patches: dict | None = None) -> Callable:
    """Inductor's own backend (what `backend="inductor"` runs), with config patches."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, inputs, config_patches=config_patches)


def inductor_mode_options(mode: str) -> dict:
    """The Inductor config a `torch.compile(mode=...)` sets (`"max-autotune"`: autotuning on)."""
    import torch._inductor

    return torch._inductor.list_mode_options(mode)


def lookup_backend(name: str) -> Callable:
    """The backend registered as `name` (`"eager"`, `"aot_eager"`, entry points); raises for an unknown one."""
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)


def list_backends() -> list[str]:
    """Every registered backend's name, debug and experimental ones included."""
    from torch._dynamo.backends.registry import list_backends

    return list_backends(exclude_tags=())


def compile_backend(backend: str | Callable, mode: str | None, options: dict | None, dynamic: bool | None,
                    name: str | None = None) -> Callable:
    """The backend object `torch.compile(backend=..., mode=..., options=...)` builds and hands to
    Dynamo: `_TorchCompileInductorWrapper` for "inductor" (mode and options as Inductor config),
    `_TorchCompileWrapper` for any other name or callable (mode and options as its keywords).
    Called as `backend(gm, example_inputs)`."""
    if backend == "inductor":
        return torch._TorchCompileInductorWrapper(mode, options, dynamic, name)
    return torch._TorchCompileWrapper(backend, mode, options, dynamic)


def default_backend() -> str | Callable:
    """The backend `torch.compile(backend=None)` uses ("inductor" unless configured otherwise)."""
    from torch._dynamo.backends.registry import get_default_backend

    return get_default_backend()


def dynamo_reset() -> None:
    """Drop Dynamo's compiled code and caches (`torch._dynamo.reset`)."""
    import torch._dynamo

    torch._dynamo.reset()


def trace_artifact(name: str, payload_fn: Callable[[], Any]) -> None:
    """Write a JSON artifact `name` into the structured log `TORCH_TRACE` turns on (what tlparse
    reads), under the compile id of the compile under way (`[0/0]`), beside Dynamo's own.

    `trace_structured("artifact", ...)` needs no registration: a named TORCH_LOGS artifact would
    have to be listed in torch's own `_registrations.py`, or `import torch` fails. `payload_fn`
    runs only while the trace log has a handler: without TORCH_TRACE, the first structured event
    (Dynamo's, before any backend runs) removes it.
    """
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "json"}, payload_fn=payload_fn)


# -- the torch-function mode stack and autograd (the training guard) -------------------------------
# Bound names, not functions: the guard's hot path binds them once and pays no extra call.
# The stack `TorchFunctionMode.__enter__` pushes on: its length, the mode at an index (top is
# `len - 1`), pop the top (returns it), push a mode (without running `__enter__`).
len_torch_function_stack = torch._C._len_torch_function_stack
torch_function_stack_at = torch._C._get_function_stack_at
pop_torch_function_stack = torch._C._pop_torch_function_stack
push_torch_function_stack = torch._C._push_on_torch_function_stack
# The autograd `Node` whose backward runs now (in a pack/unpack hook: the one unpacking), None outside.
current_autograd_node = torch._C._current_autograd_node
# The `Tensor.data` descriptor: `t.data` reaches a torch-function mode as its `__get__`, `t.data = v` as `__set__`.
TENSOR_DATA = torch._C.TensorBase.data
# A context in which torch functions skip every torch-function mode (the guard's value check
# computes its fingerprints there, unseen by the guard's own mode).
DisableTorchFunction = torch._C.DisableTorchFunction


# PyTorch's own in-place error, as `SavedVariable::unpack` words it (both releases): "... has been
# modified by an inplace operation: [torch.FloatTensor [8, 1]], which is output 0 of AsStrided, is
# at version 2; expected version 1 instead. Hint: ...". The guard names it on entries its hooks
# do not watch (`training_guard/_unwatched.py`).
_INPLACE_ERROR = re.compile(r"modified by an inplace operation: \[.*?\].*? is at version (\d+); expected version (\d+) instead")


def inplace_error_versions(message: str) -> tuple[int, int] | None:
    """(version now, version saved) from PyTorch's in-place error message; None for another message."""
    found = _INPLACE_ERROR.search(message)
    return (int(found[1]), int(found[2])) if found else None


def failed_backward(tb: Any) -> tuple[str, list[torch.Tensor], list[torch.Tensor] | None, Any] | None:
    """The innermost `torch.autograd.backward` / `torch.autograd.grad` call a traceback passes
    through (a Function's backward may call another): ("backward" or "autograd.grad", the
    tensors it started from, its `inputs` or None for all leaves, its frame), or None. Read from
    the frame's arguments, named as in the public signatures (`tensors` / `outputs`, `inputs`)."""
    calls = {inspect.unwrap(torch.autograd.backward).__code__: ("backward", "tensors"),
             inspect.unwrap(torch.autograd.grad).__code__: ("autograd.grad", "outputs")}
    found = None
    while tb is not None:
        frame = tb.tb_frame
        call = calls.get(frame.f_code)
        if call is not None:
            found = (call, frame)
        tb = tb.tb_next
    if found is None:
        return None
    (kind, roots_name), frame = found
    roots, inputs = (_tensors(frame.f_locals.get(name)) for name in (roots_name, "inputs"))
    return kind, roots, inputs or None, frame


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = x.values()
    return [t for t in (x or ()) if isinstance(t, torch.Tensor)]


def gradient_edge_node(t: torch.Tensor) -> Any:
    """The node whose input receives `t`'s gradient (its grad_fn, or a leaf's accumulator)."""
    return torch.autograd.graph.get_gradient_edge(t).node


def stale_saves_of_node(node: Any) -> list[tuple[torch.Tensor, str]]:
    """What `node` saved that fails autograd's version check now, each with the check's message.

    Each raw saved variable is unpacked on its own (`SavedTensor.unpack`), which runs the check
    and nothing else; saves made under saved-tensor hooks (whose unpack would run the hook) are
    left out, and so are saves a backward already freed. A saved output unpacks only through its
    node (`node._saved_<name>`, a Function's `saved_tensors`, which pass its grad_fn): for those
    the message is told apart by shape and version, and names none where two would fit."""
    found: list[tuple[torch.Tensor, str]] = []
    for field, raws in _raw_saves(node):
        if not raws or any(_hooked_or_freed(r) for r in raws):
            continue
        outputs = []
        for raw in raws:
            try:
                raw.unpack()
            except RuntimeError as e:
                if inplace_error_versions(str(e)):
                    found.append((raw.data, str(e)))
                else:  # a saved output: no grad_fn to give it here
                    outputs.append(raw)
        if not outputs:
            continue
        try:
            getattr(node, field)
        except RuntimeError as e:
            message = str(e)
            versions = inplace_error_versions(message)
            if versions is None or any(message == words for _, words in found):
                continue
            fits = [r for r in outputs if r.data._version == versions[0] and f" {list(r.data.shape)}]" in message]
            if len(fits) == 1:
                found.append((fits[0].data, message))
    return found


# -- FSDP2 (the training guard) --------------------------------------------------------------------
# Private FSDP2 state, stated by tests/test_guard_distributed.py (it needs two gloo ranks): the
# per-parameter records of a `fully_shard` module, and the tensor its all-gather writes into.

def fsdp_params(module: torch.nn.Module) -> list:
    """The `FSDPParam`s `fully_shard(module)` manages (each with `.sharded_param`); [] for another module."""
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    if not isinstance(module, FSDPModule):
        return []
    group = module._get_fsdp_state()._fsdp_param_group
    return list(group.fsdp_params) if group is not None else []


def fsdp_gathered(fsdp_param: Any) -> torch.Tensor | None:
    """The unsharded tensor the next all-gather of a resharded parameter writes into (autograd
    saved it, or a view of it); None while the parameter is still unsharded."""
    if getattr(getattr(fsdp_param, "sharded_state", None), "name", None) == "UNSHARDED":
        return None
    return getattr(fsdp_param, "_unsharded_param", None)
