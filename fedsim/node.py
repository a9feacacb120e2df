"""A node: one ZeroMQ socket per process, any number of actors addressed by id.

The server's node owns the network emulator: in a star topology every flow touches the
server, so one model there sees every transfer and can share the server's bottleneck
links between them. An upload is received at once over the socket, then held by the
emulator until the model says it arrives; a download is held by the emulator first and
put on the socket when the model says it arrives (the client's node hands it over at
once). Bytes are counted as the sender puts them on its link, before the model decides
their fate.

Nothing a peer sends can kill a node: every frame is validated (``codec``), and a bad
message is rejected with a reason that is logged and counted.
"""
from __future__ import annotations

import abc
import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from network.transport import Transport, UnknownPeer

from . import codec
from .codec import SERVER, CodecError, Limits, Message

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

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n


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
        self.tap: Callable[[str, int, list], None] | None = None
        """Server side: a passive wire tap (``fedsim.eavesdrop.WireTap``), handed
        ``(direction, client, frames)`` for each copy the network model delivers on a client's
        link, after its loss, duplication and corruption: bytes only."""

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
                                       lambda corrupt, f=frames: self._transmit(peer, self._on_wire("down", msg.dst, f, corrupt), msg))
        else:
            self.transport.send(frames)
        return nbytes

    def _maybe_corrupt(self, frames: list[bytes], corrupt: bool) -> list[bytes]:
        return codec.corrupt(frames, self._corrupt_rng) if corrupt else frames

    def _on_wire(self, direction: str, client: int, frames: list, corrupt: bool) -> list:
        """The frames as the link delivers them; the tap, if any, gets a look at them."""
        frames = self._maybe_corrupt(frames, corrupt)
        if self.tap is not None:
            self.tap(direction, client, frames)
        return frames

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
        try:
            head = codec.peek_route(frames[0], self.limits) if frames else None
            if head is None:
                raise CodecError("empty", "no frames")
        except CodecError as exc:
            return self._reject(peer, exc.reason, str(exc))
        if self.emulator is not None:  # the server's node
            src = head["src"]
            if head["k"] == HELLO and src == NODE:
                return self._on_hello(peer, frames, head)
            if self.routes.get(src) != peer:
                return self._reject(peer, "unknown_sender", f"sender {src} is not a client registered by this peer")
            if head["dst"] != SERVER:
                return self._reject(peer, "bad_destination", f"client {src} addressed actor {head['dst']}")
            nbytes = codec.wire_size(frames)
            self.stats.uplink_bytes += nbytes
            self.stats.uplink_payload_bits += max(0, head["bits"])
            self.stats.messages_up += 1
            self.emulator.transfer("up", src, nbytes, lambda corrupt: self._deliver(
                peer, self._on_wire("up", src, frames, corrupt), None if corrupt else head, nbytes))
        else:
            self._deliver(peer, frames, head)

    def _deliver(self, peer: bytes, frames: list, head: dict | None, nbytes: int | None = None) -> None:
        try:
            msg = codec.decode(frames, self.limits, head, nbytes, self._decode_cache)
        except CodecError as exc:
            return self._reject(peer, exc.reason, str(exc))
        if msg.dst == NODE and msg.kind == DONE and self.emulator is None:
            self.done.set()
            return
        actor = self.actors.get(msg.dst)
        if actor is None:
            return self._reject(peer, "unknown_destination", f"no actor {msg.dst} on this node")
        if not self._seen[msg.src].add(msg.msg_id):
            self.stats.count("duplicate")
            self.log("duplicate", src=msg.src, dst=msg.dst, kind=msg.kind, id=msg.msg_id)
            return
        self.log("deliver", src=msg.src, dst=msg.dst, kind=msg.kind, round=msg.round)
        actor.deliver(msg)

    def _on_hello(self, peer: bytes, frames: list, head: dict) -> None:
        clients = head["meta"].get("clients")
        if not isinstance(clients, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in clients):
            return self._reject(peer, "bad_hello", "meta.clients must be a list of ints")
        limit = self.expected_clients
        bad = [c for c in clients if c < 0 or (limit is not None and c >= limit)]
        if bad:
            return self._reject(peer, "bad_hello", f"client ids out of range: {bad[:5]}")
        taken = [c for c in clients if self.routes.get(c, peer) != peer]
        if taken:
            # A restarted node keeps its routing id; another peer may not take over clients.
            return self._reject(peer, "route_conflict", f"clients {taken[:5]} are hosted by another node")
        for c in clients:
            self.routes[c] = peer
        self.log("hello", clients=len(clients))
        if self.registered is not None and limit is not None and len(self.routes) >= limit:
            self.registered.set()

    def _reject(self, peer: bytes, reason: str, detail: str) -> None:
        self.stats.count("rejected")
        self.stats.count(f"rejected_{reason}")
        self.log("reject", reason=reason, detail=detail[:200])
