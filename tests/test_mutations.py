"""Every spelling of "in place" is found, and resolved to what it really writes.

The expected facts come from eager PyTorch: which storages an op's schema writes (seen by a
dispatch mode), which values and `_version` counters changed after a call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
