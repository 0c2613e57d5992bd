"""Run a Dynamo graph once on fake tensors and record what PyTorch itself does.

Instead of keeping a table of every spelling of "in place" (`add_`, `x += y`, `x[m] = 0`,
`out=`, `inplace=True`, custom ops with mutable schemas, ...), the run watches the
version counters of each node's tensor arguments: any op that writes a tensor bumps its
counter, whatever it is called. Two kinds of writes leave the counter alone and are
caught otherwise: writes through `.data` (the alias has its own counter, so the root's
counter does not move: that is what makes them invisible to autograd) and the writes that
PyTorch's schemas hide (batch norm's running statistics, listed in `_HIDDEN_WRITES`). Every
tensor passed in `out=` is written, whether or not a counter shows it (`_match_eager_out_versions`).
`p.data = v` (Dynamo: `set_` and a version fix-up) rebinds `p` to another storage: it is a write
of `p`, hidden from autograd (`_record_rebind`).

The same run installs `saved_tensors_hooks`, so it sees exactly which tensors autograd
saves, for which node, at which version: the facts behind the "modified by an inplace
operation" error, observed rather than guessed.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

__all__ = ["trace_mutations", "MutationTrace", "Write", "SavedTensor"]

StorageKey = StorageWeakRef


@dataclass
class Write:
    """One tensor written by one node."""

    node: torch.fx.Node
    arg: torch.fx.Node  # the argument node whose value was written (maybe a view)
    tensor: torch.Tensor
    storage: StorageKey
    autograd_visible: bool  # did the write bump the version counter autograd checks?
    grad_enabled: bool
    how: str  # "version" (counter moved), "schema" (a write the schema hides), "rebind" (`set_`, `.data =`)
    # The placeholder whose tensor a `.data =` rebound onto this storage earlier: it owns what
    # is written now (`p.data = t; p.data.mul_(2)` writes `p`, not `t`'s producer).
    owner: torch.fx.Node | None = None
    region: torch.Tensor | None = None  # the part of `tensor` written, when known to be less


@dataclass
class SavedTensor:
    """One tensor autograd saved for backward while running `node`."""

    node: torch.fx.Node
    tensor: torch.Tensor
    version: int
    storage: StorageKey | None
    mutated_by: torch.fx.Node | None = None  # first write that moved its version
    hidden_writes: list[torch.fx.Node] = field(default_factory=list)
    # False when backward checks the tensor's version but never reads its values (see
    # `_SAVED_UNREAD`): a write autograd does not see cannot change the gradients then.
    values_read: bool = True
    _last_version: int = 0


@dataclass
class MutationTrace:
    """What one fake run of a graph observed."""

    writes: list[Write]
    saved: list[SavedTensor]
    storage_root: dict[StorageKey, torch.fx.Node]  # the node that first produced each storage
    storages_read: dict[torch.fx.Node, set[StorageKey]]  # tensor arguments' storages
    storages_made: dict[torch.fx.Node, set[StorageKey]]  # outputs' storages
    grad_enabled: dict[torch.fx.Node, bool]
    # Dynamo drops `grapharg` from placeholders once compiled; keep their sources for naming.
    sources: dict[torch.fx.Node, Any] = field(default_factory=dict)
    # Whether each placeholder's tensor requires grad as the graph starts (a parameter with
    # `requires_grad=False`, a momentum copy, trains nothing).
    requires_grad: dict[torch.fx.Node, bool] = field(default_factory=dict)
    # Graph output positions whose backward runs through the autograd nodes a node made.
    # A saved tensor matters only there: behind `.detach()`, `.data`, `no_grad` or an
    # output that needs no grad, backward never unpacks it, so a later write is harmless.
    backward_outputs: dict[torch.fx.Node, frozenset[int]] = field(default_factory=dict)
    # The same for placeholders: the output positions whose backward reaches the input.
    placeholder_reach: dict[torch.fx.Node, frozenset[int]] = field(default_factory=dict)

    def writes_by_node(self) -> dict[torch.fx.Node, list[Write]]:
        grouped: dict[torch.fx.Node, list[Write]] = {}
        for write in self.writes:
            grouped.setdefault(write.node, []).append(write)
        return grouped


def _batch_norm_writes(args: tuple, kwargs: dict) -> list[int | str]:
    # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    # the running stats are updated in training mode, without a version bump even in eager.
    training = args[5] if len(args) > 5 else kwargs.get("training", False)
    return [1, 2] if training else []


def _instance_norm_writes(args: tuple, kwargs: dict) -> list[int | str]:
    use_input_stats = args[5] if len(args) > 5 else kwargs.get("use_input_stats", True)
    return [1, 2] if use_input_stats else []


# Writes that neither the version counter nor the Python-level schema shows; the value
# says which argument positions are written for the given call.
_HIDDEN_WRITES: dict[Any, Callable[[tuple, dict], list[int | str]]] = {
    torch.nn.functional.batch_norm: _batch_norm_writes,
    torch.batch_norm: _batch_norm_writes,
    torch.nn.functional.instance_norm: _instance_norm_writes,
    torch.instance_norm: _instance_norm_writes,
}


# `out=` ops whose eager kernel writes the out tensor through an alias with a counter of its
# own (`kron` writes a `_unsafe_view` of it), so eager bumps no version: the write is hidden
# from autograd. Measured on torch 2.13: every other out= op tried bumps each out tensor.
_OUT_UNVERSIONED_IN_EAGER = frozenset({torch.kron, torch.ops.aten.kron.out})


def storage_key(value: Any) -> StorageKey | None:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _tensor_args(node: torch.fx.Node, env: dict) -> Iterator[tuple[torch.fx.Node, torch.Tensor]]:
    for leaf in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(leaf, torch.fx.Node):
            value = env.get(leaf)
            for v in pytree.tree_leaves(value):
                if isinstance(v, torch.Tensor):
                    yield leaf, v


# Arguments autograd saves but whose values the backward never reads, for the given call.
# Training-mode batch norm saves `running_mean`/`running_var` (its backward formula takes
# them, so their versions are checked), yet computes the gradient from the batch statistics
# it saved itself; eval mode does read them. So a module applied twice in one forward, whose
# second call updates the running statistics the first call saved, trains correctly.
_SAVED_UNREAD: dict[Any, Callable[[tuple, dict], list[int | str]]] = {
    torch.nn.functional.batch_norm: _batch_norm_writes,
    torch.batch_norm: _batch_norm_writes,
}


def _argument_values(node: torch.fx.Node, rules: dict, args: tuple, kwargs: dict) -> list[Any]:
    """What `rules[node.target]` selects, as (argument node, runtime value) pairs."""
    rule = rules.get(node.target) if node.op == "call_function" else None
    if rule is None:
        return []
    picked = []
    for p in rule(args, kwargs):
        if isinstance(p, int):
            picked.append((node.args[p] if p < len(node.args) else None, args[p] if p < len(args) else None))
        else:
            picked.append((node.kwargs.get(p), kwargs.get(p)))
    return picked


def _hidden_write_args(node: torch.fx.Node, args: tuple, kwargs: dict) -> list[Any]:
    return [arg for arg, _ in _argument_values(node, _HIDDEN_WRITES, args, kwargs)]


class _TracingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, fake_mode):
        super().__init__(gm, garbage_collect_values=False)
        self.fake_mode = fake_mode
        self.current: torch.fx.Node | None = None
        self.trace = MutationTrace([], [], {}, {}, {}, {})
        self._saved_by_storage: dict[StorageKey, list[SavedTensor]] = {}
        self._grad_fns: dict[torch.fx.Node, list[Any]] = {}  # autograd nodes each node made
        self._known_fns: set[Any] = set()  # autograd nodes that existed before the current node
        self._unread: list[Any] = []  # the current node's saved-but-unread argument values
        self._placeholder_fns: dict[torch.fx.Node, list[Any]] = {}
        self._rebound: dict[StorageKey, torch.fx.Node] = {}  # storage -> placeholder a `.data =` moved onto it

    # -- saved tensor hooks -------------------------------------------------------------
    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.current is not None:
            version = _version(tensor)
            record = SavedTensor(self.current, tensor, version or 0, storage_key(tensor), _last_version=version or 0,
                                 values_read=not any(tensor is u for u in self._unread))
            self.trace.saved.append(record)
            if record.storage is not None:
                self._saved_by_storage.setdefault(record.storage, []).append(record)
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    # -- the run --------------------------------------------------------------------------
    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            value = self.fake_mode.from_tensor(value, static_shapes=True)
        return value

    def run_node(self, n: torch.fx.Node) -> Any:
        trace = self.trace
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            inputs = list(_tensor_args(n, self.env))
            # Reading a view whose base was written since regenerates its `grad_fn`: let that
            # happen now, so the nodes the op itself makes are the only new ones after it.
            _new_grad_fns(_grad_fns([t for _, t in inputs]), self._known_fns)
            before = [_version(t) for _, t in inputs]
            roots_before = self._root_versions(inputs)
            rebound = self.env.get(n.args[0]) if _is_rebind(n) else None
            rebound_from = (storage_key(rebound), _version(rebound)) if isinstance(rebound, torch.Tensor) else None
            trace.grad_enabled[n] = torch.is_grad_enabled()
            self.current = n
            self._unread = [v for _, v in _argument_values(n, _SAVED_UNREAD, args, kwargs)]
            try:
                result = getattr(self, n.op)(n.target, args, kwargs)
            finally:
                self.current = None
                self._unread = []
        trace.storages_read[n] = {k for _, t in inputs if (k := storage_key(t)) is not None}
        made = {k for v in pytree.tree_leaves(result) if (k := storage_key(v)) is not None}
        trace.storages_made[n] = made
        for key in made:
            trace.storage_root.setdefault(key, n)
        for arg in _autograd_function_saved_args(n, self.module):
            self.current = n
            self.pack(self.env[arg])
            self.current = None
        if n.op == "placeholder":
            # A leaf's node is its `AccumulateGrad` (found by `variable`); a non-leaf's, its grad_fn now.
            self._placeholder_fns[n] = _grad_fns(pytree.tree_leaves(result))
            _new_grad_fns(self._placeholder_fns[n], self._known_fns)
        else:
            first = len(trace.writes)
            if rebound_from is not None and rebound_from[0] is not None:
                self._record_rebind(n, rebound, *rebound_from)
            else:
                self._record_writes(n, args, kwargs, inputs, before, roots_before)
            written = [w.tensor for w in trace.writes[first:]]
            made = _new_grad_fns(_grad_fns([*pytree.tree_leaves(result), *written], written), self._known_fns)
            self._grad_fns[n] = [fn for fn in made if type(fn).__name__ != "AccumulateGrad"]
        return result

    def _owner(self, key: StorageKey) -> torch.fx.Node | None:
        return self._rebound.get(key) or self.trace.storage_root.get(key)

    def call_function(self, target, args, kwargs):
        if _is_version_fixup(target):
            return args[0]  # `.data =`'s version fix-up: `_record_rebind` already left the counter as eager does
        return super().call_function(target, args, kwargs)

    def _record_rebind(self, n: torch.fx.Node, t: torch.Tensor, key: StorageKey, version: int | None) -> None:
        # `t.set_(v)` (and `t.data = v`, which Dynamo spells `set_` plus a version fix-up) makes
        # `t` point at `v`'s storage: a write of `t`, whose old storage is what names it. Eager
        # `.data =` leaves the version counter alone (hidden from autograd); `set_` bumps it.
        if _is_data_assignment(n) and version is not None:
            torch._C._autograd._unsafe_set_version_counter((t,), (version,))
        visible = version is not None and _version(t) != version
        grad_enabled = self.trace.grad_enabled[n]
        after = n.next
        if _is_data_assignment(n) and after.op == "call_function" and after.target is torch._C._set_grad_enabled:
            grad_enabled = bool(after.args[0])  # Dynamo wraps the `set_` in no_grad; the user's mode comes back
        self.trace.writes.append(Write(n, n.args[0], t, key, visible, grad_enabled, "rebind", self._rebound.get(key)))
        owner = self._rebound.get(key) or self.trace.storage_root.get(key)
        new_key = storage_key(t)
        if new_key is not None and owner is not None and owner.op == "placeholder":
            self._rebound[new_key] = owner
        if visible:
            self._check_saved(n, key, t)  # the counter moved: every saved view of `t` is stale
        # A saved view of `t` keeps the old storage, and backward its old values (measured in
        # eager: `linear` saves `w.t()`, its input gradient uses the old `w`). Saved as itself
        # (`x * w` saves `w`), `t` is the very tensor rebound: backward reads the new storage.
        for record in list(self._saved_by_storage.get(key, ())):
            if record.tensor is t and record.node is not n:
                if not visible:
                    record.hidden_writes.append(n)
                if new_key is not None:
                    self._saved_by_storage.setdefault(new_key, []).append(record)

    def record_backward_reach(self, outputs: list[Any]) -> None:
        # All the autograd nodes an op made count, not only its result's `grad_fn`: writing
        # into a view's base regenerates the view's `grad_fn` (`F.linear` on a 1-D input
        # returns a view of an `addmm`, whose node holds what was saved), and a composite op
        # saves in inner nodes. Leaves' `AccumulateGrad` belong to no op.
        reach: list[set[Any]] = []
        for value in outputs:
            reach.append(set())
            _new_grad_fns(_grad_fns([value]), reach[-1])
        for n, fns in self._grad_fns.items():
            positions = frozenset(i for i, seen in enumerate(reach) if any(fn in seen for fn in fns))
            if positions:
                self.trace.backward_outputs[n] = positions
        for n, fns in self._placeholder_fns.items():
            value = self.env.get(n)
            positions = frozenset(
                i for i, seen in enumerate(reach)
                if any(fn in seen for fn in fns) or any(getattr(fn, "variable", None) is value for fn in seen)
            )
            if positions:
                self.trace.placeholder_reach[n] = positions

    def _root_versions(self, inputs: list) -> dict[StorageKey, int | None]:
        versions = {}
        for _, t in inputs:
            key = storage_key(t)
            root = self.env.get(self._owner(key)) if key is not None else None
            if isinstance(root, torch.Tensor):
                versions[key] = _version(root)
        return versions

    def _record_writes(self, n, args, kwargs, inputs, before, roots_before) -> None:
        out = _out_args(n)
        _match_eager_out_versions(n, out, inputs, before)
        bumped = [(arg, t) for (arg, t), v in zip(inputs, before) if v is not None and _version(t) != v]
        written = _pick_written(n, bumped)
        if not written and inputs and before[0] is None and _is_spelled_inplace(n):
            written = [inputs[0]]  # inference tensors have no version counter: trust the spelling
        # Every tensor passed in `out=` is written (its `.out` overload's schema says `Tensor(a!)`).
        hidden = {id(a) for a in [*_hidden_write_args(n, args, kwargs), *out]}
        for arg, t in inputs:
            if id(arg) in hidden and all(t is not w for _, w in written):
                written.append((arg, t))
        seen: set[int] = set()
        recorded: set[StorageKey] = set()
        for arg, t in written:
            if id(t) in seen:
                continue
            seen.add(id(t))
            key = storage_key(t)
            if key is None:
                continue
            by_version = any(t is b for _, b in bumped)
            # `.data` returns an alias with a counter of its own: writing through it leaves
            # the root's counter, the one autograd checks, where it was.
            root = self.env.get(self._owner(key))
            visible = by_version and (
                not isinstance(root, torch.Tensor) or root is t or _version(root) != roots_before.get(key)
            )
            region = _written_region(n, args, t, key)
            if key in recorded:
                # Another view of a storage this op already wrote (`out=[m[0], m[1]]`): one row
                # per target. A write autograd does not see still counts region by region.
                if not visible:
                    self._check_saved(n, key, region)
                continue
            recorded.add(key)
            self.trace.writes.append(Write(
                n, arg, t, key, visible, self.trace.grad_enabled[n], "version" if by_version else "schema",
                self._rebound.get(key), region if region is not t else None,
            ))
            self._check_saved(n, key, region)

    def _check_saved(self, n: torch.fx.Node, key: StorageKey, written: torch.Tensor) -> None:
        for record in self._saved_by_storage.get(key, ()):
            now = _version(record.tensor) or 0
            if record.node is n:
                # An in-place op saves its inputs before it writes and its result after:
                # `relu_`'s result is current, but `t.mul_(t.detach())` saved `other` and
                # then bumped the counter `other` shares with `t`, which its own backward checks.
                if record.mutated_by is None and now != record.version:
                    record.mutated_by = n
                record._last_version = now
                continue
            if now != record._last_version:
                record._last_version = now
                if record.mutated_by is None and now != record.version:
                    record.mutated_by = n
            elif record.values_read and overlaps(record.tensor, written):
                record.hidden_writes.append(n)


def _grad_fns(values: list[Any], written: list[torch.Tensor] = ()) -> list[Any]:
    """The autograd nodes behind `values` and, for tensors written in place, their bases'.

    A write through a view rebases the base's history (`CopySlices` wraps the op's own
    backward node), so the written view's base node is the op's node too.
    """
    owners = [t for t in values if isinstance(t, torch.Tensor)]
    owners += [t._base for t in written if t._base is not None]
    fns = []
    for t in owners:
        try:
            fn = t.grad_fn if t.requires_grad else None
        except RuntimeError:  # a no_grad view whose base changed refuses even this
            fn = None
        if fn is not None:
            fns.append(fn)
    return fns


def _new_grad_fns(roots: list[Any], known: set[Any]) -> list[Any]:
    """The autograd nodes reachable from `roots` and not in `known`; adds them to `known`."""
    found = []
    stack = list(roots)
    while stack:
        fn = stack.pop()
        if fn is None or fn in known:
            continue
        known.add(fn)
        found.append(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def _autograd_function_saved_args(n: torch.fx.Node, gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    # A custom autograd.Function becomes `autograd_function_apply(fwd_body, bwd_body, *args)`;
    # at run time it keeps `ctx.save_for_backward` tensors in a closure, out of the hooks'
    # sight. Its fwd body returns (outputs, saved values): saved values that are the body's
    # own inputs are the caller's tensors, saved as eager PyTorch would save them.
    if n.op != "call_function" or getattr(n.target, "__name__", "") != "autograd_function_apply":
        return []
    try:
        fwd = getattr(gm, n.args[0].target)
        placeholders = list(fwd.graph.find_nodes(op="placeholder"))
        saved_values = next(iter(reversed(fwd.graph.nodes))).args[0][1]
        saved = [saved_values[i] for i in n.kwargs.get("saved_for_backward_idx", ())]
        return [n.args[2 + placeholders.index(v)] for v in saved if v in placeholders]
    except (AttributeError, IndexError, TypeError, ValueError):
        return []


def _written_region(n: torch.fx.Node, args: tuple, t: torch.Tensor, key: StorageKey) -> torch.Tensor:
    # `t[idx] = v` writes only `t[idx]`: when the index is basic slicing that is a view of
    # `t`, and the region tells a write beside a saved view from a write over it.
    if n.target is operator.setitem and len(args) > 1:
        try:
            region = t[args[1]]
        except Exception:
            return t
        if storage_key(region) == key:
            return region
    return t


def _out_args(n: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes passed in `out=`: one tensor, or a tuple or list of them (`max`, `svd`, `split_copy`)."""
    if n.op != "call_function":
        return []
    return [leaf for leaf in pytree.tree_leaves(n.kwargs.get("out")) if isinstance(leaf, torch.fx.Node)]


def _match_eager_out_versions(n: torch.fx.Node, out: list[torch.fx.Node], inputs: list, before: list) -> None:
    # Eager bumps the counter of every out tensor (the `.out` overload's ADInplaceOrView kernel,
    # or the writes inside it), but the fake run misses some: `split_with_sizes_copy`,
    # `split_copy`, `unbind_copy` (a list `out=`) and `linalg.matrix_rank` bump nothing on fake
    # tensors (measured on torch 2.13). Bump them here, so that the fake counters, and what the
    # saved-tensor checks conclude from them, are eager's. `kron` bumps nothing in eager either.
    if not out or n.target in _OUT_UNVERSIONED_IN_EAGER:
        return
    stale = [t for (arg, t), v in zip(inputs, before) if arg in out and v is not None and _version(t) == v]
    if stale:
        torch.autograd.graph.increment_version(stale)


def _pick_written(n: torch.fx.Node, bumped: list) -> list:
    # Views of the written tensor share its counter, so several arguments can show a bump
    # (`a.add_(a[0])`): the schema's written argument is the one we report. With `out=`,
    # every out tensor is written (`max(x, 1, out=(values, indices))` writes both).
    out = _out_args(n)
    if out:
        chosen = [(a, t) for a, t in bumped if any(a is o for o in out)]
        if chosen:
            return chosen
    if len(bumped) <= 1:
        return list(bumped)
    first = n.args[0] if n.args else None
    if n.op == "call_method" or n.target in (operator.setitem,) or _is_inplace_function(n):
        chosen = [(a, t) for a, t in bumped if a is first]
        if chosen:
            return chosen[:1]
    schema_written = _schema_written_args(n)
    if schema_written:
        chosen = [(a, t) for a, t in bumped if a in schema_written]
        if chosen:
            return chosen
    return bumped[:1]


def _is_rebind(n: torch.fx.Node) -> bool:
    """`t.set_(v)`, or `t.data = v` (Dynamo spells it `set_`), with a tensor `v`."""
    is_set = (n.op == "call_function" and n.target is torch.Tensor.set_) or (
        n.op == "call_method" and n.target == "set_"
    )
    return is_set and len(n.args) == 2 and isinstance(n.args[0], torch.fx.Node) and isinstance(n.args[1], torch.fx.Node)


def _is_version_fixup(target: Any) -> bool:
    # Dynamo follows the `set_` of `t.data = v` with `_lower_version_count_by_1(t)`, undoing
    # `set_`'s bump: eager `.data =` bumps nothing.
    return getattr(target, "__name__", None) == "_lower_version_count_by_1"


def _is_data_assignment(n: torch.fx.Node) -> bool:
    return any(u.op == "call_function" and _is_version_fixup(u.target) for u in n.users)


def _is_spelled_inplace(n: torch.fx.Node) -> bool:
    name = str(n.target) if n.op == "call_method" else ""
    return (name.endswith("_") and not name.endswith("__")) or n.target is operator.setitem or _is_inplace_function(n)


def _is_inplace_function(n: torch.fx.Node) -> bool:
    name = getattr(n.target, "__name__", "")
    return n.op == "call_function" and (
        (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or n.kwargs.get("inplace") is True
    )


def _schema_written_args(n: torch.fx.Node) -> set[torch.fx.Node]:
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return set()
    written = set()
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = n.args[i] if i < len(n.args) else n.kwargs.get(argument.name)
            for leaf in pytree.tree_leaves(value):
                if isinstance(leaf, torch.fx.Node):
                    written.add(leaf)
    return written


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Can `a` and `b` (same storage) touch the same elements? True when unsure."""
    try:
        ranges = []
        for t in (a, b):
            start = int(t.storage_offset()) * t.element_size()
            if t.numel() == 0:
                return False
            extent = sum((int(s) - 1) * abs(int(st)) for s, st in zip(t.shape, t.stride()))
            ranges.append((start, start + (extent + 1) * t.element_size()))
    except (TypeError, RuntimeError):  # symbolic sizes: stay conservative
        return True
    (a0, a1), (b0, b1) = ranges
    return a0 < b1 and b0 < a1


def _fake_inputs(gm: torch.fx.GraphModule, example_inputs: list, fake_mode) -> list:
    """Fresh fakes shaped like Dynamo's, so our writes never touch Dynamo's own fakes."""
    fakes = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bases: dict[StorageKey, torch.Tensor] = {}
    groups: dict[StorageKey, int] = {}
    metas = [p.meta.get("example_value") for p in placeholders]
    for meta in metas:
        key = storage_key(meta)
        if key is not None:
            groups[key] = groups.get(key, 0) + 1
    with fake_mode:
        for meta, real in zip(metas, example_inputs):
            if meta is None and isinstance(real, torch.Tensor):
                meta = fake_mode.from_tensor(real)
            if not isinstance(meta, torch.Tensor):
                fakes.append(meta if meta is not None else real)
                continue
            # Dynamo's fakes show the state at the END of tracing: a buffer that an in-place op
            # with a grad-requiring operand turned into a non-leaf already reads as one. The real
            # inputs have not run yet, so they tell how the graph starts.
            source = real if isinstance(real, torch.Tensor) else meta
            requires_grad, is_leaf = source.requires_grad, source.is_leaf
            key = storage_key(meta)
            if key is not None and groups[key] > 1 and not requires_grad:
                # Inputs that alias each other stay aliased: views of one shared base.
                if key not in bases:
                    bases[key] = torch.empty(
                        meta.untyped_storage().nbytes() // meta.element_size(), dtype=meta.dtype, device=meta.device
                    )
                fakes.append(bases[key].as_strided(meta.shape, meta.stride(), meta.storage_offset()))
                continue
            fake = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=meta.device)
            if requires_grad:
                fake.requires_grad_()
                if not is_leaf:  # e.g. a tensor from the graph before a graph break
                    fake = fake.clone()
            fakes.append(fake)
    return fakes


def trace_mutations(gm: torch.fx.GraphModule, example_inputs: list, fake_mode=None) -> MutationTrace:
    """Run `gm` once on fake tensors and return the writes and saved tensors it observed.

    Expects a Dynamo graph (placeholders carry `example_value`). Never touches the user's
    tensors: every input is a fresh fake tensor in Dynamo's fake mode.
    """
    if fake_mode is None:
        fake_mode = torch._guards.detect_fake_mode(example_inputs) or torch._subclasses.FakeTensorMode()
    interpreter = _TracingInterpreter(gm, fake_mode)
    for node in gm.graph.find_nodes(op="placeholder"):
        interpreter.trace.sources[node] = getattr(node.meta.get("grapharg"), "source", None)
    fakes = _fake_inputs(gm, example_inputs, fake_mode)
    for node, fake in zip(gm.graph.find_nodes(op="placeholder"), fakes):
        if isinstance(fake, torch.Tensor):
            interpreter.trace.requires_grad[node] = fake.requires_grad
    # `.item()` on a fake makes an unbacked symbol that a tracer would bind to its graph
    # node; ours is no tracer, and a symbol left pending breaks the next `make_fx` of the
    # graph (functionalize, AOTAutograd) with `PendingUnbackedSymbolNotFound`.
    shape_env = getattr(fake_mode, "shape_env", None)
    unbacked = shape_env.ignore_fresh_unbacked_symbols() if shape_env is not None else contextlib.nullcontext()
    with fake_mode, unbacked, torch.autograd.graph.saved_tensors_hooks(interpreter.pack, interpreter.unpack):
        with torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad():
            interpreter.run(*fakes)
    output_node = next(iter(reversed(gm.graph.nodes)))
    outputs = [interpreter.env.get(a) for a in pytree.tree_leaves(output_node.args) if isinstance(a, torch.fx.Node)]
    interpreter.record_backward_reach(outputs)
    return interpreter.trace
