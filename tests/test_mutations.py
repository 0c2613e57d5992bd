"""Every spelling of "in place" is found, and resolved to what it really writes.

The expected facts come from eager PyTorch: which storages an op's schema writes (seen by a
dispatch mode), which values and `_version` counters changed after a call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxinplace
from conftest import eager_effects, eager_writes, quiet_audit


@torch.library.custom_op("fxinplace_test::scale_", mutates_args=("t",))
def scale_(t: torch.Tensor, factor: float) -> None:
    t.mul_(factor)


@scale_.register_fake
def _(t, factor):
    return None


class Case(nn.Module):
    """A linear layer, then a body (a lambda of the case) on its output."""

    def __init__(self, body, with_buffer=False, with_bn=False):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.body = body
        self.register_buffer("buf", torch.zeros(6))
        self.bn = nn.BatchNorm1d(6) if with_bn else None
        self.act = nn.ReLU(inplace=True)
        self.threshold = nn.Threshold(0.1, 0.0, inplace=True)
        self.w = nn.Parameter(torch.ones(6))

    def forward(self, x):
        h = self.fc(x)
        return self.body(self, h, x)


def _method(m, h, x):
    h.add_(1)
    return h.sum()


def _torch_function(m, h, x):
    torch.relu_(h)
    return h.sum()


def _clamp(m, h, x):
    h.clamp_(-1, 1)
    return h.sum()


def _masked_fill(m, h, x):
    h.masked_fill_(h > 0, 0.0)
    return h.sum()


def _index_put(m, h, x):
    h.index_put_((torch.tensor([0], device=h.device),), torch.ones(6, device=h.device))
    return h.sum()


def _copy(m, h, x):
    h.copy_(torch.zeros_like(h))
    return h.sum()


def _zero(m, h, x):
    h.zero_()
    return h.sum()


def _functional_inplace(m, h, x):
    h = F.relu(h, inplace=True)
    return h.sum()


def _module_inplace(m, h, x):
    h = m.act(h)
    return h.sum()


# Torch functions Dynamo inlines: their own frames (`nn/functional.py`, `nn/init.py`) end
# the stack trace, and the line reported is still the user's.
def _threshold(m, h, x):
    F.threshold(h, 0.1, 0.0, inplace=True)
    return h.sum()


def _threshold_module(m, h, x):
    m.threshold(h)
    return h.sum()


def _init_constant(m, h, x):
    nn.init.constant_(m.w, 0.5)
    return (h * m.w).sum()


# ... and others it records as one call, for comparison.
def _other_functionals(m, h, x):
    F.hardtanh(h, inplace=True)
    F.leaky_relu(h, 0.1, inplace=True)
    F.elu(h, inplace=True)
    F.dropout(h, 0.5, training=True, inplace=True)
    return h.sum()


def _iadd(m, h, x):
    h += 1
    return h.sum()


def _slice_assign(m, h, x):
    h[:, 0] = 0
    return h.sum()


def _mask_assign(m, h, x):
    h[h > 0.5] = 0
    return h.sum()


def _out_into_buffer(m, h, x):
    torch.add(h[0].detach(), 1, out=m.buf)
    return h.sum()


def _data_write(m, h, x):
    m.w.data.mul_(2)
    return (h * m.w).sum()


def _data_rebind(m, h, x):
    m.w.data = F.normalize(m.w.data, dim=0)
    return (h * m.w).sum()


def _view_of_view(m, h, x):
    h.t()[0].add_(1)
    return h.sum()


def _custom_op(m, h, x):
    g = h * 2
    scale_(g, 3.0)
    return g.sum()


def _batch_norm(m, h, x):
    return m.bn(h).sum()


def _no_grad_param(m, h, x):
    with torch.no_grad():
        m.w.clamp_(0, 0.5)
    return (h * m.w).sum()


def _input_write(m, h, x):
    x.mul_(2)
    return h.sum()


def _buffer_ema(m, h, x):
    with torch.no_grad():
        m.buf.mul_(0.9).add_(h.mean(0), alpha=0.1)
    return h.sum()


def _chunk_of_buffer(m, h, x):
    a, b = m.buf.chunk(2)
    b.fill_(1)
    return h.sum()


def _unbind_of_buffer(m, h, x):
    m.buf.view(2, 3).unbind(0)[1].zero_()
    return h.sum()


def _split_narrow_select(m, h, x):
    m.buf.add_(1).view(3, 2).split(2)[1].narrow(1, 0, 1).select(1, 0).mul_(3)
    return h.sum()


def _detach_reshape_transpose(m, h, x):
    h.detach().reshape(-1)[:3].zero_()
    h.transpose(0, 1).transpose(0, 1).view(-1)[0] = 5.0
    return h.sum()


def _expand_read_then_write(m, h, x):
    e = m.buf.expand(3, 6)
    y = h + e
    m.buf.add_(1)
    return y.sum()


CASES = {
    "method add_": (_method, {}),
    "torch.relu_": (_torch_function, {}),
    "clamp_": (_clamp, {}),
    "masked_fill_": (_masked_fill, {}),
    "index_put_": (_index_put, {}),
    "copy_": (_copy, {}),
    "zero_": (_zero, {}),
    "F.relu(inplace=True)": (_functional_inplace, {}),
    "nn.ReLU(inplace=True)": (_module_inplace, {}),
    "F.threshold(inplace=True)": (_threshold, {}),
    "nn.Threshold(inplace=True)": (_threshold_module, {}),
    "nn.init.constant_": (_init_constant, {}),
    "hardtanh, leaky_relu, elu, dropout (inplace=True)": (_other_functionals, {}),
    "+=": (_iadd, {}),
    "slice assignment": (_slice_assign, {}),
    "mask assignment": (_mask_assign, {}),
    "out= into a buffer": (_out_into_buffer, {}),
    ".data write": (_data_write, {}),
    ".data = v": (_data_rebind, {}),
    "view of a view": (_view_of_view, {}),
    "custom op with mutable arg": (_custom_op, {}),
    "batch norm running stats": (_batch_norm, {"with_bn": True}),
    "no_grad parameter clamp": (_no_grad_param, {}),
    "user input write": (_input_write, {}),
    "buffer EMA": (_buffer_ema, {}),
    "chunk of a buffer": (_chunk_of_buffer, {}),
    "unbind of a view of a buffer": (_unbind_of_buffer, {}),
    "split > narrow > select": (_split_narrow_select, {}),
    "detach > reshape, transpose > view": (_detach_reshape_transpose, {}),
    "expand read, then write the base": (_expand_read_then_write, {}),
}


def _model(body, **kw) -> Case:
    torch.manual_seed(0)
    return Case(body, **kw).train()


@pytest.mark.parametrize("body, kw", CASES.values(), ids=CASES.keys())
def test_mutations_match_eager(body, kw):
    model, x = _model(body, **kw), torch.randn(3, 4)
    written = eager_writes(model, {"x": x}, __file__)
    effects = eager_effects(model, {"x": x})
    report = quiet_audit(model, x.clone())

    expected_named = {k for k in written if k[0] != "intermediate"} | set(effects.changed)
    found_named = {(m.target.kind, m.target.name) for m in report.mutations if m.target.kind != "intermediate"}
    assert found_named == expected_named

    for key, lines in written.items():
        ours = [m for m in report.mutations if (m.target.kind, m.target.name if key[1] else None) == key]
        assert ours, f"no mutation of {key} reported"
        assert {m.source.line for m in ours} == lines, f"lines of {key}"

    for m in report.mutations:
        if m.target.kind != "intermediate":
            key = (m.target.kind, m.target.name)
            # autograd sees a write exactly when the version counter of the target moved.
            assert m.autograd_visible == (key in effects.version_moved), key


def test_bn_running_stats_are_found_though_no_schema_or_counter_shows_them():
    model, x = _model(_batch_norm, with_bn=True), torch.randn(3, 4)
    effects = eager_effects(model, {"x": x})
    assert ("buffer", "bn.running_mean") in effects.changed
    assert ("buffer", "bn.running_mean") not in effects.version_moved
    report = quiet_audit(model, x)
    stats = {m.target.name: m for m in report.mutations if m.target.name.startswith("bn.running")}
    assert set(stats) == {"bn.running_mean", "bn.running_var"}
    assert all(not m.autograd_visible for m in stats.values())
    assert all(m.hazards[0].code == "buffer-update" and m.hazards[0].severity == "info" for m in stats.values())


def test_eval_mode_batch_norm_writes_nothing():
    model, x = _model(_batch_norm, with_bn=True).eval(), torch.randn(3, 4)
    assert eager_effects(model, {"x": x}).changed == frozenset()
    assert quiet_audit(model, x).mutations == []


def test_view_chain_and_module_path_are_recorded():
    model, x = _model(_view_of_view), torch.randn(3, 4)
    (mutation,) = quiet_audit(model, x).mutations
    assert mutation.target.kind == "intermediate" and mutation.target.produced_by == "linear"
    assert mutation.view_chain == ("t", "getitem")

    model = _model(_module_inplace)
    (mutation,) = quiet_audit(model, x).mutations
    assert mutation.module == "act" and mutation.op == "relu(inplace=True)"


def test_no_grad_is_recorded_from_the_grad_mode_at_the_write():
    model, x = _model(_no_grad_param), torch.randn(3, 4)
    (mutation,) = quiet_audit(model, x).mutations
    assert mutation.under_no_grad and mutation.target.name == "w"
    (mutation,) = quiet_audit(_model(_method), x).mutations
    assert not mutation.under_no_grad


def test_writes_to_caller_inputs_really_change_the_callers_tensor():
    model, x = _model(_input_write), torch.randn(3, 4)
    before = x.clone()
    report = quiet_audit(model, x)
    assert torch.equal(x, before * 2)  # the audit runs the model for real, once (doubling is exact)
    (mutation,) = report.mutations
    assert (mutation.target.kind, mutation.target.name) == ("input", "x")


# -- out=: every out tensor is written, whatever the counters show ---------------------------


def _spd(x):
    return x @ x.t() + 4 * torch.eye(x.shape[0])


_F, _L, _I = torch.float32, torch.long, torch.int32
# op name -> (call with `out`, the out tensors' (shape, dtype)); x is a 4x4 input.
OUT_OPS = {
    "max": (lambda x, out: torch.max(x, 1, out=out), [((4,), _F), ((4,), _L)]),
    "min": (lambda x, out: torch.min(x, 1, out=out), [((4,), _F), ((4,), _L)]),
    "sort": (lambda x, out: torch.sort(x, 1, out=out), [((4, 4), _F), ((4, 4), _L)]),
    "topk": (lambda x, out: torch.topk(x, 2, out=out), [((4, 2), _F), ((4, 2), _L)]),
    "kthvalue": (lambda x, out: torch.kthvalue(x, 2, 1, out=out), [((4,), _F), ((4,), _L)]),
    "median": (lambda x, out: torch.median(x, 1, out=out), [((4,), _F), ((4,), _L)]),
    "mode": (lambda x, out: torch.mode(x, 1, out=out), [((4,), _F), ((4,), _L)]),
    "cummax": (lambda x, out: torch.cummax(x, 1, out=out), [((4, 4), _F), ((4, 4), _L)]),
    "cummin": (lambda x, out: torch.cummin(x, 1, out=out), [((4, 4), _F), ((4, 4), _L)]),
    "aminmax": (lambda x, out: torch.aminmax(x, dim=1, out=out), [((4,), _F), ((4,), _F)]),
    "frexp": (lambda x, out: torch.frexp(x, out=out), [((4, 4), _F), ((4, 4), _I)]),
    "linalg.qr": (lambda x, out: torch.linalg.qr(x, out=out), [((4, 4), _F), ((4, 4), _F)]),
    "svd": (lambda x, out: torch.svd(x, out=out), [((4, 4), _F), ((4,), _F), ((4, 4), _F)]),
    "linalg.svd": (lambda x, out: torch.linalg.svd(x, out=out), [((4, 4), _F), ((4,), _F), ((4, 4), _F)]),
    "linalg.lu": (lambda x, out: torch.linalg.lu(x, out=out), [((4, 4), _F)] * 3),
    "linalg.lu_factor": (lambda x, out: torch.linalg.lu_factor(x, out=out), [((4, 4), _F), ((4,), _I)]),
    "linalg.eigh": (lambda x, out: torch.linalg.eigh(_spd(x), out=out), [((4,), _F), ((4, 4), _F)]),
    "linalg.slogdet": (lambda x, out: torch.linalg.slogdet(x, out=out), [((), _F), ((), _F)]),
    "linalg.inv_ex": (lambda x, out: torch.linalg.inv_ex(_spd(x), out=out), [((4, 4), _F), ((), _I)]),
    "linalg.cholesky_ex": (lambda x, out: torch.linalg.cholesky_ex(_spd(x), out=out), [((4, 4), _F), ((), _I)]),
    "geqrf": (lambda x, out: torch.geqrf(x, out=out), [((4, 4), _F), ((4,), _F)]),
    "linalg.matrix_rank": (lambda x, out: torch.linalg.matrix_rank(x, out=out[0]), [((), _L)]),
    "split_with_sizes_copy": (lambda x, out: torch.split_with_sizes_copy(x[0], [1, 3], out=list(out)),
                              [((1,), _F), ((3,), _F)]),
    "split_copy": (lambda x, out: torch.split_copy(x[0], 2, out=list(out)), [((2,), _F), ((2,), _F)]),
    "unbind_copy": (lambda x, out: torch.unbind_copy(x, out=list(out)), [((4,), _F)] * 4),
    "kron": (lambda x, out: torch.kron(x[:2, :2], x[2:, 2:], out=out[0]), [((4, 4), _F)]),
    "add": (lambda x, out: torch.add(x, 1, out=out[0]), [((4, 4), _F)]),
    "cat": (lambda x, out: torch.cat([x, x], out=out[0]), [((8, 4), _F)]),
    "linalg.norm": (lambda x, out: torch.linalg.norm(x, out=out[0]), [((), _F)]),
}


class OutCase(nn.Module):
    """`op(x, out=...)` into buffers `o0`, `o1`, ... (or, `into_data`, the first one's `.data`)."""

    def __init__(self, op, outs, into_view=False, into_data=False):
        super().__init__()
        self.op, self.into_view, self.into_data = op, into_view, into_data
        self.fc = nn.Linear(4, 4)
        for i, (shape, dtype) in enumerate(outs):
            if into_data and i == 0:
                self.o0 = nn.Parameter(torch.full(shape, -7, dtype=dtype))  # a value no op here returns
            else:
                self.register_buffer(f"o{i}", torch.full((2, *shape) if into_view else shape, -7, dtype=dtype))
        self.n = len(outs)

    def forward(self, x):
        outs = [getattr(self, f"o{i}") for i in range(self.n)]
        if self.into_view:
            outs = [o[1] for o in outs]
        if self.into_data:
            outs[0] = outs[0].data
        self.op(x, tuple(outs))
        return self.fc(x).sum()


def _out_variants():
    variants = []
    for name, (op, outs) in OUT_OPS.items():
        variants.append(pytest.param(op, outs, {}, id=name))
        if name in ("max", "sort", "split_with_sizes_copy", "unbind_copy", "kron", "linalg.matrix_rank"):
            variants.append(pytest.param(op, outs, {"into_view": True}, id=f"{name}-into-a-view"))
        if name in ("sort", "split_with_sizes_copy", "kron"):
            variants.append(pytest.param(op, outs, {"into_data": True}, id=f"{name}-into-.data"))
    return variants


@pytest.mark.parametrize("op, outs, kw", _out_variants())
def test_every_out_tensor_is_reported_with_what_eager_does(op, outs, kw):
    torch.manual_seed(0)
    model, x = OutCase(op, outs, **kw), torch.randn(4, 4)
    effects = eager_effects(model, {"x": x})
    expected = {("parameter" if kw.get("into_data") and i == 0 else "buffer", f"o{i}") for i in range(len(outs))}
    # Eager PyTorch changes the values of every out tensor. (A dispatch mode is no oracle here:
    # under one, `linalg.matrix_rank(out=)` leaves its out tensor unwritten.)
    assert effects.changed == expected

    report = quiet_audit(model, x.clone())
    rows = {(m.target.kind, m.target.name): m for m in report.mutations}
    assert set(rows) == expected, report.render()
    assert len(report.mutations) == len(expected)
    for key, m in rows.items():
        assert m.autograd_visible == (key in effects.version_moved), key
        assert m.op.endswith("(out=)") and m.source.line == op.__code__.co_firstlineno, key


class RebindThenWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        t = self.w.data * 2
        self.w.data = t
        t.add_(1)  # `t` and `w` share a storage now
        return x * self.w


def test_a_write_after_a_data_rebind_writes_the_parameter():
    model, x = RebindThenWrite(), torch.randn(3, 4)
    effects = eager_effects(model, {"x": x})
    eager = RebindThenWrite()
    eager(x)
    assert torch.equal(eager.w.detach(), torch.full((4,), 3.0))  # the `add_` reached `w`
    report = quiet_audit(model, x)
    assert [(m.op, m.target.kind, m.target.name) for m in report.mutations] == [
        (".data = v", "parameter", "w"), ("add_", "parameter", "w"),
    ]
    # `w` keeps its own version counter through both writes.
    assert ("parameter", "w") not in effects.version_moved
    assert not any(m.autograd_visible for m in report.mutations)


# -- a parameter or buffer registered under several names ------------------------------------


class Scaled(nn.Module):
    def __init__(self, scale, table):
        super().__init__()
        self.scale = scale
        self.register_buffer("table", table)

    def forward(self, h):
        with torch.no_grad():
            self.scale.mul_(2)
            self.table.add_(1)
        return h * self.scale + self.table


class ManyNames(nn.Module):
    """One parameter and one buffer under three names each, and a module registered twice."""

    def __init__(self, graph_break=False):
        super().__init__()
        self.graph_break = graph_break
        self.first = Scaled(nn.Parameter(torch.ones(4)), torch.zeros(4))
        self.shared_scale = self.first.scale  # the root's own: `named_parameters()` lists it first
        self.second = Scaled(self.shared_scale, self.first.table)
        self.lin = nn.Linear(4, 4)
        self.again = self.lin

    def forward(self, x):
        if self.graph_break:
            torch._dynamo.graph_break()
        h = self.second(x)
        with torch.no_grad():
            self.again.weight.mul_(0.5)
        return self.lin(h)


def _pytorch_names(model):
    """id(tensor) -> (name, aliases) as `named_parameters()` / `named_buffers()` give them."""
    names = {}
    for named in (model.named_parameters, model.named_buffers):
        every = {}
        for name, t in named(remove_duplicate=False):
            every.setdefault(id(t), []).append(name)
        for name, t in named():
            names[id(t)] = (name, tuple(n for n in every[id(t)] if n != name))
    return names


def _written_tensors(model):
    return {"parameter": [model.shared_scale, model.lin.weight], "buffer": [model.first.table]}


@pytest.mark.parametrize("how", ["audit", "backend", "backend, model as an argument"])
def test_registered_twice_is_named_as_named_parameters_names_it(how):
    torch.manual_seed(0)
    model, x = ManyNames(), torch.randn(3, 4)
    names = _pytorch_names(model)
    assert names[id(model.shared_scale)] == ("shared_scale", ("first.scale", "second.scale"))
    assert names[id(model.lin.weight)] == ("lin.weight", ("again.weight",))
    if how == "audit":
        report = quiet_audit(model, x)
    else:
        backend = fxinplace.InplaceAudit(compiler="eager", print=False)
        if how == "backend":
            torch.compile(model, backend=backend)(x)
        else:
            torch.compile(lambda m, x: m(x), backend=backend)(model, x)
        report = backend.report
    expected = {(kind, *names[id(t)]) for kind, ts in _written_tensors(model).items() for t in ts}
    found = {(m.target.kind, m.target.name, m.target.aliases) for m in report.mutations}
    assert found == expected
    # Dynamo reaches the tensors through `second` and `again`: not the names PyTorch gives.
    assert {m.target.name for m in report.mutations} == {"shared_scale", "lin.weight", "first.table"}
    (row,) = [m for m in report.mutations if m.target.name == "shared_scale"]
    rows = [m for g in report.to_dict()["graphs"] for m in g["mutations"] if m["target"]["name"] == "shared_scale"]
    assert rows[0]["target"] == {"kind": "parameter", "name": "shared_scale", "aliases": ["first.scale", "second.scale"]}
    assert "parameter shared_scale (also first.scale, second.scale)" in report.render()


def test_names_after_a_graph_break_in_a_submodule_are_the_models():
    torch.manual_seed(0)
    model, x = ManyNames(graph_break=True), torch.randn(3, 4)
    names = _pytorch_names(model)
    report = quiet_audit(model, x)
    expected = {(kind, *names[id(t)]) for kind, ts in _written_tensors(model).items() for t in ts}
    assert {(m.target.kind, m.target.name, m.target.aliases) for m in report.mutations} == expected


def test_without_the_model_dynamos_names_stay():
    from fxinplace._sources import root_modules

    assert root_modules([]) == []  # outside a Dynamo compile there is no frame to look in
    torch.manual_seed(0)
    scale = nn.Parameter(torch.ones(4))

    def step(x):
        with torch.no_grad():
            scale.mul_(2)
        return x * scale

    backend = fxinplace.InplaceAudit(compiler="eager", print=False)
    torch.compile(step, backend=backend)(torch.randn(3, 4))
    (row,) = backend.report.mutations
    assert (row.target.kind, row.target.name, row.target.aliases) == ("input", "scale", ())


# -- batch norm's ATen ops: running statistics written, no counter or schema run shows it ----


class AtenBatchNorm(nn.Module):
    def __init__(self, op, out):
        super().__init__()
        self.op, self.out = op, out
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        for name in ("o0", "o1", "o2"):
            self.register_buffer(name, torch.zeros(3, 4) if name == "o0" else torch.zeros(4))

    def forward(self, x):
        if self.out:
            self.op(x, None, None, self.rm, self.rv, True, 0.5, 1e-5, out=(self.o0, self.o1, self.o2))
            return self.o0.sum()
        return self.op(x, None, None, self.rm, self.rv, True, 0.5, 1e-5)[0].sum()


@pytest.mark.parametrize("out", [False, True], ids=["functional", "out="])
@pytest.mark.parametrize("op", [torch.native_batch_norm, torch._native_batch_norm_legit], ids=lambda op: op.__name__)
def test_aten_batch_norm_running_stats_are_found(op, out):
    # Found by tests/opinfo_audit.py: `native_batch_norm(out=)` and `_native_batch_norm_legit(out=)`
    # with running statistics as inputs; the audit named the out tensors only.
    torch.manual_seed(0)
    model, x = AtenBatchNorm(op, out), torch.randn(3, 4)
    effects = eager_effects(model, {"x": x})
    stats = {("buffer", "rm"), ("buffer", "rv")}
    assert stats <= effects.changed and not stats & effects.version_moved
    report = quiet_audit(model, x)
    found = {(m.target.kind, m.target.name) for m in report.mutations}
    assert found == set(effects.changed), report.render()
    assert all(not m.autograd_visible for m in report.mutations if (m.target.kind, m.target.name) in stats)
