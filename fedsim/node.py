"""A node: one ZeroMQ socket per process, any number of actors addressed by id.

The server's node owns the network emulator: in a star topology every flow touches the
server, so one model there sees every transfer and can share the server's bottleneck
links between them. An upload is received at once over the socket, then held by the
emulator until the model says it arrives; a download is held by the emulator first and
put on the socket when the model says it arrives (the client's node hands it over at
once). Bytes are counted as the sender puts them on its link, before the model decides
their fate.

Nothing a peer sends can kill a node: every frame is validated (``codec``), and a bad
message is rejected with a reason that is counted and logged (rate-limited per peer and
reason, :mod:`fedsim.guard`). Rejections before the network model (a message no
legitimate node sends) count against the peer's budget in the transport's guard, which
bans a peer that exceeds it. The server's node keeps ``Stats.inbound``: every message its
socket received ends in exactly one named outcome (see :func:`inbound_balance`).
"""
from __future__ import annotations

import abc
import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from network.transport import BANNED, Transport, UnknownPeer

from . import codec
from .codec import SERVER, CodecError, Limits, Message
from .guard import RejectLog, peer_label

NODE = -2
"""Sender id of node-level control messages (registration)."""
HELLO = "_hello"
DONE = "_done"


class EventSink(Protocol):
    def __call__(self, event: str, **fields: Any) -> None: ...


@dataclass
class Stats:
    """Counters of one run. Bytes are wire bytes (frames + ZMTP framing)."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    uplink_payload_bits: int = 0
    downlink_payload_bits: int = 0
    messages_up: int = 0
    messages_down: int = 0
    counters: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    inbound: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    """The server node's fate of every message its socket received: ``received`` (plus
    ``network_copies``, the extra copies the network model's duplication made) equals
    ``accepted`` plus every other key (a named rejection or discard). See
    :func:`inbound_balance`."""

    sources: list[Callable[[], tuple[dict[str, int], dict[str, int]]]] = field(default_factory=list)
    """Counts kept elsewhere and read when asked (a transport's discards, what the network
    model still holds): each returns (extra counters, extra inbound)."""

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        """(counters, inbound) as of now, sorted by name, live sources included."""
        counters, inbound = collections.Counter(self.counters), collections.Counter(self.inbound)
        for source in self.sources:
            extra_counters, extra_inbound = source()
            counters.update(extra_counters)
            inbound.update(extra_inbound)
        return ({k: v for k, v in sorted(counters.items()) if v},
                {k: v for k, v in sorted(inbound.items()) if v})


INBOUND_SOURCES = ("received", "network_copies")


def inbound_balance(inbound: dict[str, int]) -> tuple[int, int]:
    """(messages in: received + network copies, outcomes: accepted + every reason)."""
    came = sum(inbound.get(k, 0) for k in INBOUND_SOURCES)
    went = sum(v for k, v in inbound.items() if k not in INBOUND_SOURCES)
    return came, went


class _RecentIds:
    """The last ``size`` message ids of one sender, for duplicate suppression in O(1)."""

    def __init__(self, size: int = 65536):
        self.ids: set[int] = set()
        self.order: collections.deque[int] = collections.deque()
        self.size = size

    def add(self, msg_id: int) -> bool:
        """False when ``msg_id`` was seen already."""
        if msg_id in self.ids:
            return False
        self.ids.add(msg_id)
        self.order.append(msg_id)
        if len(self.order) > self.size:
            self.ids.discard(self.order.popleft())
        return True


class Actor(abc.ABC):
    """Something that receives messages by id on a node. Subclasses decide how mail is
    processed; both roles do it with callbacks and timers rather than one task per actor,
    so ten thousand idle client actors cost ten thousand small objects and nothing more."""

    def __init__(self, actor_id: int):
        self.actor_id = actor_id

    @abc.abstractmethod
    def deliver(self, msg: Message) -> None:
        """Take one message (called by the node, on the event loop)."""


class Node:
    """Glue between one transport and the actors of this process."""

    def __init__(self, transport: Transport, *, log: EventSink, stats: Stats, limits: Limits = Limits(),
                 emulator: Any = None, seed: int = 0):
        self.transport = transport
        self.log = log
        self.stats = stats
        self.limits = limits
        self.emulator = emulator
        self.actors: dict[int, Actor] = {}
        self.routes: dict[int, bytes] = {}
        """Server side: client id -> routing id of the node that hosts it."""
        self.registered: asyncio.Event | None = None
        self.done = asyncio.Event()
        """Client side: set when the server announces the end of the run."""
        self.expected_clients: int | None = None
        self._next_id = 0
        self._seen: dict[int, _RecentIds] = collections.defaultdict(_RecentIds)
        self._corrupt_rng = np.random.default_rng([seed, 0xC0])
        self._decode_cache = codec.DecodeCache()
        self._server = emulator is not None
        self._inbound = stats.inbound
        self._in_network = 0
        """Uploads handed to the network model and neither delivered nor dropped yet."""
        loop_time = (lambda: transport.loop.time() if transport.loop is not None else 0.0)
        self._rejects = RejectLog(log, loop_time)
        self.admit: Callable[[dict], str | None] | None = None
        """Server side, set by the server role: the reason an upload can never be used
        (asked for by no request, or of a round not begun), judged before the network
        model holds it; None to model it."""
        transport.on_discard = self._on_discard
        if self._server:
            stats.sources.append(self._live_counts)

    # --- sending -----------------------------------------------------------------
    def _stamp(self, msg: Message) -> Message:
        self._next_id += 1
        msg.msg_id = self._next_id
        msg.sent_at = self.transport.loop.time() if self.transport.loop is not None else 0.0
        return msg

    def send(self, msg: Message, tensors: codec.EncodedTensors | None = None) -> int:
        """Encode and send; returns wire bytes. On the server side the emulator decides
        when (and whether) the message reaches the client."""
        frames = codec.encode(self._stamp(msg), tensors)
        nbytes = codec.wire_size(frames)
        bits = msg.payload.payload_bits
        if msg.src == SERVER:
            self.stats.downlink_bytes += nbytes
            self.stats.downlink_payload_bits += bits
            self.stats.messages_down += 1
            peer = self.routes.get(msg.dst)
            self.log("send", src=msg.src, dst=msg.dst, kind=msg.kind, round=msg.round, bytes=nbytes)
            if peer is None:
                self.stats.count("send_unknown_client")
                self.log("drop", dst=msg.dst, kind=msg.kind, reason="unknown_client")
                return nbytes
            if self.emulator is None:
                self._transmit(peer, frames, msg)
            else:
                self.emulator.transfer("down", msg.dst, nbytes,
                                       lambda corrupt, f=frames: self._transmit(peer, self._maybe_corrupt(f, corrupt), msg))
        else:
            self.transport.send(frames)
        return nbytes

    def _maybe_corrupt(self, frames: list[bytes], corrupt: bool) -> list[bytes]:
        return codec.corrupt(frames, self._corrupt_rng) if corrupt else frames

    def _transmit(self, peer: bytes, frames: list[bytes], msg: Message) -> None:
        try:
            self.transport.send(frames, peer)
        except UnknownPeer:
            self.stats.count("send_unknown_peer")
            self.log("drop", dst=msg.dst, kind=msg.kind, reason="peer_gone")

    def hello(self, client_ids: list[int]) -> None:
        """Client side: announce the clients this node hosts."""
        msg = Message(src=NODE, dst=SERVER, round=-1, kind=HELLO, version=0,
                      payload=codec.Payload(meta={"clients": client_ids}))
        self.transport.send(codec.encode(self._stamp(msg)))

    def farewell(self) -> None:
        """Server side: tell every client node the run is over (control, not modelled)."""
        for peer in sorted(set(self.routes.values())):
            msg = Message(src=SERVER, dst=NODE, round=-1, kind=DONE, version=0, payload=codec.Payload())
            try:
                self.transport.send(codec.encode(self._stamp(msg)), peer)
            except UnknownPeer:
                pass

    # --- receiving ---------------------------------------------------------------
    def on_message(self, peer: bytes, frames: list) -> None:
        """Transport callback. Never raises for a peer's bytes."""
        if self._server:
            self._inbound["received"] += 1
        try:
            head = codec.peek_route(frames[0], self.limits) if frames else None
            if head is None:
                raise CodecError("empty", "no frames")
        except CodecError as exc:
            return self._reject(peer, exc.reason, str(exc), before_network=True)
        if self.emulator is not None:  # the server's node
            src = head["src"]
            if head["k"] == HELLO and src == NODE:
                return self._on_hello(peer, frames, head)
            if self.routes.get(src) != peer:
                return self._reject(peer, "unknown_sender", f"sender {src} is not a client registered by this peer",
                                    before_network=True)
            if head["dst"] != SERVER:
                return self._reject(peer, "bad_destination", f"client {src} addressed actor {head['dst']}",
                                    before_network=True)
            if self.admit is not None:
                unusable = self.admit(head)
                if unusable is not None:
                    # no legitimate client sends these; modelling them would let a node's
                    # junk crowd its own clients' links and the server's queues
                    self.stats.count(unusable)
                    self._inbound[unusable] += 1
                    return
            nbytes = codec.wire_size(frames)
            self.stats.uplink_bytes += nbytes
            self.stats.uplink_payload_bits += max(0, head["bits"])
            self.stats.messages_up += 1
            self._in_network += 1
            copies = [0]

            def deliver(corrupt: bool) -> None:
                copies[0] += 1
                if copies[0] == 1:
                    self._in_network -= 1
                else:
                    self._inbound["network_copies"] += 1
                self._deliver(peer, self._maybe_corrupt(frames, corrupt), None if corrupt else head, nbytes,
                              modelled_corruption=corrupt)

            self.emulator.transfer("up", src, nbytes, deliver, self._dropped_in_network)
        else:
            self._deliver(peer, frames, head)

    def _dropped_in_network(self, reason: str) -> None:
        """The network model lost an upload (loss, crash, partition, queue overflow ...)."""
        self._in_network -= 1
        self._inbound[f"network_{reason}"] += 1

    def _on_discard(self, peer: bytes, reason: str, nbytes: int) -> None:
        """The transport dropped a message unparsed (oversized)."""
        if self._server:
            self._inbound["received"] += 1
        self._reject(peer, reason, f"{nbytes} bytes", before_network=True)

    def _live_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Counts read when a summary is made (see ``Stats.sources``): messages the
        transport discarded from banned peers, and uploads the network model still holds."""
        banned = self.transport.discarded.get(BANNED, 0)
        counters = {"rejected": banned, f"rejected_{BANNED}": banned}
        inbound = {"received": banned, f"rejected_{BANNED}": banned, "in_network_at_end": self._in_network}
        return counters, inbound

    def finish(self) -> None:
        """End of the run: summarise suppressed and banned rejections in the log."""
        banned = self.transport.discarded.get(BANNED, 0)
        if banned:
            self.log("reject_summary", peer="*", reason=BANNED, total=banned)
        self._rejects.flush()

    def _deliver(self, peer: bytes, frames: list, head: dict | None, nbytes: int | None = None, *,
                 modelled_corruption: bool = False) -> None:
        try:
            msg = codec.decode(frames, self.limits, head, nbytes, self._decode_cache)
        except CodecError as exc:
            return self._reject(peer, exc.reason, str(exc), modelled=modelled_corruption)
        if msg.dst == NODE and msg.kind == DONE and self.emulator is None:
            self.done.set()
            return
        actor = self.actors.get(msg.dst)
        if actor is None:
            return self._reject(peer, "unknown_destination", f"no actor {msg.dst} on this node")
        if not self._seen[msg.src].add(msg.msg_id):
            self.stats.count("duplicate")
            if self._server:
                self._inbound["duplicate"] += 1
            self.log("duplicate", src=msg.src, dst=msg.dst, kind=msg.kind, id=msg.msg_id)
            return
        self.log("deliver", src=msg.src, dst=msg.dst, kind=msg.kind, round=msg.round)
        actor.deliver(msg)

    def _on_hello(self, peer: bytes, frames: list, head: dict) -> None:
        clients = head["meta"].get("clients")
        if not isinstance(clients, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in clients):
            return self._reject(peer, "bad_hello", "meta.clients must be a list of ints", before_network=True)
        if not clients:
            return self._reject(peer, "bad_hello", "meta.clients is empty", before_network=True)
        limit = self.expected_clients
        bad = [c for c in clients if c < 0 or (limit is not None and c >= limit)]
        if bad:
            return self._reject(peer, "bad_hello", f"client ids out of range: {bad[:5]}", before_network=True)
        taken = [c for c in clients if self.routes.get(c, peer) != peer]
        if taken:
            # A restarted node keeps its routing id; another peer may not take over clients.
            return self._reject(peer, "route_conflict", f"clients {taken[:5]} are hosted by another node",
                                before_network=True)
        for c in clients:
            self.routes[c] = peer
        self._inbound["hello"] += 1
        self.log("hello", clients=len(clients))
        if self.registered is not None and limit is not None and len(self.routes) >= limit:
            self.registered.set()

    def _reject(self, peer: bytes, reason: str, detail: str, *, before_network: bool = False,
                modelled: bool = False) -> None:
        """Count, log (rate-limited) and, for a message refused ``before_network``, charge
        the peer's rejection budget. ``modelled``: the network model corrupted it (a
        simulated event, always logged in full)."""
        self.stats.count("rejected")
        self.stats.count(f"rejected_{reason}")
        if not self._server:
            # a client node hears only from the server: nothing to rate-limit
            self.log("reject", reason=reason, detail=detail[:200])
            return
        self._inbound[f"rejected_{reason}"] += 1
        if modelled:
            self.log("reject", reason=reason, detail=detail[:200])
        else:
            self._rejects(peer, reason, detail=detail[:200])
        if before_network and self.transport.report_rejection(peer):
            self.stats.count("peers_banned")
            self.log("peer_banned", peer=peer_label(peer), reason=reason)
