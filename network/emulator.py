"""The network emulator: decides when, whether and how often each message arrives.

One ``Emulator`` sits at the server's node. In a star topology every flow touches the
server, so it sees every transfer: it keeps the fluid model of bandwidth sharing
(:mod:`network.fluid`), the TCP connections (handshake, a congestion window stepped per
round trip, per-segment headers: one fluid flow per window-limited round trip, see
``_Conn``), draws each message's fate from seeded per-purpose, per-link streams, runs the scripted timeline and the availability process, and calls the
receiver's ``deliver(corrupt)`` at the delivery time through the clock.

It is clock-agnostic: all timing goes through ``Clock.now`` and ``Clock.call_at``, so the
same code runs under the virtual clock and the wall clock. It keeps its own agenda (a heap
of (time, class, tie, sequence)) and arms a single clock timer for its head, so entries
at equal times run in a fixed order whatever the clock's own tie-breaking:
state changes (events, traces, availability) first, then flow completions, then
deliveries in the order of the ``transfer()`` calls.

Time inside is the clock's; scenario times (``at = "120s"``, trace times) count from the
clock's reading when the Emulator is built.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from .config import Event, Link, Loss, NetworkConfig, Trace
from .fluid import FluidNetwork
from .models import (GilbertElliott, TcpWindow, cubic_rate, device_speeds, loss_event_rate, p_intact, packets,
                     padhye_rate, sample_jitter, tcp_rto)
from .units import format_clients

DIRECTIONS = ("up", "down")

# Purposes of random streams: each gets its own PCG64 stream per link, so drawing from
# one (say, jitter) never shifts another (say, loss).
_LOSS, _JITTER, _DUP, _CORRUPT, _AVAIL, _SPEED, _NOISE = range(1, 8)
# Agenda classes: at equal times, state changes run before completions before deliveries.
_STATE, _FLOW, _DELIVER = 0, 1, 2
# Round trips a new connection costs before its first message's first byte leaves: TCP's
# SYN / SYN-ACK; ZMTP's greeting and READY exchange on top (NULL mechanism); CURVE's
# HELLO / WELCOME and INITIATE / READY on top of that.
HANDSHAKE_RTTS = {"tcp": 1, "null": 2, "curve": 4}


class Clock(Protocol):
    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Any: ...


class _Agenda:
    """A private timer heap on top of a Clock, with one clock timer armed for its head."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.heap: list[tuple[float, int, int, int, Callable[[float], None]]] = []
        self.seq = 0
        self.handle: Any = None
        self.armed_at: float | None = None
        self.running = False

    def at(self, when: float, cls: int, tie: int, fn: Callable[[float], None]) -> None:
        """Run ``fn(when)`` at ``when``."""
        self.seq += 1
        heapq.heappush(self.heap, (when, cls, tie, self.seq, fn))
        if not self.running:
            self._arm()

    def _arm(self) -> None:
        if not self.heap:
            return
        head = self.heap[0][0]
        if self.armed_at is not None and self.armed_at <= head:
            return
        if self.handle is not None:
            self.handle.cancel()
        self.armed_at = head
        self.handle = self.clock.call_at(head, lambda: self._fire(head))

    def _fire(self, target: float) -> None:
        self.handle, self.armed_at = None, None
        self.running = True
        try:
            # Run everything due by the time this timer was armed for (not clock.now():
            # an event loop may fire a timer a hair early).
            heap, pop = self.heap, heapq.heappop  # (at() pushes onto this same list)
            while heap and heap[0][0] <= target:
                when, _, _, _, fn = pop(heap)
                fn(when)
        finally:
            self.running = False
            self._arm()


@dataclass(slots=True)
class _Transfer:
    tid: int
    direction: str
    client: int
    nbytes: int
    deliver: Callable[[bool], None]
    lost: bool            # datagram: a packet was lost
    duplicate: bool
    corrupt: tuple[bool, bool]
    delays: tuple[float, float]   # latency + jitter of each copy, seconds (>= 0)
    bits: float = 0.0             # tcp: wire bits (payload + headers) not yet handed to a chunk
    chunk: float = 0.0            # tcp: bits of its chunk in the fluid model now
    conn: "_Conn | None" = None   # tcp: the connection direction it travels on
    on_drop: Callable[[str], None] | None = None
    copies_left: int = 0


class _Conn:
    """One direction of a client's TCP connection: the sender's congestion window, the round
    trip in progress, and the messages waiting (one byte stream: sent one after the other).

    A round starts with a *credit* of ``cwnd`` segments; the head message sends a chunk of
    at most that credit as a fluid flow at its fair share; when the credit is spent the
    connection waits for the round's ACKs (``round_start + RTT``), then the window grows
    (or shrinks on a loss event) and the next round starts."""

    __slots__ = ("key", "window", "queue", "round_start", "credit", "sent", "last_send", "active", "wake",
                 "lossy", "rate", "chunk_start")

    def __init__(self, key: tuple[str, int], window: TcpWindow):
        self.key = key
        self.window = window
        self.queue: deque[_Transfer] = deque()
        self.round_start = -math.inf
        self.credit = 0.0          # wire bits the window still allows in this round
        self.sent = 0.0            # segments sent in this round
        self.last_send = -math.inf
        self.active = False        # a chunk in the fluid model, or a wake-up pending
        self.wake: float | None = None
        self.lossy = False
        self.rate = math.inf       # bits/s the last chunk averaged (its share of the path)
        self.chunk_start = 0.0


class Emulator:
    """See the module docstring. ``log(event, **fields)`` receives ``drop``, ``duplicate``
    and ``net_event`` records with JSON-friendly fields.

    Per-client upload budget: the emulator holds at most ``max(max_held_bytes, uplink rate
    x queue_s)`` bytes of one client's uploads at once (in flight on the link or waiting
    for their delivery time); an upload that would exceed it is dropped as
    ``queue_overflow``, as a real bottleneck queue (sized in seconds of its line rate)
    drops what does not fit. ``max_held_bytes`` None: unbounded."""

    def __init__(self, config: NetworkConfig, n_clients: int, clock: Clock, seed: int,
                 log: Callable[..., None], max_held_bytes: int | None = None, queue_s: float = 0.0):
        if n_clients != config.n_clients:
            raise ValueError(f"config was parsed for {config.n_clients} clients, emulator built for {n_clients}")
        self.config = config
        self.n = n_clients
        self.clock = clock
        self.seed = int(seed)
        self.log = log
        self.t0 = float(clock.now())
        self._agenda = _Agenda(clock)
        self._floor = self.t0
        self._fluid = FluidNetwork(self.t0)
        self._fluid_gen = 0
        self._links: dict[str, list[Link]] = {"up": list(config.uplinks), "down": list(config.downlinks)}
        self._bursts: dict[tuple[str, int], dict[int, float]] = {}
        # Per link: the extra loss of active bursts, and the TCP cap. Both change only
        # with a set_link or a burst (see _refresh_caps), not per message.
        self._extra: dict[tuple[str, int], float] = {}
        self._caps: dict[tuple[str, int], float] = {}
        self._cap_memo: dict[tuple[int, int, float], tuple[Link, Link, float]] = {}
        self._slow: dict[int, dict[int, float]] = {}
        self._partitioned: set[int] = set()
        self._crashed: set[int] = set()
        self._offline: set[int] = set()
        self._transfers: dict[int, _Transfer] = {}
        self._by_client: dict[int, set[int]] = {}
        self._last_delivery: dict[tuple[str, int], float] = {}
        self._tid = 0
        self._overlay_id = 0
        self._rngs: dict[tuple, np.random.Generator] = {}
        self._ge: dict[tuple[str, int], GilbertElliott] = {}
        self._runtime_cb: Callable[[dict], None] | None = None
        self._rounds_started: set[int] = set()
        self._pending_runtime: list[dict] = []
        self._trace_gen: dict[tuple[str, int], int] = {}
        self._batch_pending = False
        # TCP: per (direction, client) the sender's connection state; per client the time its
        # connection is set up (absent: none yet, the next message opens one).
        self._conns: dict[tuple[str, int], _Conn] = {}
        self._ready: dict[int, float] = {}
        self._handshake = HANDSHAKE_RTTS["null"]
        self._wakes: dict[float, list[_Conn]] = {}
        self._opening: list[_Transfer] = []
        self._seg_bits = 8.0 * (config.tcp.mss + config.tcp.header)
        self._tcp = config.transport == "tcp"
        self._tcp_header, self._tcp_mss = config.tcp.header, config.tcp.mss
        self.max_held_bytes = max_held_bytes
        self.queue_s = queue_s
        self._held: dict[int, int] = {}
        """client -> bytes of its uploads held now (see max_held_bytes)."""
        self.overflows: dict[int, int] = {}

        self._fluid.set_capacity(("server", "up"), config.server_uplink)
        self._fluid.set_capacity(("server", "down"), config.server_downlink)
        for d in DIRECTIONS:
            for c in range(n_clients):
                self._apply_bandwidth(d, c)

        st = config.stragglers
        self._speeds = device_speeds(st.distribution, st.speed, st.sigma, st.alpha, st.speeds, n_clients,
                                     self._rng(_SPEED))
        for ev in config.events:
            if ev.at is not None:
                self._agenda.at(self.t0 + ev.at, _STATE, ev.index, lambda t, ev=ev: self._fire_event(ev, t))
        self._start_availability()

    # ------------------------------------------------------------------ randomness
    def _rng(self, purpose: int, *key: int) -> np.random.Generator:
        k = (purpose, *key)
        g = self._rngs.get(k)
        if g is None:
            g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=k)))
            self._rngs[k] = g
        return g

    # ------------------------------------------------------------------ time
    def _now(self) -> float:
        t, floor = float(self.clock.now()), self._floor
        return floor if floor > t else t  # max(t, floor)

    def _sim(self, t: float) -> float:
        return t - self.t0

    def _sync(self, now: float) -> None:
        """Bring the fluid model to ``now``, finishing the flows that completed on the way.
        Under TCP a completion may start the connection's next chunk at that very instant,
        so the model is advanced one completion time at a time."""
        fluid = self._fluid
        if not self._conns:
            for fid, tc in fluid.advance(now):
                self._complete(fid, tc)
            return
        while True:
            nxt = fluid.next_completion()
            if nxt is None or nxt > now:
                fluid.advance(now)
                return
            for fid, tc in fluid.advance(nxt):
                self._complete(fid, tc)

    def _reschedule(self) -> None:
        if self._opening:
            self._open_windows()
        nxt = self._fluid.next_completion()
        self._fluid_gen += 1
        if nxt is not None:
            gen = self._fluid_gen
            self._agenda.at(nxt, _FLOW, 0, lambda t, gen=gen: self._on_flow_timer(gen, t))

    def _on_flow_timer(self, gen: int, t: float) -> None:
        if gen != self._fluid_gen:
            return
        self._floor = max(self._floor, t)
        self._sync(self._now())
        self._reschedule()

    # ------------------------------------------------------------------ links
    def link(self, client: int, direction: str) -> Link:
        """The client's current link in ``direction`` (after set_link events)."""
        return self._links[direction][client]

    def _loss(self, direction: str, client: int) -> tuple[Loss, float]:
        """The link's base loss model and the extra Bernoulli loss of active bursts."""
        return self._links[direction][client].loss, self._extra.get((direction, client), 0.0)

    def _burst_loss(self, direction: str, client: int) -> float:
        """1 - prod(1 - p_burst) over the bursts active on the link."""
        keep = 1.0
        for p in self._bursts.get((direction, client), {}).values():
            keep *= 1.0 - p
        return 1.0 - keep

    def loss_rate(self, direction: str, client: int) -> float:
        """Long-run packet loss probability of the link now (base model and bursts)."""
        base, extra = self._loss(direction, client)
        return 1.0 - (1.0 - base.rate) * (1.0 - extra)

    def tcp_cap(self, direction: str, client: int) -> float:
        """Long-run TCP throughput (bits/s) of a flow on this link: the response function of
        ``network.tcp.congestion`` (CUBIC's, or Padhye's for Reno) at the link's loss *event*
        rate (:func:`network.models.loss_event_rate`: the losses among one window in flight
        are one event) and the round trip over both of the client's links. The transfer
        model does not cap flows with it: the per-round window (:class:`network.models.TcpWindow`) converges to it on
        long transfers, and this is its closed form (reported, and checked by the tests).

        Cached per link (cleared by :meth:`_refresh_caps` when a set_link or a burst
        changes the client's links) and shared between clients whose two links are the
        same objects: 10,000 clients on the default links cost one evaluation."""
        key = (direction, client)
        cap = self._caps.get(key)
        if cap is None:
            cap = self._caps[key] = self._tcp_cap_now(direction, client)
        return cap

    def _tcp_cap_now(self, direction: str, client: int) -> float:
        if self.config.transport != "tcp":
            return math.inf
        data = self._links[direction][client]
        ack = self._links["down" if direction == "up" else "up"][client]
        extra = self._extra.get((direction, client), 0.0)
        # Keyed by identity; the entry keeps both links alive, so an id is never reused
        # while its entry exists.
        memo_key = (id(data), id(ack), extra)
        hit = self._cap_memo.get(memo_key)
        if hit is not None and hit[0] is data and hit[1] is ack:
            return hit[2]
        cap = self._padhye_cap(direction, client)
        self._cap_memo[memo_key] = (data, ack, cap)
        return cap

    def _padhye_cap(self, direction: str, client: int) -> float:
        """The response function for the link as it is now, evaluated afresh: CUBIC's
        (RFC 8312 section 5.1, with its Reno-friendly region) or Padhye's (5) for Reno, at
        the loss event rate p / (1 + p W) of the window W it gives."""
        if self.config.transport != "tcp":
            return math.inf
        data = self._links[direction][client]
        ack = self._links["down" if direction == "up" else "up"][client]
        rtt = data.latency + ack.latency
        tcp = self.config.tcp
        p = self.loss_rate(direction, client)
        if rtt <= 0 or p <= 0:
            return cubic_rate(tcp.mss, rtt, p, tcp.max_window) if tcp.congestion == "cubic" else \
                padhye_rate(tcp.mss, rtt, p, self._rto(client), tcp.b, tcp.max_window)
        # At the loss *event* rate: the losses among a window in flight are one event.
        per_rtt = rtt / (8.0 * tcp.mss)     # bits/s -> segments per round trip
        if tcp.congestion == "cubic":
            def rate(q: float) -> float:
                return cubic_rate(tcp.mss, rtt, q, tcp.max_window)
        else:
            rto = self._rto(client)

            def rate(q: float) -> float:
                return padhye_rate(tcp.mss, rtt, q, rto, tcp.b, tcp.max_window)
        return rate(loss_event_rate(p, lambda q: rate(q) * per_rtt))

    def rtt(self, client: int) -> float:
        """Propagation round trip of the client's connection, seconds: both links' latency."""
        return self._links["up"][client].latency + self._links["down"][client].latency

    def _rto(self, client: int) -> float:
        up, down = self._links["up"][client], self._links["down"][client]
        return tcp_rto(self.config.tcp.min_rto, up.latency + down.latency, math.hypot(up.jitter.std, down.jitter.std))

    def _apply_bandwidth(self, direction: str, client: int) -> None:
        bw = self._links[direction][client].bandwidth
        key = (direction, client)
        self._trace_gen[key] = self._trace_gen.get(key, 0) + 1
        if isinstance(bw, Trace):
            now = self._fluid.now
            self._fluid.set_capacity(key, bw.at(self._sim(now)))
            self._schedule_breakpoint(direction, client, bw, now)
        else:
            self._fluid.set_capacity(key, bw)

    def _schedule_breakpoint(self, direction: str, client: int, trace: Trace, now: float) -> None:
        nxt = trace.next_change(self._sim(now))
        if nxt is None:
            return
        key = (direction, client)
        gen = self._trace_gen[key]

        def step(t: float) -> None:
            if self._trace_gen.get(key) != gen:
                return
            self._floor = max(self._floor, t)
            self._sync(t)
            self._fluid.set_capacity(key, trace.at(self._sim(t)))
            self._schedule_breakpoint(direction, client, trace, t)
            self._reschedule()

        self._agenda.at(self.t0 + nxt, _STATE, client, step)

    def _refresh_caps(self, client: int) -> None:
        """The client's links or bursts changed: recompute its loss overlay and TCP caps,
        and re-cap its flows in progress."""
        for d in DIRECTIONS:
            key = (d, client)
            extra = self._burst_loss(d, client)
            if extra > 0:
                self._extra[key] = extra
            else:
                self._extra.pop(key, None)
            self._caps.pop(key, None)
        # Flows in progress need nothing more: the TCP window reads the loss rate each round.

    # ------------------------------------------------------------------ reachability
    def is_online(self, client: int) -> bool:
        """Whether messages to and from ``client`` can get through now: not offline
        (availability), not partitioned, not crashed."""
        return not (client in self._offline or client in self._partitioned or client in self._crashed)

    def _down_reason(self, client: int) -> str | None:
        if client in self._crashed:
            return "crashed"
        if client in self._partitioned:
            return "partition"
        if client in self._offline:
            return "offline"
        return None

    def _abort_client(self, client: int, reason: str) -> None:
        """A client went down: every message it is sending or receiving is lost."""
        fids = sorted(self._by_client.get(client, ()))
        for fid in fids:
            if fid in self._fluid.flows:    # (a TCP message may be between two chunks, or queued)
                self._fluid.remove(fid)
            tr = self._transfers.pop(fid)
            self.log("drop", direction=tr.direction, client=client, nbytes=tr.nbytes, reason=reason, tid=fid)
            self._release(tr, reason)
        self._by_client.pop(client, None)
        # The connection is gone: the next message opens a new one (handshake, initial window).
        for d in DIRECTIONS:
            self._conns.pop((d, client), None)
        self._ready.pop(client, None)

    # ------------------------------------------------------------------ transfers
    def transfer(self, direction: str, client: int, nbytes: int, deliver: Callable[[bool], None],
                 on_drop: Callable[[str], None] | None = None) -> None:
        """Send ``nbytes`` bytes between the server and ``client`` (``"up"``: client ->
        server, ``"down"``: server -> client), now. ``deliver(corrupt)`` is called at each
        delivery: once, twice if duplicated, never if lost; ``on_drop(reason)`` once if
        lost (``loss``, ``crashed``, ``partition``, ``offline``, ``queue_overflow``)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        if not 0 <= client < self.n:
            raise ValueError(f"client {client} does not exist ({self.n} clients)")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        now = self._now()
        if not self._batch_pending:
            self._sync(now)
        self._tid += 1
        tid = self._tid
        reason = self._down_reason(client) if self._crashed or self._partitioned or self._offline else None
        if reason is not None:
            self.log("drop", direction=direction, client=client, nbytes=int(nbytes), reason=reason, tid=tid)
            if on_drop is not None:
                on_drop(reason)
            return
        if direction == "up" and self.max_held_bytes is not None:
            held = self._held.get(client, 0) + int(nbytes)
            if held > self.max_held_bytes and held > self._queue_bytes(client, now):
                n = self.overflows[client] = self.overflows.get(client, 0) + 1
                if n <= 100 or n % 1000 == 0:  # a flooding client costs log rows only sparsely
                    self.log("drop", direction=direction, client=client, nbytes=int(nbytes), reason="queue_overflow",
                             tid=tid, overflows=n)
                if on_drop is not None:
                    on_drop("queue_overflow")
                return
            self._held[client] = held
        link = self._links[direction][client]
        d = 0 if direction == "up" else 1
        lost = False
        if self.config.transport == "datagram":
            n = packets(nbytes, self.config.mss)
            base, extra = self._loss(direction, client)
            rng = self._rng(_LOSS, d, client)
            if base.model == "gilbert_elliott":
                chain = self._ge.get((direction, client))
                if chain is None or chain.loss != base:
                    chain = self._ge[(direction, client)] = GilbertElliott(base, rng)
                lost = bool(chain.sample(n).any())
            else:
                lost = bool(rng.random() >= p_intact(base.p, n))
            if extra > 0:
                lost = bool(rng.random() >= p_intact(extra, n)) or lost
        # A stream is only drawn from when its probability or scale is non-zero (creating
        # 60,000 streams for 10,000 clean links costs seconds); each stays deterministic.
        dup = link.duplicate > 0 and bool(self._rng(_DUP, d, client).random() < link.duplicate)
        cor = (False, False)
        if link.corrupt > 0:
            u = self._rng(_CORRUPT, d, client).random(2)
            cor = (bool(u[0] < link.corrupt), bool(u[1] < link.corrupt))
        if link.jitter.distribution == "none" or link.jitter.scale == 0:
            delays = (link.latency, link.latency)
        else:
            jit = sample_jitter(link.jitter, self._rng(_JITTER, d, client), 2)
            delays = (max(0.0, link.latency + float(jit[0])), max(0.0, link.latency + float(jit[1])))
        tr = _Transfer(tid, direction, client, int(nbytes), deliver, lost, dup, cor, delays, on_drop=on_drop)
        self._transfers[tid] = tr
        mine = self._by_client.get(client)
        if mine is None:
            mine = self._by_client[client] = set()
        mine.add(tid)
        if self._tcp:
            tr.bits = 8.0 * self.wire_bytes(nbytes)
            conn = tr.conn = self._conns.get((direction, client)) or self._new_conn(direction, client)
            conn.queue.append(tr)
            if not conn.active:
                ready = self._ready.get(client)
                if ready is None:
                    ready = self._ready[client] = now + self._handshake * self.rtt(client)
                if ready > now:
                    self._sleep(conn, ready)
                else:
                    self._pump(conn, now)
        else:
            server = ("server", "down") if direction == "up" else ("server", "up")
            self._fluid.add(tid, 8.0 * nbytes, ((direction, client), server))
        if not self._batch_pending:
            # A broadcast is N transfer() calls in a row: recompute the sharing once for all
            # of them, in one agenda entry at this instant, not N times. Under a wall clock
            # the batch's flows start at the first one's time (microseconds apart).
            self._batch_pending = True
            self._agenda.at(now, _FLOW, 0, self._end_batch)

    def _end_batch(self, t: float) -> None:
        self._batch_pending = False
        self._floor = max(self._floor, t)
        self._sync(self._now())
        self._reschedule()

    # ------------------------------------------------------------------ tcp
    def set_security(self, mechanism: str) -> None:
        """How connections are set up, for the round trips a new one costs before its first
        message's first byte leaves: ``"tcp"`` (a bare TCP connection: 1 RTT), ``"null"``
        (ZeroMQ's ZMTP greeting and NULL handshake on top: 2 RTT, the default), ``"curve"``
        (ZMTP with CURVE, when keys are in use: 4 RTT). Applies to connections opened later."""
        if mechanism not in HANDSHAKE_RTTS:
            raise ValueError(f"security mechanism must be one of {', '.join(HANDSHAKE_RTTS)}, got {mechanism!r}")
        self._handshake = HANDSHAKE_RTTS[mechanism]

    def reset_connections(self, clients: "list[int] | None" = None) -> None:
        """Forget the TCP connections of ``clients`` (all if None): their next message opens
        a new one (handshake, initial window). Partitions, crashes and going offline do this
        themselves; a runtime-level reconnect (a restarted server, a rejoining process) calls
        it. Messages in flight are not touched."""
        for c in range(self.n) if clients is None else clients:
            self._ready.pop(c, None)
            for d in DIRECTIONS:
                conn = self._conns.get((d, c))
                if conn is not None and not conn.queue:
                    del self._conns[(d, c)]
                elif conn is not None:
                    # a message still queued keeps its connection object; only its window restarts
                    tcp = self.config.tcp
                    conn.window = TcpWindow(tcp.initial_window, tcp.congestion, tcp.b, tcp.max_window / tcp.mss)

    def wire_bytes(self, nbytes: int) -> int:
        """Bytes a message of ``nbytes`` application bytes puts on the wire: under TCP one
        ``network.tcp`` header (52 B: IPv4, TCP, timestamps) per segment of ``mss`` payload
        bytes, at least one segment. Logged and reported sizes stay ``nbytes``."""
        nbytes = int(nbytes)
        if not self._tcp:
            return nbytes
        return nbytes + self._tcp_header * packets(nbytes, self._tcp_mss)

    def _new_conn(self, direction: str, client: int) -> _Conn:
        tcp = self.config.tcp
        conn = self._conns[(direction, client)] = _Conn(
            (direction, client), TcpWindow(tcp.initial_window, tcp.congestion, tcp.b, tcp.max_window / tcp.mss))
        return conn

    def _sleep(self, conn: _Conn, t: float) -> None:
        """Wake the connection at ``t`` (end of its handshake, of a round trip, of an RTO).
        Connections waking at the same instant share one agenda entry."""
        conn.active, conn.wake = True, t
        waiting = self._wakes.get(t)
        if waiting is None:
            waiting = self._wakes[t] = []
            self._agenda.at(t, _FLOW, 0, self._on_wake)
        waiting.append(conn)

    def _on_wake(self, t: float) -> None:
        self._floor = max(self._floor, t)
        self._sync(t)
        for conn in self._wakes.pop(t, ()):
            if self._conns.get(conn.key) is conn and conn.wake == t:
                conn.wake = None
                self._pump(conn, t)
        self._reschedule()

    def _pump(self, conn: _Conn, now: float) -> None:
        """Hand the connection's head message its next chunk, starting a round trip if the
        last one's credit is spent (after its ACKs are back) or it is over."""
        conn.active = False
        if not conn.queue:
            return
        direction, client = conn.key
        rtt = self.rtt(client)
        due = conn.round_start + rtt
        if conn.credit < 1.0 or now >= due:
            if now < due:
                self._sleep(conn, due)      # the window is spent: wait for the round's ACKs
                return
            w = conn.window
            p = self.loss_rate(direction, client)
            if conn.round_start > -math.inf:
                ceiling = 2.0 * conn.rate * rtt / self._seg_bits if rtt > 0 and conn.rate < math.inf else math.inf
                q = w.on_round(conn.sent, p, now, rtt, ceiling)
                conn.sent, conn.credit = 0.0, 0.0
                if q > 0:       # a timeout (share q) holds everything until the RTO fires
                    resume = conn.round_start + rtt + q * max(0.0, self._rto(client) - rtt)
                    conn.round_start = resume - rtt
                    if now < resume:
                        self._sleep(conn, resume)
                        return
            if self.config.tcp.slow_start_after_idle and conn.last_send > -math.inf:
                w.restart_after_idle(now - conn.last_send, self._rto(client))
            conn.round_start = now
            conn.credit = w.cwnd * self._seg_bits
            conn.lossy = p > 0
        tr = conn.queue[0]
        bits = tr.bits if tr.bits - conn.credit < 8.0 else conn.credit
        tr.chunk = bits
        server = ("server", "down") if direction == "up" else ("server", "up")
        self._fluid.add(tr.tid, bits, ((direction, client), server))
        conn.chunk_start = now
        conn.active = True
        if bits < tr.bits and not conn.lossy:
            self._opening.append(tr)

    def _open_windows(self) -> None:
        """Chunks that started at this instant on loss-free links: once the window covers
        the bandwidth-delay product at the flow's fair share, it no longer binds (slow start
        keeps it ahead of the ACK clock), so the rest of the message joins the chunk: one
        flow instead of one per round trip."""
        fluid = self._fluid
        live = [tr for tr in self._opening
                if tr.conn is not None and tr.tid in fluid.flows and self._transfers.get(tr.tid) is tr]
        # All rates first (one solve), then the growth (which moves no rate).
        rates = [fluid.rate(tr.tid) for tr in live]
        for tr, x in zip(live, rates):
            conn = tr.conn
            if conn.window.cwnd * self._seg_bits >= x * self.rtt(tr.client):
                extra = tr.bits - tr.chunk
                if extra > 0:
                    fluid.grow(tr.tid, extra)
                    tr.chunk += extra
                    conn.credit += extra
        self._opening.clear()

    def _complete(self, tid: int, tc: float) -> None:
        """The last bit of a message (under TCP: of a chunk) left the bottleneck at ``tc``."""
        tr = self._transfers.get(tid)
        if tr is None:
            return
        conn = tr.conn
        done = tc
        if conn is not None:
            tr.bits -= tr.chunk
            conn.credit = max(0.0, conn.credit - tr.chunk)
            conn.sent += tr.chunk / self._seg_bits
            conn.last_send = tc
            if tc > conn.chunk_start:
                conn.rate = tr.chunk / (tc - conn.chunk_start)
            tr.chunk = 0.0
            if tr.bits > 0.5:
                self._pump(conn, tc)
                return
            conn.queue.popleft()
            if conn.lossy and conn.window.loss_due(conn.sent, self.loss_rate(tr.direction, tr.client)):
                # The message's last round trip holds a loss event: its last byte arrives
                # after the retransmission (one more RTT, or the RTO with probability Q).
                rtt = self.rtt(tr.client)
                q = conn.window.timeout_probability()
                done += rtt + q * max(0.0, self._rto(tr.client) - rtt)
        del self._transfers[tid]
        mine = self._by_client.get(tr.client)
        if mine is not None:
            mine.discard(tid)
        self._deliver(tr, done)
        if conn is not None:
            self._pump(conn, tc)

    def _deliver(self, tr: _Transfer, tc: float) -> None:
        tid = tr.tid
        if tr.lost:
            self.log("drop", direction=tr.direction, client=tr.client, nbytes=tr.nbytes, reason="loss", tid=tid)
            self._release(tr, "loss")
            return
        copies = 2 if tr.duplicate else 1
        tr.copies_left = copies
        if tr.duplicate:
            self.log("duplicate", direction=tr.direction, client=tr.client, nbytes=tr.nbytes, tid=tid)
        key = (tr.direction, tr.client)
        for i in range(copies):
            when = tc + tr.delays[i]
            if self._tcp:
                # One ordered byte stream per link: a message never overtakes an earlier one.
                when = max(when, self._last_delivery.get(key, -math.inf))
                self._last_delivery[key] = when
            self._agenda.at(when, _DELIVER, tid, functools.partial(self._deliver_copy, tr, tr.corrupt[i]))

    def _deliver_copy(self, tr: _Transfer, corrupt: bool, t: float = 0.0) -> None:
        tr.copies_left -= 1
        if tr.copies_left == 0:
            self._release(tr, None)
        tr.deliver(corrupt)

    def _release(self, tr: _Transfer, dropped: str | None) -> None:
        """The emulator no longer holds ``tr`` (delivered for the last time, or lost)."""
        if tr.direction == "up" and self.max_held_bytes is not None:
            left = self._held.get(tr.client, 0) - tr.nbytes
            if left > 0:
                self._held[tr.client] = left
            else:
                self._held.pop(tr.client, None)
        if dropped is not None and tr.on_drop is not None:
            tr.on_drop(dropped)

    def _queue_bytes(self, client: int, now: float) -> float:
        """Bytes the client's uplink carries in ``queue_s`` seconds at its rate now."""
        if self.queue_s <= 0:
            return 0.0
        bw = self._links["up"][client].bandwidth
        rate = bw.at(self._sim(now)) if isinstance(bw, Trace) else bw
        # an unlimited link delivers after its latency alone: only the byte floor applies
        return rate * self.queue_s / 8.0 if math.isfinite(rate) else 0.0

    def held_bytes(self, client: int) -> int:
        """Bytes of ``client``'s uploads the emulator holds now (counted only when
        ``max_held_bytes`` is set)."""
        return self._held.get(client, 0)

    # ------------------------------------------------------------------ compute
    def compute_time(self, client: int, work_flop: float, round: int) -> float:
        """Seconds of compute for ``work_flop`` FLOP on ``client`` in ``round``:
        work / (speed_i * noise_{i,round}) * (product of active slowdown factors)."""
        if work_flop < 0:
            raise ValueError(f"work must be >= 0 FLOP, got {work_flop}")
        speed = float(self._speeds[client])
        noise = self.config.stragglers.noise
        if noise > 0:
            # A stream per (client, round): independent of the order of calls.
            g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(_NOISE, client, round))))
            speed *= math.exp(noise * float(g.standard_normal()))
        slow = 1.0
        for f in self._slow.get(client, {}).values():
            slow *= f
        return float(work_flop) / speed * slow

    def speed(self, client: int) -> float:
        """The client's base device speed, FLOP/s."""
        return float(self._speeds[client])

    # ------------------------------------------------------------------ availability
    def _start_availability(self) -> None:
        av = self.config.availability
        if av.model != "exponential":
            return
        for c in av.clients:
            rng = self._rng(_AVAIL, c)
            online = True
            if av.start == "stationary":
                online = bool(rng.random() < av.mean_online / (av.mean_online + av.mean_offline))
            if not online:
                self._offline.add(c)
            self._next_toggle(c, self.t0, online)

    def _next_toggle(self, c: int, now: float, online: bool) -> None:
        av = self.config.availability
        mean = av.mean_online if online else av.mean_offline
        dt = float(self._rng(_AVAIL, c).exponential(mean)) if mean > 0 else 0.0
        self._agenda.at(now + dt, _STATE, c, lambda t, c=c: self._toggle(c, t))

    def _toggle(self, c: int, t: float) -> None:
        self._floor = max(self._floor, t)
        self._sync(t)
        going_online = c in self._offline
        if going_online:
            self._offline.discard(c)
        else:
            self._offline.add(c)
            self._abort_client(c, "offline")
        self._reschedule()
        self.log("net_event", action="online" if going_online else "offline", clients=str(c), cause="availability")
        self._next_toggle(c, t, going_online)

    # ------------------------------------------------------------------ events
    def on_runtime_event(self, callback: Callable[[dict], None]) -> None:
        """Register the runtime's handler for crash/restart fired at a simulated time."""
        self._runtime_cb = callback
        pending, self._pending_runtime = self._pending_runtime, []
        for ev in pending:
            callback(ev)

    def _to_runtime(self, ev: dict) -> None:
        if self._runtime_cb is None:
            self._pending_runtime.append(ev)
        else:
            self._runtime_cb(ev)

    def start_round(self, round: int) -> list[dict]:
        """Fire the events scheduled ``at_round = round`` (in file order); returns the
        runtime-level ones (crash / restart) for the runtime to act on. A crash's
        ``restart_after`` restart comes later through the ``on_runtime_event`` callback.
        A round that starts again (after a server restart) does not fire its events twice."""
        if round in self._rounds_started:
            return []
        self._rounds_started.add(round)
        now = self._now()
        out: list[dict] = []
        for ev in self.config.events:
            if ev.at_round == round:
                r = self._apply(ev, now, round=round)
                if r is not None:
                    out.append(r)
        return out

    def _fire_event(self, ev: Event, t: float) -> None:
        self._floor = max(self._floor, t)
        r = self._apply(ev, t)
        if r is not None:
            self._to_runtime(r)

    def _log_event(self, ev: Event, **extra: Any) -> None:
        fields = {k: v for k, v in ev.raw.items() if k not in ("action", "clients")}
        fields.update(extra)
        self.log("net_event", action=ev.action, clients=format_clients(ev.clients), index=ev.index, **fields)

    def _apply(self, ev: Event, now: float, round: int | None = None) -> dict | None:
        """Apply one event at ``now``; return the runtime-level record, if any."""
        self._sync(now)
        self._log_event(ev)
        a = ev.action
        if a == "set_link":
            # Clients that shared a link object share the new one (the TCP cap memo is
            # keyed by link identity).
            replaced: dict[tuple[str, int], tuple[Link, Link]] = {}   # holds the old link alive
            for c in ev.clients:
                for d, fields in (("up", ev.up), ("down", ev.down)):
                    if fields:
                        old = self._links[d][c]
                        hit = replaced.get((d, id(old)))
                        if hit is None:
                            hit = replaced[(d, id(old))] = (old, dataclasses.replace(old, **fields))
                        self._links[d][c] = hit[1]
                        if "bandwidth" in fields:
                            self._apply_bandwidth(d, c)
                        if "loss" in fields:
                            self._ge.pop((d, c), None)
                self._refresh_caps(c)
        elif a == "loss_burst":
            self._overlay_id += 1
            oid = self._overlay_id
            for c in ev.clients:
                for d, fields in (("up", ev.up), ("down", ev.down)):
                    if fields:
                        self._bursts.setdefault((d, c), {})[oid] = fields["loss"].rate
                self._refresh_caps(c)
            self._later(now + (ev.duration or 0.0), ev, lambda t: self._end_burst(ev, oid, t))
        elif a == "partition":
            for c in ev.clients:
                self._partitioned.add(c)
                self._abort_client(c, "partition")
            if ev.duration is not None:
                self._later(now + ev.duration, ev, lambda t: self._heal(ev, t))
        elif a == "heal":
            self._partitioned.difference_update(ev.clients)
        elif a == "slowdown":
            self._overlay_id += 1
            oid = self._overlay_id
            for c in ev.clients:
                self._slow.setdefault(c, {})[oid] = ev.factor
            if ev.duration is not None:
                self._later(now + ev.duration, ev, lambda t: self._end_slowdown(ev, oid, t))
        elif a == "crash":
            for c in ev.clients:
                self._crashed.add(c)
                self._abort_client(c, "crashed")
            if ev.restart_after is not None:
                self._later(now + ev.restart_after, ev, lambda t: self._restart(ev, t))
            self._reschedule()
            return {"action": "crash", "clients": list(ev.clients), "index": ev.index, "round": round,
                    "restart_after": ev.restart_after, "t": self._sim(now)}
        elif a == "server_crash":
            # The network stays up; the runtime drops the server's memory and restores it
            # from its last checkpoint after restart_after.
            return {"action": "server_crash", "clients": [], "index": ev.index, "round": round,
                    "restart_after": ev.restart_after or 0.0, "t": self._sim(now)}
        elif a == "restart":
            self._crashed.difference_update(ev.clients)
            return {"action": "restart", "clients": list(ev.clients), "index": ev.index, "round": round,
                    "t": self._sim(now)}
        self._reschedule()
        return None

    def _later(self, when: float, ev: Event, fn: Callable[[float], None]) -> None:
        def run(t: float) -> None:
            self._floor = max(self._floor, t)
            self._sync(t)
            fn(t)
            self._reschedule()
        self._agenda.at(when, _STATE, ev.index, run)

    def _end_burst(self, ev: Event, oid: int, t: float) -> None:
        for c in ev.clients:
            for d in DIRECTIONS:
                self._bursts.get((d, c), {}).pop(oid, None)
            self._refresh_caps(c)
        self._log_event(ev, phase="end")

    def _heal(self, ev: Event, t: float) -> None:
        self._partitioned.difference_update(ev.clients)
        self.log("net_event", action="heal", clients=format_clients(ev.clients), index=ev.index, cause="duration")

    def _end_slowdown(self, ev: Event, oid: int, t: float) -> None:
        for c in ev.clients:
            self._slow.get(c, {}).pop(oid, None)
        self._log_event(ev, phase="end")

    def _restart(self, ev: Event, t: float) -> None:
        self._crashed.difference_update(ev.clients)
        self.log("net_event", action="restart", clients=format_clients(ev.clients), index=ev.index,
                 cause="restart_after")
        self._to_runtime({"action": "restart", "clients": list(ev.clients), "index": ev.index, "round": None,
                          "t": self._sim(t)})
