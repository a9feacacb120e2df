"""The emulator's behaviour: fates, timelines, stragglers, availability, determinism."""
from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

from network.config import parse_network
from network.emulator import Emulator
from network.simclock import HeapClock

RICH = {"network": {"transport": "datagram", "loss": 0.02, "jitter": "5ms", "duplicate": 0.05,
                    "corrupt": 0.05, "uplink": "2Mbps", "server": {"downlink": "8Mbps"}},
        "stragglers": {"distribution": "lognormal", "sigma": 0.5, "noise": 0.2},
        "availability": {"mean_online": "20s", "mean_offline": "5s", "clients": "0-3"}}


def make(sections, n, seed=0, start=0.0, base=pathlib.Path(".")):
    clock = HeapClock(start)
    log: list = []
    em = Emulator(parse_network(sections, n, base), n, clock, seed, lambda e, **f: log.append((e, f)))
    return em, clock, log


def traffic(seed, sections=RICH, n=6, msgs=400):
    """A fixed call sequence: round-robin uploads and downloads every 50 ms."""
    em, clock, log = make(sections, n, seed)
    got: list = []
    for i in range(msgs):
        c, d = i % n, ("up", "down")[(i // n) % 2]
        clock.call_at(0.05 * i, lambda i=i, c=c, d=d: em.transfer(
            d, c, 20_000 + 37 * i, lambda corrupt, i=i: got.append((i, round(clock.now(), 12), corrupt))))
    clock.run(until=60)
    speeds = [em.compute_time(c, 1e9, r) for c in range(n) for r in range(3)]
    return got, log, speeds


def test_same_seed_same_fates_other_seed_different():
    a, b, c = traffic(1), traffic(1), traffic(2)
    assert a == b
    assert a[0] != c[0] and a[2] != c[2]
    got, log, _ = a
    kinds = {f["reason"] for e, f in log if e == "drop"}
    assert {"loss", "offline"} <= kinds                                   # both kinds of loss happened
    assert any(corrupt for _, _, corrupt in got)
    ids = [i for i, _, _ in got]
    assert len(ids) != len(set(ids))                                     # duplicates delivered


def test_streams_are_per_purpose():
    """Adding jitter must not change which messages are lost."""
    base = {"network": {"transport": "datagram", "loss": 0.1, "latency": "10ms"}}
    jit = {"network": {**base["network"], "jitter": "3ms"}}
    a, _, _ = traffic(5, base, n=3, msgs=300)
    b, _, _ = traffic(5, jit, n=3, msgs=300)
    assert sorted({i for i, _, _ in a}) == sorted({i for i, _, _ in b})
    assert [t for _, t, _ in a] != [t for _, t, _ in b]


def test_duplicate_and_corrupt_rates():
    em, clock, log = make({"network": {"duplicate": 0.1, "corrupt": 0.2, "latency": 0}}, 1, seed=3)
    got: list = []
    n = 5000
    for i in range(n):
        em.transfer("down", 0, 10, lambda corrupt, i=i: got.append((i, corrupt)))
    clock.run()
    dups = len(got) - n
    assert sum(1 for e, _ in log if e == "duplicate") == dups
    assert abs(dups / n - 0.1) < 4 * math.sqrt(0.09 / n)
    frac = sum(c for _, c in got) / len(got)
    assert abs(frac - 0.2) < 4 * math.sqrt(0.16 / len(got))


def test_partition_and_heal():
    ev = [{"at": "1s", "action": "partition", "clients": "1-2"},
          {"at": "3s", "action": "heal", "clients": "1"},
          {"at": "4s", "action": "partition", "clients": "0", "duration": "1s"}]
    em, clock, log = make({"network": {"uplink": "1Mbps", "latency": 0}, "events": ev}, 3)
    got: list = []

    def up(c, nbytes=125_000):  # 1 s at 1 Mbps
        em.transfer("up", c, nbytes, lambda corrupt: got.append((c, clock.now())))

    clock.call_at(0.5, lambda: up(1))          # cut mid-transfer at 1 s
    clock.call_at(2.0, lambda: up(2))          # sent while partitioned
    clock.call_at(3.5, lambda: up(1))          # healed at 3 s
    clock.call_at(4.5, lambda: up(0, 1000))    # partitioned until 5 s
    clock.call_at(5.01, lambda: up(0, 1000))   # healed at 5 s
    clock.call_at(2.5, lambda: got.append(("online", em.is_online(2), em.is_online(0))))
    clock.run(until=20)
    # TCP puts a 52-byte header on every segment; with latency 0 the handshake and the window
    # cost nothing (tests/test_network_tcp.py covers them).
    wire = lambda nbytes: em.wire_bytes(nbytes) * 8 / 1e6   # noqa: E731  seconds at 1 Mbps
    assert em.wire_bytes(125_000) == 125_000 + 52 * 87
    assert got == [("online", False, True), (1, pytest.approx(3.5 + wire(125_000))),
                   (0, pytest.approx(5.01 + wire(1000)))]
    drops = [(f["client"], f["reason"]) for e, f in log if e == "drop"]
    assert drops == [(1, "partition"), (2, "partition"), (0, "partition")]
    nets = [(f["action"], f["clients"]) for e, f in log if e == "net_event"]
    assert nets == [("partition", "1-2"), ("heal", "1"), ("partition", "0"), ("heal", "0")]


def test_crash_restart_go_to_the_runtime():
    ev = [{"at": "2s", "action": "crash", "clients": "1", "restart_after": "30s"},
          {"at_round": 3, "action": "crash", "clients": "0,2"},
          {"at_round": 5, "action": "restart", "clients": "0-2"}]
    em, clock, log = make({"events": ev}, 3)
    seen: list = []
    clock.run(until=1.0)
    em.on_runtime_event(lambda e: seen.append((clock.now(), e["action"], e["clients"])))
    clock.run(until=10)
    assert seen == [(2.0, "crash", [1])] and not em.is_online(1)
    assert em.start_round(2) == []
    r3 = em.start_round(3)
    assert [(e["action"], e["clients"], e["round"]) for e in r3] == [("crash", [0, 2], 3)]
    assert not em.is_online(0)
    got: list = []
    em.transfer("down", 0, 100, lambda corrupt: got.append(corrupt))
    clock.run(until=40)
    assert seen[-1] == (32.0, "restart", [1]) and em.is_online(1)
    assert got == [] and ("drop", {"direction": "down", "client": 0, "nbytes": 100, "reason": "crashed", "tid": 1}) in log
    assert [e["action"] for e in em.start_round(5)] == ["restart"] and em.is_online(0)


def test_timed_crash_before_callback_is_held():
    em, clock, _ = make({"events": [{"at": "0s", "action": "crash", "clients": "0"}]}, 1)
    clock.run(until=1)
    seen: list = []
    em.on_runtime_event(seen.append)
    assert [e["action"] for e in seen] == ["crash"]


def test_stragglers_and_slowdown():
    sec = {"stragglers": {"distribution": "pareto", "alpha": 1.5, "speed": 2e9},
           "events": [{"at_round": 2, "action": "slowdown", "clients": "1", "factor": 4, "duration": "10s"}]}
    em, clock, log = make(sec, 200, seed=4)
    speeds = np.array([em.speed(c) for c in range(200)])
    assert speeds.max() <= 2e9 and speeds.min() < 0.2e9            # heavy tail of slow devices
    t1 = em.compute_time(1, 1e9, 0)
    assert t1 == pytest.approx(1e9 / speeds[1])
    em.start_round(2)
    assert em.compute_time(1, 1e9, 2) == pytest.approx(4 * t1)
    assert em.compute_time(2, 1e9, 2) == pytest.approx(1e9 / speeds[2])
    clock.run(until=11)
    assert em.compute_time(1, 1e9, 3) == pytest.approx(t1)
    assert [f.get("phase") for e, f in log if e == "net_event"] == [None, "end"]


def test_straggler_noise_is_per_client_round_and_order_free():
    sec = {"stragglers": {"distribution": "lognormal", "sigma": 0.3, "noise": 0.2}}
    a, _, _ = make(sec, 4, seed=9)
    b, _, _ = make(sec, 4, seed=9)
    fwd = [a.compute_time(c, 1e9, r) for c in range(4) for r in range(5)]
    rev = [b.compute_time(c, 1e9, r) for c in reversed(range(4)) for r in reversed(range(5))]
    assert fwd == list(reversed(rev))
    assert len(set(fwd)) == len(fwd)


def test_straggler_trace_file(tmp_path):
    (tmp_path / "speeds.csv").write_text("client,flops\n0,1e9\n1,5e8\n")
    em, _, _ = make({"stragglers": {"distribution": "trace", "file": "speeds.csv"}}, 3, base=tmp_path)
    assert [em.speed(c) for c in range(3)] == [1e9, 5e8, 1e9]


def test_availability_fractions_and_drops():
    """Exponential on/off with means 30 s / 10 s: each client offline a quarter of the time."""
    sec = {"availability": {"mean_online": "30s", "mean_offline": "10s", "clients": "all"}}
    n, horizon, dt = 20, 4000.0, 1.0
    em, clock, log = make(sec, n, seed=11)
    offline = np.zeros(n)
    samples = 0
    t = 0.0
    while t < horizon:
        t += dt
        clock.run(until=t)
        offline += [not em.is_online(c) for c in range(n)]
        samples += 1
    frac = offline.sum() / (samples * n)
    # ~ n * horizon / 40 s on/off cycles in all: relative error of order 1/sqrt(2000)
    assert frac == pytest.approx(0.25, abs=0.03)
    toggles = [f for e, f in log if e == "net_event" and f.get("cause") == "availability"]
    assert abs(len(toggles) - 2 * n * horizon / 40) < 0.1 * 2 * n * horizon / 40


def test_offline_client_loses_messages():
    em, clock, log = make({"availability": {"mean_online": "1s", "mean_offline": "1000s", "clients": "0"}}, 2, seed=1)
    clock.run(until=100)          # client 0 has almost surely gone offline by now
    assert not em.is_online(0) and em.is_online(1)
    got: list = []
    em.transfer("up", 0, 10, lambda c: got.append(0))
    em.transfer("up", 1, 10, lambda c: got.append(1))
    clock.run(until=101)
    assert got == [1]
    assert [f["reason"] for e, f in log if e == "drop"] == ["offline"]


def test_set_link_latency_and_tcp_order():
    ev = [{"at": "1s", "action": "set_link", "clients": "0", "latency": "500ms", "direction": "down"}]
    em, clock, _ = make({"network": {"latency": "10ms", "downlink": "1Gbps"}, "events": ev}, 1)
    got: list = []
    clock.call_at(0.9, lambda: em.transfer("down", 0, 0, lambda c: got.append(("a", clock.now()))))
    clock.call_at(1.1, lambda: em.transfer("down", 0, 0, lambda c: got.append(("b", clock.now()))))
    clock.call_at(1.2, lambda: em.transfer("up", 0, 0, lambda c: got.append(("c", clock.now()))))
    clock.run()
    # The first message opens the connection: 2 round trips of 20 ms (TCP, then ZMTP's
    # greeting) before it leaves; the later ones use it. 52 header bytes at 1 Gbps.
    seg = 52 * 8 / 1e9
    assert got == [("a", pytest.approx(0.9 + 0.04 + 0.01 + seg)), ("c", pytest.approx(1.21 + 52 * 8 / 10e6)),
                   ("b", pytest.approx(1.6 + seg))]


def test_rejects_bad_calls():
    em, _, _ = make({}, 2)
    with pytest.raises(ValueError):
        em.transfer("sideways", 0, 1, lambda c: None)
    with pytest.raises(ValueError):
        em.transfer("up", 2, 1, lambda c: None)
    with pytest.raises(ValueError):
        Emulator(parse_network({}, 3, pathlib.Path(".")), 2, HeapClock(), 0, lambda e, **f: None)


class LifoClock:
    """A clock that runs callbacks due at the same time last-in first-out (as a careless
    event loop might): the emulator's own ordering must not depend on it."""

    def __init__(self):
        import heapq
        self._heapq, self._t, self._seq, self._heap = heapq, 0.0, 0, []

    def now(self):
        return self._t

    def call_at(self, when, cb):
        self._seq -= 1
        h = type("H", (), {"cancelled": False, "cancel": lambda self: setattr(self, "cancelled", True)})()
        self._heapq.heappush(self._heap, (max(when, self._t), self._seq, h, cb))
        return h

    def run(self):
        while self._heap:
            when, _, h, cb = self._heapq.heappop(self._heap)
            if not h.cancelled:
                self._t = when
                cb()


@pytest.mark.parametrize("clock_cls", [HeapClock, LifoClock])
def test_equal_time_deliveries_keep_call_order(clock_cls):
    clock = clock_cls()
    cfg = parse_network({"network": {"uplink": "8Mbps", "downlink": "8Mbps", "latency": "5ms"}}, 5, pathlib.Path("."))
    em = Emulator(cfg, 5, clock, 0, lambda e, **f: None)
    got: list = []
    for c in (3, 1, 4, 0, 2):
        em.transfer("down", c, 1000, lambda corrupt, c=c: got.append(c))
        em.transfer("up", c, 1000, lambda corrupt, c=c: got.append(10 + c))
    clock.run()
    assert got == [3, 13, 1, 11, 4, 14, 0, 10, 2, 12]


def test_zero_bandwidth_trace_stalls_then_resumes(tmp_path):
    (tmp_path / "outage.csv").write_text("0,1Mbps\n1,0\n3,1Mbps\n")
    em, clock, _ = make({"network": {"downlink": "outage.csv", "latency": 0}}, 1, base=tmp_path)
    got: list = []
    em.transfer("down", 0, 250_000, lambda c: got.append(clock.now()))   # 2 Mbit
    clock.run(until=60)
    assert got == [pytest.approx(4.0 + (em.wire_bytes(250_000) - 250_000) * 8 / 1e6)]   # headers at 1 Mbps


def test_datagram_loss_burst_only_during_its_window():
    ev = [{"at": "10s", "action": "loss_burst", "clients": "0", "loss": 0.5, "duration": "10s", "direction": "up"}]
    em, clock, log = make({"network": {"transport": "datagram", "latency": 0, "uplink": "1Gbps"}, "events": ev}, 1, seed=2)
    got: list = []
    for i in range(3000):
        t = 30.0 * i / 3000
        clock.call_at(t, lambda t=t: em.transfer("up", 0, 100, lambda c, t=t: got.append(t)))
        clock.call_at(t, lambda t=t: em.transfer("down", 0, 100, lambda c, t=t: got.append(-1.0)))
    clock.run()
    inside = [t for t in got if 10 <= t < 20]
    assert len([t for t in got if t >= 0 and not 10 <= t < 20]) == 2000     # no loss outside the burst
    assert abs(len(inside) - 500) < 4 * math.sqrt(1000 * 0.25)              # half lost inside
    assert got.count(-1.0) == 3000                                          # downlink untouched


def test_tcp_cap_uses_gilbert_elliott_long_run_rate():
    from network.models import cubic_rate, padhye_rate
    ge = {"model": "gilbert_elliott", "p": 0.001, "r": 0.5}
    em, clock, _ = make({"network": {"uplink": "1Gbps", "latency": "20ms",
                                     "group": [{"clients": "all", "direction": "up", "loss": ge}]}}, 1)
    p_bar = 0.001 / 0.501
    assert em.loss_rate("up", 0) == pytest.approx(p_bar)
    # the response function at the loss event rate p / (1 + p W) of the long-run rate
    cap = em.tcp_cap("up", 0)
    event_rate = p_bar / (1 + p_bar * cap * 0.04 / (8 * 1448))
    assert cap == pytest.approx(cubic_rate(1448, 0.04, event_rate))   # default: CUBIC
    assert em.tcp_cap("down", 0) == math.inf
    em, clock, _ = make({"network": {"uplink": "1Gbps", "latency": "20ms", "tcp": {"congestion": "reno"},
                                     "group": [{"clients": "all", "direction": "up", "loss": ge}]}}, 1)
    cap = em.tcp_cap("up", 0)
    event_rate = p_bar / (1 + p_bar * cap * 0.04 / (8 * 1448))
    assert cap == pytest.approx(padhye_rate(1448, 0.04, event_rate, 0.2))


def test_partition_aborts_download_in_flight_and_counts_offline_as_down():
    ev = [{"at": "0.5s", "action": "partition", "clients": "0", "duration": "1s"}]
    em, clock, log = make({"network": {"downlink": "1Mbps", "latency": 0}, "events": ev}, 2)
    got: list = []
    em.transfer("down", 0, 125_000, lambda c: got.append(0))
    em.transfer("down", 1, 125_000, lambda c: got.append(1))
    clock.run(until=10)
    assert got == [1]
    assert [(f["client"], f["reason"]) for e, f in log if e == "drop"] == [(0, "partition")]
    assert em.is_online(0)
