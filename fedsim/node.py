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
"""Sender/receiver id of node-level control messages (sessions, liveness, the end)."""
HELLO = "_hello"
"""client node -> server: ``meta = {clients, session}``: ids this node hosts (a node with
many clients says hello in several chunks of one session)."""
WELCOME = "_welcome"
"""server -> client node: the hello is accepted; ``meta = {server_session, resumed}``."""
REFUSED = "_refused"
"""server -> client node: the hello is refused; ``meta = {reason, retry}``."""
PING = "_ping"
PONG = "_pong"
UNKNOWN = "_unknown"
"""server -> a node that pings without a session here (the server restarted): say hello."""
HELLO_CHUNK = 4096
"""Client ids per registration message (below the codec's array-length limit)."""
DONE = "_done"
MAX_SESSION_CHARS = 64


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


@dataclass
class PeerSession:
    """Server side: one connected client node (one ``join`` process, or the simulation's
    client node). ``peer`` is its routing id, random per session, so no peer can predict or
    reuse another's; ``key`` is the CURVE public key it authenticated with (None without
    CURVE)."""

    peer: bytes
    session: str
    key: str | None
    clients: list[int]
    last_seen: float


Authorize = Callable[["str | None", list[int]], "str | None"]
"""(CURVE key or None, client ids) -> None when the key may host those ids, else the reason."""


class Node:
    """Glue between one transport and the actors of this process."""

    def __init__(self, transport: Transport, *, log: EventSink, stats: Stats, limits: Limits = Limits(),
                 emulator: Any = None, seed: int = 0, server: bool | None = None):
        self.transport = transport
        self.log = log
        self.stats = stats
        self.limits = limits
        self.emulator = emulator
        self.is_server = emulator is not None if server is None else server
        self.emulate = emulator is not None
        """Server side: False when the wire is real and must be measured as it is."""
        self.actors: dict[int, Actor] = {}
        self.routes: dict[int, bytes] = {}
        """Server side: client id -> routing id of the node that hosts it."""
        self.sessions: dict[bytes, PeerSession] = {}
        """Server side: live client nodes by routing id."""
        self.session = ""
        """This node's session: the server's (sent in every welcome) or the client node's."""
        self.resumed = -1
        """Server side: the last round restored from a checkpoint (-1: a fresh run)."""
        self.authorize: Authorize | None = None
        self.on_join: Callable[[list[int], bool], None] | None = None
        """Server side: (clients, rejoin) after a hello is accepted."""
        self.on_dead: Callable[[list[int]], None] | None = None
        """Server side: clients whose node was declared dead (silent past the timeout)."""
        self.registered: asyncio.Event | None = None
        self.done = asyncio.Event()
        """Client side: set when the server announces the end of the run."""
        self.expected_clients: int | None = None
        # client side: the server's answers to hello and pings
        self.welcome: dict[str, Any] | None = None
        self.refusal: dict[str, Any] | None = None
        self.last_heard = 0.0
        self.on_welcome: Callable[[dict[str, Any]], None] | None = None
        self.on_unknown: Callable[[], None] | None = None
        self._ever_joined: set[int] = set()
        self.rounds_sent: set[int] = set()
        """Client side: rounds in which this node's clients sent a reply."""
        self._next_id = 0
        self._seen: dict[tuple, "int | _RecentIds"] = {}
        """Per (sender's session, sender): the one message id seen so far, or the last ids
        (``_RecentIds``) once there are two: 100,000 clients sending one reply each cost an
        int apiece, not a set and a deque."""
        self._corrupt_rng = np.random.default_rng([seed, 0xC0])
        self._decode_cache = codec.DecodeCache()
        self.tap: Callable[[str, int, list], None] | None = None
        """Server side: a passive wire tap (``fedsim.eavesdrop.WireTap``), handed
        ``(direction, client, frames)`` for each copy the network model delivers on a client's
        link, after its loss, duplication and corruption: bytes only."""
        self._server = self.is_server
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

    def _now(self) -> float:
        return self.transport.loop.time() if self.transport.loop is not None else 0.0

    # --- sending -----------------------------------------------------------------
    def _stamp(self, msg: Message) -> Message:
        self._next_id += 1
        msg.msg_id = self._next_id
        msg.sent_at = self._now()
        if msg.src >= 0:
            self.rounds_sent.add(msg.round)
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
            if not self.emulate:
                self._transmit(peer, frames, msg)
            else:
                self.emulator.transfer("down", msg.dst, nbytes,
                                       lambda corrupt, f=frames: self._transmit(peer, self._on_wire("down", msg.dst, f, corrupt), msg))
        else:
            self.transport.send(frames)
        return nbytes

    def _on_wire(self, direction: str, client: int, frames: list, corrupt: bool) -> list:
        """The frames as the link delivers them; the tap, if any, gets a look at them."""
        if corrupt:
            frames = codec.corrupt(frames, self._corrupt_rng)
        if self.tap is not None:
            self.tap(direction, client, frames)
        return frames

    def _transmit(self, peer: bytes, frames: list[bytes], msg: Message) -> None:
        try:
            self.transport.send(frames, peer)
        except UnknownPeer:
            self.stats.count("send_unknown_peer")
            self.log("drop", dst=msg.dst, kind=msg.kind, reason="peer_gone")

    def _control(self, kind: str, meta: dict[str, Any] | None = None, peer: bytes | None = None) -> bool:
        """A node-level control message: not modelled, not counted as traffic. False when
        ``peer``'s connection is gone."""
        src, dst = (SERVER, NODE) if self.is_server else (NODE, SERVER)
        msg = Message(src=src, dst=dst, round=-1, kind=kind, version=0, payload=codec.Payload(meta=meta or {}))
        try:
            self.transport.send(codec.encode(self._stamp(msg)), peer)
        except UnknownPeer:
            return False
        return True

    def hello(self, client_ids: list[int]) -> None:
        """Client side: announce the clients this node hosts, in this node's session,
        ``HELLO_CHUNK`` ids a message (a receiver's msgpack limits cap one array's length:
        100,000 ids do not fit in one)."""
        for start in range(0, len(client_ids), HELLO_CHUNK):
            self._control(HELLO, {"clients": client_ids[start:start + HELLO_CHUNK], "session": self.session})

    def ping(self) -> None:
        """Client side: a heartbeat (the server answers with PONG, or UNKNOWN after a restart)."""
        self._control(PING)

    def farewell(self) -> None:
        """Server side: tell every client node the run is over (control, not modelled)."""
        for peer in sorted(self.sessions):
            self._control(DONE, peer=peer)

    def welcome_all(self) -> None:
        """Server side: (re)send the welcome to every live session (after a restore)."""
        for peer in sorted(self.sessions):
            self._control(WELCOME, {"server_session": self.session, "resumed": self.resumed}, peer)

    # --- liveness (server side) ----------------------------------------------------
    def check_liveness(self, timeout_s: float) -> list[int]:
        """Declare dead every session silent for more than ``timeout_s`` seconds: its
        clients leave the routes at once (so no gather waits for them). Returns them."""
        now = self._now()
        gone: list[int] = []
        for peer, s in list(self.sessions.items()):
            # Silent, and its connection is gone (kill -9 closes it at once; a dead host is
            # dropped by the ZMTP heartbeat). A node busy computing still holds its connection.
            if now - s.last_seen > timeout_s and not self._control(PONG, peer=peer):
                gone += self._drop_session(peer)
                self.stats.count("peer_dead")
                self.log("peer_dead", clients=len(s.clients), first=s.clients[:1], silent_s=round(now - s.last_seen, 3))
        if gone and self.on_dead is not None:
            self.on_dead(sorted(gone))
        return gone

    def _drop_session(self, peer: bytes) -> list[int]:
        s = self.sessions.pop(peer)
        for c in s.clients:
            if self.routes.get(c) == peer:
                del self.routes[c]
        self._seen = {k: v for k, v in self._seen.items() if k[0] != peer}
        return s.clients

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
        if not self.is_server:
            return self._deliver(peer, frames, head)
        src = head["src"]
        if src == NODE:
            return self._on_control(peer, frames, head)
        session = self.sessions.get(peer)
        if session is not None:
            session.last_seen = self._now()
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
        if not self.emulate:  # a real link: no model between the socket and the server
            return self._deliver(peer, self._on_wire("up", src, frames, False), head, nbytes)
        self._in_network += 1
        copies = [0]

        def deliver(corrupt: bool) -> None:
            copies[0] += 1
            if copies[0] == 1:
                self._in_network -= 1
            else:
                self._inbound["network_copies"] += 1
            self._deliver(peer, self._on_wire("up", src, frames, corrupt), None if corrupt else head, nbytes,
                          modelled_corruption=corrupt)

        self.emulator.transfer("up", src, nbytes, deliver, self._dropped_in_network)

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
        if msg.dst == NODE and not self.is_server:
            return self._on_server_control(msg)
        actor = self.actors.get(msg.dst)
        if actor is None:
            if self.is_server and msg.dst == SERVER:  # the server is down (a scripted crash)
                self.stats.count("to_crashed_server")
                self._inbound["to_crashed_server"] += 1
                return self.log("drop", src=msg.src, kind=msg.kind, reason="server_down")
            return self._reject(peer, "unknown_destination", f"no actor {msg.dst} on this node")
        # Duplicates are judged per (sender's session, sender): a restarted process numbers
        # its messages from 1 again, in a new session, and must not be taken for a replay.
        if self.is_server:
            key = (peer, msg.src)
        else:
            self.last_heard = self._now()
            key = (self.welcome["server_session"] if self.welcome else "", msg.src)
        if not self._first_time(key, msg.msg_id):
            self.stats.count("duplicate")
            if self._server:
                self._inbound["duplicate"] += 1
            self.log("duplicate", src=msg.src, dst=msg.dst, kind=msg.kind, id=msg.msg_id)
            return
        self.log("deliver", src=msg.src, dst=msg.dst, kind=msg.kind, round=msg.round)
        actor.deliver(msg)

    def _first_time(self, key: tuple, msg_id: int) -> bool:
        """False when ``msg_id`` is among the last ids seen from ``key`` (a duplicate)."""
        seen = self._seen
        known = seen.get(key)
        if known is None:
            seen[key] = msg_id
            return True
        if type(known) is int:
            if known == msg_id:
                return False
            first, known = known, _RecentIds()
            known.add(first)
            seen[key] = known
        return known.add(msg_id)

    # --- control (server side) -----------------------------------------------------
    def _on_control(self, peer: bytes, frames: list, head: dict) -> None:
        kind = head["k"]
        if kind == PING:
            self._inbound["control"] += 1
            session = self.sessions.get(peer)
            if session is None:
                return self._control(UNKNOWN, peer=peer)
            session.last_seen = self._now()
            return self._control(PONG, peer=peer)
        if kind != HELLO:
            return self._reject(peer, "bad_control", f"control message {kind[:40]!r} from a client node",
                                before_network=True)
        try:
            msg = codec.decode(frames, self.limits, head)
        except CodecError as exc:
            return self._reject(peer, exc.reason, str(exc), before_network=True)
        meta = msg.payload.meta
        clients, session_id = meta.get("clients"), meta.get("session", "")
        if not isinstance(clients, list) or not clients or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in clients):
            return self._refuse(peer, "bad_hello", "meta.clients must be a non-empty list of client ids")
        if not isinstance(session_id, str) or len(session_id) > MAX_SESSION_CHARS:
            return self._refuse(peer, "bad_hello", f"meta.session must be a string of at most {MAX_SESSION_CHARS} chars")
        limit = self.expected_clients
        if len(set(clients)) != len(clients):
            return self._refuse(peer, "bad_hello", "client ids repeat")
        bad = [c for c in clients if c < 0 or (limit is not None and c >= limit)]
        if bad:
            return self._refuse(peer, "bad_hello",
                                f"client ids out of range: {bad[:5]} (this run has clients 0..{(limit or 1) - 1})")
        key = self.transport.user_id(peer)
        if self.authorize is not None:
            reason = self.authorize(key, clients)
            if reason is not None:
                return self._refuse(peer, "not_authorized", reason)
        held = {self.routes[c] for c in clients if c in self.routes and self.routes[c] != peer}
        for other in sorted(held):
            owner = self.sessions.get(other)
            if owner is not None and (key is None or owner.key != key):
                # Without keys, a live session's ids are its own until it goes silent: a
                # restarted process retries and gets them once the old one times out.
                return self._refuse(peer, "ids_held",
                                    f"clients {sorted(set(owner.clients) & set(clients))[:5]} are held by a live session; "
                                    "retrying until it times out", retry=True)
        rejoin = False
        for other in sorted(held):
            # The same key in a new session: the old process is gone (or superseded).
            self._drop_session(other)
            self.stats.count("session_superseded")
            rejoin = True
        previous = self.sessions.get(peer)
        if previous is not None and previous.session == session_id:
            # the same session: another chunk of its ids, or a hello again after it lost word
            # of us for a while (welcomed back; not a rejoin)
            fresh = sorted(set(clients) - set(previous.clients))
            previous.clients = sorted(set(previous.clients) | set(clients))
            previous.last_seen = self._now()
            rejoin = rejoin or bool(self._ever_joined & set(fresh))
            clients = fresh
        else:
            if previous is not None:
                self._drop_session(peer)
            rejoin = rejoin or bool(self._ever_joined & set(clients))
            self.sessions[peer] = PeerSession(peer, session_id, key, sorted(clients), self._now())
        for c in clients:
            self.routes[c] = peer
        self._ever_joined.update(clients)
        self._inbound["hello"] += 1
        self._control(WELCOME, {"server_session": self.session, "resumed": self.resumed}, peer)
        if not clients:
            return
        self.log("hello", clients=len(clients), rejoin=rejoin)
        if rejoin:
            self.stats.count("rejoin")
        if self.on_join is not None:
            self.on_join(sorted(clients), rejoin)
        if self.registered is not None and limit is not None and len(self.routes) >= limit:
            self.registered.set()

    def _refuse(self, peer: bytes, reason: str, detail: str, retry: bool = False) -> None:
        # a transient refusal (ids held by a live session) is what a restarted process meets
        # while it waits: it does not count against the peer's budget
        self._reject(peer, reason, detail, before_network=not retry)
        self._control(REFUSED, {"reason": f"{reason}: {detail}"[:300], "retry": retry}, peer)

    # --- control (client side) -----------------------------------------------------
    def _on_server_control(self, msg: Message) -> None:
        self.last_heard = self._now()
        kind, meta = msg.kind, msg.payload.meta
        if kind == DONE:
            self.done.set()
        elif kind == WELCOME:
            first = self.welcome is None or self.welcome.get("server_session") != meta.get("server_session")
            self.welcome, self.refusal = dict(meta), None
            if first and self.on_welcome is not None:
                self.on_welcome(self.welcome)
        elif kind == REFUSED:
            self.refusal = dict(meta)
        elif kind == UNKNOWN:
            self.welcome = None
            if self.on_unknown is not None:
                self.on_unknown()
        elif kind != PONG:
            self.stats.count("unknown_control")

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
