"""Untested torch releases: the audit warns, functionalize refuses unless asked. Then, one test
per private torch API in `fxinplace._compat`, stating against torch itself the behaviour we rely
on: when a torch release breaks one, the failure names it here."""

from __future__ import annotations

import contextlib
import json
import operator
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.fx

import fxinplace
from fxinplace import _compat
from test_logging import ROOT, structured_log


@pytest.mark.parametrize("version, tested", [
    ("2.13.0", True), ("2.13.0+cpu", True), ("2.13.1+cu128", True), ("2.13.0rc1", True),
    ("2.14.1", True), ("2.14.1+cu130", True), ("2.14.0a0+git1234", True),
    ("2.12.1", False), ("2.15.0", False), ("2.15.0a0+git1234", False), ("3.0.0", False),
])
def test_tested_releases(version, tested):
    assert _compat.torch_is_tested(version) is tested


def test_the_torch_running_the_suite_is_tested():
    # CI must fail, not skip, when it runs on a release the range does not name.
    assert _compat.torch_is_tested(), f"torch {torch.__version__} is not in the tested range {_compat.tested_range()}"


class SavedThenWritten(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        s = torch.sigmoid(self.fc(x))
        s[:, 0] = 1.0  # sigmoid saved s
        return s


@pytest.fixture
def untested(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.15.0")
    monkeypatch.setattr(_compat, "_warned", False)


@pytest.mark.filterwarnings("ignore:Error detected in")
def test_on_an_untested_release_functionalize_compiles_the_graph_unchanged(untested):
    model = SavedThenWritten()
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()  # eager's verdict
    audit = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True)
    with pytest.warns(UserWarning, match=r"torch 2\.15\.0 is outside the tested range \(torch ==2\.13\.\* or ==2\.14\.\*\)"):
        with pytest.raises(Exception, match="the compiler failed with PyTorch's in-place autograd error"):
            torch.compile(model, backend=audit)(x)
    [mutation] = audit.report.mutations
    assert mutation.rewrite == fxinplace.Rewrite(fxinplace.RewriteKind.KEPT_IN_PLACE, fxinplace.KeptReason.UNTESTED_TORCH,
                                                 ("2.15.0", "==2.13.* or ==2.14.*"))
    assert mutation.severity == "error"


def test_on_an_untested_release_the_user_may_opt_in(untested):
    model = SavedThenWritten()
    audit = fxinplace.InplaceAudit(compiler="aot_eager", print=False, functionalize=True, untested_torch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(model, backend=audit)(torch.randn(2, 4)).sum().backward()
    assert model.fc.weight.grad is not None
    assert audit.report.mutations[0].rewrite.kind is fxinplace.RewriteKind.REWRITTEN


def test_the_untested_warning_comes_once(untested):
    audit = fxinplace.InplaceAudit(compiler="eager", print=False)
    with pytest.warns(UserWarning, match="outside the tested range") as record:
        torch.compile(lambda t: t.add_(1), backend=audit)(torch.randn(3))
        torch._dynamo.reset()
        torch.compile(lambda t: t.mul_(2), backend=audit)(torch.randn(3))
    assert sum("outside the tested range" in str(w.message) for w in record) == 1



# -- the private behaviours, one test each ---------------------------------------------------------
aten = torch.ops.aten
_RELEASE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


class _Capture:
    """A Dynamo backend that keeps each graph, its example inputs and what `probe` saw inside the call."""

    def __init__(self, probe=None):
        self.graphs, self.inputs, self.seen = [], [], []
        self.probe = probe

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        self.inputs.append(example_inputs)
        if self.probe is not None:
            self.seen.append(self.probe(gm, example_inputs))
        return gm.forward


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_make_fx_aten_keeps_detach_where_plain_make_fx_may_not():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        return x.detach() + 1

    x = torch.randn(3)
    assert aten.detach.default in _targets(_compat.make_fx_aten(f)(x))
    plain = _targets(make_fx(f, pre_dispatch=False)(x))
    # torch 2.14's make_fx, given no table, decomposes detach into alias; 2.13's keeps it.
    assert (aten.detach.default in plain) is (_RELEASE < (2, 14)), plain


def test_dynamo_spells_data_assignment_as_compat_says():
    def f(p, v):
        p.data = v
        return p * 2

    backend = _Capture()
    torch.compile(f, backend=backend, fullgraph=True)(torch.randn(3, requires_grad=True), torch.randn(3))
    targets = [t for gm in backend.graphs for t in _targets(gm)]
    one_op = [t for t in targets if _compat.is_data_assignment_op(t)]
    fixups = [t for t in targets if _compat.is_version_fixup(t)]
    if _compat.SHALLOW_COPY_DATA is None:  # torch 2.13: `set_` then the version fix-up
        assert not one_op and len(fixups) == 1, targets
        assert any(getattr(t, "__name__", None) == "set_" for t in targets), targets
    else:  # torch 2.14: one op, no fix-up
        assert len(one_op) == 1 and not fixups, targets
    assert not _compat.is_data_assignment_op(aten.set_.source_Tensor)


def test_op_classes_and_hop_name():
    assert isinstance(aten.add_.Tensor, _compat.OpOverload)
    assert isinstance(aten.add_, _compat.OpOverloadPacket)
    assert _compat.hop_name(aten.add.Tensor) is None and _compat.hop_name(operator.add) is None

    def f(x):
        return torch.utils.checkpoint.checkpoint(torch.sin, x, use_reentrant=False).cos()

    backend = _Capture()
    torch.compile(f, backend=backend, fullgraph=True)(torch.randn(3, requires_grad=True))
    hops = [t for t in _targets(backend.graphs[0]) if isinstance(t, _compat.HigherOrderOperator)]
    assert [_compat.hop_name(t) for t in hops] == ["tag_activation_checkpoint"]


def test_schema_alias_annotations():
    add_ = _compat.schema_of(aten.add_.Tensor)
    assert add_.name == "aten::add_" and _compat.overload_name(aten.add_.Tensor) == "Tensor"
    assert _compat.overload_name(aten.relu_.default) == "default"
    assert [a.alias_info is not None and a.alias_info.is_write for a in add_.arguments] == [True, False, False]
    assert add_.returns[0].alias_info.before_set == add_.arguments[0].alias_info.before_set  # `Tensor(a!)` both
    view = _compat.schema_of(aten.view.default)
    assert not view.arguments[0].alias_info.is_write and view.returns[0].alias_info is not None
    split = _compat.schema_of(aten.split.Tensor)  # `Tensor(a)[]`: the views of `self`
    assert split.returns[0].alias_info is not None and not split.returns[0].alias_info.before_set
    out = _compat.schema_of(aten.add.out)
    assert [a.name for a in out.arguments if a.alias_info is not None and a.alias_info.is_write] == ["out"]
    assert _compat.schema_of(operator.add) is None and _compat.schema_of(torch.add) is None


def test_dynamo_marks_grad_mode_changes_with_set_grad_enabled():
    def f(x):
        with torch.no_grad():
            y = x * 2
        return x + y

    backend = _Capture()
    torch.compile(f, backend=backend, fullgraph=True)(torch.randn(3, requires_grad=True))
    modes = [n.args for n in backend.graphs[0].graph.nodes if n.target is _compat.SET_GRAD_ENABLED]
    assert modes == [(False,), (True,)]


def test_native_batch_norm_legit_writes_the_running_stats_its_schema_marks():
    mean, var = torch.zeros(3), torch.ones(3)
    _compat.NATIVE_BATCH_NORM_LEGIT(torch.randn(4, 3) + 5, None, None, mean, var, True, 0.1, 1e-5)
    assert (mean > 0.1).all()
    schema = _compat.schema_of(aten._native_batch_norm_legit.default)
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == \
        ["running_mean", "running_var"]


def test_foreach_copy_copies_and_bumps_each_version():
    dst, src = [torch.zeros(2), torch.zeros(3)], [torch.ones(2), torch.full((3,), 2.0)]
    _compat.foreach_copy_(dst, src)
    assert all(torch.equal(d, s) for d, s in zip(dst, src)) and [d._version for d in dst] == [1, 1]


def test_pytree_leaves_and_key_paths():
    a, b = torch.zeros(1), torch.ones(1)
    assert _compat.pytree.tree_leaves([None, (a, {"k": b})]) == [None, a, b]  # callers keep the nodes / tensors
    leaves = _compat.pytree.tree_flatten_with_path({"seg": a, "aux": (b,)})[0]
    paths = [[getattr(k, "key", getattr(k, "idx", None)) for k in path] for path, _ in leaves]
    assert paths == [["seg"], ["aux", 0]]


def test_preserve_node_meta_gives_make_fx_nodes_their_origin():
    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    for node in gm.graph.nodes:  # as on Dynamo's nodes: a node with empty meta passes on no origin
        node.meta["stack_trace"] = node.name
    x = torch.randn(3)
    with _compat.preserve_node_meta():
        traced = _compat.make_fx_aten(torch.fx.Interpreter(gm).run)(x)
    origins = {n.target: _compat.origin_names(n) for n in traced.graph.nodes if n.op == "call_function"}
    assert origins == {aten.relu.default: ["relu"], aten.mul.Tensor: ["mul"]}
    bare = _compat.make_fx_aten(torch.fx.Interpreter(gm).run)(x)
    assert all(_compat.origin_names(n) == [] for n in bare.graph.nodes)
    # ... and the graph each origin was in: its own, for an op of the traced graph.
    assert {_compat.origin_sources(n)[0] for n in traced.graph.nodes if n.op == "call_function"} == \
        {(id(gm.graph), "relu"), (id(gm.graph), "mul")}


def test_an_inlined_checkpoint_bodys_ops_name_the_bodys_graph():
    # `functionalize` restores each ATen op's grad mode from its origin: an op of a checkpoint
    # body (inlined by the ATen trace) names the body's graph, whose node names may repeat
    # the outer graph's.
    captured = []

    def backend(gm, example_inputs):  # traced here, in Dynamo's fake mode, as `functionalize` does
        fake_mode = _compat.detect_fake_mode(example_inputs)
        fakes = [fake_mode.from_tensor(torch.randn(3))]
        with fake_mode, _compat.preserve_node_meta(), torch.no_grad():
            captured.append((gm, _compat.make_fx_aten(torch.fx.Interpreter(gm).run)(*fakes)))
        return gm.forward

    def f(w):
        return torch.utils.checkpoint.checkpoint(torch.exp, w, use_reentrant=False) * 2

    torch.compile(f, backend=backend)(torch.randn(3, requires_grad=True))
    gm, traced = captured[0]
    bodies = {id(m.graph) for m in gm.modules() if isinstance(m, torch.fx.GraphModule) and m is not gm}
    assert bodies
    graphs = {n.target: _compat.origin_sources(n)[0][0] for n in traced.graph.nodes if n.op == "call_function"}
    assert graphs[aten.exp.default] in bodies and graphs[aten.mul.Tensor] == id(gm.graph)


def test_interpreting_names_the_node_for_what_runs_inside():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.meta["stack_trace"] = "x + 1"
    with _compat.preserve_node_meta(), _compat.interpreting(torch.fx.Interpreter(gm), node):
        current = torch.fx.traceback.get_current_meta()
    assert [s.name for s in current["from_node"]] == [node.name]


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return torch.relu(self.fc(x))  # the line the stack trace names


def test_dynamo_node_metadata():
    # The grapharg is read during the backend call: Dynamo deletes it when the compile ends.
    backend = _Capture(lambda gm, inputs: [_compat.graph_arg_source(p) for p in gm.graph.find_nodes(op="placeholder")])
    net, x = _Net(), torch.randn(4, 3)
    torch.compile(net, backend=backend, fullgraph=True)(x)
    gm = backend.graphs[0]
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    trace = _compat.stack_trace(relu)
    assert f'File "{__file__}"' in trace and "the line the stack trace names" in trace
    assert not _compat.nn_module_stack(relu)  # run by the compiled module itself
    fc = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)
    path, module_type = list(_compat.nn_module_stack(fc).values())[-1]  # innermost last
    assert str(path).endswith("fc") and module_type is torch.nn.Linear
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    examples = [_compat.example_value(p) for p in placeholders]
    assert all(isinstance(e, _compat.FakeTensor) for e in examples)
    [sources] = backend.seen
    assert sorted(s.name() if callable(s.name) else s.name for s in sources) == sorted(
        ["L['x']", "L['self']._modules['fc']._parameters['weight']", "L['self']._modules['fc']._parameters['bias']"])
    assert _compat.graph_arg_source(relu) is None and _compat.example_value(torch.fx.Graph().placeholder("y")) is None


def test_graph_break_reason():
    def f(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    backend = _Capture()
    torch.compile(f, backend=backend)(torch.randn(3))
    (reason0, break0), (reason1, break1) = [_compat.graph_break_reason(gm) for gm in backend.graphs]
    assert break0 and reason0 and not break1 and reason1 == "return_value"
    assert _compat.graph_break_reason(torch.fx.symbolic_trace(lambda x: x)) == (None, False)


def test_fake_modes():
    mode = _compat.FakeTensorMode()
    fake = _compat.fake_from_real(mode, torch.randn(2, 3, requires_grad=True))
    assert isinstance(fake, _compat.FakeTensor) and fake.shape == (2, 3) and fake.requires_grad
    assert _compat.detect_fake_mode([1, fake]) is mode and _compat.detect_fake_mode([torch.randn(2)]) is None
    assert _compat.fake_mode_of([fake]) is mode
    fresh = _compat.fake_mode_of([torch.randn(2)])
    assert isinstance(fresh, _compat.FakeTensorMode) and fresh is not _compat.fake_mode_of([torch.randn(2)])
    with mode:
        assert isinstance(torch.ones(2), _compat.FakeTensor)
        with _compat.unset_fake_temporarily():
            real = torch.ones(2)
    assert not isinstance(real, _compat.FakeTensor) and real.tolist() == [1.0, 1.0]


def test_dynamo_example_inputs_lead_to_dynamo_fake_mode():
    backend = _Capture(lambda gm, inputs: (_compat.detect_fake_mode(inputs),
                                           [_compat.example_value(p) for p in gm.graph.find_nodes(op="placeholder")]))
    torch.compile(lambda x: x + 1, backend=backend)(torch.randn(3))
    [(mode, examples)] = backend.seen
    # The backend's fake mode is not the one of Dynamo's example values; they share one shape env.
    assert mode is not None and mode.shape_env is not None
    assert all(e.fake_mode.shape_env is mode.shape_env for e in examples)
    static = _compat.fake_from_real(mode, torch.randn(5, 2), static_shapes=True)
    assert all(isinstance(s, int) for s in static.shape)


def test_ignore_fresh_unbacked_symbols():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    def item_of_fake(scope):
        mode = _compat.FakeTensorMode(shape_env=ShapeEnv())
        mode.allow_scalar_outputs = True  # as Dynamo's `capture_scalar_outputs` does
        with mode, scope(mode):
            torch.ones(2).sum().item()
        return mode.shape_env.pending_fresh_unbacked_symbols

    assert item_of_fake(lambda mode: contextlib.nullcontext())  # the symbol a tracer would bind
    assert not item_of_fake(_compat.ignore_fresh_unbacked_symbols)
    with _compat.ignore_fresh_unbacked_symbols(_compat.FakeTensorMode()):  # no shape env: nothing to do
        pass


def test_storage_weak_ref_is_one_key_per_storage():
    t = torch.zeros(4, 4)
    a, b = _compat.StorageWeakRef(t[0].untyped_storage()), _compat.StorageWeakRef(t.T[1:].untyped_storage())
    assert a == b and hash(a) == hash(b)
    assert a != _compat.StorageWeakRef(t.clone().untyped_storage())


def test_version_counters():
    t = torch.zeros(3)
    view = t[1:]
    _compat.set_version(t, 7)
    assert t._version == 7 and view._version == 7
    with _compat.preserve_version_counter((t,)):
        t.add_(1)
        assert t._version == 8
    assert t._version == 7 and t.sum() == 3
    _compat.increment_version([t])
    assert t._version == 8


def test_multi_output_views_are_marked_on_real_and_fake_tensors():
    w = torch.randn(4, 6, requires_grad=True)
    a, b = w.chunk(2, 1)
    assert _compat.is_multi_output_view(a) and not _compat.is_multi_output_view(w[:, :3])
    assert not _compat.is_multi_output_view(w)
    with pytest.raises(RuntimeError, match="returns multiple views"):  # what the mark means in eager
        a.mul_(2)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(w)
        assert _compat.is_multi_output_view(fake.unbind(0)[1]) and not _compat.is_multi_output_view(fake[1])


def test_saves_of_a_node_are_read_without_unpacking_and_hooked_ones_left_out():
    a = torch.randn(3, requires_grad=True)
    y = a.sigmoid()  # saves its result
    (saved,) = _compat.saves_of_node(y.grad_fn)
    assert saved.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    unpacked = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: unpacked.append(t) or t):
        z = a.sigmoid()
    assert _compat.saves_of_node(z.grad_fn) == [] and unpacked == []  # no hook ran
    z.sum().backward()
    assert len(unpacked) == 1  # the hook autograd itself runs
    with torch.no_grad():  # a read does not check versions: nothing raises on a stale save
        y.mul_(2)
    assert len(_compat.saves_of_node(y.grad_fn)) == 1
    w = a * 2.0
    v = w.exp()
    v.sum().backward()
    assert _compat.saves_of_node(v.grad_fn) == []  # freed by the backward


def test_a_custom_functions_node_names_its_class_and_saves():
    from test_graph_breaks import Square  # x * y, saving both

    a = torch.randn(3, requires_grad=True)
    before = _compat.current_sequence_nr()
    out = Square.apply(a, a)
    assert _compat.function_class_of(out.grad_fn) is Square and _compat.function_class_of((a * 2).grad_fn) is None
    assert [t.untyped_storage().data_ptr() for t in _compat.saves_of_node(out.grad_fn)] == [a.data_ptr()] * 2
    later = (a * 1).grad_fn
    assert before <= _compat.sequence_nr(out.grad_fn) < _compat.sequence_nr(later)


def test_pytorchs_inplace_error_its_backward_call_and_the_stale_save_it_stopped_at():
    # What the guard's unwatched entries read from PyTorch's own error: the versions in its
    # words, the call's roots in the traceback's `torch.autograd.backward` frame, and the save
    # that fails the check, unpacked with no hook run (a hooked save is left out).
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)  # so that `mm` saves `w` too
    y = (x @ w).tanh().sum()
    with torch.no_grad():
        w.add_(1.0)
    stale = _compat.stale_saves_of_node(y.grad_fn.next_functions[0][0].next_functions[0][0])  # MmBackward0
    assert [(t is w or t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()) for t, _ in stale] == [True]
    with pytest.raises(RuntimeError) as info:
        y.backward()
    assert _compat.inplace_error_versions(str(info.value)) == (1, 0)
    assert stale[0][1].split(" Hint:")[0] == str(info.value).split(" Hint:")[0]
    call, roots, inputs, frame = _compat.failed_backward(info.value.__traceback__)
    assert call == "backward" and roots[0] is y and inputs is None and frame.f_code.co_name == "backward"
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad(y, [w])
    call, roots, inputs, _ = _compat.failed_backward(info.value.__traceback__)
    assert call == "autograd.grad" and roots[0] is y and inputs[0] is w
    assert _compat.gradient_edge_node(w) is y.grad_fn.next_functions[0][0].next_functions[0][0].next_functions[1][0]
    assert _compat.inplace_error_versions("Trying to backward through the graph a second time") is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        z = (x @ w).sum()
    with torch.no_grad():
        w.add_(1.0)
    assert _compat.stale_saves_of_node(z.grad_fn.next_functions[0][0]) == []


def test_the_code_after_a_break_is_named_by_the_function_and_the_line_of_the_break():
    names, stacks = [], []

    def backend(gm, example_inputs):
        names.append(_compat.traced_code()[0].co_name)
        stacks.append(_compat.graph_break_frames(gm))
        return gm.forward

    def f(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    torch.compile(f, backend=backend)(torch.randn(3))
    line = f.__code__.co_firstlineno + 2
    assert (stacks[0][-1].name, stacks[0][-1].lineno) == ("f", line)
    assert names[1] == _compat.resume_function_name("f", line)


def test_after_two_breaks_in_a_row_the_code_compiled_next_resumes_after_the_second():
    # The code resuming after the first break breaks before any op: no graph of it is compiled.
    codes, stacks = [], []

    def backend(gm, example_inputs):
        codes.append(_compat.traced_code()[0])
        stacks.append(_compat.graph_break_frames(gm))
        return gm.forward

    def f(x):
        y = x * 2
        torch._dynamo.graph_break()
        torch._dynamo.graph_break()
        return y + 1

    torch.compile(f, backend=backend)(torch.randn(3))
    first = f.__code__.co_firstlineno + 2
    assert (stacks[0][-1].name, stacks[0][-1].lineno) == ("f", first)
    assert len(codes) == 2 and codes[1].co_name == _compat.resume_function_name("f", first + 1)
    assert _compat.resumes(codes[1], "f", f.__code__.co_filename) and _compat.resumed_at(codes[1]) == first + 1
    assert not _compat.resumes(codes[1], "f", f.__code__.co_filename + "x") and not _compat.resumes(codes[0], "f", f.__code__.co_filename)


def test_compile_id_and_traced_code_inside_a_backend_call():
    backend = _Capture(lambda gm, inputs: (_compat.current_compile_id(), _compat.traced_code()))

    def the_compiled_function(x):
        return x + 1

    torch.compile(the_compiled_function, backend=backend)(torch.randn(3))
    [(compile_id, codes)] = backend.seen
    assert str(compile_id) == "0/0" and codes[0].co_name == "the_compiled_function"
    assert _compat.current_compile_id() is None and _compat.traced_code() == []


def test_dynamo_output_scopes_are_the_traced_frame():
    def frame_under_trace(x):
        return x * 2

    backend = _Capture(lambda gm, inputs: _compat.dynamo_output_scopes())
    x = torch.randn(3)
    torch.compile(frame_under_trace, backend=backend)(x)
    [scopes] = backend.seen
    assert scopes["local_name"]["x"] is x and scopes["global_name"] is globals()
    with pytest.raises(Exception):
        _compat.dynamo_output_scopes()


class _RolesAndOutputs:
    """A backend keeping `graph_output_roles` and, at run time, the tensors each graph returned."""

    def __init__(self):
        self.roles, self.outputs = [], []

    def __call__(self, gm, inputs):
        code = gm.code
        self.roles.append(_compat.graph_output_roles(gm))
        assert gm.code == code, "graph_output_roles changed the graph"  # e.g. by realizing a lazy local
        outputs = []
        self.outputs.append(outputs)

        def run(*args):
            out = gm(*args)
            outputs[:] = list(out)
            return out

        return run


def test_graph_output_roles_place_each_output_in_the_users_code():
    seen = {}

    @torch._dynamo.disable
    def look(h):  # Dynamo breaks the graph here: `h` is live across it
        seen["h"] = h

    class Cached(torch.nn.Module):
        def forward(self, x):
            h = x * 2
            self.cache = h + 1  # stored, not returned
            look(h)
            return {"seg": h.sin(), "aux": [h.cos(), x - 1]}

    backend, model = _RolesAndOutputs(), Cached()
    result = torch.compile(model, backend=backend)(torch.randn(3))
    (before, after), (out_before, out_after) = backend.roles, backend.outputs
    by_id = {id(t): role for t, role in zip(out_before, before)}
    assert by_id[id(seen["h"])] == ("live", "h") and by_id[id(model.cache)] == ("stored", "cache")
    returned = {id(t): role for t, role in zip(out_after, after)}
    assert returned == {id(result["seg"]): ("returned", "seg"), id(result["aux"][0]): ("returned", "aux[0]"),
                        id(result["aux"][1]): ("returned", "aux[1]")}
    assert _compat.graph_output_roles(torch.fx.symbolic_trace(lambda x: x + 1)) is None  # outside a Dynamo trace


_TRACE_PROBE = """
import sys, torch
from fxinplace import _compat
made = []
def backend(gm, inputs):
    _compat.trace_artifact("probe", lambda: made.append(1) or {"seen": str(_compat.current_compile_id())})
    return gm.forward
torch.compile(lambda x: x + 1, backend=backend)(torch.randn(3))
print(len(made))
"""


@pytest.mark.parametrize("traced", [True, False], ids=["TORCH_TRACE", "no-trace"])
def test_trace_artifact_writes_under_the_compile_id_and_makes_no_payload_without_a_trace(tmp_path, traced):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_TRACE", "TORCH_COMPILE_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if traced:
        env["TORCH_TRACE"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _TRACE_PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == (["1"] if traced else ["0"])  # the payload is made only for a trace
    if traced:
        [(meta, payload)] = [(m, p) for m, p in structured_log(tmp_path) if m.get("artifact", {}).get("name") == "probe"]
        assert meta["artifact"] == {"name": "probe", "encoding": "json"}
        assert (meta["frame_id"], meta["frame_compile_id"]) == (0, 0) and json.loads(payload) == {"seen": "0/0"}
    else:
        assert not list(tmp_path.iterdir())


def test_inductor_mode_options():
    assert _compat.inductor_mode_options("max-autotune")["max_autotune"] is True
    assert "max_autotune" not in _compat.inductor_mode_options("default")
    assert callable(_compat.inductor_compile_fx)


def test_backend_registry():
    assert callable(_compat.lookup_backend("eager")) and callable(_compat.lookup_backend("aot_eager"))
    with pytest.raises(Exception):
        _compat.lookup_backend("no_such_backend")
    names = _compat.list_backends()
    assert {"eager", "aot_eager", "inductor", "inplace_audit"} <= set(names)


def test_compile_backend_is_what_torch_compile_hands_dynamo():
    # `fxinplace run` audits a `torch.compile(..., backend=b, mode=m, options=o)` by handing off
    # to `compile_backend(b, m, o, dynamic)`: it must call the backend as torch.compile would.
    calls = []

    def recorder(gm, example_inputs, **kwargs):
        calls.append(kwargs)
        return gm.forward

    for mode, options in [(None, None), ("reduce-overhead", None), (None, {"a": 1})]:
        torch.compile(lambda x: x + 1, backend=recorder, mode=mode, options=options)(torch.randn(2))
        _compat.compile_backend(recorder, mode, options, None)(torch.fx.symbolic_trace(lambda x: x + 1), [torch.randn(2)])
        assert calls[-1] == calls[-2]
    assert calls[1::2] == [{}, {"mode": "reduce-overhead"}, {"options": {"a": 1}}]
    inductor = _compat.compile_backend("inductor", "max-autotune", None, None)
    assert inductor.config["max_autotune"] is True and callable(inductor)
    assert inductor.config.items() >= _compat.inductor_mode_options("max-autotune").items()
    assert _compat.compile_backend("inductor", None, {"max_autotune": True}, None).config == {"max_autotune": True}
    assert _compat.compile_backend("eager", None, None, None).compiler_fn is _compat.lookup_backend("eager")
    assert _compat.default_backend() == "inductor"


def test_dynamo_reset_drops_compiled_code():
    backend = _Capture()
    f = torch.compile(lambda x: x - 1, backend=backend)
    f(torch.randn(3))
    f(torch.randn(3))
    assert len(backend.graphs) == 1
    _compat.dynamo_reset()
    f(torch.randn(3))
    assert len(backend.graphs) == 2


def test_torch_function_stack_as_the_guard_lifts_and_lands_its_mode():
    seen = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    base = _compat.len_torch_function_stack()
    with Recording() as mode:
        n = _compat.len_torch_function_stack()
        assert n == base + 1 and _compat.torch_function_stack_at(n - 1) is mode
        assert _compat.pop_torch_function_stack() is mode and _compat.len_torch_function_stack() == base
        torch.add(torch.ones(1), 1)
        assert torch.add not in seen  # lifted: ops no longer reach the mode
        _compat.push_torch_function_stack(mode)
        assert _compat.torch_function_stack_at(n - 1) is mode
        torch.add(torch.ones(1), 1)
        assert torch.add in seen
    assert _compat.len_torch_function_stack() == base


def test_current_autograd_node_in_an_unpack_hook():
    names = []

    def unpack(t):
        node = _compat.current_autograd_node()
        names.append(node.name() if node is not None else None)
        return t

    x = torch.randn(3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        y = x.sin()
    y.sum().backward()
    assert names == ["SinBackward0"] and _compat.current_autograd_node() is None


def test_disable_torch_function_skips_the_modes():
    seen = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    t = torch.ones(3)
    with Recording():
        with _compat.DisableTorchFunction():
            assert t.sum().item() == 3.0
        t.sum()
    assert len(seen) == 1


def test_tensor_data_reaches_a_torch_function_mode_as_the_descriptor():
    seen = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__self__", None) is _compat.TENSOR_DATA:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    t = torch.zeros(2)
    with Recording():
        t.data
        t.data = torch.ones(2)
    assert seen == ["__get__", "__set__"]
