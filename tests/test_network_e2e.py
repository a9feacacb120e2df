"""The network model through the real runtime (actors, codec, ZeroMQ, clocks).

What users expect to see end to end:

* stragglers: without a round deadline a round lasts exactly as long as its slowest
  client (download + compute + upload, from the link formula and ``Emulator.speed``);
  with one, the round is capped at the deadline and the clients predicted to finish after
  it are the ones counted missing;
* TCP loss slows uploads to what the TCP model gives them (handshake, window per round
  trip, loss response), exactly, and loses nothing;
* corruption is caught by the receiver's CRC (``rejected_checksum``) and the run finishes;
* the wall clock gives the same round times as virtual time (within 10 %).
"""
from __future__ import annotations

import math

import pytest

from fedsim.data import load_dataset, partition
from fedsim.models import build_model, work_per_sample
from fedsim.runner import run
from fedsim.scenario import Scenario, load_scenario
from network.emulator import Emulator
from network.simclock import HeapClock

BASE = ["data.dataset=digits", "data.partition=iid", "model.kind=mlp", "model.hidden=[32]", "algorithm.name=fedavg",
        "algorithm.local_epochs=1", "run.target_accuracy=0.5"]


class Recorder:
    """Wraps ``Emulator.transfer`` to record what the runtime asked of the network model:
    (direction, client, bytes, clock time) of every transfer."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int, int, float]] = []
        original = self.original = Emulator.transfer

        def transfer(emu, direction, client, nbytes, deliver, *rest):
            self.calls.append((direction, client, int(nbytes), emu.clock.now()))
            return original(emu, direction, client, nbytes, deliver, *rest)

        monkeypatch.setattr(Emulator, "transfer", transfer)

    def first(self, direction: str, t0: float, t1: float = math.inf) -> dict[int, int]:
        """Index (in ``calls``) of each client's first transfer in [t0, t1) (one message per
        client and direction per round; a straggler's reply may leave after its round has
        closed)."""
        out: dict[int, int] = {}
        for i, (d, c, n, t) in enumerate(self.calls):
            if d == direction and t0 <= t < t1:
                out.setdefault(c, i)
        return out

    def replay(self, sc: Scenario) -> list[float]:
        """Seconds each recorded transfer took to arrive, by the network model alone: the
        same transfers at the same times through an emulator of the scenario, off the
        runtime. (Under TCP a message's time depends on its connection's history: the
        handshake, the window left by earlier messages, restarts after idle.)"""
        clock = HeapClock()
        emu = model_emulator(sc, clock)
        took = [math.inf] * len(self.calls)
        for i, (d, c, n, t) in enumerate(self.calls):
            def send(i=i, d=d, c=c, n=n, t=t):
                self.original(emu, d, c, n, lambda corrupt: took.__setitem__(i, min(took[i], clock.now() - t)))
            clock.call_at(t, send)
        clock.run()
        return took


def model_emulator(sc: Scenario, clock: HeapClock | None = None) -> Emulator:
    """An emulator with the scenario's network and seed, off the runtime: same device
    speeds and TCP response rates as the run's (they depend only on the config and the seed)."""
    return Emulator(sc.network, sc.data.clients, clock or HeapClock(), sc.run.seed, lambda *a, **k: None)


def compute_times(sc: Scenario) -> dict[int, float]:
    """Seconds of local training per client and round: FedAvg's work (epochs x local
    samples x FLOP per sample) over the client's device speed."""
    ds = load_dataset(sc.data, sc.run.seed)
    parts = partition(ds.train_y, sc.data, sc.run.seed)
    wps = work_per_sample(build_model(sc.model, ds.input_shape, ds.num_classes, sc.run.seed), ds.input_shape)
    emu = model_emulator(sc)
    return {i: sc.algorithm.local_epochs * len(p) * wps / emu.speed(i) for i, p in enumerate(parts)}


def predicted_finish(sc: Scenario, rec: Recorder, t0: float, t1: float) -> dict[int, float]:
    """Seconds from the start of a round at ``t0`` until each client's reply arrives: its
    download's transfer time, its compute time, its upload's transfer time (the transfer
    times from the network model, replayed off the runtime)."""
    took = rec.replay(sc)
    comp = compute_times(sc)
    down, up = rec.first("down", t0, t1), rec.first("up", t0)
    return {c: took[down[c]] + comp[c] + took[up[c]] for c in down if c in up}


def round_starts(result) -> list[float]:
    return [t for t, e, _ in result.events.rows if e == "round_start"]


# ----------------------------------------------------------------------------- stragglers
STRAGGLERS = BASE + ["data.clients=6", "run.rounds=2", "network.uplink=1Mbps", "network.downlink=10Mbps",
                     "network.latency=30ms", "stragglers.distribution=lognormal", "stragglers.speed=2e7",
                     "stragglers.sigma=1.0"]


def test_without_deadline_round_time_follows_the_slowest_client(monkeypatch):
    rec = Recorder(monkeypatch)
    sc = load_scenario(None, STRAGGLERS)
    r = run(sc)
    starts = round_starts(r) + [math.inf]
    comp = compute_times(sc)
    assert max(comp.values()) > 3 * min(comp.values()), "the speeds must actually differ"
    assert r.summary["counters"].get("missed_replies", 0) == 0
    for k, m in enumerate(r.metrics):
        finish = predicted_finish(sc, rec, starts[k], starts[k + 1])
        assert len(finish) == sc.data.clients
        slowest = max(finish, key=finish.get)
        assert m.round_time_s == pytest.approx(finish[slowest], rel=1e-9, abs=1e-9)
        # ...and that is the slow device, not the network: compute decides this round.
        assert slowest == max(comp, key=comp.get)


def test_round_deadline_caps_rounds_and_leaves_the_slowest_out(monkeypatch):
    rec = Recorder(monkeypatch)
    free = load_scenario(None, STRAGGLERS)
    comp = compute_times(free)
    # A deadline between the fastest and the slowest client's predicted finish.
    deadline = sorted(comp.values())[len(comp) // 2] + 0.1
    sc = load_scenario(None, STRAGGLERS + [f"run.round_deadline={deadline!r}"])
    r = run(sc)
    starts = round_starts(r)
    finish = predicted_finish(sc, rec, starts[0], starts[1])
    expected_missing = sorted(c for c, t in finish.items() if t > deadline)
    assert 0 < len(expected_missing) < sc.data.clients
    timeouts = [f for _, e, f in r.events.rows if e == "gather_timeout"]
    assert timeouts[0]["round"] == 0 and timeouts[0]["first_missing"] == expected_missing
    # Each round misses at least the clients predicted past the deadline (the first round
    # pays the connections' handshakes, later ones do not, so the count may differ).
    bounds = starts + [math.inf]
    predicted = sum(sum(t > deadline for t in predicted_finish(sc, rec, bounds[k], bounds[k + 1]).values())
                    for k in range(len(r.metrics)))
    assert predicted >= len(expected_missing)
    assert r.summary["counters"]["missed_replies"] >= predicted
    for m in r.metrics:
        assert m.round_time_s == pytest.approx(deadline, abs=1e-9), "capped at the deadline, not the slowest"
    # Without the deadline the same run takes as long as its slowest client.
    assert max(finish.values()) > deadline + 0.1


# ----------------------------------------------------------------------------- loss, corruption
def test_tcp_loss_becomes_padhye_throughput_and_loses_nothing(monkeypatch):
    rec = Recorder(monkeypatch)
    sc = load_scenario(None, BASE + ["data.clients=4", "run.rounds=2", "network.uplink=10Mbps", "network.latency=100ms",
                                     "network.loss=0.05", "network.transport=tcp"])
    emu = model_emulator(sc)
    cap = emu.tcp_cap("up", 0)
    assert cap < 1e6 < sc.network.uplinks[0].bandwidth, "the loss-limited TCP rate, not the link, must bind"
    r = run(sc)
    assert not [f for _, e, f in r.events.rows if e == "drop"]
    assert r.summary["counters"].get("missed_replies", 0) == 0
    starts = round_starts(r) + [math.inf]
    for k, m in enumerate(r.metrics):
        finish = predicted_finish(sc, rec, starts[k], starts[k + 1])
        assert m.round_time_s == pytest.approx(max(finish.values()), rel=1e-9)


def test_corrupted_uploads_are_caught_by_the_checksum_and_the_run_finishes():
    # Corrupt uploads only, so every rejection counted is the server node's own.
    sc = load_scenario(None, BASE + ["data.clients=5", "run.rounds=4", "run.round_deadline=2s",
                                     "network.corrupt=0.3", "network.group=[{clients='all', direction='down', corrupt=0.0}]"])
    assert sc.network.uplinks[0].corrupt == 0.3 and sc.network.downlinks[0].corrupt == 0.0
    r = run(sc)
    c = r.summary["counters"]
    assert r.summary["rounds"] == 4 and r.summary["final_accuracy"] is not None
    assert c["rejected_checksum"] > 0
    rejects = [f for _, e, f in r.events.rows if e == "reject" and f.get("reason") == "checksum"]
    assert len(rejects) == c["rejected_checksum"]
    # A corrupted update is never applied: each one is a reply the server goes without.
    assert c["missed_replies"] == c["rejected"]
    assert c.get("to_crashed_client", 0) == 0 and not [1 for _, e, _ in r.events.rows if e == "drop"]


# ----------------------------------------------------------------------------- real time
@pytest.mark.realtime
def test_wall_clock_round_times_agree_with_virtual_time():
    # Round times of ~0.5 s, made of latency, a 1 Mbps upload and ~0.35 s of modelled
    # compute (the real compute, a few ms, is subtracted from it on the wall clock).
    common = BASE + ["data.clients=3", "run.rounds=3", "model.kind=logistic", "network.uplink=1Mbps",
                     "network.downlink=20Mbps", "network.latency=60ms", "stragglers.speed=5e6"]
    virtual = run(load_scenario(None, common + ["run.clock=virtual"]))
    real = run(load_scenario(None, common + ["run.clock=real"]))
    assert real.summary["clock"] == "real" and len(real.metrics) == len(virtual.metrics) == 3
    for v, w in zip(virtual.metrics, real.metrics):
        assert 0.3 <= v.round_time_s <= 1.0
        assert w.round_time_s == pytest.approx(v.round_time_s, rel=0.10), (w.round_time_s, v.round_time_s)
