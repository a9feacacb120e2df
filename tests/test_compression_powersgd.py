"""PowerSGD / LQ-SGD: full rank reconstructs, per-layer planning and rank clamping, bit counts
on the wire, NaN handling, LQ-SGD's quarter-size uploads."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from algorithms import get_algorithm
from algorithms.base import ConfigError, Payload
from algorithms.powersgd import low_rank_step
from tests.fakes import FakeClientContext
from tests.statesync import Harness, TinyCNN, digits_problem, tiny_data
from tests.test_compression_laq import wire_check


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 10), m=st.integers(1, 10), seed=st.integers(0, 10**6))
def test_full_rank_power_step_reconstructs(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, m, generator=g, dtype=torch.float64)
    q = torch.randn(m, min(n, m), generator=g, dtype=torch.float64)
    p_hat, q_new = low_rank_step(a, q)
    assert torch.allclose(p_hat @ q_new.T, a, atol=1e-8)


def test_rank_is_clamped_per_layer_and_small_layers_travel_raw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    alg = get_algorithm("powersgd")(get_algorithm("powersgd").make_config({"rank": 50}), model)
    assert alg.plans["0.weight"].rank == 50 and alg.plans["0.weight"].compressed
    assert not alg.plans["2.weight"].compressed    # (10 + 200) * 10 >= 10 * 200
    assert not alg.plans["0.bias"].compressed
    big = get_algorithm("powersgd")(get_algorithm("powersgd").make_config({"rank": 5000}), model)
    assert not big.plans["0.weight"].compressed   # clamped to 200, then (200 + 784) * 200 >= 200 * 784


def _one_client_round(method, config, model, x, y):
    cls = get_algorithm(method)
    alg = cls(cls.make_config(config), model)
    ctx = FakeClientContext(0, model, x, y)
    req = Payload(tensors={**alg.params, **{f"Q:{k}": v for k, v in alg.Q.items()}}, meta={"included": -1}, version=0)
    first = alg.on_p(ctx, req)
    alg.check_reply("p", first)
    p_hat = {k: torch.linalg.qr(alg.decode(first.tensors, alg._p_shapes())[f"P:{k}"]).Q for k in alg.compressed}
    second = alg.on_q(ctx, Payload(tensors={f"P:{k}": v for k, v in p_hat.items()}, meta={"p_tag": "0" * 16}, version=0))
    alg.check_reply("q", second)
    return alg, first, second


@pytest.mark.parametrize("method,config", [("powersgd", {"rank": 2}), ("lqsgd", {"rank": 2, "bits": 8}),
                                           ("lqsgd", {"rank": 3, "bits": 5})])
def test_payload_bits_match_the_wire(method, config):
    torch.manual_seed(0)
    model = TinyCNN()
    (x, y), = tiny_data("cnn", 1)
    alg, first, second = _one_client_round(method, config, model, x, y)
    r = config["rank"]
    comp = [alg.plans[k] for k in alg.compressed]
    raw = [alg.params[k].numel() for k in alg.raw]
    if method == "powersgd":
        assert first.payload_bits == 32 * (sum(p.n * r for p in comp) + sum(raw))
        assert second.payload_bits == 32 * sum(p.m * r for p in comp)
        assert first.tensor_bytes * 8 == first.payload_bits and second.tensor_bytes * 8 == second.payload_bits
    else:
        b = config["bits"]
        assert first.payload_bits == sum(32 + b * p.n * r for p in comp) + sum(32 + b * n for n in raw)
        assert second.payload_bits == sum(32 + b * p.m * r for p in comp)
        wire_check(first, float_scalars=len(comp) + len(raw))
        wire_check(second, float_scalars=len(comp))


def test_lqsgd_uploads_about_a_quarter_of_powersgd():
    model = torch.nn.Sequential(torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    _, p1, p2 = _one_client_round("powersgd", {"rank": 4}, model, x, y)
    _, l1, l2 = _one_client_round("lqsgd", {"rank": 4, "bits": 8}, model, x, y)
    ratio = (l1.tensor_bytes + l2.tensor_bytes) / (p1.tensor_bytes + p2.tensor_bytes)
    assert 0.25 <= ratio < 0.26, ratio


@pytest.mark.parametrize("method", ["powersgd", "lqsgd"])
def test_nan_gradient_abstains_and_model_stays_finite(method):
    h = Harness(method, config={"rank": 2})
    h.run_round()
    h.contexts[2].x = h.contexts[2].x.clone()
    h.contexts[2].x[0, 0] = float("nan")
    h.run_round()
    h.run_round()
    assert h.comm.counters.get("client_nonfinite") == 2
    assert h.params_finite() and h.comm.violations == []


def test_zero_gradients_keep_the_warm_start_alive():
    h = Harness("powersgd", config={"rank": 2})
    for ctx in h.contexts.values():
        ctx.x = torch.zeros_like(ctx.x)
    for _ in range(3):
        h.run_round()
    assert h.params_finite()
    assert all(float(q.norm(dim=0).min()) > 0 for q in h.algorithm.Q.values())


@pytest.mark.parametrize("method,key,value", [("powersgd", "rank", 0), ("powersgd", "rank", 1.5),
                                              ("lqsgd", "bits", 17), ("lqsgd", "log_alpha", 0),
                                              ("lqsgd", "log_alpha", float("inf"))])
def test_bad_config(method, key, value):
    with pytest.raises(ConfigError):
        get_algorithm(method).make_config({key: value})


def test_min_compression_rate_decides_which_layers_compress():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 10))
    cls = get_algorithm("powersgd")
    # rank 8 on 20 x 30: (20 + 30) * 8 = 400 < 600, but 400 * 2 >= 600 (PyTorch's default rate 2)
    assert not cls(cls.make_config({"rank": 8}), model).plans["0.weight"].compressed
    assert cls(cls.make_config({"rank": 8, "min_compression_rate": 1}), model).plans["0.weight"].compressed
    with pytest.raises(ConfigError, match="min_compression_rate"):
        cls.make_config({"min_compression_rate": 0.5})


def test_warmup_rounds_are_uncompressed_then_compression_starts():
    from tests.statesync import train
    _, _, _, comm, alg = train("powersgd", {"rank": 2, "start_round": 3, "lr": 0.5}, 5)
    dense = 32 * sum(t.numel() for t in alg.params.values())
    per_round = comm.uplink_bits  # 3 dense rounds of 5 clients, then 2 compressed ones
    assert per_round < 5 * dense * 5 and per_round > 3 * 5 * dense
    assert alg.Q  # the warm start survives the warm-up


@pytest.mark.parametrize("feedback", ["aggregated", "own"])
def test_error_feedback_choice_trains(feedback):
    from tests.statesync import train
    before, after, _, comm, _ = train("powersgd", {"rank": 1, "lr": 0.5, "error_feedback": feedback}, 30)
    assert after > before + 0.3 and comm.counters.get("stale_rejected", 0) == 0


def test_aggregated_error_feedback_uses_the_servers_q():
    """One client: the aggregate Q is its own Q_i, so both choices keep the same residual; with
    two clients they differ."""
    from tests.statesync import train
    one = [train("powersgd", {"rank": 1, "lr": 0.5, "error_feedback": f}, 4, clients=1)[4] for f in ("aggregated", "own")]
    assert all(torch.equal(one[0].params[k], one[1].params[k]) for k in one[0].params)
    two = [train("powersgd", {"rank": 1, "lr": 0.5, "error_feedback": f}, 4, clients=2)[4] for f in ("aggregated", "own")]
    assert not all(torch.equal(two[0].params[k], two[1].params[k]) for k in two[0].params)
