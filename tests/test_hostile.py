"""Hostile and runaway peers, piece by piece: bounded reads, the size cap across frames,
rejection budgets and bans, rate-limited reject logging, the streamed event log, the
emulator's per-client upload budget, the decode cache's type checks, and the server's
account of every message it received (virtual time, inproc: fast and deterministic)."""
import asyncio
import hashlib
import json

import pytest
import torch
import zmq

from algorithms.base import Payload
from fedsim import codec
from fedsim.codec import SERVER, CodecError, Message
from fedsim.guard import RejectLog
from fedsim.hostile import envelope, flood_messages, fuzz_messages
from fedsim.node import HELLO, NODE, inbound_balance
from fedsim.results import EventLog
from fedsim.runner import run
from fedsim.scenario import load_scenario
from network.emulator import Emulator
from network.guard import GuardConfig, PeerGuard
from network.transport import BANNED, OVERSIZED, Transport
from tests.attacked import attacked_run


# ----------------------------------------------------------------------------- guard
def test_guard_bans_after_burst_refills_at_rate_and_forgets_old_peers():
    g = PeerGuard(GuardConfig(rate=10.0, burst=5.0, ban_s=2.0, max_peers=3))
    assert not any(g.reject(b"a", 0.0) for _ in range(5))
    assert g.reject(b"a", 0.0) and g.is_banned(b"a", 1.9) and not g.is_banned(b"a", 2.0)
    # a slow trickle (below the rate) is never banned
    assert not any(g.reject(b"b", t * 0.2) for t in range(100))
    for p in (b"c", b"d", b"e", b"f"):
        g.reject(p, 0.0)
    assert len(g._buckets) <= 3
    with pytest.raises(ValueError, match="guard.rate"):
        GuardConfig(rate=0)


# ----------------------------------------------------------------------------- transport
def _pair(**kw):
    ctx = zmq.Context()
    loop = asyncio.new_event_loop()
    router = Transport(router=True, address="inproc://hostile-test", context=ctx, rcv_hwm=100_000, **kw)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"mallory")
    dealer.setsockopt(zmq.SNDHWM, 100_000)
    dealer.connect("inproc://hostile-test")
    return ctx, loop, router, dealer


def test_a_read_takes_a_bounded_batch_and_yields_to_the_loop():
    ctx, loop, router, dealer = _pair(batch_messages=50)
    got, ticks = [], []
    try:
        router.attach(loop, lambda peer, frames: got.append(peer))
        for _ in range(1000):
            dealer.send(b"x")

        async def main():
            # a timer due now runs between batches, long before the 1000 messages are read
            loop.call_soon(lambda: ticks.append(len(got)))
            while len(got) < 1000:
                await asyncio.sleep(0)
                ticks.append(len(got))

        loop.run_until_complete(asyncio.wait_for(main(), 10))
        assert len(got) == 1000 and set(got) == {b"mallory"}
        assert max(b - a for a, b in zip(ticks, ticks[1:])) <= 50
        assert ticks[0] < 1000
    finally:
        router.close(), dealer.close(0), loop.close(), ctx.term()


def test_a_message_over_the_total_cap_is_refused_frame_by_frame_and_reading_goes_on():
    ctx, loop, router, dealer = _pair(max_message_bytes=10_000)
    got, discarded = [], []
    try:
        router.on_discard = lambda peer, reason, n: discarded.append((peer, reason, n))
        router.attach(loop, lambda peer, frames: got.append(frames))
        dealer.send_multipart([b"a" * 4000] * 4)  # each frame fits, the message does not
        dealer.send_multipart([b"ok", b"b" * 9000])
        for _ in range(100):
            router.drain()
            if got:
                break
        assert discarded == [(b"mallory", OVERSIZED, 16_000 + len(b"mallory"))]
        assert got == [[b"ok", b"b" * 9000]]
    finally:
        router.close(), dealer.close(0), loop.close(), ctx.term()


def test_a_banned_peer_is_discarded_at_read_time_and_counted():
    ctx, loop, router, dealer = _pair(guard=PeerGuard(GuardConfig(rate=1.0, burst=3.0, ban_s=60.0)),
                                      batch_messages=10)
    got = []
    try:
        router.attach(loop, lambda peer, frames: (got.append(frames), router.report_rejection(peer)))
        for i in range(100):
            dealer.send(b"%d" % i)
        for _ in range(10):
            router.drain()
        assert len(got) == 4  # 3 within the burst, the 4th empties the bucket and bans
        assert router.discarded[BANNED] == 96 and router.guard.bans == 1
        assert router._paused  # the loop's own reads now wait ban_pause_s between batches
    finally:
        router.close(), dealer.close(0), loop.close(), ctx.term()


# ----------------------------------------------------------------------------- logging
def test_reject_log_full_rows_then_summaries_bounded_keys():
    rows, t = [], [0.0]
    log = RejectLog(lambda e, **f: rows.append((e, f)), lambda: t[0], full=3, every_s=10.0, max_keys=2)
    for i in range(1000):
        t[0] = i * 0.1
        log(b"\x01\x02", "bad_msgpack", detail="x")
    for p in range(50):
        log(bytes([p]) * 5, "checksum", detail="y")
    log.flush()
    full = [f for e, f in rows if e == "reject"]
    summaries = [f for e, f in rows if e == "reject_summary"]
    assert len(full) == 3 + 1 + 3  # 3 of the first key, the 2nd key's one; past max_keys peers share "*"
    assert 9 <= len(summaries) <= 14
    assert sum(f["suppressed"] for f in summaries if f["peer"] == "0102") == 997
    assert {f["peer"] for f in summaries} == {"0102", "*"}
    assert log.keys == 2 + 1  # max_keys, plus one shared "*" entry per reason


def test_event_log_streams_with_the_same_digest_and_bounded_memory(tmp_path):
    log = EventLog(lambda: 1.5, flush_rows=1000)
    longest = 0
    for i in range(20_000):
        log("reject", reason="bad_msgpack", detail="x" * 50, i=i)
        longest = max(longest, len(log._buf))
    assert longest < 1000  # memory holds one buffer of rows, the rest is on disk
    lines = [json.dumps({"t": 1.5, "event": "reject", "reason": "bad_msgpack", "detail": "x" * 50, "i": i},
                        separators=(",", ":"), sort_keys=True) for i in range(20_000)]
    expected = hashlib.sha256("".join(l + "\n" for l in lines).encode()).hexdigest()
    assert log.sha256() == expected and log.total == 20_000 and log.count("reject") == 20_000
    log.write(tmp_path / "events.jsonl")
    assert hashlib.sha256((tmp_path / "events.jsonl").read_bytes()).hexdigest() == expected
    first = next(iter(log.rows))
    assert first == (1.5, "reject", {"reason": "bad_msgpack", "detail": "x" * 50, "i": 0})


def test_run_with_out_streams_events_file_and_digest_matches(tmp_path):
    s = load_scenario(None, ["run.rounds=1", "data.clients=3"])
    a = run(s, out_dir=tmp_path)
    b = run(s)
    data = (tmp_path / "events.jsonl").read_bytes()
    assert hashlib.sha256(data).hexdigest() == a.summary["events_sha256"] == b.summary["events_sha256"]
    assert data.count(b"\n") == a.summary["events"] == b.summary["events"]


# ----------------------------------------------------------------------------- codec
@pytest.mark.parametrize("shape", [[4.0], [True, 4], [1.0, 4]])
def test_decode_cache_checks_declaration_types_like_a_fresh_decoder(shape):
    good = codec.encode(Message(src=1, dst=SERVER, round=0, kind="grad", version=0,
                                payload=Payload({"w": torch.ones(1, 4) if len(shape) == 2 else torch.ones(4)})))
    bad = envelope(src=1, kind="grad", tensors=[("w", "float32", shape, good[1])])
    with pytest.raises(CodecError) as cold:
        codec.decode(bad)
    cache = codec.DecodeCache()
    codec.decode(good, cache=cache)  # warm: the equal (==) valid declaration is cached
    with pytest.raises(CodecError) as warm:
        codec.decode(bad, cache=cache)
    assert warm.value.reason == cold.value.reason == "bad_shape"
    assert codec.decode(good, cache=cache).payload.tensors["w"].shape == tuple(int(d) for d in shape)


def test_long_kind_is_refused_before_it_is_logged():
    with pytest.raises(CodecError, match="bad_kind"):
        codec.peek_route(envelope(src=1, kind="k" * 65)[0])
    assert codec.peek_route(envelope(src=1, kind="k" * 64)[0])["k"] == "k" * 64


# ----------------------------------------------------------------------------- emulator
def test_emulator_holds_at_most_the_budget_per_client_and_counts_overflow():
    sc = load_scenario(None, ["data.clients=2", "network.uplink=1Mbps"])

    class Clock:
        def __init__(self):
            self.t, self.timers = 0.0, []

        def now(self):
            return self.t

        def call_at(self, when, cb):
            self.timers.append((when, cb))

            class H:
                def cancel(self_inner):
                    self.timers = [x for x in self.timers if x[1] is not cb]
            return H()

        def run(self):
            while self.timers:
                self.timers.sort(key=lambda x: x[0])
                when, cb = self.timers.pop(0)
                self.t = max(self.t, when)
                cb()

    clock, rows = Clock(), []
    emu = Emulator(sc.network, 2, clock, 1, lambda e, **f: rows.append((e, f)), max_held_bytes=250_000)
    delivered, dropped = [], []
    for i in range(10):
        emu.transfer("up", 0, 100_000, lambda c, i=i: delivered.append(i), dropped.append)
    assert emu.held_bytes(0) == 200_000 and dropped == ["queue_overflow"] * 8
    emu.transfer("up", 1, 100_000, lambda c: delivered.append("other"), dropped.append)  # per client
    clock.run()
    assert sorted(map(str, delivered)) == ["0", "1", "other"] and emu.held_bytes(0) == 0
    emu.transfer("up", 0, 100_000, lambda c: delivered.append("after"), dropped.append)  # budget freed
    clock.run()
    assert delivered[-1] == "after"
    assert [f["reason"] for e, f in rows if e == "drop"] == ["queue_overflow"] * 8


# ----------------------------------------------------------------------------- the whole server
def _attacked_run(overrides, attack):
    """The attack lands during round 2 (sent when round 1 ends)."""
    return attacked_run(overrides, 1, lambda sim, stranger: attack(sim, stranger, 2))


def test_every_message_received_is_accounted_for_under_faults_and_attack():
    """received (+ network copies) = accepted + every named rejection and discard."""
    overrides = ["run.rounds=6", "data.clients=6", "algorithm.name=powersgd", "network.transport=datagram",
                 "network.loss=0.08", "network.duplicate=0.3", "network.corrupt=0.1", "run.round_deadline=1s"]

    def attack(sim, stranger, r):
        for frames in flood_messages("stranger") * 5:
            stranger.send(frames)
        for frames in fuzz_messages(7, 300):
            stranger.send(frames)
        # a registered node's odd traffic: an unasked kind, a reply for another round, a duplicate id
        node = sim.client_node
        for kind, rnd in (("flood", r), ("p", 0), ("q", r), ("q", r)) + (("p", r),) * 6:
            node.send(Message(src=2, dst=SERVER, round=rnd, kind=kind, version=rnd, payload=Payload()))
        sim.client_transport.send(envelope(src=3, kind="p", round=r, version=r, msg_id=1))  # replayed id

    sim, result = _attacked_run(overrides, attack)
    inbound = result.summary["inbound"]
    came, went = inbound_balance(inbound)
    assert came == went, inbound
    assert inbound["received"] == sim.server_transport.received
    assert inbound["accepted"] > 0 and inbound["network_copies"] > 0 and inbound["network_loss"] > 0
    for reason in ("rejected_unknown_sender", "rejected_bad_hello", "unasked", "unrequested", "rejected_checksum"):
        assert inbound.get(reason, 0) > 0, (reason, inbound)
    assert result.summary["rounds"] == 6


def test_empty_hello_is_rejected_and_set_aside_messages_are_counted():
    def attack(sim, stranger, r):
        stranger.send(envelope(src=NODE, kind=HELLO, meta={"clients": []}))
        for kind in ("junk", "junk", "model"):
            sim.client_node.send(Message(src=1, dst=SERVER, round=r, kind=kind, version=r, payload=Payload()))

    sim, result = _attacked_run(["run.rounds=3", "data.clients=4", "algorithm.name=fedavg"], attack)
    c = result.summary["counters"]
    assert c["rejected_bad_hello"] == 1 and c["unasked"] == 2
    assert sim.server_node.routes.keys() == {0, 1, 2, 3}
    came, went = inbound_balance(result.summary["inbound"])
    assert came == went


def test_a_registered_nodes_junk_never_reaches_the_network_model():
    """A node floods as its own clients (unasked kinds, future rounds, late-looking rounds):
    almost nothing reaches the network model (a few uploads per request at most)."""
    overrides = ["run.rounds=4", "data.clients=4", "algorithm.name=fedavg", "run.round_deadline=1s"]
    clean = run(load_scenario(None, overrides))

    def attack(sim, stranger, r):
        blob = torch.zeros(25_000)  # 100 KB
        for i in range(300):
            kind, rnd = [("junk", r), ("model", r + 1), ("model", r - 1), ("model", 0)][i % 4]
            sim.client_node.send(Message(src=i % 4, dst=SERVER, round=rnd, kind=kind, version=rnd,
                                         payload=Payload({"w": blob})))

    sim, result = _attacked_run(overrides, attack)
    # (the model may differ: what is modelled crowds the node's own clients' links, whose
    # replies may then overflow their queue; other nodes' clients are untouched)
    assert result.summary["rounds"] == 4
    inbound = result.summary["inbound"]
    refused = inbound["unasked"] + inbound["future_round"] + inbound["unrequested"]
    # at most the slack of ADMIT_PER_REQUEST - 1 per (round, kind, client) reaches the model
    assert refused >= 300 - 4 * 2 * 3, inbound
    assert result.summary["messages_up"] - clean.summary["messages_up"] == 300 - refused
    assert inbound_balance(inbound)[0] == inbound_balance(inbound)[1]


def test_many_rejections_cost_counters_not_log_rows(monkeypatch):
    import network.guard
    monkeypatch.setattr(network.guard, "DEFAULT", GuardConfig(rate=1e9, burst=1e9))  # every one parsed

    def attack(sim, stranger, r):
        for frames in flood_messages("stranger") * 5000:
            stranger.send(frames)

    sim, result = _attacked_run(["run.rounds=3", "data.clients=4"], attack)
    c = result.summary["counters"]
    assert c["rejected"] == 20_000
    rows = list(result.events.rows)
    assert sum(1 for _, e, _ in rows if e == "reject") == 4 * 100  # first 100 per (peer, reason)
    summaries = [f for _, e, f in rows if e == "reject_summary"]
    assert sum(f["suppressed"] for f in summaries) == 20_000 - 400
    assert result.summary["events"] < 600


def test_an_oversized_frame_is_refused_inside_zeromq_before_it_is_buffered():
    ctx = zmq.Context()
    loop = asyncio.new_event_loop()
    router = Transport(router=True, address="tcp://127.0.0.1:0", context=ctx, max_frame_bytes=10_000)
    got, socks = [], []
    try:
        router.attach(loop, lambda peer, frames: got.append(frames))
        for payload in ([b"x" * 50_000], [b"ok"]):  # ZeroMQ drops the big one's connection
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(router.address)
            d.send_multipart(payload)
            socks.append(d)

        async def wait():
            for _ in range(300):
                if got:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # real tcp sockets, wall clock: time for a wrongly kept big frame to land too

        loop.run_until_complete(wait())
        assert got == [[b"ok"]]
    finally:
        for d in socks:
            d.close(0)
        router.close()
        loop.close()
        ctx.term()
