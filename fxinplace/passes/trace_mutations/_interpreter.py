"""The interpreter behind `trace_mutations`: one run of a graph on fake tensors that records,
node by node, what each op wrote (version counters, schemas, `out=`, `.data`), the storages it
read and made, and what autograd saved (through the saved-tensor hooks).
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Iterator

import torch
import torch.fx

from ._hop_facts import subgraph_facts
from ._hop_runs import BodyRun, dry_run_bodies
from ._facts import MutationTrace, SavedTensor, Write
from ._saved_tensors import autograd_function_saved_args, grad_fns, new_grad_fns
from ..._compat import (SET_GRAD_ENABLED, FakeTensor, HigherOrderOperator, fake_from_real, increment_version,
                        interpreting, is_data_assignment_op, is_version_fixup, pytree, set_version)
from .._storage import StorageKey, overlaps, storage_key, version_of
from ..op_knowledge import OUT_UNVERSIONED_IN_EAGER, hidden_write_of, is_inplace_function, is_spelled_inplace, written_inputs

__all__ = ["TracingInterpreter", "is_data_assignment"]

log = logging.getLogger(__name__)


def _tensor_args(node: torch.fx.Node, env: dict) -> Iterator[tuple[torch.fx.Node, torch.Tensor]]:
    for leaf in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(leaf, torch.fx.Node):
            value = env.get(leaf)
            for v in pytree.tree_leaves(value):
                if isinstance(v, torch.Tensor):
                    yield leaf, v


def _hidden_write_values(node: torch.fx.Node, args: tuple, kwargs: dict, unread: bool = False) -> list[tuple[Any, Any]]:
    """(argument node, runtime value) per argument the op writes unseen (`HIDDEN_WRITES`); only
    those whose values backward never reads, when `unread`."""
    hidden = hidden_write_of(node)
    if hidden is None or (unread and hidden.read_by_backward):
        return []
    picked = []
    for p in hidden.written_now(args, kwargs):
        if isinstance(p, int):
            picked.append((node.args[p] if p < len(node.args) else None, args[p] if p < len(args) else None))
        else:
            picked.append((node.kwargs.get(p), kwargs.get(p)))
    return picked


class TracingInterpreter(torch.fx.Interpreter):
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
        self._body_runs: dict[torch.fx.Node, tuple[list[BodyRun], int]] = {}

    def nested(self, body: torch.fx.GraphModule) -> TracingInterpreter:
        """An interpreter for a higher-order op's body, in the same fake mode (see `_hop_runs`)."""
        return TracingInterpreter(body, self.fake_mode)

    # -- saved tensor hooks -------------------------------------------------------------
    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.current is not None:
            version = version_of(tensor)
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
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            value = fake_from_real(self.fake_mode, value, static_shapes=True)
        return value

    def run_node(self, n: torch.fx.Node) -> Any:
        trace = self.trace
        with interpreting(self, n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            inputs = list(_tensor_args(n, self.env))
            # Reading a view whose base was written since regenerates its `grad_fn`: let that
            # happen now, so the nodes the op itself makes are the only new ones after it.
            new_grad_fns(grad_fns([t for _, t in inputs]), self._known_fns)
            before = [version_of(t) for _, t in inputs]
            roots_before = self._root_versions(inputs)
            rebound = self.env.get(n.args[0]) if _is_rebind(n) else None
            rebound_from = (storage_key(rebound), version_of(rebound)) if isinstance(rebound, torch.Tensor) else None
            trace.grad_enabled[n] = torch.is_grad_enabled()
            self.current = n
            self._unread = [v for _, v in _hidden_write_values(n, args, kwargs, unread=True)]
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
        for arg, read in autograd_function_saved_args(n, self.module, self.env):
            self.current = n
            self.pack(self.env[arg])
            self.trace.saved[-1].values_read = read
            self.current = None
        if n.op == "placeholder":
            # A leaf's node is its `AccumulateGrad` (found by `variable`); a non-leaf's, its grad_fn now.
            self._placeholder_fns[n] = grad_fns(pytree.tree_leaves(result))
            new_grad_fns(self._placeholder_fns[n], self._known_fns)
        else:
            first = len(trace.writes)
            if rebound_from is not None and rebound_from[0] is not None:
                self._record_rebind(n, rebound, *rebound_from)
            else:
                self._record_writes(n, args, kwargs, inputs, before, roots_before)
            self._record_subgraph_facts(n, first)
            written = [w.tensor for w in trace.writes[first:]]
            made = new_grad_fns(grad_fns([*pytree.tree_leaves(result), *written], written), self._known_fns)
            self._grad_fns[n] = [fn for fn in made if type(fn).__name__ != "AccumulateGrad"]
        return result

    def _owner(self, key: StorageKey) -> torch.fx.Node | None:
        return self._rebound.get(key) or self.trace.storage_root.get(key)

    def call_function(self, target, args, kwargs):
        if is_version_fixup(target):
            return args[0]  # `.data =`'s version fix-up: `_record_rebind` already left the counter as eager does
        if is_data_assignment_op(target):
            # torch 2.14's `.data = v`; on fakes it need not rebind as eager does: run it as 2.13
            # spells it, `set_` under no_grad (`_record_rebind` puts the version counter back).
            with torch.no_grad():
                return torch.Tensor.set_(args[0], args[1])
        n = self.current
        if isinstance(target, HigherOrderOperator) and n is not None:
            # What the bodies write, learned on copies before the op itself runs (see below).
            runs = dry_run_bodies(n, target, args, self.nested)
            if runs:
                self._body_runs[n] = (runs, len(self.trace.saved))
        return super().call_function(target, args, kwargs)

    def _record_rebind(self, n: torch.fx.Node, t: torch.Tensor, key: StorageKey, version: int | None) -> None:
        # `t.set_(v)` (and `t.data = v`, which Dynamo spells `set_` plus a version fix-up) makes
        # `t` point at `v`'s storage: a write of `t`, whose old storage is what names it. Eager
        # `.data =` leaves the version counter alone (hidden from autograd); `set_` bumps it.
        if is_data_assignment(n) and version is not None:
            set_version(t, version)
        visible = version is not None and version_of(t) != version
        grad_enabled = self.trace.grad_enabled[n]
        after = n.next
        if is_data_assignment(n) and after.op == "call_function" and after.target is SET_GRAD_ENABLED:
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
            facts = subgraph_facts(n, runs, self.trace, self.trace.saved[mark:], self._saved_by_storage, self.module)
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
            new_grad_fns(grad_fns([value]), reach[-1])
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
                versions[key] = version_of(root)
        return versions

    def _record_writes(self, n, args, kwargs, inputs, before, roots_before) -> None:
        out = _out_args(n)
        _match_eager_out_versions(n, out, inputs, before)
        bumped = [(arg, t) for (arg, t), v in zip(inputs, before) if v is not None and version_of(t) != v]
        written = _pick_written(n, bumped)
        if (not written and inputs and before[0] is None and is_spelled_inplace(n)
                and n.args and inputs[0][0] is n.args[0]):
            written = [inputs[0]]  # inference tensors have no version counter: trust the spelling
        # Every tensor passed in `out=` is written (its `.out` overload's schema says `Tensor(a!)`).
        hidden = {id(a) for a in [*(a for a, _ in _hidden_write_values(n, args, kwargs)), *out]}
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
                not isinstance(root, torch.Tensor) or root is t or version_of(root) != roots_before.get(key)
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
            now = version_of(record.tensor) or 0
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
    if not out or n.target in OUT_UNVERSIONED_IN_EAGER:
        return
    stale = [t for (arg, t), v in zip(inputs, before) if arg in out and v is not None and version_of(t) == v]
    if stale:
        increment_version(stale)


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
    if n.op == "call_method" or n.target in (operator.setitem,) or is_inplace_function(n):
        chosen = [(a, t) for a, t in bumped if a is first]
        if chosen:
            return chosen[:1]
    schema_written = set(written_inputs(n))
    if schema_written:
        chosen = [(a, t) for a, t in bumped if a in schema_written]
        if chosen:
            return chosen
    return bumped[:1]


def _is_rebind(n: torch.fx.Node) -> bool:
    """`t.set_(v)`, or `t.data = v` (Dynamo spells it `set_`, or `shallow_copy_data_`), with a tensor `v`."""
    is_set = (n.op == "call_function" and (n.target is torch.Tensor.set_ or is_data_assignment_op(n.target))) or (
        n.op == "call_method" and n.target == "set_"
    )
    return is_set and len(n.args) == 2 and isinstance(n.args[0], torch.fx.Node) and isinstance(n.args[1], torch.fx.Node)


def is_data_assignment(n: torch.fx.Node) -> bool:
    """Is this Dynamo's spelling of `t.data = v`: `set_` followed by a version fix-up (torch
    2.13), or one `shallow_copy_data_` (torch 2.14)? Eager `.data =` bumps no version."""
    return (n.op == "call_function" and is_data_assignment_op(n.target)) or any(
        u.op == "call_function" and is_version_fixup(u.target) for u in n.users)
