"""The TCP transfer model in closed form: handshake, slow start, restart after idle,
CUBIC's and Reno's loss response, per-segment headers. No ns-3 needed
(bench/validate_ns3.py compares the same model with it)."""
from __future__ import annotations

import math
import pathlib

import pytest

from network.config import parse_network
from network.emulator import Emulator
from network.errors import NetworkConfigError
from network.models import (CUBIC_BETA, TcpWindow, cubic_rate, cubic_window, loss_event_rate, mathis_rate,
                            padhye_rate)
from network.simclock import HeapClock

MSS, HDR, IW = 1448, 52, 10
SEG_BITS = 8 * (MSS + HDR)
REL = 1e-9


def make(net: dict, n: int = 1, security: str | None = None, events: list | None = None):
    clock = HeapClock()
    log: list = []
    sections = {"network": net}
    if events:
        sections["events"] = events
    em = Emulator(parse_network(sections, n, pathlib.Path(".")), n, clock, 0, lambda e, **f: log.append((e, f)))
    if security:
        em.set_security(security)
    return em, clock, log


def send(em, clock, nbytes, got, client=0, direction="up"):
    t = clock.now()
    em.transfer(direction, client, nbytes, lambda corrupt: got.append((t, clock.now())))


def slow_start_rounds(segments: int, iw: int = IW) -> int:
    """Round trips slow start needs for ``segments``: the window doubles from ``iw``."""
    rounds, sent, w = 0, 0, iw
    while sent < segments:
        sent, w, rounds = sent + w, 2 * w, rounds + 1
    return rounds


# Fast links and a long round trip: the window, never the link, limits every round.
FAST = {"uplink": "1Gbps", "downlink": "1Gbps", "latency": "50ms"}
R, L, B = 0.1, 0.05, 1e9


@pytest.mark.parametrize("k", [1, 3, 7, 8, 20])
@pytest.mark.parametrize("security, handshake", [("tcp", 1), (None, 2), ("curve", 4)])
def test_k_initial_windows_take_the_slow_start_round_trips(k, security, handshake):
    em, clock, _ = make(FAST, security=security)
    got: list = []
    send(em, clock, k * IW * MSS, got)
    clock.run()
    rounds = slow_start_rounds(k * IW)
    assert rounds == math.ceil(math.log2(k + 1))
    last = k * IW - IW * (2 ** (rounds - 1) - 1)          # segments left for the last round
    want = handshake * R + (rounds - 1) * R + last * SEG_BITS / B + L
    assert got[0][1] == pytest.approx(want, rel=REL)


def test_second_message_right_after_keeps_the_window_and_one_after_idle_restarts():
    k = 7                                   # 70 segments: 10 + 20 + 40, the window ends at 80
    nbytes = k * IW * MSS
    em, clock, _ = make(FAST, security="tcp")
    got: list = []
    send(em, clock, nbytes, got)                                     # A, on a new connection
    clock.run()
    a_deliver = got[0][1]
    round3 = R + 2 * R                       # handshake, then rounds at R, 2R, 3R
    assert a_deliver == pytest.approx(round3 + 40 * SEG_BITS / B + L, rel=REL)
    # B right away: it waits for round 3's ACKs, then all 70 segments go in one round.
    send(em, clock, nbytes, got)
    clock.run()
    assert got[1][1] == pytest.approx(round3 + R + 70 * SEG_BITS / B + L, rel=REL)
    # C after 10 s of idleness (> RTO = 200 ms): the window restarted, slow start again.
    clock.call_at(clock.now() + 10.0, lambda: send(em, clock, nbytes, got))
    clock.run()
    t_send, t_deliver = got[2]
    assert t_deliver - t_send == pytest.approx(2 * R + 40 * SEG_BITS / B + L, rel=REL)
    # ...unless slow_start_after_idle is off: the window of 160 segments is kept.
    em, clock, _ = make({**FAST, "tcp": {"slow_start_after_idle": False}}, security="tcp")
    got = []
    send(em, clock, nbytes, got)
    send(em, clock, nbytes, got)
    clock.run()
    clock.call_at(clock.now() + 10.0, lambda: send(em, clock, nbytes, got))
    clock.run()
    t_send, t_deliver = got[2]
    assert t_deliver - t_send == pytest.approx(70 * SEG_BITS / B + L, rel=REL)


def test_restart_after_idle_halves_per_rto_down_to_the_initial_window():
    w = TcpWindow(IW)
    w.cwnd = 80.0
    w.restart_after_idle(0.15, rto=0.2)         # not idle long enough
    assert w.cwnd == 80.0
    w.restart_after_idle(0.5, rto=0.2)          # 2.5 RTO: halved twice (Linux's tcp_cwnd_restart)
    assert w.cwnd == 20.0 and w.ssthresh == 60.0
    w.restart_after_idle(30.0, rto=0.2)
    assert w.cwnd == IW


def test_new_connection_after_partition_pays_the_handshake_again():
    ev = [{"at": "1s", "action": "partition", "clients": "0", "duration": "1s"}]
    em, clock, log = make(FAST, events=ev)
    got: list = []
    send(em, clock, 100, got)
    clock.call_at(0.5, lambda: send(em, clock, 100, got))        # same connection: no handshake
    clock.call_at(3.0, lambda: send(em, clock, 100, got))        # after the partition: a new one
    clock.run()
    seg = (100 + HDR) * 8 / B
    assert [t1 - t0 for t0, t1 in got] == pytest.approx([2 * R + seg + L, seg + L, 2 * R + seg + L], rel=REL)


def test_reset_connections_makes_the_next_message_pay_the_handshake():
    em, clock, _ = make(FAST, n=2, security="curve")
    got: list = []
    send(em, clock, 100, got)
    clock.run()
    em.reset_connections([0])
    clock.call_at(1.0, lambda: send(em, clock, 100, got))
    clock.call_at(1.0, lambda: send(em, clock, 100, got, client=1))
    clock.run()
    seg = (100 + HDR) * 8 / B
    assert [t1 - t0 for t0, t1 in got] == pytest.approx([4 * R + seg + L] * 3, rel=REL)


def test_headers_count_on_the_wire_not_in_reported_bytes():
    em, clock, log = make({"uplink": "10Mbps", "latency": 0})
    assert em.wire_bytes(0) == HDR and em.wire_bytes(MSS) == MSS + HDR and em.wire_bytes(MSS + 1) == MSS + 1 + 2 * HDR
    n = 1_000_000
    got: list = []
    send(em, clock, n, got)
    clock.run()
    assert got[0][1] == pytest.approx((n + HDR * math.ceil(n / MSS)) * 8 / 10e6, rel=REL)
    assert HDR / (MSS + HDR) == pytest.approx(0.0347, abs=1e-4)      # the header share of a full segment
    # datagrams carry no TCP header in the model
    em, clock, _ = make({"uplink": "10Mbps", "latency": 0, "transport": "datagram"})
    assert em.wire_bytes(n) == n


# ----------------------------------------------------------------------------- loss response
@pytest.mark.parametrize("p", [1e-3, 1e-2])
def test_cubic_cap_matches_its_response_function(p):
    # RFC 8312 section 5.1: W = (C (3 + beta) / (4 (1 - beta)))^(1/4) (RTT / p)^(3/4), C = 0.4,
    # beta = 0.7, or the Reno-friendly sqrt(3 / (2p)) where that is larger.
    for rtt in (0.02, 0.2, 0.5):
        w_cubic = (0.4 * 3.7 / 1.2) ** 0.25 * (rtt / p) ** 0.75
        w_reno = math.sqrt(1.5 / p)
        assert cubic_window(rtt, p) == pytest.approx(max(w_cubic, w_reno), rel=REL)
        assert cubic_rate(MSS, rtt, p) == pytest.approx(8 * MSS * max(w_cubic, w_reno) / rtt, rel=REL)
    # At a long round trip CUBIC's own region binds and beats Reno; at a short one it is Reno's.
    assert cubic_rate(MSS, 0.5, p) > 1.2 * mathis_rate(MSS, 0.5, p)
    assert cubic_rate(MSS, 0.02, p) == pytest.approx(mathis_rate(MSS, 0.02, p), rel=REL)
    assert CUBIC_BETA == 0.7
    # The emulator's cap is the response function at the loss *event* rate p_e = p / (1 + p W):
    # the losses among the window in flight when a loss is detected are the same event.
    em, _, _ = make({"uplink": "1Gbps", "latency": "100ms", "loss": p})
    cap = em.tcp_cap("up", 0)
    pe = p / (1 + p * cap * 0.2 / (8 * MSS))
    assert cap == pytest.approx(cubic_rate(MSS, 0.2, pe), rel=1e-9)
    assert 1.0 < cap / cubic_rate(MSS, 0.2, p) < 1.0 + math.sqrt(p) * 3   # a few per cent above
    em, _, _ = make({"uplink": "1Gbps", "latency": "100ms", "loss": p, "tcp": {"congestion": "reno"}})
    cap = em.tcp_cap("up", 0)
    pe = p / (1 + p * cap * 0.2 / (8 * MSS))
    assert cap == pytest.approx(padhye_rate(MSS, 0.2, pe, 0.2), rel=1e-9)


@pytest.mark.parametrize("p", [1e-4, 1e-3, 1e-2, 0.1])
def test_loss_event_rate_of_reno_in_closed_form(p):
    """Episodes every 1/p + W segments with Reno's W = sqrt(3 / (2 p_e)): p_e + p sqrt(1.5 p_e) = p,
    a quadratic in sqrt(p_e)."""
    y = (math.sqrt(1.5 * p * p + 4 * p) - p * math.sqrt(1.5)) / 2
    assert loss_event_rate(p, lambda q: math.sqrt(1.5 / q)) == pytest.approx(y * y, rel=1e-10)
    assert loss_event_rate(p, lambda q: 0.0) == p                # no window in flight: every loss an event
    assert loss_event_rate(0.0, lambda q: 10.0) == 0.0 and loss_event_rate(1.0, lambda q: 10.0) == 1.0


def test_losses_in_flight_join_the_episode():
    """A window of W segments per round trip at packet loss p sees one loss event every
    1/p + W segments, not every 1/p: the window's own later losses are one recovery."""
    w = TcpWindow(10, "reno")
    W, p, rounds = 50, 0.001, 21_000                 # 1,050,000 segments
    events = 0
    for i in range(rounds):
        before = w.acc
        w.on_round(W, p, 0.1 * (i + 1), 0.1)
        events += w.acc < before                     # without an event the count only grows
    assert abs(events - rounds * W / (1 / p + W)) <= 1            # 1000, where 1/p alone gives 1050


@pytest.mark.parametrize("congestion", ["cubic", "reno"])
def test_long_transfer_settles_at_the_response_function(congestion):
    """30 MB at p = 1e-2, RTT 50 ms: the per-round window (a loss event every 1/p segments)
    averages its congestion control's response rate, within 10 %, on a link 100x faster."""
    em, clock, log = make({"uplink": "1Gbps", "downlink": "1Gbps", "latency": "25ms", "loss": 0.01,
                           "tcp": {"congestion": congestion}})
    got: list = []
    send(em, clock, 30_000_000, got)
    clock.run()
    rate = em.wire_bytes(30_000_000) * 8 / (got[0][1] - 2 * 0.05 - 0.025)
    assert rate == pytest.approx(em.tcp_cap("up", 0), rel=0.10)
    assert not [e for e, _ in log if e == "drop"]


def test_short_transfer_keeps_its_slow_start_under_loss():
    """The issue's case: 6.4 MB over 100 Mbps, 25 ms, 0.1 % loss. The steady-state cap
    (9.1 Mbit/s at the loss event rate) would make it ~5.6 s; the window model lets slow start carry most of it,
    and the 4-5 loss events cut the window only a few times."""
    em, clock, _ = make({"uplink": "10Gbps", "downlink": "10Gbps", "latency": "25ms", "loss": 0.001,
                         "server": {"downlink": "100Mbps"}}, security="tcp")
    got: list = []
    send(em, clock, 6_400_000, got)
    clock.run()
    capped = 6_400_000 * 8 / em.tcp_cap("up", 0)
    assert capped > 5.0
    assert 0.84 < got[0][1] < 1.6


def test_window_steps_by_hand():
    w = TcpWindow(10, "reno")
    assert w.on_round(10, 0.0, 0.1, 0.1) == 0.0 and w.cwnd == 20        # slow start doubles
    w.ssthresh = 20
    assert w.on_round(20, 0.0, 0.2, 0.1) == 0.0 and w.cwnd == 21        # Reno: +1 per round trip
    w.acc = 0.9
    q = w.on_round(21, 0.01, 0.3, 0.1)                                  # 0.21 more: a loss event
    assert w.cwnd == 10.5 and w.ssthresh == 10.5 and q == 0.0                # fast retransmit
    assert w.acc == pytest.approx(0.11 - 0.21)      # the round's 21 segments in flight join the episode
    w.cwnd, w.ssthresh, w.acc = 3.0, 2.0, 0.99
    assert w.on_round(3, 0.01, 0.4, 0.1) == 1.0 and w.cwnd == 2.0          # too few dupacks: a timeout
    c = TcpWindow(10, "cubic")
    c.cwnd, c.ssthresh, c.acc = 100.0, 50.0, 0.99
    c.on_round(100, 0.001, 1.0, 0.1)
    assert c.cwnd == pytest.approx(70.0) and c.w_max == 100.0            # beta = 0.7
    before = c.cwnd
    for i in range(5):
        c.on_round(c.cwnd, 0.0, 1.1 + 0.1 * i, 0.1)
    assert before < c.cwnd < 100.0                                      # concave growth back to W_max


def test_same_seed_same_times():
    def run():
        em, clock, _ = make({"uplink": "20Mbps", "latency": "30ms", "loss": 0.005, "jitter": "2ms"}, n=3)
        got: list = []
        for c in range(3):
            for i in range(3):
                clock.call_at(0.7 * i, lambda c=c: send(em, clock, 300_000 * (c + 1), got, client=c))
        clock.run()
        return got
    assert run() == run()


# ----------------------------------------------------------------------------- settings
def test_tcp_settings_parse_and_default_to_linux():
    cfg = parse_network({}, 1, pathlib.Path("."))
    assert (cfg.tcp.mss, cfg.tcp.initial_window, cfg.tcp.slow_start_after_idle, cfg.tcp.congestion) == (
        1448, 10, True, "cubic")
    cfg = parse_network({"network": {"mtu": 9000, "tcp": {"mss": "8000B", "initial_window": 4,
                                                          "slow_start_after_idle": False, "congestion": "Reno"}}},
                        1, pathlib.Path("."))
    assert (cfg.mss, cfg.tcp.initial_window, cfg.tcp.slow_start_after_idle, cfg.tcp.congestion) == (
        8000, 4, False, "reno")
    assert parse_network({"network": {"mtu": 9000}}, 1, pathlib.Path(".")).tcp.mss == 9000 - 52


@pytest.mark.parametrize("tcp, key", [
    ({"mss": 1460}, "network.tcp.mss"),                   # 1460 + 52 > 1500
    ({"mss": 0}, "network.tcp.mss"),
    ({"mss": "1.5kb"}, "network.tcp.mss"),
    ({"initial_window": 0}, "network.tcp.initial_window"),
    ({"initial_window": 2.5}, "network.tcp.initial_window"),
    ({"initial_window": True}, "network.tcp.initial_window"),
    ({"slow_start_after_idle": "yes"}, "network.tcp.slow_start_after_idle"),
    ({"congestion": "bbr"}, "network.tcp.congestion"),
    ({"congestion": 3}, "network.tcp.congestion"),
    ({"windw": 3}, "network.tcp.windw"),
])
def test_bad_tcp_settings_name_key_and_value(tcp, key):
    with pytest.raises(NetworkConfigError) as e:
        parse_network({"network": {"tcp": tcp}}, 1, pathlib.Path("."))
    assert e.value.key == key and e.value.value == next(iter(tcp.values()))
    assert key in str(e.value)


def test_security_mechanism_is_checked():
    em, _, _ = make(FAST)
    with pytest.raises(ValueError, match="curve"):
        em.set_security("tls")
