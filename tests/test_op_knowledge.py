"""The op facts fxinplace keeps as tables (`fxinplace.passes.op_knowledge`), held to eager PyTorch."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from fxinplace.passes.op_knowledge import (HIDDEN_WRITES, OUT_UNVERSIONED_IN_EAGER, RESPELLED, aliased_arg,
                                           is_spelled_inplace, out_of_place_twin, view_chain, written_args)

aten = torch.ops.aten


def _stats():
    return torch.randn(3), torch.rand(3) + 0.5


# Each hidden write, called in eager with its flag on: (entry's op, call(x, weight, bias, mean, var)).
HIDDEN_CALLS = {
    "F.batch_norm": (F.batch_norm, lambda x, w, b, m, v: F.batch_norm(x, m, v, w, b, True)),
    "torch.batch_norm": (torch.batch_norm, lambda x, w, b, m, v: torch.batch_norm(x, w, b, m, v, True, 0.1, 1e-5, False)),
    "torch.native_batch_norm": (torch.native_batch_norm,
                                lambda x, w, b, m, v: torch.native_batch_norm(x, w, b, m, v, True, 0.1, 1e-5)),
    "torch._native_batch_norm_legit": (torch._native_batch_norm_legit,
                                       lambda x, w, b, m, v: torch._native_batch_norm_legit(x, w, b, m, v, True, 0.1, 1e-5)),
    "F.instance_norm": (F.instance_norm, lambda x, w, b, m, v: F.instance_norm(x, m, v, w, b, True)),
    "torch.instance_norm": (torch.instance_norm,
                            lambda x, w, b, m, v: torch.instance_norm(x, w, b, m, v, True, 0.1, 1e-5, False)),
}


BUMPED_IN_EAGER = {"F.instance_norm", "torch.instance_norm"}


def test_every_hidden_write_of_the_table_is_called_here():
    writing = {op for op, entry in HIDDEN_WRITES.items() if not entry.new_values}
    assert {op for op, _ in HIDDEN_CALLS.values()} == writing


@pytest.mark.parametrize("name", list(HIDDEN_CALLS))
def test_a_hidden_write_changes_the_running_stats_and_bumps_no_version(name):
    op, call = HIDDEN_CALLS[name]
    entry = HIDDEN_WRITES[op]
    mean, var = _stats()
    old = mean.clone(), var.clone()
    call(torch.randn(4, 3, 5), torch.ones(3), torch.zeros(3), mean, var)
    assert not torch.equal(mean, old[0]) and not torch.equal(var, old[1])
    # Hidden from autograd: why the table exists. Instance norm updates them by a copy eager
    # does see; listed all the same, so that they are named written on every path.
    assert (mean._version, var._version) == ((1, 1) if name in BUMPED_IN_EAGER else (0, 0))
    assert [n for _, n in entry.written] == ["running_mean", "running_var"]


@pytest.mark.parametrize("name", [n for n, (op, _) in HIDDEN_CALLS.items() if not HIDDEN_WRITES[op].read_by_backward])
def test_training_batch_norm_backward_does_not_read_the_running_stats(name):
    _, call = HIDDEN_CALLS[name]
    x = torch.randn(4, 3, 5)
    grads = []
    for change in (False, True):
        mean, var = _stats()
        w = torch.ones(3, requires_grad=True)
        leaf = x.clone().requires_grad_()
        out = call(leaf, w, torch.zeros(3), mean, var)
        if change:  # after the save, out of autograd's sight: backward sees the new values if it reads them
            mean.data.add_(100.0)
            var.data.mul_(50.0)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        grads.append((leaf.grad, w.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_the_functional_batch_norm_returns_what_its_inplace_twin_writes():
    functional = HIDDEN_WRITES[aten._native_batch_norm_legit_functional.default]
    assert written_args(functional.op) == ()  # it writes nothing: the new values are results
    assert written_args(functional.inplace) == functional.written  # its twin's schema marks them
    x = torch.randn(4, 3, 5)
    mean, var = _stats()
    results = functional.op(x, None, None, mean, var, True, 0.1, 1e-5)
    functional.inplace(x, None, None, mean, var, True, 0.1, 1e-5)
    for k, written in zip(functional.new_values, (mean, var)):
        torch.testing.assert_close(results[k], written)


# Ops called in eager on fresh tensors: the arguments whose version moved are the written ones.
WRITTEN_CALLS = [
    (aten.add_.Tensor, lambda t: (t[0], t[1])),
    (aten.add.Tensor, lambda t: (t[0], t[1])),
    (aten.add.out, lambda t: (t[0], t[1], 1, t[2])),
    (aten.max.dim_max, lambda t: (t[0], 0, False, t[1], torch.zeros(3, dtype=torch.long))),
    (aten.index_put_.default, lambda t: (t[0], (torch.tensor([0]),), t[1][:1])),
    (aten.addcmul_.default, lambda t: (t[0], t[1], t[2])),
]


@pytest.mark.parametrize("op, args", WRITTEN_CALLS, ids=lambda v: str(v) if isinstance(v, torch._ops.OpOverload) else "")
def test_written_args_are_the_arguments_eager_bumps(op, args):
    values = args([torch.randn(3) for _ in range(3)])
    positional = [v for v in values]
    names = [a.name for a in op._schema.arguments]
    kw = {names[i]: positional[i] for i in range(len(positional)) if op._schema.arguments[i].kwarg_only}
    pos = [v for i, v in enumerate(positional) if not op._schema.arguments[i].kwarg_only]
    tensors = {i: v for i, v in enumerate(positional) if isinstance(v, torch.Tensor)}
    before = {i: v._version for i, v in tensors.items()}
    op(*pos, **kw)
    bumped = tuple((i, names[i]) for i, v in tensors.items() if v._version != before[i])
    assert written_args(op) == bumped


def test_a_python_function_has_no_written_args():
    assert written_args(torch.add) == ()
    assert written_args(operator.iadd) == ()


def test_kron_out_bumps_no_version_in_eager():
    out = torch.zeros(4, 4)
    torch.kron(torch.ones(2, 2), torch.ones(2, 2), out=out)
    assert out._version == 0 and out.sum() == 16
    assert torch.kron in OUT_UNVERSIONED_IN_EAGER and aten.kron.out in OUT_UNVERSIONED_IN_EAGER


def _aten_graph(fn, *args):
    return torch.fx.experimental.proxy_tensor.make_fx(fn)(*args)


def test_view_chain_ends_at_the_storage_eager_shares():
    def fn(x):
        return x.t()[0].unsqueeze(0), x.split(2)[1]

    gm = _aten_graph(fn, torch.randn(4, 3))
    (x,) = gm.graph.find_nodes(op="placeholder")
    eager = fn(torch.randn(4, 3))
    for out_node, value in zip(gm.graph.output_node().args[0], eager):
        assert view_chain(out_node)[-1] is x
        assert value._base is not None  # eager: a view of the input too
    assert aliased_arg(x) is None


def test_an_out_of_place_op_aliases_nothing():
    gm = _aten_graph(lambda x: x * 2, torch.randn(3))
    (mul,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert aliased_arg(mul) is None


@pytest.mark.parametrize("op", list(RESPELLED), ids=str)
def test_every_respelled_op_writes_its_self_or_noise(op):
    # What functionalize must respell: an op whose schema writes (the twin it would use does not).
    assert written_args(op)
    if RESPELLED[op] in ("compare", "untracked"):
        assert written_args(out_of_place_twin(op)) == ()


def test_spelled_in_place():
    # Dynamo's spellings (FACTS.md): `x.add_()` a call_method, `t[i] = y` operator.setitem,
    # `torch.relu_` a call_function, `F.relu(inplace=True)` a kwarg.
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    nodes = [
        graph.call_method("add_", (x, 1)),
        graph.call_function(operator.setitem, (x, 0, 2.0)),
        graph.call_function(torch.relu_, (x,)),
        graph.call_function(F.relu, (x,), {"inplace": True}),
        graph.call_function(operator.iadd, (x, 1)),
        graph.call_method("add", (x, 1)),
        graph.call_method("__add__", (x, 1)),
        graph.call_function(F.relu, (x,)),
        graph.call_function(operator.add, (x, 1)),
    ]
    assert [is_spelled_inplace(n) for n in nodes] == [True] * 5 + [False] * 4


@pytest.mark.parametrize("op", [operator.iadd, operator.imul, operator.isub, operator.itruediv])
def test_operator_inplace_functions_write_their_tensor_in_eager(op):
    t = torch.ones(3)
    before = t._version
    assert op(t, 2.0) is t and t._version > before  # what `is_spelled_inplace` claims for them
