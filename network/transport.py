"""ZeroMQ transport: one socket per process, non-blocking, driven by an asyncio loop.

The server's node binds a ROUTER (``ROUTER_MANDATORY`` so that a message to an unknown
or full peer raises instead of vanishing, as a plain ROUTER does at its high-water mark);
every other node connects a DEALER. Addresses are ZeroMQ endpoints: ``inproc://name``
(one process; no I/O thread), ``ipc:///path`` or ``tcp://host:port`` (across processes
and hosts). Over tcp, CURVE authenticates both ends when keys are given.

The socket is read through its edge-triggered ``zmq.FD``. One read takes at most a bounded
batch (``batch_messages`` messages, ``batch_bytes`` bytes) and, if more is waiting,
schedules the next read with ``call_soon``: timers, deliveries and sends run between
batches, so a peer that sends faster than the node can reject cannot hold the loop. (A
ROUTER already fair-queues its inbound pipes, taking one message from each peer in turn,
so within a batch one peer cannot starve another either.) Every send re-checks
``zmq.EVENTS`` so an edge consumed by the send is not lost. Sends that hit the
high-water mark are queued here (explicit back-pressure) and retried when the socket is
writable; ``pending`` counts them.

Hostile input is refused before it costs memory: ``MAXMSGSIZE`` caps each frame inside
ZeroMQ, and frames are read one at a time with a running total, so a message whose frames
add up to more than ``max_message_bytes`` is refused at the frame that crosses the cap and
its remaining frames are discarded unread into Python. A ROUTER may carry a
:class:`~network.guard.PeerGuard`: peers it bans are discarded at read time (by routing
id, and under CURVE by public key as well). An oversized message is reported to
``on_discard(peer, reason, nbytes)``; a banned peer's are only counted (``discarded``).

Reading a message costs the node ~7-10 us however quickly it is dropped, so a banned
peer still taxes the loop; when most of a batch came from banned peers, the next batch
waits ``ban_pause_s`` (while the banned peer's pipe fills and TCP holds it back), which
caps the share of the loop a banned flood takes, at the price of that much delay for
others while it lasts.

A ROUTER's receive high-water mark is low (``rcv_hwm``, per peer): when a peer sends
faster than the node reads, ZeroMQ stops reading its connection and TCP pushes back on
the sender, instead of queueing its messages in this process's memory.
"""
from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import zmq
import zmq.backend

from . import guard as _guard
from .guard import PeerGuard

Frames = Sequence["bytes | memoryview | zmq.Frame"]

# pyzmq's Python-level Socket.send only adds routing_id/group handling (unused here) over
# the compiled one; calling the compiled one directly saves ~0.4 us per frame.
_send_frame = zmq.backend.Socket.send
# Plain ints: or-ing pyzmq's enum flags per frame costs more than the send itself.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


@dataclass(frozen=True)
class CurveKeys:
    """CURVE key material, Z85-encoded. The server needs its secret; a client needs the
    server's public key plus its own pair."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @staticmethod
    def generate() -> "CurveKeys":
        public, secret = zmq.curve_keypair()
        return CurveKeys(public, secret)


OVERSIZED = "oversized_message"
BANNED = "banned_peer"


class Transport:
    """One ZeroMQ socket. ``on_message(peer, frames)`` is called for each received message
    (``peer`` is the sender's routing id on a ROUTER, ``b""`` on a DEALER).

    ``max_message_bytes`` caps one message's frames together (and each frame, through
    ``MAXMSGSIZE``); ``batch_messages`` / ``batch_bytes`` bound one read (see the module
    docstring; a banned peer's messages, dropped unparsed, count a quarter each);
    ``max_frame_bytes`` (default ``max_message_bytes``) caps each frame inside ZeroMQ; ``guard`` (ROUTER only) bans peers whose messages keep being rejected: by
    default one with :data:`network.guard.DEFAULT`.

    ``heartbeat_s`` turns on ZMTP heartbeats: a PING every ``heartbeat_s`` seconds, the
    connection dropped after five of them without a word, and the peer asked to do the
    same. Not on a socket that strangers reach: libzmq 4.3.5 aborts the process
    (``Assertion failed: !_io_error``, in its I/O thread) when a heartbeat falls due on a
    connection whose peer filled the receive pipe (``rcv_hwm``) and then reset it, as a
    flooding peer that exits does (libzmq issues 4364, 3937: open). A PING command from the
    peer, decoded when the pipe drains after such a reset, takes the same path, so a peer
    crafted for it can still abort the process; under CURVE only holders of admitted keys
    get past the handshake this needs."""

    def __init__(self, *, router: bool, address: str, identity: bytes | None = None,
                 context: zmq.Context | None = None, curve: CurveKeys | None = None,
                 max_message_bytes: int = 256 * 1024 * 1024, hwm: int = 100_000,
                 batch_messages: int = 64, batch_bytes: int = 8 * 1024 * 1024,
                 guard: PeerGuard | None = None, rcv_hwm: int | None = None, ban_pause_s: float = 0.01,
                 max_frame_bytes: int | None = None, heartbeat_s: float | None = None):
        if batch_messages < 1 or batch_bytes < 1:
            raise ValueError(f"batch_messages and batch_bytes must be >= 1, got {batch_messages}, {batch_bytes}")
        self.max_message_bytes = int(max_message_bytes)
        self.batch_messages = int(batch_messages)
        self.batch_bytes = int(batch_bytes)
        self.guard = (guard or PeerGuard(_guard.DEFAULT)) if router else None
        self.curve = curve is not None
        self.ban_pause_s = ban_pause_s
        self._paused = False
        self.context = context or zmq.Context.instance()
        self.router = router
        self.address = address
        sock = self.context.socket(zmq.ROUTER if router else zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, rcv_hwm if rcv_hwm is not None else (1000 if router else hwm))
        # Per frame, checked by ZeroMQ from the frame's header before its bytes are buffered
        # (it hands a multipart message over only once all of it arrived, so the total
        # checked at read time bounds copies, not ZeroMQ's own buffering). Must be set
        # before bind/connect: connections copy the options then.
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes if max_frame_bytes is None else max_frame_bytes)
        if router:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if heartbeat_s is not None:
            # ZMTP heartbeats run in ZeroMQ's I/O thread: a peer busy computing still
            # answers them, a dead host stops, and its connection is dropped after the timeout
            # (here, or by the peer through the TTL; see the class docstring for why a
            # server's ROUTER leaves them off).
            sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat_s * 1000)))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(heartbeat_s * 5000)))
            sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(heartbeat_s * 5000)))
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if curve is not None:
            if router:
                sock.curve_server = True
                sock.curve_secretkey = curve.secret
                sock.curve_publickey = curve.public
            else:
                if curve.server_public is None:
                    raise ValueError("a CURVE client needs the server's public key")
                sock.curve_serverkey = curve.server_public
                sock.curve_publickey = curve.public
                sock.curve_secretkey = curve.secret
        if router:
            if address.startswith("tcp://") and address.endswith(":0"):
                sock.bind_to_random_port(address[:-2])
            else:
                sock.bind(address)
            self.address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        else:
            sock.connect(address)
        self.socket = sock
        self._copy_below = sock.copy_threshold
        self.curve_server = router and curve is not None
        self._user_ids: dict[bytes, str] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_message: Callable[[bytes, list], None] | None = None
        self.on_discard: Callable[[bytes, str, int], None] | None = None
        """Called for each message dropped here unparsed: (peer, reason, bytes read)."""
        self._backlog: collections.deque = collections.deque()
        self._drain_scheduled = False
        self._current: zmq.Frame | None = None
        """First frame of the message being handed to on_message (for its CURVE key)."""
        self.banned_keys: dict[str, float] = {}
        """CURVE public key (Z85) -> time its ban ends (loop seconds)."""
        self.sent = 0
        self.received = 0
        self.received_bytes = 0
        self.discarded: collections.Counter[str] = collections.Counter()
        self.reads = 0
        """Calls of :meth:`drain` that read at least one message."""
        self.longest_read_s = 0.0
        """Wall seconds of the longest single :meth:`drain` call (a measure of fairness;
        includes time other threads of the process held the interpreter)."""
        self.longest_read_cpu_s = 0.0
        """CPU seconds of this thread in the longest (by CPU) single :meth:`drain` call."""

    @property
    def pending(self) -> int:
        """Messages waiting for the socket to accept them (back-pressure)."""
        return len(self._backlog)

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[bytes, list], None]) -> None:
        self.loop = loop
        self.on_message = on_message
        loop.add_reader(self.socket.getsockopt(zmq.FD), self._on_readable)
        self._schedule_drain()

    def close(self) -> None:
        if self.loop is not None and not self.socket.closed:
            try:
                self.loop.remove_reader(self.socket.getsockopt(zmq.FD))
                self.loop.remove_writer(self.socket.getsockopt(zmq.FD))
            except Exception:
                pass
        self.socket.close(linger=0)

    def send(self, frames: Frames, peer: bytes | None = None) -> None:
        """Queue-or-send without blocking. ``peer`` is required on a ROUTER."""
        parts = [peer, *frames] if self.router else list(frames)
        if self._backlog or not self._try_send(parts):
            self._backlog.append(parts)
            if len(self._backlog) == 1 and self.loop is not None:
                self.loop.add_writer(self.socket.getsockopt(zmq.FD), self._flush)
        self._schedule_drain()

    def user_id(self, peer: bytes) -> str | None:
        """The CURVE public key (Z85) that ``peer``'s connection authenticated with, as the
        ZAP handler reported it; None without CURVE."""
        return self._user_ids.get(peer)

    def _remember_user(self, peer: bytes, frame: zmq.Frame) -> None:
        # ZAP binds a key to a connection, and a routing id to one connection: ask once.
        if len(self._user_ids) >= 65536:
            self._user_ids.clear()
        try:
            self._user_ids[peer] = frame.get("User-Id")
        except zmq.ZMQError:
            pass

    def _try_send(self, parts: list) -> bool:
        # ZeroMQ accepts or refuses a multipart message at its first frame, so EAGAIN can only
        # come before anything was queued. Frames under pyzmq's copy_threshold are copied
        # either way; asking for the copy outright skips pyzmq's memoryview and size test.
        sock = self.socket
        small = self._copy_below
        try:
            for part in parts[:-1]:
                _send_frame(sock, part, _MORE_NOBLOCK, len(part) < small)
            last = parts[-1]
            _send_frame(sock, last, _NOBLOCK, len(last) < small)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise UnknownPeer(parts[0]) from None
            raise
        self.sent += 1
        return True

    def _flush(self) -> None:
        while self._backlog and self._try_send(self._backlog[0]):
            self._backlog.popleft()
        if not self._backlog and self.loop is not None:
            self.loop.remove_writer(self.socket.getsockopt(zmq.FD))
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        # zmq.FD is edge-triggered and a send may consume the edge, so after sending look at
        # EVENTS; once per burst of sends (a broadcast), not once per send.
        if self.loop is not None and not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain_if_readable)

    def _drain_if_readable(self) -> None:
        self._drain_scheduled = False
        if not self._paused and not self.socket.closed and self.socket.get(_EVENTS) & _POLLIN:
            self.drain()

    def report_rejection(self, peer: bytes) -> bool:
        """The node rejected a message from ``peer`` before modelling it. Counts against the
        peer's budget in the guard; True when that bans the peer. Called from inside
        ``on_message`` the ban also covers the sender's CURVE key."""
        guard = self.guard
        if guard is None or self.loop is None:
            return False
        now = self.loop.time()
        if not guard.reject(peer, now):
            return False
        if self.curve and self._current is not None:
            key = _user_id(self._current)
            if key:
                self.banned_keys[key] = now + guard.config.ban_s
        return True

    def _discard(self, peer: bytes, reason: str, nbytes: int) -> None:
        self.discarded[reason] += 1
        if self.on_discard is not None:
            self.on_discard(peer, reason, nbytes)

    def _is_banned(self, peer: bytes, frame: zmq.Frame) -> bool:
        now = self.loop.time() if self.loop is not None else 0.0
        if self.guard is not None and self.guard.banned and self.guard.is_banned(peer, now):
            return True
        if self.banned_keys:
            key = _user_id(frame)
            until = self.banned_keys.get(key) if key else None
            if until is not None:
                if now < until:
                    return True
                del self.banned_keys[key]
        return False

    def _on_readable(self) -> None:
        # A batch already scheduled (or a pause) stands: reading again now would give this
        # socket two batches in one turn of the loop.
        if not (self._drain_scheduled or self._paused):
            self.drain()

    def _resume(self) -> None:
        self._paused = False
        self._drain_if_readable()

    def drain(self) -> int:
        """Receive one bounded batch of ready messages; returns how many. If more may be
        waiting, the next batch is scheduled with ``call_soon`` (so the loop runs its
        timers and ready callbacks first), or after ``ban_pause_s`` when the batch was
        mostly a banned peer's. The pause binds the loop's own reads (reader callback and
        scheduled batches); a direct call (the virtual clock's, which must not stall)
        reads regardless."""
        self._drain_scheduled = False
        t0, c0 = time.perf_counter(), time.thread_time()
        n = nbytes = 0
        sock = self.socket
        recv = sock.recv
        on_message = self.on_message
        assert on_message is not None
        router = self.router
        cap = self.max_message_bytes
        guard = self.guard
        max_n, max_bytes = self.batch_messages, self.batch_bytes
        more_waiting = False
        banned_before = self.discarded[BANNED]
        cost = 0  # a banned peer's message (read, dropped: ~8 us) costs 1, any other 4
        max_cost = 4 * max_n
        banned_keys = self.banned_keys  # the same dict: bans are added and lifted in place
        view_from = ZERO_COPY_BYTES
        while not sock.closed:
            if cost >= max_cost or nbytes >= max_bytes:
                more_waiting = True
                break
            try:
                first = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            # Frames stay ZeroMQ's (no copy) until the whole message is known to fit; then a
            # small frame is copied out (bytes are cheaper to hold and compare), a large one
            # handed on as a read-only view of ZeroMQ's buffer (``ZERO_COPY_BYTES``). A
            # Frame's own ``more`` flag is cheaper than asking the socket for RCVMORE.
            frames = [first]
            total = len(first)
            frame = first
            while frame.more:
                frame = recv(_NOBLOCK, copy=False)
                total += len(frame)
                if frames is not None:
                    if total > cap:
                        frames = None  # release what was held; the rest is read and dropped
                    else:
                        frames.append(frame)
            n += 1
            nbytes += total
            self.received += 1
            self.received_bytes += total
            peer = first.bytes if router else b""
            if (guard is not None and guard.banned or banned_keys) and self._is_banned(peer, first):
                # counted here only (no callback per message): a banned flood costs a few
                # microseconds a message; the node takes the count at the end of the run
                self.discarded[BANNED] += 1
                cost += 1
                continue
            cost += 4
            if frames is None:
                self._discard(peer, OVERSIZED, total)
                continue
            self._current = first
            if self.curve_server and peer not in self._user_ids:
                self._remember_user(peer, first)
            if router:
                del frames[0]
            on_message(peer, [f.buffer.toreadonly() if len(f) >= view_from else f.bytes for f in frames])
            self._current = None
        if more_waiting and self.loop is not None:
            if 2 * (self.discarded[BANNED] - banned_before) > n and self.ban_pause_s > 0:
                if not self._paused:
                    self._paused = True
                    self.loop.call_later(self.ban_pause_s, self._resume)
            elif not self._drain_scheduled:
                self._drain_scheduled = True
                self.loop.call_soon(self._drain_if_readable)
        if self._backlog:
            self._flush()
        if n:
            self.reads += 1
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if dt > self.longest_read_s:
                self.longest_read_s = dt
            if dc > self.longest_read_cpu_s:
                self.longest_read_cpu_s = dc
        return n


ZERO_COPY_BYTES = 64 * 1024
"""Received frames of at least this many bytes reach ``on_message`` as read-only memoryviews
of ZeroMQ's own buffer instead of copies."""
# A copy of a large frame buys nothing: the view keeps the Frame, and with it the message's
# memory, alive and unchanged. Within one process (inproc) the view is of the sender's own
# immutable bytes object, so every receiver of a broadcast sees the same memory
# (``codec.DecodeCache`` relies on that to skip the CRC pass).


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP user id (a CURVE client's Z85 public key) of a received frame, if any."""
    try:
        return frame.get("User-Id") or None
    except (zmq.ZMQError, UnicodeDecodeError):
        return None


class UnknownPeer(LookupError):
    """A ROUTER send to a routing id that is not connected."""

    def __init__(self, peer: bytes):
        super().__init__(f"no connected peer with routing id {peer!r}")
        self.peer = peer
