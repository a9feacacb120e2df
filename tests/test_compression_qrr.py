"""QRR: Eckart-Young, Tucker, sign alignment (and what it saves), bit counts on the wire."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from algorithms import get_algorithm
from algorithms.base import ConfigError, Payload
from algorithms.qrr import align_svd, randomized_svd, truncated_svd, tucker, tucker_to_tensor
from tests.fakes import FakeClientContext
from tests.statesync import TinyCNN, digits_problem, tiny_data
from tests.test_compression_laq import wire_check


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_truncated_svd_error_is_the_discarded_tail(m, n, k, seed):
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = min(k, m, n)
    u, s, vh = truncated_svd(a, k)
    tail = torch.linalg.svdvals(a)[k:]
    err = torch.linalg.matrix_norm(a - (u * s) @ vh)   # Frobenius
    assert math.isclose(float(err), float(tail.norm()), rel_tol=1e-6, abs_tol=1e-9)
    if k < min(m, n):
        assert math.isclose(float(torch.linalg.matrix_norm(a - (u * s) @ vh, ord=2)), float(tail[0]), rel_tol=1e-6)


def test_randomized_svd_is_near_optimal_on_low_rank_plus_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 5, generator=g) @ torch.randn(5, 80, generator=g) + 0.01 * torch.randn(60, 80, generator=g)
    u, s, vh = randomized_svd(a, 5, torch.Generator().manual_seed(1))
    ue, se, vhe = truncated_svd(a, 5)
    assert float(torch.linalg.matrix_norm(a - (u * s) @ vh)) <= 1.01 * float(torch.linalg.matrix_norm(a - (ue * se) @ vhe))


def test_tucker_full_rank_reconstructs_and_truncation_approximates():
    t = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    core, factors = tucker(t, (6, 4, 3, 3))
    assert torch.allclose(tucker_to_tensor(core, factors), t, atol=1e-4)
    core, factors = tucker(t, (3, 2, 2, 2))
    assert core.shape == (3, 2, 2, 2) and [f.shape for f in factors] == [(6, 3), (4, 2), (3, 2), (3, 2)]
    assert float((tucker_to_tensor(core, factors) - t).norm()) < float(t.norm())


def test_sign_alignment_leaves_the_product_and_saves_radius():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 20, generator=g)
    u, s, vh = truncated_svd(a, 4)
    flipped_u, flipped_vh = u * torch.tensor([1.0, -1, -1, 1]), vh * torch.tensor([1.0, -1, -1, 1])[:, None]
    au, as_, avh = align_svd(flipped_u, s, flipped_vh, u, vh)
    assert torch.allclose((au * as_) @ avh, (u * s) @ vh, atol=1e-5)
    assert torch.allclose(au, u) and torch.allclose(avh, vh)


def _radii_over_rounds(align: bool, svd: str, rounds: int = 8) -> float:
    """Sum of the LAQ radii QRR uploads for one client whose gradient drifts slowly."""
    model, parts, _ = digits_problem(1)
    cls = get_algorithm("qrr")
    alg = cls(cls.make_config({"rank_fraction": 0.3, "bits": 8, "align_signs": align, "svd": svd, "batch_size": 0}), model)
    ctx = FakeClientContext(0, model, *parts[0])
    params = {k: v.clone() for k, v in alg.params.items()}
    ack, total = None, 0.0
    for r in range(rounds):
        ctx.round = r
        reply = alg.on_grad(ctx, Payload(tensors=params, meta={"ack": ack}, version=r))
        if r:  # the first upload is a reset against 0 either way
            total += float(reply.tensors["radii"].sum())
        ack = reply.meta["tag"]
        params = {k: v * 0.995 for k, v in params.items()}  # a small step: gradients stay close
    return total


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_sign_alignment_never_hurts_and_saves_when_signs_flip(svd):
    aligned, raw = _radii_over_rounds(True, svd), _radii_over_rounds(False, svd)
    assert aligned <= raw
    if svd == "randomized":  # a fresh random range each round: arbitrary signs, big savings
        assert aligned < 0.5 * raw, (aligned, raw)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_payload_bits_follow_the_paper_and_the_wire(svd):
    torch.manual_seed(0)
    model = TinyCNN()
    (x, y), = tiny_data("cnn", 1)
    cls = get_algorithm("qrr")
    bits, p = 5, 0.5
    alg = cls(cls.make_config({"rank_fraction": p, "bits": bits, "svd": svd}), model)
    reply = alg.on_grad(FakeClientContext(0, model, x, y), Payload(tensors=alg.params, meta={"ack": None}, version=0))
    expected = 0
    for name, t in alg.params.items():
        if t.ndim == 2:
            (m, n), k = t.shape, math.ceil(p * min(t.shape))
            expected += 3 * 32 + bits * (m * k + k + k * n)
        elif t.ndim == 4:
            ranks = [math.ceil(p * d) for d in t.shape]
            expected += 5 * 32 + bits * (math.prod(ranks) + sum(d * r for d, r in zip(t.shape, ranks)))
        else:
            expected += 32 + bits * t.numel()
    assert [plan[0] for plan in alg.plan.values()] == ["tucker", "direct", "svd", "direct"]
    assert reply.payload_bits == expected
    wire_check(reply, float_scalars=len(alg.layout))
    alg.check_reply("grad", reply)


def test_fc_bits_formula_on_mlp_784_200_10():
    model = torch.nn.Sequential(torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    alg = get_algorithm("qrr")(get_algorithm("qrr").make_config({"rank_fraction": 0.3, "bits": 8}), model)
    k1, k2 = 60, 3
    assert alg.upload_bits() == (96 + 8 * (200 * k1 + k1 + k1 * 784)) + (32 + 8 * 200) + (96 + 8 * (10 * k2 + k2 + k2 * 200)) + (32 + 8 * 10)
    assert alg.upload_bits() / (32 * sum(p.numel() for p in model.parameters())) < 0.1


@pytest.mark.parametrize("key,value", [("rank_fraction", 0), ("rank_fraction", 1.5), ("svd", "qr"), ("bits", 0)])
def test_bad_config(key, value):
    with pytest.raises(ConfigError):
        get_algorithm("qrr").make_config({key: value})


def test_paper_cnn_upload_is_under_a_tenth_of_sgd_by_the_authors_formula():
    """The QRR paper's CNN on 28x28 (fedsim model ``qrr_cnn``), p = 0.3, b = 8: the authors' bit
    formula gives 7.85% of SGD's 32-bit upload (p = 0.1: 2.76%, p = 0.2: 5.11%). The 3x3 kernels
    keep rank ceil(0.3 * 3) = 1 in both spatial modes of their Tucker decomposition."""
    from algorithms import get_algorithm
    from algorithms.common import dense_bits
    from fedsim.models import ModelConfig, build_model

    model = build_model(ModelConfig(kind="qrr_cnn"), (1, 28, 28), 10, seed=1)
    cls = get_algorithm("qrr")
    ratios = {}
    for p in (0.1, 0.2, 0.3):
        alg = cls(cls.make_config({"rank_fraction": p, "bits": 8}), model)
        ratios[p] = alg.upload_bits() / dense_bits(alg.params)
    assert ratios[0.1] < ratios[0.2] < ratios[0.3] < 0.10
    alg = cls(cls.make_config({"rank_fraction": 0.3, "bits": 8}), model)
    assert alg.plan["2.weight"] == ("tucker", (10, 5, 1, 1)) and alg.plan["6.weight"] == ("svd", 20)


def test_exact_svd_of_a_low_rank_float32_gradient_and_its_fallbacks():
    """The sketch's path (common._range_svd) on a rank-32 200 x 784 float32 matrix, as a batch-32
    gradient of the 784-200-10 MLP: the best rank-k product, orthonormal singular vectors up to
    the rank and zero triplets beyond it. A matrix whose rank exceeds the sketch (or a tail the
    sketch misses) goes to torch.linalg.svd and gets its factors bit for bit."""
    g = torch.Generator().manual_seed(11)
    low = torch.randn(200, 32, generator=g) @ torch.randn(32, 784, generator=g)
    u, s, vh = truncated_svd(low, 60)
    ref = torch.linalg.svdvals(low.double())
    assert u.shape == (200, 60) and s.shape == (60,) and vh.shape == (60, 784)
    assert float((s[:32].double() - ref[:32]).abs().max()) < 1e-5 * float(ref[0])
    assert float(((u * s) @ vh - low).norm()) < 1e-5 * float(low.norm())
    torch.testing.assert_close(u[:, :32].T @ u[:, :32], torch.eye(32), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh[:32] @ vh[:32].T, torch.eye(32), rtol=0, atol=1e-5)
    assert not s[32:].any() and not u[:, 32:].any() and not vh[32:].any()
    for k in (10, 32):  # truncation below the rank: Eckart-Young
        u, s, vh = truncated_svd(low, k)
        err = float(torch.linalg.matrix_norm(low.double() - (u * s).double() @ vh.double()))
        assert math.isclose(err, float(ref[k:].norm()), rel_tol=1e-3, abs_tol=1e-4 * float(ref[0]))
    tail = low + 1e-3 * float(low.abs().max()) * torch.randn(200, 784, generator=g)
    full = torch.randn(200, 100, generator=g) @ torch.randn(100, 784, generator=g)
    for a in (tail, full):
        u, s, vh = truncated_svd(a, 60)
        ue, se, vhe = torch.linalg.svd(a, full_matrices=False)
        assert torch.equal(u, ue[:, :60]) and torch.equal(s, se[:60]) and torch.equal(vh, vhe[:60])
    zero = torch.zeros(200, 784)
    u, s, vh = truncated_svd(zero, 60)
    assert not u.any() and not s.any() and not vh.any()


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_svd_aligns_signs_itself_as_align_svd_does(svd):
    """truncated_svd / randomized_svd with ``align_to`` flip the same pairs as align_svd on
    their unaligned output (on the sketch's path the flips are made on its small factors)."""
    g = torch.Generator().manual_seed(12)
    a = torch.randn(200, 20, generator=g) @ torch.randn(20, 784, generator=g)
    prev_u, prev_vh = torch.randn(200, 30, generator=g), torch.randn(30, 784, generator=g)
    if svd == "exact":
        plain, aligned = truncated_svd(a, 30), truncated_svd(a, 30, align_to=(prev_u, prev_vh))
    else:
        plain = randomized_svd(a, 30, torch.Generator().manual_seed(1))
        aligned = randomized_svd(a, 30, torch.Generator().manual_seed(1), align_to=(prev_u, prev_vh))
    expected = align_svd(*plain, prev_u, prev_vh)
    assert any(bool((x < 0).any()) for x in ((plain[0] * expected[0]).sum(0),))  # some pair was flipped
    for got, want in zip(aligned, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
