"""Bandwidth sharing: the max-min fluid model alone, and through the emulator, in closed form."""
from __future__ import annotations

import math
import pathlib

import pytest
from hypothesis import given, settings, strategies as st

from network.config import parse_network
from network.emulator import Emulator
from network.fluid import Flow, FluidNetwork, max_min_rates
from network.simclock import HeapClock

REL = 1e-6


def make(sections, n, base=pathlib.Path("."), seed=0, start=0.0):
    # The sharing alone: loss-free datagrams are the bare fluid model (no handshake, no TCP
    # window, no per-segment headers; those are tests/test_network_tcp.py's).
    net = {"transport": "datagram", **sections.get("network", {})}
    sections = {**sections, "network": net}
    clock = HeapClock(start)
    log: list = []
    em = Emulator(parse_network(sections, n, base), n, clock, seed, lambda e, **f: log.append((e, f)))
    return em, clock, log


def send(em, clock, direction, client, nbytes, arrivals):
    em.transfer(direction, client, nbytes, lambda corrupt: arrivals.append((client, clock.now(), corrupt)))


# ----------------------------------------------------------------------------- pure model
def test_water_filling_by_hand():
    cap = {"s": 10.0, "a": 1.0, "b": 2.0, "c": math.inf}
    flows = [Flow(i, 1, 1, (r, "s")) for i, r in enumerate("abcc")]
    assert max_min_rates(flows, cap) == {0: 1.0, 1: 2.0, 2: 3.5, 3: 3.5}
    # a per-flow cap acts like a private link
    flows[2].cap = 0.5
    assert max_min_rates(flows, cap) == {0: 1.0, 1: 2.0, 2: 0.5, 3: 6.5}
    # no finite constraint: infinite rate
    assert max_min_rates([Flow("x", 1, 1, ("c",))], cap) == {"x": math.inf}


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_max_min_fair_bottleneck_property(data):
    """Every flow is at its cap or has a saturated link on which no flow gets more: the
    defining property of the max-min fair allocation; and no link is over capacity."""
    n_res = data.draw(st.integers(1, 5))
    caps = {r: data.draw(st.sampled_from([math.inf, 1.0, 2.5, 4.0, 7.0, 10.0])) for r in range(n_res)}
    n_flows = data.draw(st.integers(1, 8))
    flows = []
    for i in range(n_flows):
        res = tuple(sorted(data.draw(st.sets(st.integers(0, n_res - 1), min_size=1, max_size=3))))
        cap = data.draw(st.sampled_from([math.inf, math.inf, 0.5, 3.0]))
        flows.append(Flow(i, 1, 1, res, cap))
    rate = max_min_rates(flows, caps)
    load = {r: sum(rate[f.fid] for f in flows if r in f.resources) for r in caps}
    for r, c in caps.items():
        if math.isfinite(c):
            assert load[r] <= c * (1 + 1e-9)
    for f in flows:
        x = rate[f.fid]
        if math.isinf(x):
            assert math.isinf(f.cap) and all(math.isinf(caps[r]) for r in f.resources)
            continue
        if x >= f.cap * (1 - 1e-9):
            continue
        assert any(math.isfinite(caps[r]) and load[r] >= caps[r] * (1 - 1e-9)
                   and all(rate[g.fid] <= x * (1 + 1e-9) for g in flows if r in g.resources)
                   for r in f.resources), (f, rate, caps)


def test_fluid_late_advance_gives_exact_times():
    def build():
        net = FluidNetwork(0.0)
        net.set_capacity("s", 10.0)
        for i, (bits, link) in enumerate([(8, 1.0), (8, 2.0), (8, 100.0), (16, 100.0)]):
            net.set_capacity(("c", i), link)
            net.add(i, bits, (("c", i), "s"))
        return net
    a, b = build(), build()
    done_once = a.advance(100.0)
    done_steps = []
    t = 0.0
    while t < 100.0:
        t += 0.37
        done_steps += b.advance(t)
    t1 = 8 / 3.5
    want = {2: t1, 3: t1 + 8 / 7, 1: 4.0, 0: 8.0}
    assert [fid for fid, _ in done_once] == [2, 3, 1, 0]
    for fid, tc in done_once:
        assert tc == pytest.approx(want[fid], rel=1e-12)
    for (f1, t1_), (f2, t2_) in zip(done_once, done_steps):
        assert f1 == f2 and t2_ == pytest.approx(t1_, rel=1e-12)


# ----------------------------------------------------------------------------- emulator
@pytest.mark.parametrize("n", [1, 4, 16])
def test_equal_uploads_share_server_downlink(n):
    B, C, L = 250_000, 10e6, 0.03
    em, clock, _ = make({"network": {"uplink": "1Gbps", "latency": L, "server": {"downlink": C}}}, n)
    got: list = []
    for c in range(n):
        send(em, clock, "up", c, B, got)
    clock.run()
    assert len(got) == n
    for _, t, corrupt in got:
        assert t == pytest.approx(L + n * B * 8 / C, rel=REL)
        assert not corrupt
    assert [c for c, _, _ in got] == list(range(n))   # equal times: order of transfer() calls


def test_broadcast_costs_shared_server_uplink():
    B, C, L, n = 100_000, 20e6, 0.01, 8
    em, clock, _ = make({"network": {"downlink": "100Mbps", "latency": L, "server": {"uplink": C}}}, n)
    got: list = []
    for c in range(n):
        send(em, clock, "down", c, B, got)
    clock.run()
    for _, t, _ in got:
        assert t == pytest.approx(L + n * B * 8 / C, rel=REL)   # not L + B*8/100Mbps


def test_max_min_with_slow_clients():
    """Server downlink 10 Mbps; uplinks 1, 2, 100, 100 Mbps; 8, 8, 16, 8 Mbit.
    Water-filling: 1, 2, 3.5, 3.5 until client 3 ends at 8/3.5 s; then client 2 gets 7 Mbps."""
    L = 0.02
    sections = {"network": {"uplink": "100Mbps", "latency": L, "server": {"downlink": "10Mbps"},
                            "group": [{"clients": "0", "uplink": "1Mbps"}, {"clients": "1", "uplink": "2Mbps"}]}}
    em, clock, _ = make(sections, 4)
    got: list = []
    for c, nbytes in enumerate([1_000_000, 1_000_000, 2_000_000, 1_000_000]):
        send(em, clock, "up", c, nbytes, got)
    clock.run()
    t1 = 8 / 3.5
    want = {3: L + t1, 2: L + t1 + 8 / 7, 1: L + 4.0, 0: L + 8.0}
    assert [c for c, _, _ in got] == [3, 2, 1, 0]
    for c, t, _ in got:
        assert t == pytest.approx(want[c], rel=REL)


def test_transfer_straddling_trace_breakpoints(tmp_path):
    (tmp_path / "bw.csv").write_text("time,bps\n0,1Mbps\n2s,4Mbps\n5s,500kbps\n")
    L = 0.05
    em, clock, _ = make({"network": {"uplink": {"trace": "bw.csv"}, "latency": L}}, 2, tmp_path)
    got: list = []
    clock.call_at(1.0, lambda: send(em, clock, "up", 0, 1_000_000, got))   # 8 Mbit
    clock.call_at(1.0, lambda: send(em, clock, "up", 1, 2_000_000, got))   # 16 Mbit
    clock.run(until=100)
    want = {0: 1.0 + 1.0 + 7 / 4 + L,          # 1 Mbit by t=2, then 7 Mbit at 4 Mbps
            1: 1.0 + 1.0 + 3.0 + 3 / 0.5 + L}  # 1 + 12 Mbit by t=5, then 3 Mbit at 0.5 Mbps
    for c, t, _ in got:
        assert t == pytest.approx(want[c], rel=REL)


def test_trace_relative_to_emulator_start(tmp_path):
    """Trace times count from the clock reading at construction (a wall clock is not 0)."""
    (tmp_path / "bw.csv").write_text("0,1Mbps\n1,2Mbps\n")
    em, clock, _ = make({"network": {"uplink": "bw.csv", "latency": 0}}, 1, tmp_path, start=1000.0)
    got: list = []
    send(em, clock, "up", 0, 250_000, got)   # 2 Mbit: 1 Mbit in the first second, 1 at 2 Mbps
    clock.run()
    assert got[0][1] == pytest.approx(1000.0 + 1.5, rel=1e-9)


def test_set_link_mid_transfer_reshapes_rate():
    em, clock, _ = make({"network": {"uplink": "1Mbps", "latency": 0},
                         "events": [{"at": "1s", "action": "set_link", "clients": "0", "uplink": "3Mbps"}]}, 1)
    got: list = []
    send(em, clock, "up", 0, 500_000, got)   # 4 Mbit: 1 in the first second, 3 at 3 Mbps
    clock.run()
    assert got[0][1] == pytest.approx(2.0, rel=REL)


def test_zero_byte_and_latency_only():
    em, clock, _ = make({"network": {"latency": "7ms"}}, 1)
    got: list = []
    send(em, clock, "down", 0, 0, got)
    clock.run()
    assert got[0][1] == pytest.approx(0.007, rel=REL)


def _reference_completions(arrivals, capacity):
    """Brute force: re-solve every flow's rate at every arrival and completion."""
    pending = sorted(arrivals, key=lambda a: (a[0], a[1]))
    active: dict = {}
    t, done = 0.0, {}
    while pending or active:
        rates = max_min_rates([Flow(fid, 1, 1, res, cap) for fid, (_, res, cap) in active.items()], capacity)
        dt_c = min((active[f][0] / rates[f] if rates[f] > 0 else math.inf for f in active), default=math.inf)
        dt_a = pending[0][0] - t if pending else math.inf
        dt = min(dt_c, dt_a)
        for f in list(active):
            left = active[f][0] - rates[f] * dt if math.isfinite(rates[f]) else 0.0
            active[f] = (left, *active[f][1:])
        t += dt
        for f in [f for f in active if active[f][0] <= 1e-9 * 8e5]:
            done[f] = t
            del active[f]
        while pending and pending[0][0] <= t:
            _, fid, bits, res, cap = pending.pop(0)
            active[fid] = (bits, res, cap)
    return done


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(0, 3), st.integers(1, 100_000),
                          st.sampled_from([math.inf, 2e5, 1e6])), min_size=1, max_size=12),
       st.sampled_from([math.inf, 1e6, 3e6]))
def test_incremental_fluid_matches_brute_force(arrivals, server):
    """The incremental model (components, heap of predictions) against full recomputation."""
    capacity = {("c", 0): 1e6, ("c", 1): 5e5, ("c", 2): 4e6, ("c", 3): math.inf, "s": server}
    flows = [(t, i, 8.0 * b, (("c", c), "s"), cap) for i, (t, c, b, cap) in enumerate(arrivals)]
    want = _reference_completions(flows, capacity)
    net = FluidNetwork(0.0)
    for r, c in capacity.items():
        net.set_capacity(r, c)
    got = {}
    for t, fid, bits, res, cap in sorted(flows, key=lambda a: (a[0], a[1])):
        got.update(dict(net.advance(t)))
        net.add(fid, bits, res, cap)
    got.update(dict(net.advance(1e9)))
    assert set(got) == set(want)
    for fid in want:
        assert got[fid] == pytest.approx(want[fid], rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------- fast path
def _drive(ops, shared_min):
    """Replay ``ops`` on a FluidNetwork; return what an observer sees: completions, the
    bits left by aborted flows, and the rates after every step."""
    net = FluidNetwork(0.0, shared_min=shared_min)
    net.set_capacity("s", 4e6)
    for c in range(6):
        net.set_capacity(("c", c), [1e6, 5e5, 4e6, 2e6, 3e5, 8e6][c])
    seen: list = []
    fid = 0
    for kind, t, a, b in ops:
        seen.extend(("done", f, tc) for f, tc in net.advance(t))
        if kind == "add":
            fid += 1
            net.add(fid, 8.0 * a, (("c", b), "s"), [math.inf, 2e5, 1.5e6][a % 3])
        elif kind == "cap" and a in net.flows:
            net.set_cap(a, [math.inf, 2e5, 1.5e6, 0.0][b % 4])
        elif kind == "link":
            net.set_capacity(("c", a % 6), [1e6, 5e5, 0.0, 3e6][b % 4])
        elif kind == "server":
            net.set_capacity("s", [4e6, 1e6, math.inf, 2.5e6][b % 4])
        elif kind == "abort" and a in net.flows:
            seen.append(("left", a, net.remove(a)))
        seen.append(("rates", t, sorted(net.rates().items())))
    seen.extend(("done", f, tc) for f, tc in net.advance(1e7))
    return seen


_OPS = st.lists(st.tuples(st.sampled_from(["add"] * 6 + ["cap", "link", "server", "abort"]), st.floats(0, 0.5),
                          st.integers(1, 60_000), st.integers(0, 5)), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None)
@given(_OPS)
def test_single_bottleneck_fast_path_matches_general_solver(ops):
    """The incremental single-bottleneck path (entered, left when a client's link gets a
    second flow or the server link turns unlimited, re-entered) gives the same rates,
    completion times and leftovers as re-solving max-min fairness at every event."""
    ops = sorted(ops, key=lambda o: o[1])
    ops = [(k, t, a if k != "cap" and k != "abort" else 1 + a % 12, b) for k, t, a, b in ops]
    want, got = _drive(ops, math.inf), _drive(ops, 2)
    assert [w[:2] for w in want] == [g[:2] for g in got]
    for w, g in zip(want, got):
        if w[0] == "rates":
            assert [f for f, _ in w[2]] == [f for f, _ in g[2]]
            for (_, x), (_, y) in zip(w[2], g[2]):
                assert y == pytest.approx(x, rel=1e-9, abs=1e-6)
        else:
            assert g[2] == pytest.approx(w[2], rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("shared_min", [math.inf, 2])
def test_many_uploads_through_one_finite_link_in_closed_form(shared_min):
    """F uploads of sizes B_1 < ... < B_F through C (client links faster than C): the k-th
    smallest finishes when everybody has received B_k, i.e. at sum_{j<k} B_j/C + (F-k+1) B_k/C."""
    F, C = 300, 1e7
    net = FluidNetwork(0.0, shared_min=shared_min)
    net.set_capacity("s", C)
    sizes = [8.0 * (10_000 + 37 * i) for i in range(F)]
    for i, bits in enumerate(sizes):
        net.set_capacity(("c", i), 1e9)
        net.add(i, bits, (("c", i), "s"))
    done = net.advance(1e9)
    assert [f for f, _ in done] == list(range(F))
    served = 0.0
    for k, (fid, tc) in enumerate(done):
        want = (served + (F - k) * sizes[k]) / C
        served += sizes[k]
        assert tc == pytest.approx(want, rel=1e-9)
