"""The server role: the runtime's implementation of ``algorithms.base.ServerComm``."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from algorithms.base import Algorithm, Payload, ProtocolError, Reply

from . import codec
from .codec import SERVER, Message
from .node import Actor, Node, Stats


class _Gather:
    def __init__(self, kind: str, expected: set[int], version: int | None, fut: asyncio.Future):
        self.kind, self.expected, self.version, self.fut = kind, expected, version, fut
        self.replies: dict[int, Reply] = {}


class ServerRole(Actor):
    """Runs an algorithm's server rounds over a node. Replies are validated here, so an
    algorithm only ever sees well-formed replies of the current round and version."""

    def __init__(self, node: Node, algorithm: Algorithm, *, stats: Stats, log: Callable[..., None],
                 max_wait_s: float):
        super().__init__(SERVER)
        self.node = node
        self.algorithm = algorithm
        self.stats = stats
        self._log = log
        self.max_wait_s = max_wait_s
        self.round = 0
        self.participants: list[int] = []
        self.round_deadline_s: float | None = None
        self._sent_to: dict[str, set[int]] = {}
        self._pending: dict[str, list[Message]] = {}
        self._gather: _Gather | None = None
        self.contributions: dict[int, int] = {}
        """Client id -> rounds in which the server accepted at least one of its replies."""
        self._contributed_round: dict[int, int] = {}
        self._rejoined_at: dict[int, int] = {}
        self.rejoin_lags: list[int] = []
        """Rounds from each rejoin to that client's next accepted reply."""
        self.report_waiting: Callable[[str, list[int], float], None] | None = None
        """Called every ``report_every_s`` seconds while a gather waits: (kind, missing, waited)."""
        self.report_every_s = 5.0
        self._report_handle: asyncio.TimerHandle | None = None
        self.replies_received = 0
        """Replies accepted by gathers since the start (metrics.csv takes per-round differences)."""
        self.replies_missed = 0
        node.actors[SERVER] = self

    # --- ServerComm ----------------------------------------------------------------
    def begin_round(self, round: int, participants: list[int], deadline_s: float | None) -> None:
        self.round = round
        self.participants = sorted(participants)
        self.round_deadline_s = deadline_s
        self._sent_to.clear()
        self._pending.clear()

    async def broadcast(self, kind: str, payload: Payload | Callable[[int], Payload], *, version: int,
                        to: list[int] | None = None) -> None:
        targets = sorted(self.participants if to is None else to)
        self._sent_to.setdefault(kind, set()).update(targets)
        shared = None if callable(payload) else codec.encode_tensors(payload)
        for client in targets:
            p = payload(client) if callable(payload) else payload
            self.node.send(Message(src=SERVER, dst=client, round=self.round, kind=kind, version=version, payload=p),
                           shared)

    async def send(self, client: int, kind: str, payload: Payload, *, version: int) -> None:
        await self.broadcast(kind, payload, version=version, to=[client])

    async def gather(self, kind: str, *, version: int | None = None, clients: list[int] | None = None,
                     deadline_s: float | None = None) -> dict[int, Reply]:
        expected = set(clients) if clients is not None else set(self._sent_to.get(kind, ()))
        # A client whose node is gone (declared dead, or never joined) cannot answer.
        absent = {c for c in expected if c not in self.node.routes}
        if absent:
            expected -= absent
            self.stats.count("absent_clients", len(absent))
        loop = asyncio.get_running_loop()
        g = _Gather(kind, expected, version, loop.create_future())
        self._gather = g
        for msg in self._pending.pop(kind, []):
            self._accept(g, msg)
        wait = deadline_s if deadline_s is not None else self.round_deadline_s
        wait = self.max_wait_s if wait is None else min(wait, self.max_wait_s)
        if not self._complete(g):
            timer = loop.call_later(wait, lambda: g.fut.done() or g.fut.set_result(None))
            if self.report_waiting is not None:
                self._report_waiting_every(loop, g, loop.time())
            try:
                await g.fut
            finally:
                timer.cancel()
                if self._report_handle is not None:
                    self._report_handle.cancel()
                    self._report_handle = None
        self._gather = None
        missing = sorted(expected - g.replies.keys())
        self.replies_received += len(g.replies)
        if missing:
            self.replies_missed += len(missing)
            self.stats.count("missed_replies", len(missing))
            self._log("gather_timeout", round=self.round, kind=kind, missing=len(missing),
                      first_missing=missing[:10], waited_s=wait)
        return dict(sorted(g.replies.items()))

    def _report_waiting_every(self, loop: asyncio.AbstractEventLoop, g: _Gather, since: float) -> None:
        def report() -> None:
            if self._gather is g and self.report_waiting is not None:
                self.report_waiting(g.kind, sorted(g.expected - g.replies.keys()), loop.time() - since)
                self._report_handle = loop.call_later(self.report_every_s, report)
        self._report_handle = loop.call_later(self.report_every_s, report)

    def joined(self, clients: list[int], rejoin: bool) -> None:
        """A client node said hello; a rejoin's lag to its next contribution is measured."""
        if rejoin:
            for c in clients:
                self._rejoined_at[c] = max(self.round, 0)

    def forget(self, clients: list[int]) -> None:
        """Clients whose node died: the open gather stops waiting for them at once."""
        g = self._gather
        if g is None:
            return
        gone = (g.expected & set(clients)) - g.replies.keys()
        if gone:
            g.expected -= gone
            self.stats.count("absent_clients", len(gone))
            self._log("absent", round=self.round, kind=g.kind, clients=len(gone), first=min(gone))
            if self._complete(g) and not g.fut.done():
                g.fut.set_result(None)

    def count(self, name: str, n: int = 1) -> None:
        self.stats.count(name, n)

    def log(self, event: str, **fields: Any) -> None:
        self._log(event, round=self.round, **fields)

    # --- mail --------------------------------------------------------------------
    def deliver(self, msg: Message) -> None:
        # Synchronous: the server holds no per-message task; replies land in the gather.
        if msg.round != self.round:
            self.stats.count("late")
            self._log("late", src=msg.src, kind=msg.kind, msg_round=msg.round)
            return
        g = self._gather
        if g is not None and g.kind == msg.kind:
            self._accept(g, msg)
        else:
            self._pending.setdefault(msg.kind, []).append(msg)

    def _accept(self, g: _Gather, msg: Message) -> None:
        client = msg.src
        if client not in g.expected:
            return self._refuse(msg, "unexpected", f"client {client} was not asked for {msg.kind!r}")
        if client in g.replies:
            return self._refuse(msg, "duplicate_reply", f"second {msg.kind!r} reply from client {client}")
        if g.version is not None and msg.version != g.version:
            return self._refuse(msg, "stale_rejected", f"computed against version {msg.version}, expected {g.version}")
        try:
            self.algorithm.check_reply(msg.kind, msg.payload)
        except ProtocolError as exc:
            return self._refuse(msg, "bad_reply", str(exc))
        except Exception as exc:  # a validator tripping over odd bytes must not kill the server
            return self._refuse(msg, "bad_reply", f"validation failed: {type(exc).__name__}: {exc}")
        g.replies[client] = Reply(client, msg.payload, msg.version)
        if self._contributed_round.get(client) != self.round:
            self._contributed_round[client] = self.round
            self.contributions[client] = self.contributions.get(client, 0) + 1
            if client in self._rejoined_at:
                self.rejoin_lags.append(self.round - self._rejoined_at.pop(client))
        if self._complete(g) and not g.fut.done():
            g.fut.set_result(None)

    @staticmethod
    def _complete(g: _Gather) -> bool:
        # replies only ever hold expected clients (see _accept), so counting suffices
        return len(g.replies) == len(g.expected)

    def _refuse(self, msg: Message, reason: str, detail: str) -> None:
        self.stats.count(reason)
        self._log("reject", src=msg.src, kind=msg.kind, reason=reason, detail=detail[:200])
