"""In-memory stand-ins for the runtime, to drive an algorithm's two halves without sockets.

``LocalRun`` holds one algorithm instance, a set of client contexts, and a ``LocalComm``
that delivers every broadcast to the client handlers directly (in client-id order) and
returns their replies from ``gather``. Hooks let a test drop, duplicate or reorder
messages, or crash a client, between the two halves.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from algorithms.base import Algorithm, Payload, ProtocolError, Reply


@dataclass
class FakeClientContext:
    client_id: int
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    seed: int = 0
    round: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    charged: int = 0

    @property
    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.client_id * 7919 + self.round)

    def charge(self, samples: int, factor: float = 1.0) -> None:
        self.charged += int(samples * factor)


class LocalComm:
    """A ServerComm whose network is a function call. ``fault(kind, client) -> list of
    deliveries`` decides what the server receives for each reply: [] drops it, [p, p]
    duplicates it; default delivers once."""

    def __init__(self, algorithm: Algorithm, contexts: dict[int, FakeClientContext],
                 fault: Callable[[str, int, Payload], list[Payload]] | None = None):
        self.algorithm = algorithm
        self.contexts = contexts
        self.round = 0
        self.participants = sorted(contexts)
        self.fault = fault
        self.counters: dict[str, int] = {}
        self.events: list[tuple[str, dict]] = []
        self._inbox: dict[str, list[tuple[int, Payload, int]]] = {}
        self.uplink_bits = 0
        self.downlink_bits = 0

    async def broadcast(self, kind, payload, *, version, to=None):
        handlers = self.algorithm.client_handlers()
        for client in (to if to is not None else self.participants):
            msg = payload(client) if callable(payload) else payload
            self.downlink_bits += msg.payload_bits
            ctx = self.contexts[client]
            ctx.round = self.round
            incoming = Payload({k: v.clone() for k, v in msg.tensors.items()}, dict(msg.meta), msg.payload_bits,
                               version if msg.version is None else msg.version)
            reply = handlers[kind](ctx, incoming)
            if reply is None:
                continue
            deliveries = [reply] if self.fault is None else self.fault(kind, client, reply)
            for r in deliveries:
                v = incoming.version if r.version is None else r.version
                self._inbox.setdefault(kind, []).append((client, r, v))

    async def send(self, client, kind, payload, *, version):
        await self.broadcast(kind, payload, version=version, to=[client])

    async def gather(self, kind, *, version=None, clients=None, deadline_s=None):
        out = accept_replies(self, kind, self._inbox.pop(kind, []), version, clients)
        self.uplink_bits += sum(r.payload.payload_bits for r in out.values())
        return out

    def count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def log(self, event, **fields):
        self.events.append((event, fields))


def accept_replies(comm, kind: str, entries, version, clients) -> dict[int, Reply]:
    """The runtime's gather rules (fedsim.server.ServerRole._accept) over in-memory replies:
    ``entries`` are (client, payload, version); wrong version, duplicates and replies that
    fail ``check_reply`` are counted and left out; the result is in client-id order."""
    out: dict[int, Reply] = {}
    for client, payload, v in entries:
        if clients is not None and client not in clients:
            continue
        if version is not None and v != version:
            comm.count("stale_rejected")
            continue
        if client in out:
            comm.count("duplicate_dropped")
            continue
        try:
            comm.algorithm.check_reply(kind, payload)
        except ProtocolError as exc:
            comm.count("rejected")
            comm.log("rejected", client=client, reason=str(exc))
            continue
        out[client] = Reply(client, payload, v)
    return dict(sorted(out.items()))


def run_rounds(algorithm: Algorithm, comm: LocalComm, rounds: int) -> None:
    """Drive ``rounds`` server rounds to completion."""
    async def _go():
        for r in range(rounds):
            comm.round = r
            await algorithm.server_round(comm)
    asyncio.run(_go())
