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
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from .._sources import qualified_name_of

__all__ = ["trace_mutations", "MutationTrace", "Write", "SavedTensor", "output_nodes", "is_data_assignment"]

log = logging.getLogger(__name__)

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
    # For a write inside a higher-order op's subgraph (a custom autograd.Function's forward,
    # a checkpoint region, ...): the body node that wrote. `node` is then the op's call.
    inner: torch.fx.Node | None = None


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
    # Facts from inside a higher-order op's subgraph (`node` or `mutated_by` is then the op's
    # call): the body node that saved it, the body node whose write moved its version, and
    # (op call, body node) for each write to it that autograd does not see.
    inner: torch.fx.Node | None = None
    mutated_inside: torch.fx.Node | None = None
    hidden_inside: list[tuple[torch.fx.Node, torch.fx.Node]] = field(default_factory=list)
    # Saved inside a non-reentrant checkpoint region (or read there from module state): backward
    # recomputes it from the values it finds then, with no version check, so a write to it is
    # silent: it matters when the recomputation reads or replays it.
    recomputed: bool = False


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
    # The tensors of the subgraph dry runs: some of their storages are keys above, and a
    # storage freed while tracing goes on could come back at the same address.
    subgraph_values: list[Any] = field(default_factory=list)

    def writes_by_node(self) -> dict[torch.fx.Node, list[Write]]:
        grouped: dict[torch.fx.Node, list[Write]] = {}
        for write in self.writes:
            grouped.setdefault(write.node, []).append(write)
        return grouped


def _running_stats(positions: tuple[int, int], flag: str, default: bool) -> Callable[[tuple, dict], list[int | str]]:
    """The running-statistics arguments a norm call updates: `positions` when its `flag`
    (argument 5 in every signature below) is set. Eager bumps no version for these writes."""

    def written(args: tuple, kwargs: dict) -> list[int | str]:
        on = args[5] if len(args) > 5 else kwargs.get(flag, default)
        names = ("running_mean", "running_var")
        return [p if p < len(args) else name for p, name in zip(positions, names)] if on else []

    return written


# F.batch_norm(input, running_mean, running_var, weight, bias, training, ...) and
# torch.batch_norm(input, weight, bias, running_mean, running_var, training, ...): the same
# facts at other positions (likewise instance_norm with `use_input_stats`). The ATen ops
# `torch.native_batch_norm` and `torch._native_batch_norm_legit` take torch.batch_norm's
# positions; eager bumps no version for them either, with or without `out=` (measured on
# torch 2.13, though the latter's schema marks `running_mean(a!)`). Its `no_stats` overload
# has a bool at position 3: no tensor argument, nothing picked.
_batch_norm_writes = _running_stats((1, 2), "training", False)
_aten_batch_norm_writes = _running_stats((3, 4), "training", False)
_instance_norm_writes = _running_stats((1, 2), "use_input_stats", True)
_aten_instance_norm_writes = _running_stats((3, 4), "use_input_stats", True)


# Writes that neither the version counter nor the Python-level schema shows; the value
# says which argument positions are written for the given call.
_HIDDEN_WRITES: dict[Any, Callable[[tuple, dict], list[int | str]]] = {
    torch.nn.functional.batch_norm: _batch_norm_writes,
    torch.batch_norm: _aten_batch_norm_writes,
    torch.native_batch_norm: _aten_batch_norm_writes,
    torch._native_batch_norm_legit: _aten_batch_norm_writes,
    torch.nn.functional.instance_norm: _instance_norm_writes,
    torch.instance_norm: _aten_instance_norm_writes,
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
    torch.batch_norm: _aten_batch_norm_writes,
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
        # A higher-order op's body dry runs, and how many saved tensors came before the op.
        self._body_runs: dict[torch.fx.Node, tuple[list[_BodyRun], int]] = {}

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
        for arg, read in _autograd_function_saved_args(n, self.module, self.env):
            self.current = n
            self.pack(self.env[arg])
            self.trace.saved[-1].values_read = read
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
            self._record_subgraph_facts(n, first)
            written = [w.tensor for w in trace.writes[first:]]
            made = _new_grad_fns(_grad_fns([*pytree.tree_leaves(result), *written], written), self._known_fns)
            self._grad_fns[n] = [fn for fn in made if type(fn).__name__ != "AccumulateGrad"]
        return result

    def _owner(self, key: StorageKey) -> torch.fx.Node | None:
        return self._rebound.get(key) or self.trace.storage_root.get(key)

    def call_function(self, target, args, kwargs):
        if _is_version_fixup(target):
            return args[0]  # `.data =`'s version fix-up: `_record_rebind` already left the counter as eager does
        n = self.current
        if isinstance(target, torch._ops.HigherOrderOperator) and n is not None:
            # What the bodies write, learned on copies before the op itself runs (see below).
            runs = _dry_run_bodies(n, target, args, self.fake_mode)
            if runs:
                self._body_runs[n] = (runs, len(self.trace.saved))
        return super().call_function(target, args, kwargs)

    def _record_rebind(self, n: torch.fx.Node, t: torch.Tensor, key: StorageKey, version: int | None) -> None:
        # `t.set_(v)` (and `t.data = v`, which Dynamo spells `set_` plus a version fix-up) makes
        # `t` point at `v`'s storage: a write of `t`, whose old storage is what names it. Eager
        # `.data =` leaves the version counter alone (hidden from autograd); `set_` bumps it.
        if is_data_assignment(n) and version is not None:
            torch._C._autograd._unsafe_set_version_counter((t,), (version,))
        visible = version is not None and _version(t) != version
        grad_enabled = self.trace.grad_enabled[n]
        after = n.next
        if is_data_assignment(n) and after.op == "call_function" and after.target is torch._C._set_grad_enabled:
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
                if not visible and record.values_read:
                    record.hidden_writes.append(n)
                if new_key is not None:
                    self._saved_by_storage.setdefault(new_key, []).append(record)

    def _record_subgraph_facts(self, n: torch.fx.Node, first: int) -> None:
        """Replace the op-level facts of a higher-order op call with its bodies' (see below)."""
        runs, mark = self._body_runs.pop(n, (None, 0))
        if not runs:
            return
        self.trace.subgraph_values.extend(run.values for run in runs)
        try:
            facts = _subgraph_facts(n, runs, self.trace, self.trace.saved[mark:], self._saved_by_storage, self.module)
        except Exception as e:  # a graph we do not understand: audit the op as one op
            log.warning("fxinplace: could not audit inside `%s` (%s: %s); auditing it as one op",
                        n.name, type(e).__name__, e)
            return
        facts.apply(n, self.trace, self._saved_by_storage, first)

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


def _autograd_function_saved_args(n: torch.fx.Node, gm: torch.fx.GraphModule, env: dict) -> list[tuple[torch.fx.Node, bool]]:
    # A custom autograd.Function becomes `autograd_function_apply(fwd_body, bwd_body, *args)`;
    # at run time it keeps `ctx.save_for_backward` tensors in a closure, out of the hooks'
    # sight. Its fwd body returns (outputs, saved values): saved values that are the body's
    # own inputs are the caller's tensors, saved as eager PyTorch would save them. Each comes
    # with whether the backward reads it for a gradient autograd wants (see `_read_for_grads`).
    if n.op != "call_function" or getattr(n.target, "__name__", "") != "autograd_function_apply":
        return []
    try:
        fwd = getattr(gm, n.args[0].target)
        placeholders = list(fwd.graph.find_nodes(op="placeholder"))
        saved_values = next(iter(reversed(fwd.graph.nodes))).args[0][1]
        read = _read_for_grads(getattr(gm, n.args[1].target), len(saved_values), n.args[2:], env)
        picked = [i for i in n.kwargs.get("saved_for_backward_idx", ()) if saved_values[i] in placeholders]
        return [(n.args[2 + placeholders.index(saved_values[i])], read[i]) for i in picked]
    except (AttributeError, IndexError, TypeError, ValueError):
        return []


def _read_for_grads(bwd: torch.fx.GraphModule, n_saved: int, inputs: Sequence, env: dict) -> list[bool]:
    """Per saved value: does the Function's backward use it for the gradient of an input that
    requires grad? Autograd drops the others, so their values cannot change a gradient."""
    placeholders = list(bwd.graph.find_nodes(op="placeholder"))
    grads = pytree.tree_leaves(bwd.graph.output_node().args)
    if n_saved > len(placeholders) or len(grads) != len(inputs):
        return [True] * n_saved  # a layout we do not know: every save counts
    wanted = {g for g, arg in zip(grads, inputs)
              if isinstance(g, torch.fx.Node) and getattr(env.get(arg), "requires_grad", True)}
    read = []
    for placeholder in placeholders[len(placeholders) - n_saved:]:
        seen, stack = set(), [placeholder]
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(node.users)
        read.append(bool(seen & wanted))
    return read


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


def is_data_assignment(n: torch.fx.Node) -> bool:
    """Is this `set_` Dynamo's spelling of `t.data = v` (followed by a version fix-up)?"""
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
    if not (a0 < b1 and b0 < a1):
        return False
    # Interleaved strided views (two columns of one matrix) share a range but no element.
    if a.element_size() != b.element_size() or a.numel() + b.numel() > _EXACT_OVERLAP_LIMIT:
        return True
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        return bool(torch.isin(_element_offsets(a), _element_offsets(b)).any())


_EXACT_OVERLAP_LIMIT = 1 << 22  # elements of both views, up to which they are compared one by one


def _element_offsets(t: torch.Tensor) -> torch.Tensor:
    offsets = torch.tensor([int(t.storage_offset())], dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(int(size), dtype=torch.int64) * int(stride)).flatten()
    return offsets


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
    interpreter.record_backward_reach([interpreter.env.get(a) for a in output_nodes(gm)])
    return interpreter.trace


def output_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes a graph returns, flattened, in output position order."""
    return [a for a in pytree.tree_leaves(gm.graph.output_node().args) if isinstance(a, torch.fx.Node)]


# -- Subgraphs of higher-order ops ------------------------------------------------------------
#
# A custom autograd.Function, a checkpoint region, `wrap`, `cond` and `while_loop` reach the
# graph as one call of a higher-order op (HOP) whose bodies are `get_attr` submodules. Run as
# one op, a body's write shows at most as a version bump of an operand, and not at all when it
# goes through `.data` (as a fused kernel writes its input buffer inside a Function's forward).
#
# So each body first runs alone, on copies of the operands that keep their storage layout and
# aliasing but have fresh version counters, in a nested tracing interpreter: that dry run tells
# which body node writes which operand region, whether autograd sees it, and what the body
# saves, in order. Then the op runs as before, on the real fakes: each write happens once, and
# autograd sees the op exactly as PyTorch builds it (a Function's own backward node, the saved
# inputs of a checkpoint). Last, the op's facts are refined with the dry run's: its writes
# become the body nodes' writes, and saved tensors are checked by the rules of the op (below).
# Anything unexpected leaves the op audited as one op, as before.

# How the saved tensors of a body behave, per HOP:
#   "plain":     the body runs as a call, saving by reference (wrap);
#   "recompute": non-reentrant checkpoint: its explicit inputs are saved (version-checked) at
#                entry, and what the body saves is recomputed in backward, which replays the
#                body up to its last save (early stop) on the inputs as they are then. Module
#                state the body reads (parameters, buffers) is not an explicit input: Dynamo
#                lifts it into the body's operands, indistinguishable from explicit ones, so
#                operands rooted in a parameter or buffer are taken as lifted;
#   "function":  autograd.Function: `ctx.save_for_backward` keeps references, checked against
#                versions from the moment forward returns; forward runs under no_grad;
#   "own":       the op saves its operands and its backward reruns the body with autograd
#                (cond, while_loop), so the body's saves behave as in plain code.
@dataclass(frozen=True)
class _Layout:
    bodies: Callable[[Sequence], list[tuple[Any, Sequence]]]  # the op's args -> [(body, operands)]
    saves: str
    grad: bool | None = None  # grad mode the body runs under; None: the mode around the call


_LAYOUTS = {
    "wrap": _Layout(lambda a: [(a[0], a[1:])], "plain"),
    "tag_activation_checkpoint": _Layout(lambda a: [(a[0], a[1:])], "recompute"),
    "autograd_function_apply": _Layout(lambda a: [(a[0], a[2:])], "function", grad=False),
    "cond": _Layout(lambda a: [(a[1], a[3]), (a[2], a[3])], "own"),
    "while_loop": _Layout(lambda a: [(a[0], (*a[2], *a[3])), (a[1], (*a[2], *a[3]))], "own"),
}


@dataclass
class _BodyRun:
    """One body's dry run on copies of the op's operands."""

    layout: _Layout
    body: torch.fx.GraphModule
    trace: MutationTrace  # on the copies
    order: dict[torch.fx.Node, int]  # the body's nodes, in order
    operands: list[tuple[Any, Any]]  # (the op's argument node, its value) per body placeholder
    copies: dict[StorageKey, int]  # a copy's storage -> the operand position it stands for
    values: list[Any]  # everything the dry run made, kept alive (see `MutationTrace.subgraph_values`)


def _dry_run_bodies(n: torch.fx.Node, target, args: tuple, fake_mode) -> list[_BodyRun]:
    layout = _LAYOUTS.get(target.name())
    if layout is None:
        return []
    try:
        runs = []
        for (body, values), (_, nodes) in zip(layout.bodies(args), layout.bodies(n.args), strict=True):
            run = _dry_run(body, list(values), list(nodes), layout, fake_mode)
            if run is None:
                return []
            runs.append(run)
        return runs
    except Exception as e:  # a layout we do not know: the op is audited as one op
        log.warning("fxinplace: could not run the body of `%s` alone (%s: %s); auditing it as one op",
                    n.name, type(e).__name__, e)
        return []


def _dry_run(body, values: list, nodes: list, layout: _Layout, fake_mode) -> _BodyRun | None:
    if not isinstance(body, torch.fx.GraphModule):
        return None
    if len(list(body.graph.find_nodes(op="placeholder"))) != len(values):
        return None
    copied = _copy_operands(values)
    if copied is None:
        return None
    copies, of_storage = copied
    nested = _TracingInterpreter(body, fake_mode)
    grad = torch.is_grad_enabled() if layout.grad is None else layout.grad
    # `set_grad_enabled` restores the mode on exit, whatever `_set_grad_enabled` nodes did.
    with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(nested.pack, nested.unpack):
        nested.run(*copies)
    nested.record_backward_reach([nested.env.get(a) for a in output_nodes(body)])
    order = {node: i for i, node in enumerate(body.graph.nodes)}
    kept = [copies, nested.env, nested.trace.subgraph_values]
    return _BodyRun(layout, body, nested.trace, order, list(zip(nodes, values)), of_storage, kept)


def _copy_operands(values: list) -> tuple[list, dict[StorageKey, int]] | None:
    """Fresh tensors laid out like `values` (same storage size, strides, offsets, aliasing)."""
    copies: list[Any] = []
    of_storage: dict[StorageKey, int] = {}
    roots: dict[StorageKey, torch.Tensor] = {}
    # Non-leaf operands that require grad stay non-leaves, so in-place ops stay legal on them.
    with_grad = {storage_key(v) for v in values if isinstance(v, torch.Tensor) and v.requires_grad and not v.is_leaf}
    for position, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            copies.append(v)
            continue
        key = storage_key(v)
        if key is None:
            return None
        if v.requires_grad and v.is_leaf:
            copy = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).requires_grad_()
        else:
            root = roots.get(key)
            if root is None:
                root = torch.empty(v.untyped_storage().nbytes() // v.element_size(), dtype=v.dtype, device=v.device)
                if key in with_grad:
                    root = root.requires_grad_().clone()
                roots[key] = root
            if root.dtype != v.dtype:
                return None
            copy = root.as_strided(v.shape, v.stride(), v.storage_offset())
            if not v.requires_grad and copy.requires_grad:
                copy = copy.detach()  # same storage and version counter, no history
        of_storage.setdefault(storage_key(copy), position)
        copies.append(copy)
    return copies, of_storage


@dataclass
class _SubgraphFacts:
    """What a HOP call's bodies did, in the outer graph's terms; `apply` puts it in the trace."""

    writes: list[Write] = field(default_factory=list)
    mutated_inside: list[tuple[SavedTensor, torch.fx.Node]] = field(default_factory=list)
    mutated_in_body: list[tuple[SavedTensor, torch.fx.Node]] = field(default_factory=list)
    hidden_inside: list[tuple[SavedTensor, torch.fx.Node]] = field(default_factory=list)
    savers: list[tuple[SavedTensor, torch.fx.Node]] = field(default_factory=list)
    new_saved: list[SavedTensor] = field(default_factory=list)
    unsaved: list[SavedTensor] = field(default_factory=list)  # saves that backward never reads
    recomputed: list[SavedTensor] = field(default_factory=list)  # read again only by a recomputation
    roots: dict[StorageKey, torch.fx.Node] = field(default_factory=dict)  # body-made storages

    def apply(self, n: torch.fx.Node, trace: MutationTrace, saved_by_storage: dict, first: int) -> None:
        for record, inner in self.savers:
            record.inner = inner
        for record, inner in self.mutated_inside:
            if record.mutated_by is n and record.mutated_inside is None:
                record.mutated_inside = inner
        for record, inner in self.mutated_in_body:
            # A write between a save and its use, both inside the body: the op's inputs never
            # showed it, the dry run did.
            if record.mutated_by is None:
                record.mutated_by, record.mutated_inside = n, inner
        for record, inner in self.hidden_inside:
            if (n, inner) not in record.hidden_inside:
                record.hidden_inside.append((n, inner))
        for record in self.recomputed:
            record.recomputed = True
        # (Identity, not `==`: the dataclasses hold tensors.)
        unsaved = {id(r) for r in self.unsaved}
        trace.saved[:] = [r for r in trace.saved if id(r) not in unsaved]
        for records in saved_by_storage.values():
            records[:] = [r for r in records if id(r) not in unsaved]
        trace.saved.extend(self.new_saved)
        for key, root in self.roots.items():
            trace.storage_root.setdefault(key, root)
        # The op-level write of a storage the bodies' writes explain goes, unless a saved
        # tensor's hazard still points at the op as a whole (nothing else would carry it).
        explained = {w.storage for w in self.writes}
        unattributed = {r.storage for r in trace.saved if r.mutated_by is n and r.mutated_inside is None}
        kept = [w for w in trace.writes[first:] if w.storage not in explained or w.storage in unattributed]
        trace.writes[first:] = [*self.writes, *kept]


def _subgraph_facts(n, runs: list[_BodyRun], trace: MutationTrace, saved_here: list[SavedTensor], saved_by_storage,
                    gm) -> _SubgraphFacts:
    facts = _SubgraphFacts()
    saved_here = [r for r in saved_here if r.node is n]
    here = {id(r) for r in saved_here}
    for run in runs:
        writes = _outer_writes(n, run, facts)
        facts.writes += [w for w, _, _ in writes]
        first_visible: dict[StorageKey, torch.fx.Node] = {}
        for w, _, _ in writes:
            if w.autograd_visible:
                first_visible.setdefault(w.storage, w.inner)
        saves = run.layout.saves
        # The op's own saves whose writes the rules below know better than a version bump.
        matched = saves == "function" or (saves == "plain" and _match_plain_saves(run, saved_here, facts))
        for w, region, _ in writes:
            for record in saved_by_storage.get(w.storage, ()):
                plain_here = matched and id(record) in here
                if record.mutated_by is n and not plain_here:
                    facts.mutated_inside.append((record, first_visible.get(w.storage, w.inner)))
                # Batch norm's running statistics (the writes schemas hide) feed no saved value
                # in training mode: not a hazard for what the op itself saved.
                schema_own = w.how == "schema" and id(record) in here
                if (not w.autograd_visible and not plain_here and not schema_own and record.values_read
                        and overlaps(record.tensor, region)):
                    facts.hidden_inside.append((record, w.inner))
        if saves == "function":
            _check_function_saves(n, run, writes, saved_here, gm, facts)
        elif saves == "recompute":
            _sort_checkpoint_inputs(run, saved_here, trace, facts)
            _check_recomputed_saves(n, run, facts)
        elif saves == "own":
            _check_body_saves(n, run, facts, recomputed=False, before_step=None)
    return facts


def _outer_writes(n, run: _BodyRun, facts: _SubgraphFacts) -> list[tuple[Write, torch.Tensor, int]]:
    """The body's writes as writes of the op call: (write, written region, body step)."""
    writes = []
    for w in run.trace.writes:
        inner = w.inner or w.node
        position = run.copies.get(w.storage)
        if position is not None:
            node, value = run.operands[position]
            write = Write(n, node, value, storage_key(value), w.autograd_visible, w.grad_enabled, w.how,
                          region=w.region, inner=inner)
        else:
            # A tensor the body made: named by the body node that made it.
            root = run.trace.storage_root.get(w.storage, w.arg)
            facts.roots[w.storage] = root
            write = Write(n, root, w.tensor, w.storage, w.autograd_visible, w.grad_enabled, w.how,
                          region=w.region, inner=inner)
        if write.storage is not None:
            # The copies share the operands' layout: the region's offsets hold for the operand.
            writes.append((write, w.tensor, run.order[w.node]))
    return writes


def _match_plain_saves(run: _BodyRun, saved_here: list[SavedTensor], facts: _SubgraphFacts) -> bool:
    # A plain call saves under the outer hooks, in the order the dry run saved: pair them up.
    inner_saved = run.trace.saved
    if len(inner_saved) != len(saved_here):
        return False
    for record, inner in zip(saved_here, inner_saved):
        facts.savers.append((record, inner.inner or inner.node))
        if inner.mutated_by is not None:
            facts.mutated_inside.append((record, inner.mutated_inside or inner.mutated_by))
            facts.mutated_in_body.append((record, inner.mutated_inside or inner.mutated_by))
        root = run.trace.storage_root.get(inner.storage) if inner.storage not in run.copies else None
        if root is not None and record.storage is not None:
            facts.roots[record.storage] = root  # a tensor the body made: named by its body node
        for node in inner.hidden_writes:
            facts.hidden_inside.append((record, node))
        for _, node in inner.hidden_inside:
            facts.hidden_inside.append((record, node))
    return True


def _check_function_saves(n, run: _BodyRun, writes, saved_here: list[SavedTensor], gm, facts: _SubgraphFacts) -> None:
    # `ctx.save_for_backward(x)` keeps `x` itself; its version is recorded when forward returns.
    # A write in forward after forward read `x` (visible or through `.data`, no error either
    # way) hands backward values that forward did not compute with. A write before any read
    # is what forward computed with; a saved tensor backward never reads is harmless.
    for position in _function_saved_operands(n, gm):
        value = run.operands[position][1]
        record = next((r for r in saved_here if r.tensor is value), None)
        # Operands that alias (`apply(t, t.detach())`) share one copy, keyed by the first of them.
        copy_key = next((k for k, p in run.copies.items() if storage_key(run.operands[p][1]) == record.storage),
                        None) if record is not None else None
        if record is None or copy_key is None or not record.values_read:
            continue  # `values_read`: used by the backward for a gradient autograd wants
        for w, region, step in writes:
            if w.storage != record.storage or not overlaps(value, region):
                continue
            if _read_before(run, copy_key, step):
                facts.hidden_inside.append((record, w.inner))


def _function_saved_operands(n: torch.fx.Node, gm: torch.fx.GraphModule) -> list[int]:
    """Operand positions of the Function's saved tensors (`ctx.save_for_backward` of inputs)."""
    fwd = getattr(gm, n.args[0].target)
    fwd_inputs = list(fwd.graph.find_nodes(op="placeholder"))
    saved_values = list(fwd.graph.output_node().args[0][1])
    return [fwd_inputs.index(saved_values[i]) for i in n.kwargs.get("saved_for_backward_idx", ())
            if saved_values[i] in fwd_inputs]


def _read_before(run: _BodyRun, key: StorageKey, step: int) -> bool:
    # Reading consumes values; making a view (`.data`, slicing) does not.
    for node, i in run.order.items():
        if i >= step:
            continue
        read = key in run.trace.storages_read.get(node, ())
        if read and (key not in run.trace.storages_made.get(node, ()) or any(
                w.node is node and w.storage == key for w in run.trace.writes)):
            return True
    return False


def _sort_checkpoint_inputs(run: _BodyRun, saved_here: list[SavedTensor], trace: MutationTrace,
                            facts: _SubgraphFacts) -> None:
    # The op saved all its operands at entry (torch.compile runs checkpoint so); eager saves
    # only the explicit inputs, and only a region that saves something ever reads them again.
    if not run.trace.saved:
        facts.unsaved += saved_here
        return
    saved_inside = {r.storage for r in run.trace.saved}
    feeding = _operands_feeding_saves(run)
    for record in saved_here:
        if not _is_module_state(record.storage, trace):
            continue
        copies = {k for k, p in run.copies.items() if storage_key(run.operands[p][1]) == record.storage}
        positions = {p for p, (_, value) in enumerate(run.operands) if storage_key(value) == record.storage}
        if copies & saved_inside or positions & feeding:
            # The recomputation reads it as it is then: saved itself (`linear` saves its
            # weight), or computed into what the region saves (`exp(u * w)` saves its result).
            facts.recomputed.append(record)
        else:
            facts.unsaved.append(record)  # `num_batches_tracked`: nothing saved depends on it


def _operands_feeding_saves(run: _BodyRun) -> set[int]:
    """Operand positions whose values flow, in the body, into something the body saves."""
    placeholders = {node: i for i, node in enumerate(run.body.graph.find_nodes(op="placeholder"))}
    stack = [r.node for r in run.trace.saved if r.node in run.order]
    seen, feeding = set(), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in placeholders:
            feeding.add(placeholders[node])
        stack.extend(node.all_input_nodes)
    return feeding


def _is_module_state(key: StorageKey | None, trace: MutationTrace) -> bool:
    root = trace.storage_root.get(key) if key is not None else None
    source = trace.sources.get(root) if root is not None and root.op == "placeholder" else None
    return source is not None and qualified_name_of(source)[0] in ("parameter", "buffer")


def _check_recomputed_saves(n, run: _BodyRun, facts: _SubgraphFacts) -> None:
    # Backward's recomputation replays the region up to its last save, then stops: a write
    # to a tensor saved earlier in the region, made before that last save, is replayed and
    # hands backward the written values; a write after it is not. No error either way: the
    # checkpoint's hooks hold the saved tensors, not autograd's version check. (Writes to the
    # region's inputs are checked against the inputs the checkpoint saved at entry.)
    steps = [run.order[r.node] for r in run.trace.saved if r.node in run.order]
    if steps:
        _check_body_saves(n, run, facts, recomputed=True, before_step=max(steps))


# Ops whose backward reads only their own result, element by element (grad * f(result)): a
# zero output gradient gives a zero input gradient, whatever the saved value holds.
_OWN_RESULT_SAVERS = frozenset({torch.exp, torch.sigmoid, torch.tanh, torch.relu, torch.nn.functional.relu,
                                torch.nn.functional.sigmoid, torch.nn.functional.tanh, "exp", "sigmoid", "tanh", "relu"})
# In-place ops whose own backward gives zero gradient wherever they changed a value: they
# overwrite a region (`h[i] = v`, `fill_`, `zero_`, `masked_fill_`, `copy_`) or clip to a range.
_MASKING_WRITES = frozenset({operator.setitem, torch.relu_, torch.clamp_, "relu_", "clamp_", "clamp_min_",
                             "clamp_max_", "fill_", "zero_", "masked_fill_", "copy_", "hardtanh_", "threshold_"})
_MASKING_INPLACE = frozenset({torch.nn.functional.relu, torch.nn.functional.hardtanh, torch.nn.functional.threshold})


def _masks_own_result(run: _BodyRun, record: SavedTensor, writer: torch.fx.Node) -> bool:
    """Does a visible write over an elementwise op's saved result leave its gradient alone?

    In a checkpoint region eager checks no versions, so the recomputed backward reads the
    written values. For `h = exp(u); h[0] = 1.0` (or `relu_`, `clamp_`) that is harmless: where
    the write changed `h`, autograd already zeroes `h`'s gradient, and `exp`'s backward is
    `grad * h`, element by element. Only if nothing else read `h` in between (its gradient would
    reach `exp` unmasked).
    """
    saver = record.node
    if _op_key(saver) not in _OWN_RESULT_SAVERS or saver.kwargs.get("inplace"):
        return False
    if record.storage not in run.trace.storages_made.get(saver, ()):
        return False  # it saved its input, not its result
    masking = _op_key(writer) in _MASKING_WRITES or (
        _op_key(writer) in _MASKING_INPLACE and writer.kwargs.get("inplace") is True)
    if not masking or writer not in run.order or saver not in run.order:
        return False
    between = [m for m, i in run.order.items() if run.order[saver] < i < run.order[writer]]
    return not any(record.storage in run.trace.storages_read.get(m, ())
                   and record.storage not in run.trace.storages_made.get(m, ()) for m in between)


def _op_key(node: torch.fx.Node) -> Any:
    return str(node.target) if node.op == "call_method" else node.target


def _check_body_saves(n, run: _BodyRun, facts: _SubgraphFacts, recomputed: bool, before_step: int | None) -> None:
    """Saved-then-written pairs inside the body, on tensors the body made, as saved tensors of `n`."""
    for inner in run.trace.saved:
        if inner.storage is None or inner.storage in run.copies or not run.trace.backward_outputs.get(inner.node):
            continue
        visible = [(inner.mutated_by, inner.mutated_inside or inner.mutated_by)] if inner.mutated_by else []
        hidden = [(node, node) for node in inner.hidden_writes] + list(inner.hidden_inside)
        if recomputed:
            # Both kinds only replace the recomputed value: no error, silently wrong values,
            # unless the write is a mask over what an elementwise op saved of its own result.
            visible = [(at, node) for at, node in visible if not _masks_own_result(run, inner, node)]
            hidden = [(at, node) for at, node in visible + hidden if run.order.get(at, before_step) < before_step]
            visible = []
        if not visible and not hidden:
            continue
        record = SavedTensor(n, inner.tensor, inner.version, inner.storage, inner=inner.inner or inner.node,
                             recomputed=recomputed)
        if visible:
            record.mutated_by, record.mutated_inside = n, visible[0][1]
        record.hidden_inside = [(n, node) for _, node in hidden]
        facts.new_saved.append(record)
        root = run.trace.storage_root.get(inner.storage)
        if root is not None:
            facts.roots[inner.storage] = root
