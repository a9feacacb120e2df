"""The shared low-rank math (algorithms/lowrank.py), each function alone."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from algorithms import ConfigError
from algorithms.lowrank import (augment_basis, check_rank_fits, float_bits, linear_weights, loss_and_grads,
                                pad_coefficients, scaled_factor_grads, svd_factors, truncate, truncation_rank)


def _orthonormal(n, r, seed):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 16), r=st.integers(1, 8), seed=st.integers(0, 10_000), inside=st.booleans())
def test_augmented_basis_is_orthonormal_and_extends_u(n, r, seed, inside):
    r = min(r, n)
    U = _orthonormal(n, r, seed)
    g = torch.Generator().manual_seed(seed + 1)
    G = U @ torch.randn(r, r, generator=g, dtype=torch.float64) if inside else torch.randn(n, r, generator=g, dtype=torch.float64)
    new = augment_basis(U, G)
    assert new.shape == (n, min(r, n - r))
    full = torch.cat([U, new], dim=1)
    assert torch.allclose(full.T @ full, torch.eye(full.shape[1], dtype=torch.float64), atol=1e-10)
    if not inside and n >= 2 * r:
        # The gradient lies in the augmented span.
        assert torch.allclose(full @ (full.T @ G), G, atol=1e-9)


def test_truncation_rank_keeps_the_smallest_rank_within_tolerance():
    sigma = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.01])
    total = float(torch.linalg.vector_norm(sigma))
    assert truncation_rank(sigma, 0.5, 10) == 1          # tail ||[5, 1, .1, .01]|| = 5.1 <= 5.6
    assert truncation_rank(sigma, 1.05 / total, 10) == 2  # tail 1.005 <= 1.05
    assert truncation_rank(sigma, 0.0101 / total, 10) == 4
    assert truncation_rank(sigma, 1e-9, 10) == 5
    assert truncation_rank(sigma, 1e-9, 3) == 3           # the cap wins
    assert truncation_rank(torch.zeros(3), 0.1, 3) == 1


def test_truncate_recovers_a_low_rank_product_and_keeps_bases_orthonormal():
    g = torch.Generator().manual_seed(0)
    U, V = _orthonormal(12, 6, 1), _orthonormal(9, 6, 2)
    S = torch.zeros(6, 6, dtype=torch.float64)
    S[:2, :2] = torch.randn(2, 2, generator=g, dtype=torch.float64)
    S[2:3, :] = 1e-9  # below any sensible tolerance
    f = truncate(U, S, V, tolerance=1e-6, max_rank=6)
    assert f.rank == 2
    assert torch.allclose(f.dense(), U @ S @ V.T, atol=1e-8)
    assert torch.allclose(f.U.T @ f.U, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(f.V.T @ f.V, torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_svd_factors_and_padding():
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    f = svd_factors(W, 5)
    assert torch.allclose(f.dense(), W, atol=1e-5)
    f2 = svd_factors(W, 2)
    assert f2.U.shape == (7, 2) and f2.S.shape == (2, 2) and f2.V.shape == (5, 2)
    padded = pad_coefficients(f2.S, 4, 3)
    assert padded.shape == (4, 3) and torch.equal(padded[:2, :2], f2.S) and padded[2:].abs().sum() == 0


def test_linear_weights_in_parameter_order_and_keep_last_dense():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    assert linear_weights(model) == ["1.weight", "3.weight", "5.weight"]
    assert linear_weights(model, keep_last_dense=True) == ["1.weight", "3.weight"]
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    assert linear_weights(conv) == ["2.weight"]
    with pytest.raises(ConfigError, match="no Linear layer"):
        check_rank_fits(linear_weights(conv, keep_last_dense=True), {}, 2)


def test_loss_and_grads_match_the_dense_gradient_through_factors():
    # d/dS of L(U S Vᵀ) equals Uᵀ ∇_W L V: autograd through the composed weight.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False))
    x, y = torch.randn(16, 5), torch.randn(16, 4)
    f = svd_factors(torch.randn(4, 5), 3)
    _, grads = loss_and_grads(model, lambda leaves: {"0.weight": f.U @ leaves["S"] @ f.V.T}, {"S": f.S}, x, y, "mse")
    _, dense = loss_and_grads(model, lambda leaves: {"0.weight": leaves["W"]}, {"W": f.dense()}, x, y, "mse")
    assert torch.allclose(grads["S"], f.U.T @ dense["W"] @ f.V, atol=1e-6)


def test_float_bits_counts_32_per_value():
    assert float_bits({"a": torch.zeros(3, 4), "b": torch.zeros(5)}) == 32 * 17


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), m=st.integers(2, 12), r=st.integers(1, 4), scale=st.floats(0.01, 100.0),
       seed=st.integers(0, 10_000))
def test_scaled_factor_step_never_moves_w_further_than_plain_gradient_descent(n, m, r, scale, seed):
    # First order, the move of B A is G P_A + P_B G with P_A, P_B of eigenvalues in [0, 1):
    # its norm is at most 2 ||G|| whatever the factors' size; plain steps grow with scale².
    r = min(r, n, m)
    g = torch.Generator().manual_seed(seed)
    B = scale * torch.randn(n, r, generator=g, dtype=torch.float64)
    A = scale * torch.randn(r, m, generator=g, dtype=torch.float64)
    G = torch.randn(n, m, generator=g, dtype=torch.float64)
    gB, gA = scaled_factor_grads(G @ A.T, B.T @ G, B, A, damping=0.1)
    move = gB @ A + B @ gA
    assert float(torch.linalg.matrix_norm(move)) <= 2 * float(torch.linalg.matrix_norm(G)) * (1 + 1e-9)
    # With a zero damping the directions are exact projections: G P_A + P_B G.
    gB0, gA0 = scaled_factor_grads(G @ A.T, B.T @ G, B, A, damping=0.0)
    P_A = A.T @ torch.linalg.pinv(A @ A.T) @ A
    P_B = B @ torch.linalg.pinv(B.T @ B) @ B.T
    if torch.linalg.matrix_rank(A) == r and torch.linalg.matrix_rank(B) == r and scale > 0.1:
        assert torch.allclose(gB0 @ A + B @ gA0, G @ P_A + P_B @ G, atol=1e-6 * float(G.abs().max()) * 10)


def test_scaled_factor_step_is_plain_descent_along_an_orthonormal_factor():
    # B with orthonormal columns and A = 0 (FedLoRU's fresh modules for n <= m): the A step is
    # the plain gradient divided by 1 + damping, the B step is 0.
    B, _ = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    A = torch.zeros(2, 9, dtype=torch.float64)
    G = torch.randn(6, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gB, gA = scaled_factor_grads(G @ A.T, B.T @ G, B, A, damping=0.1)
    assert torch.equal(gB, torch.zeros_like(gB))
    assert torch.allclose(gA, B.T @ G / 1.1, atol=1e-12)
