"""LAQ's uniform innovation quantizer and LQ-SGD's log quantizer: bounds, exact inverses, safety."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from algorithms import quantizers as qz
from algorithms.base import ProtocolError

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def _tensor(values):
    return torch.tensor(values, dtype=torch.float32)


@settings(max_examples=150, deadline=None)
@given(g=st.lists(finite, min_size=0, max_size=40), bits=st.integers(1, 16), data=st.data())
def test_laq_error_within_tau_radius(g, bits, data):
    q_prev = _tensor(data.draw(st.lists(finite, min_size=len(g), max_size=len(g))))
    g = _tensor(g)
    out = qz.laq_quantize(g, q_prev, bits)
    radius = float(out.scale)
    assert radius == (float((g - q_prev).abs().max()) if len(g) else 0.0)
    err = (g - out.value).abs()
    # tau*R plus float32 rounding of the reconstruction
    slack = 1e-6 * (radius + float(q_prev.abs().max()) if len(g) else 0.0) + 1e-30
    assert bool((err <= qz.tau(bits) * radius + slack).all())
    # the receiver computes the same bits
    assert torch.equal(qz.laq_dequantize(q_prev, out.scale, out.packed, bits), out.value)
    assert out.packed.numel() == (len(g) * bits + 7) // 8


@pytest.mark.parametrize("bits", [1, 4, 8, 16])
def test_laq_zero_innovation_is_safe(bits):
    q = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    out = qz.laq_quantize(q.clone(), q, bits)
    assert float(out.scale) == 0.0
    assert torch.equal(out.value, q)
    assert torch.isfinite(out.value).all()
    zero = qz.laq_quantize(torch.zeros(4), torch.zeros(4), bits)
    assert torch.equal(zero.value, torch.zeros(4))


def test_laq_values_on_the_grid():
    g = torch.linspace(-3, 5, 101)
    out = qz.laq_quantize(g, torch.zeros(101), 3)
    levels = {round(float(out.scale) * (-1 + 2 * j / 7), 4) for j in range(8)}
    assert {round(v, 4) for v in out.value.tolist()} <= levels


def test_laq_refuses_nan_and_malformed():
    with pytest.raises(ValueError):
        qz.laq_quantize(torch.tensor([1.0, float("nan")]), torch.zeros(2), 4)
    out = qz.laq_quantize(torch.arange(5.0), torch.zeros(5), 4)
    with pytest.raises(ProtocolError):
        qz.laq_dequantize(torch.zeros(5), torch.tensor(float("inf")), out.packed, 4)
    with pytest.raises(ProtocolError):
        qz.laq_dequantize(torch.zeros(5), torch.tensor(-1.0), out.packed, 4)
    with pytest.raises(ProtocolError):
        qz.laq_dequantize(torch.zeros(5), out.scale, out.packed[:-1], 4)
    with pytest.raises(ProtocolError):
        qz.laq_dequantize(torch.zeros(5), out.scale.double(), out.packed, 4)


@settings(max_examples=100, deadline=None)
@given(x=st.lists(finite, min_size=1, max_size=60), bits=st.integers(1, 16),
       alpha=st.sampled_from([0.5, 1.0, 10.0, 100.0, 255.0]))
def test_log_quantizer_monotone_with_error_bound(x, bits, alpha):
    x = torch.sort(_tensor(x)).values
    out = qz.log_quantize(x, bits, alpha)
    s = float(out.scale)
    assert torch.equal(qz.log_dequantize(out.scale, out.packed, bits, alpha, x.shape), out.value)
    # monotone: sorted input gives a sorted reconstruction
    assert bool((out.value[1:] >= out.value[:-1]).all())
    if s > 0:
        u, u_hat = x / s, out.value / s
        bound = qz.log_error_bound(u, bits, alpha)
        assert bool(((u - u_hat).abs() <= bound + 1e-5).all())


def test_log_compand_is_an_exact_inverse_pair():
    u = torch.linspace(-1, 1, 1001)
    for alpha in (0.1, 10.0, 1000.0):
        assert torch.allclose(qz.log_expand(qz.log_compand(u, alpha), alpha), u, atol=1e-5)
        q = qz.log_compand(u, alpha)
        assert bool((q[1:] >= q[:-1]).all()) and float(q.abs().max()) <= 1 + 1e-6


def test_log_quantizer_fine_near_zero():
    # the point of companding: relative resolution for small values beats a uniform grid
    x = torch.tensor([1.0, 0.01, -0.003, 0.0005])
    log_err = (qz.log_quantize(x, 6, 255.0).value - x).abs()[1:]
    uni_err = (qz.laq_quantize(x, torch.zeros(4), 6).value - x).abs()[1:]
    assert float(log_err.sum()) < float(uni_err.sum())


def test_log_zero_and_empty():
    z = qz.log_quantize(torch.zeros(7), 8, 10.0)
    assert float(z.scale) == 0 and torch.equal(z.value, torch.zeros(7))
    e = qz.log_quantize(torch.zeros(0), 8, 10.0)
    assert e.packed.numel() == 0 and e.value.numel() == 0
    assert math.isclose(qz.tau(8), 1 / 255)


def _torch_laq_reference(g, q_prev, bits):
    """LAQ's quantizer as the per-tensor torch formula it was until 2026-12 (the batched numpy
    version must reproduce it bit for bit: the wire bytes and both ends' mirrors)."""
    top = (1 << bits) - 1
    d = g - q_prev
    radius = d.abs().max() if d.numel() else torch.zeros(())
    if float(radius) > 0:
        codes = torch.clamp(torch.round((d / radius + 1.0) * (top / 2.0)), 0, top).to(torch.int64)
    else:
        codes = torch.full(d.shape, (1 << bits) // 2, dtype=torch.int64)
    value = q_prev + radius * (codes.to(torch.float32) * (2.0 / top) - 1.0).reshape(q_prev.shape)
    return radius, codes.reshape(-1), value


def test_batched_laq_quantizer_is_bit_identical_to_the_torch_formula():
    from algorithms import bitpack

    g = torch.Generator().manual_seed(3)
    for case in range(60):
        bits = [8, 1, 2, 4, 5, 7, 12, 16][case % 8]
        shapes = [(200, 6), (6,), (6, 79), (0,), (3, 1, 2), ()][: 2 + case % 5]
        scale = 10.0 ** (case % 9 - 4)
        gs = [torch.randn(s, generator=g) * scale for s in shapes]
        prevs = [torch.randn(s, generator=g) * scale for s in shapes]
        if case % 3 == 0:
            prevs[0] = gs[0].clone()  # zero innovation: R = 0
        out = qz.laq_quantize_many(gs, prevs, bits)
        radii = torch.stack([o.scale for o in out])
        back = qz.laq_dequantize_many(prevs, radii, [o.packed for o in out], bits)
        for x, p, o, b in zip(gs, prevs, out, back):
            radius, codes, value = _torch_laq_reference(x, p, bits)
            assert float(o.scale) == float(radius)
            assert torch.equal(o.packed, bitpack.pack(codes, bits))
            assert torch.equal(o.value, value) and torch.equal(b, value) and o.value.shape == p.shape
            assert torch.equal(qz.laq_quantize(x, p, bits).value, value)
    with pytest.raises(ValueError):
        qz.laq_quantize_many([torch.zeros(3), torch.tensor([1.0, float("inf")])], [torch.zeros(3), torch.zeros(2)], 8)
    with pytest.raises(ProtocolError):
        qz.laq_dequantize_many([torch.zeros(3)], torch.tensor([-1.0]), [torch.zeros(3, dtype=torch.uint8)], 8)
