"""Statistical checks of the stochastic link models (fixed seeds, analytic intervals)."""
from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from scipy import stats

from network.config import Jitter, Loss, parse_network
from network.emulator import Emulator
from network.models import GilbertElliott, cubic_rate, mathis_rate, packets, padhye_rate, sample_jitter
from network.simclock import HeapClock


def make(sections, n=1, seed=0):
    clock = HeapClock()
    log: list = []
    em = Emulator(parse_network(sections, n, pathlib.Path(".")), n, clock, seed, lambda e, **f: log.append((e, f)))
    return em, clock, log


def blast(em, clock, n_msgs, nbytes, direction="up", client=0):
    """Send n_msgs messages at t=0; return the delivery records (send index, time, corrupt)."""
    got: list = []
    for i in range(n_msgs):
        em.transfer(direction, client, nbytes, lambda corrupt, i=i: got.append((i, clock.now(), corrupt)))
    clock.run()
    return got


def binomial_ok(k, n, p, alpha=1e-4):
    return stats.binomtest(k, n, p).pvalue > alpha


# ----------------------------------------------------------------------------- Bernoulli
@pytest.mark.parametrize("p, nbytes", [(0.05, 1000), (1e-3, 146_000)])
def test_datagram_bernoulli_message_loss(p, nbytes):
    n_msgs = 10_000
    em, clock, log = make({"network": {"transport": "datagram", "loss": p, "uplink": "1Gbps", "latency": 0}})
    got = blast(em, clock, n_msgs, nbytes)
    k = packets(nbytes, 1460)
    p_lost = 1 - (1 - p) ** k
    lost = n_msgs - len(got)
    drops = [f for e, f in log if e == "drop"]
    assert len(drops) == lost and all(f["reason"] == "loss" for f in drops)
    assert binomial_ok(lost, n_msgs, p_lost), (lost, n_msgs * p_lost)


# ----------------------------------------------------------------------------- Gilbert-Elliott
def _ge_asymptotic_var(loss: Loss) -> float:
    """N * Var(mean loss indicator) of the stationary Gilbert-Elliott chain:
    r(1-r) + 2 (lB - lG)^2 piG piB lam / (1 - lam), lam = 1 - p - r."""
    pb = loss.p / (loss.p + loss.r)
    lg, lb = 1 - loss.k, 1 - loss.h
    lam = 1 - loss.p - loss.r
    rate = loss.rate
    return rate * (1 - rate) + 2 * (lb - lg) ** 2 * (1 - pb) * pb * lam / (1 - lam)


def _bursts(x: np.ndarray) -> np.ndarray:
    """Lengths of the runs of consecutive losses."""
    padded = np.concatenate([[False], x, [False]]).astype(np.int8)
    d = np.diff(padded)
    return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


@pytest.mark.parametrize("loss", [Loss("gilbert_elliott", 0.01, 0.25, 0.0, 1.0),
                                  Loss("gilbert_elliott", 0.02, 0.1, 0.3, 0.995)])
def test_gilbert_elliott_rate_and_bursts(loss):
    n = 400_000
    chain = GilbertElliott(loss, np.random.Generator(np.random.PCG64(7)))
    # drawn in uneven pieces: the chain carries its state from message to message
    sizes = np.random.Generator(np.random.PCG64(8)).integers(1, 3000, size=400)
    sizes = np.append(sizes, n - sizes.sum()) if sizes.sum() < n else sizes
    x = np.concatenate([chain.sample(int(s)) for s in sizes])[:n]
    se = math.sqrt(_ge_asymptotic_var(loss) / n)
    assert abs(x.mean() - loss.rate) < 4.5 * se, (x.mean(), loss.rate, se)
    if loss.h == 0 and loss.k == 1:
        # simple Gilbert: a burst is a Bad sojourn, geometric with mean 1/r, var (1-r)/r^2
        b = _bursts(x)
        se_b = math.sqrt((1 - loss.r) / loss.r ** 2 / len(b))
        assert abs(b.mean() - 1 / loss.r) < 4.5 * se_b, (b.mean(), 1 / loss.r)
        assert len(b) > 3000


def test_datagram_gilbert_elliott_through_emulator():
    """One-packet messages under simple Gilbert: message loss rate is the chain's rate."""
    ge = {"model": "gilbert_elliott", "p": 0.02, "r": 0.3}
    em, clock, _ = make({"network": {"transport": "datagram", "loss": ge, "latency": 0}})
    n_msgs = 20_000
    got = blast(em, clock, n_msgs, 100)
    loss = Loss("gilbert_elliott", 0.02, 0.3)
    se = math.sqrt(_ge_asymptotic_var(loss) / n_msgs)
    assert abs((n_msgs - len(got)) / n_msgs - loss.rate) < 4.5 * se
    delivered = np.zeros(n_msgs, dtype=bool)
    delivered[[i for i, _, _ in got]] = True
    b = _bursts(~delivered)
    assert abs(b.mean() - 1 / 0.3) < 4.5 * math.sqrt(0.7 / 0.09 / len(b))


# ----------------------------------------------------------------------------- jitter
@pytest.mark.parametrize("jitter, dist", [
    ({"distribution": "normal", "scale": "10ms"}, stats.norm(0, 0.010)),
    ({"distribution": "lognormal", "scale": "10ms", "sigma": 0.7}, stats.lognorm(s=0.7, scale=0.010 * math.exp(-0.245))),
    ({"distribution": "pareto", "scale": "10ms", "alpha": 2.5}, stats.lomax(c=2.5, scale=0.010 * 1.5)),
])
def test_jitter_quantiles(jitter, dist):
    L = 0.2
    em, clock, _ = make({"network": {"transport": "datagram", "latency": L, "jitter": jitter, "uplink": "1Gbps"}})
    got = blast(em, clock, 3000, 0)
    delays = np.array([t for _, t, _ in got]) - L
    assert stats.kstest(delays, dist.cdf).pvalue > 1e-3
    # datagrams overtake each other: jitter reorders
    assert [i for i, _, _ in got] != sorted(i for i, _, _ in got)


def test_tcp_keeps_order_despite_jitter():
    em, clock, _ = make({"network": {"latency": "50ms", "jitter": "20ms", "uplink": "1Gbps"}})
    got = blast(em, clock, 500, 100)
    order = [i for i, _, _ in got]
    assert order == sorted(order)
    times = [t for _, t, _ in got]
    assert times == sorted(times)


def test_jitter_sampler_means():
    rng = np.random.Generator(np.random.PCG64(3))
    for j in (Jitter("lognormal", 0.01, 0.5), Jitter("pareto", 0.01, 4.0)):
        x = sample_jitter(j, rng, 200_000)
        assert x.mean() == pytest.approx(0.01, rel=0.02)
        assert x.std() == pytest.approx(j.std, rel=0.1)


# ----------------------------------------------------------------------------- tcp
def test_mathis_and_padhye_agree_at_small_loss():
    m = mathis_rate(1460, 0.05, 1e-4)
    assert padhye_rate(1460, 0.05, 1e-4, 0.2) == pytest.approx(m, rel=0.01)
    # past a few percent the timeout term dominates: far below Mathis
    assert padhye_rate(1460, 0.05, 0.1, 0.2) < 0.5 * mathis_rate(1460, 0.05, 0.1)
    assert padhye_rate(1460, 0.05, 0.0, 0.2) == math.inf
    assert padhye_rate(1460, 0.05, 0.0, 0.2, wmax_bytes=65536) == pytest.approx(65536 * 8 / 0.05)


@pytest.mark.parametrize("link", ["1Gbps", "10Gbps"])
def test_tcp_long_transfer_converges_to_the_reno_response_function(link):
    """30 MB at RTT 50 ms and p = 1e-2 under Reno: the per-round window settles at Mathis'
    rate at the loss *event* rate (the losses among a window in flight are one event: events
    every 1/p + W segments) whatever the link capacity (the slow-start transient is a small
    share of it), a little above Padhye's, which adds timeouts a SACK connection with 13
    segments in flight does not take."""
    nbytes, L, p = 30_000_000, 0.025, 1e-2
    em, clock, log = make({"network": {"uplink": link, "downlink": link, "latency": L, "loss": p,
                                       "tcp": {"congestion": "reno"}}})
    got = blast(em, clock, 1, nbytes)
    assert len(got) == 1 and not any(e == "drop" for e, _ in log)
    cap = em.tcp_cap("up", 0)
    assert cap == pytest.approx(padhye_rate(1448, 2 * L, p / (1 + p * cap * 2 * L / (8 * 1448)), 0.2))
    y = (math.sqrt(1.5 * p * p + 4 * p) - p * math.sqrt(1.5)) / 2   # Mathis' W at its own event rate y^2
    rate = em.wire_bytes(nbytes) * 8 / (got[0][1] - L - 4 * L)   # less the handshake and propagation
    assert rate == pytest.approx(mathis_rate(1448, 2 * L, y * y), rel=0.05)
    assert cap < rate


def test_datagram_10MB_at_p_1e3_almost_never_arrives():
    nbytes, p, n_msgs = 10_000_000, 1e-3, 3000
    em, clock, _ = make({"network": {"transport": "datagram", "uplink": "10Gbps", "latency": "25ms", "loss": p}})
    got = blast(em, clock, n_msgs, nbytes)
    p_ok = (1 - p) ** math.ceil(nbytes / 1460)
    assert p_ok < 2e-3
    assert len(got) < 0.01 * n_msgs
    assert binomial_ok(len(got), n_msgs, p_ok)


def test_loss_burst_lowers_tcp_rate_for_its_duration():
    def run(events):
        em, clock, log = make({"network": {"uplink": "100Mbps", "latency": "25ms"}, "events": events})
        got: list = []
        clock.call_at(0.5, lambda: em.transfer("up", 0, 10_000_000, lambda c: got.append(clock.now())))
        clock.run(until=100)
        return em, got[0], log
    em, clean, _ = run([])
    em, lossy, log = run([{"at": "0s", "action": "loss_burst", "loss": 0.01, "duration": "2s"}])
    # Without loss: handshake (2 RTT), slow start, then 100 Mbps. With 1% loss for 2 s the
    # window is cut every ~100 segments: the transfer takes longer, but once the burst ends
    # the window grows back, so it ends well before a whole 10 MB at the 1% response rate.
    fluid = 0.5 + 0.1 + em.wire_bytes(10_000_000) * 8 / 100e6 + 0.025
    assert fluid < clean < fluid + 7 * 0.05          # slow start to the 625 kB BDP: < 7 round trips
    assert clean + 0.5 < lossy < 0.5 + 10_000_000 * 8 / cubic_rate(1448, 0.05, 0.01)
    assert em.loss_rate("up", 0) == 0.0
    assert [f.get("phase") for e, f in log if e == "net_event"] == [None, "end"]
