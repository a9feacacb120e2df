"""The client role: an actor that answers the server with its algorithm's handlers."""
from __future__ import annotations

import asyncio
import collections
import copy
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from algorithms.base import Algorithm, Payload, ProtocolError

from .batching import ComputeBatcher
from .clock import wall_time
from .codec import SERVER, Message
from .node import Actor, Node, Stats

ComputeTime = Callable[[int, float, int], float]
"""(client, work in FLOP, round) -> seconds of compute."""


@dataclass
class ClientCtx:
    """The ``algorithms.base.ClientContext`` of one message."""

    client_id: int
    round: int
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    generator: torch.Generator
    state: dict[str, Any]
    work_per_sample: float
    work_flop: float = 0.0

    def charge(self, samples: int, factor: float = 1.0) -> None:
        self.work_flop += samples * self.work_per_sample * factor


@dataclass
class ClientData:
    x: torch.Tensor
    y: torch.Tensor
    state: dict[str, Any] = field(default_factory=dict)


class ClientRole(Actor):
    """A client actor. Handlers are synchronous (pure compute), so a message costs no task:
    the handler runs on arrival, and the reply leaves when the modelled compute time has
    passed (a timer). Mail arriving meanwhile waits in the mailbox: one message at a time."""

    def __init__(self, client_id: int, node: Node, algorithm: Algorithm, data: ClientData, *, model: nn.Module,
                 seed: int, work_per_sample: float, compute_time: ComputeTime, real_time: bool,
                 stats: Stats, log: Callable[..., None]):
        super().__init__(client_id)
        self.mailbox: collections.deque[tuple[Message, float]] = collections.deque()
        """(message, wall time of arrival): handled one at a time."""
        self.node, self.algorithm, self.data, self.model = node, algorithm, data, model
        self.seed, self.work_per_sample, self.compute_time = seed, work_per_sample, compute_time
        self.real_time, self.stats, self.log = real_time, stats, log
        self.handlers = algorithm.client_handlers()
        self.batcher: ComputeBatcher | None = None
        """Set by the node's owner (virtual time, fast compute): then the kinds with a batch
        handler are computed together with the other clients of the same instant."""
        self.batch_handlers = algorithm.client_batch_handlers()
        self._seed_prefix_crc = zlib.crc32(f"{seed}/{client_id}/".encode())
        self.crashed = False
        self.busy = False
        self.free_since = 0.0
        """Wall time this client finished its last message (real time only)."""
        self.epoch = 0
        """Bumped by a crash or a rollback, so a reply computed before it is never sent after it."""
        self.keep_ledger = False
        """Keep the state as of each round's start, so that a server resumed from a
        checkpoint can have this client recompute a round exactly as the first time."""
        self._ledger: dict[int, dict[str, Any]] = {}
        self._ledger_floor = -1
        """The newest round whose record was pruned: no rollback to before it is possible."""
        node.actors[client_id] = self

    def crash(self) -> None:
        """Lose all memory; ignore mail until :meth:`restart`."""
        self.data.state = {}
        self._ledger.clear()
        self._ledger_floor = -1
        self.mailbox.clear()
        self.crashed = True
        self.busy = False
        self.epoch += 1

    def restart(self) -> None:
        self.crashed = False

    def rollback(self, applied_round: int) -> str:
        """The server resumed after ``applied_round`` (its last checkpoint): go back to the
        shared state as of the end of that round, dropping what later rounds changed and
        any work in flight. Returns what happened: ``kept`` (nothing to undo),
        ``rolled_back``, or ``lost`` (no record that old: the state is cleared and the
        algorithm resynchronises, as after a crash)."""
        self.mailbox.clear()
        self.busy = False
        self.epoch += 1
        later = sorted(r for r in self._ledger if r > applied_round)
        if applied_round < self._ledger_floor:
            self.data.state = {}
            outcome = "lost"
        elif later:
            self.data.state = clone_state(self._ledger[later[0]])
            outcome = "rolled_back"
        elif self._ledger and max(self._ledger) <= applied_round or not self.data.state:
            outcome = "kept"
        else:
            self.data.state = {}
            outcome = "lost"
        for r in later:
            del self._ledger[r]
        return outcome

    def _record(self, round: int) -> None:
        if round not in self._ledger and (not self._ledger or round > max(self._ledger)):
            self._ledger[round] = clone_state(self.data.state)
            for old in sorted(self._ledger)[:-2]:  # a resume goes back at most one round
                del self._ledger[old]
                self._ledger_floor = max(self._ledger_floor, old)

    def deliver(self, msg: Message) -> None:
        if self.crashed:
            self.stats.count("to_crashed_client")
            self.log("drop", dst=self.actor_id, kind=msg.kind, reason="client_crashed")
            return
        self.mailbox.append((msg, wall_time()))
        if not self.busy:
            if self.real_time:
                # Let every message of this instant reach its actor (and be stamped) before any
                # handler computes: handlers share one thread, and a client's modelled compute
                # runs from its own message's arrival, not from when the thread was free.
                asyncio.get_running_loop().call_soon(self._next)
            else:
                self._next()

    def _generator(self, msg: Message) -> torch.Generator:
        # One stream per (run seed, client, round, kind): phases of a round draw independently.
        # crc32(b, crc32(a)) == crc32(a + b): the client's prefix is hashed once.
        key = zlib.crc32(f"{msg.round}/{msg.kind}".encode(), self._seed_prefix_crc)
        return torch.Generator().manual_seed(key)

    def _next(self) -> None:
        while self.mailbox and not self.busy:
            msg, arrived = self.mailbox.popleft()
            handler = self.handlers.get(msg.kind)
            if handler is None:
                self.stats.count("unknown_kind")
                self.log("reject", dst=self.actor_id, kind=msg.kind, reason="unknown_kind")
                continue
            if self.keep_ledger:
                self._record(msg.round)
            ctx = ClientCtx(self.actor_id, msg.round, self.model, self.data.x, self.data.y, self._generator(msg),
                            self.data.state, self.work_per_sample)
            started = max(arrived, self.free_since)
            batch = self.batch_handlers.get(msg.kind) if self.batcher is not None else None
            if batch is not None:  # done with the other clients of this instant (fedsim.batching)
                self.busy = True
                self.batcher.submit(batch, self, msg, ctx, started)
                return
            try:
                reply = handler(ctx, msg.payload)
            except ProtocolError as exc:
                reply = exc
            self.handled(msg, ctx, reply, started)

    def handled(self, msg: Message, ctx: ClientCtx, reply: Payload | None | ProtocolError, started: float) -> None:
        """A handler's outcome: the reply leaves after the modelled compute time; a refusal is
        logged and the next message in the mailbox is taken."""
        if isinstance(reply, ProtocolError):
            self.stats.count("client_refused")
            self.log("client_refused", client=self.actor_id, kind=msg.kind, reason=str(reply)[:200])
            if self.busy:  # a batched job: this client waited for it
                self.busy = False
                self._next()
            return
        seconds = self.compute_time(self.actor_id, ctx.work_flop, msg.round)
        if self.real_time:
            seconds = max(0.0, seconds - (wall_time() - started))
        self.busy = True
        asyncio.get_running_loop().call_later(seconds, self._finish, msg, reply, self.epoch)

    def _finish(self, msg: Message, reply: Payload | None, epoch: int) -> None:
        if epoch != self.epoch:  # crashed while computing: the work is lost
            return
        self.busy = False
        self.free_since = wall_time()
        if reply is not None and not self.crashed:
            version = msg.version if reply.version is None else reply.version
            self.node.send(Message(src=self.actor_id, dst=SERVER, round=msg.round, kind=msg.kind, version=version,
                                   payload=reply))
        self._next()


def clone_state(state: Any) -> Any:
    """A deep copy of a client's state (tensors cloned: handlers update them in place)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    if isinstance(state, tuple):
        return tuple(clone_state(v) for v in state)
    return copy.deepcopy(state)
