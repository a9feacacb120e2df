"""The server role: the runtime's implementation of ``algorithms.base.ServerComm``."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from algorithms.base import Algorithm, Payload, ProtocolError, Reply

from . import codec
from .codec import SERVER, Message
from .node import Actor, Node, Stats


ADMIT_WINDOW = 4
"""Rounds back for which the server remembers which requests are still unanswered."""
ADMIT_PER_REQUEST = 4
"""Uploads admitted to the network model per request sent: one is the reply; the slack
lets a malformed upload (rejected only after the model, where checksums are checked)
never displace the genuine reply that follows it."""


class _Gather:
    def __init__(self, kind: str, expected: set[int], version: int | None, fut: asyncio.Future):
        self.kind, self.expected, self.version, self.fut = kind, expected, version, fut
        self.replies: dict[int, Reply] = {}


class ServerRole(Actor):
    """Runs an algorithm's server rounds over a node. Replies are validated here, so an
    algorithm only ever sees well-formed replies of the current round and version.

    Every message delivered here ends in one counted outcome (``Stats.inbound``):
    ``accepted`` into a gather, or refused (``late``, ``unexpected``, ``duplicate_reply``,
    ``stale_rejected``, ``bad_reply``), or set aside for a later gather of its kind in the
    same round. Only a reply the server asked this client for is set aside, at most one
    per (kind, client) (others: ``unasked``), so the set-aside store is bounded by the
    round's requests; what no gather claims is counted ``unclaimed`` at the round's end."""

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
        self._pending: dict[str, dict[int, Message]] = {}
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
        self._inbound = stats.inbound
        self._requests: dict[int, int] = {}
        """client -> requests sent to it so far (this run)."""
        self._uploads: dict[int, int] = {}
        """client -> uploads admitted to the network model so far."""
        self._open: dict[int, dict[str, dict[int, int]]] = {}
        """round -> kind -> client -> requests not answered yet, for the last
        ``ADMIT_WINDOW`` rounds."""
        stats.sources.append(self._live_counts)
        node.actors[SERVER] = self
        node.admit = self.admit

    # --- ServerComm ----------------------------------------------------------------
    def begin_round(self, round: int, participants: list[int], deadline_s: float | None) -> None:
        self.round = round
        self.participants = sorted(participants)
        self.round_deadline_s = deadline_s
        self._sent_to.clear()
        self._drop_pending()
        for old in [k for k in self._open if k < round - ADMIT_WINDOW]:
            del self._open[old]

    async def broadcast(self, kind: str, payload: Payload | Callable[[int], Payload], *, version: int,
                        to: list[int] | None = None) -> None:
        targets = sorted(self.participants if to is None else to)
        self._sent_to.setdefault(kind, set()).update(targets)
        requests = self._requests
        opened = self._open.setdefault(self.round, {}).setdefault(kind, {})
        for client in targets:
            requests[client] = requests.get(client, 0) + 1
            opened[client] = opened.get(client, 0) + ADMIT_PER_REQUEST
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
        for msg in self._pending.pop(kind, {}).values():
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
        replies = g.replies
        return {c: replies[c] for c in sorted(replies)}  # sorting int keys, not (key, reply) pairs: 2x faster

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

    def _live_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """What is still set aside when a summary is made (``unclaimed``, like a round's
        leftovers)."""
        n = sum(len(v) for v in self._pending.values())
        return {"unclaimed": n}, {"unclaimed": n}

    def _drop_pending(self) -> None:
        n = sum(len(v) for v in self._pending.values())
        self._pending.clear()
        if n:
            # counted, not logged: replies of an earlier phase that arrive after its gather
            # closed are common under loss and delay, and the log stays as it was
            self.stats.count("unclaimed", n)
            self._inbound["unclaimed"] += n

    def log(self, event: str, **fields: Any) -> None:
        self._log(event, round=self.round, **fields)

    # --- mail --------------------------------------------------------------------
    def admit(self, head: dict) -> str | None:
        """Before the network model: an upload of a round not begun (``future_round``), of
        a recent round and kind this client was not asked for (``unasked``), or beyond
        ``ADMIT_PER_REQUEST`` uploads per request it was sent (``unrequested``: per round
        and kind for the last ``ADMIT_WINDOW`` rounds, in total before that) can never be
        used. A legitimate client sends one reply per request it receives, after it, so
        none of its replies is refused here (late ones are modelled as before); a node
        flooding as its own clients gets at most a few uploads per request modelled, which
        crowd only its own clients' links."""
        r, src = head["r"], head["src"]
        if r > self.round:
            return "future_round"
        admitted = self._uploads.get(src, 0)
        if admitted >= ADMIT_PER_REQUEST * self._requests.get(src, 0):
            return "unrequested"
        if r >= self.round - ADMIT_WINDOW:
            opened = self._open.get(r, {}).get(head["k"])
            left = opened.get(src, 0) if opened is not None else 0
            if left <= 0:
                return "unrequested" if opened is not None and src in opened else "unasked"
            opened[src] = left - 1
        self._uploads[src] = admitted + 1
        return None


    def deliver(self, msg: Message) -> None:
        # Synchronous: the server holds no per-message task; replies land in the gather.
        if msg.round != self.round:
            self.stats.count("late")
            self._inbound["late"] += 1
            self._log("late", src=msg.src, kind=msg.kind, msg_round=msg.round)
            return
        g = self._gather
        if g is not None and g.kind == msg.kind:
            self._accept(g, msg)
        elif msg.src not in self._sent_to.get(msg.kind, ()):
            # not asked for in this round: it can never be gathered, so nothing is kept
            self.stats.count("unasked")
            self._inbound["unasked"] += 1
        else:
            held = self._pending.setdefault(msg.kind, {})
            if msg.src in held:
                self._refuse(msg, "duplicate_reply", f"second {msg.kind!r} reply from client {msg.src} set aside")
            else:
                held[msg.src] = msg

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
        self._inbound["accepted"] += 1
        if self._complete(g) and not g.fut.done():
            g.fut.set_result(None)

    @staticmethod
    def _complete(g: _Gather) -> bool:
        # replies only ever hold expected clients (see _accept), so counting suffices
        return len(g.replies) == len(g.expected)

    def _refuse(self, msg: Message, reason: str, detail: str) -> None:
        self.stats.count(reason)
        self._inbound[reason] += 1
        self._log("reject", src=msg.src, kind=msg.kind, reason=reason, detail=detail[:200])
