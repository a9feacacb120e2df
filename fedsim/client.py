"""The client role: an actor that answers the server with its algorithm's handlers."""
from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from algorithms.base import Algorithm, Payload, ProtocolError

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
    def __init__(self, client_id: int, node: Node, algorithm: Algorithm, data: ClientData, *, model: nn.Module,
                 seed: int, work_per_sample: float, compute_time: ComputeTime, real_time: bool,
                 stats: Stats, log: Callable[..., None]):
        super().__init__(client_id)
        self.node, self.algorithm, self.data, self.model = node, algorithm, data, model
        self.seed, self.work_per_sample, self.compute_time = seed, work_per_sample, compute_time
        self.real_time, self.stats, self.log = real_time, stats, log
        self.handlers = algorithm.client_handlers()
        self.crashed = False
        node.actors[client_id] = self

    def crash(self) -> None:
        """Lose all memory; ignore mail until :meth:`restart`."""
        self.data.state = {}
        self.mailbox.clear()
        self.crashed = True

    def restart(self) -> None:
        self.crashed = False

    def deliver(self, msg: Message) -> None:
        if self.crashed:
            self.stats.count("to_crashed_client")
            self.log("drop", dst=self.actor_id, kind=msg.kind, reason="client_crashed")
            return
        super().deliver(msg)

    def _generator(self, msg: Message) -> torch.Generator:
        # One stream per (run seed, client, round, kind): phases of a round draw independently.
        key = zlib.crc32(f"{self.seed}/{self.actor_id}/{msg.round}/{msg.kind}".encode())
        return torch.Generator().manual_seed(key)

    async def handle(self, msg: Message) -> None:
        handler = self.handlers.get(msg.kind)
        if handler is None:
            self.stats.count("unknown_kind")
            self.log("reject", dst=self.actor_id, kind=msg.kind, reason="unknown_kind")
            return
        ctx = ClientCtx(self.actor_id, msg.round, self.model, self.data.x, self.data.y, self._generator(msg),
                        self.data.state, self.work_per_sample)
        started = wall_time()
        try:
            reply = handler(ctx, msg.payload)
        except ProtocolError as exc:
            self.stats.count("client_refused")
            self.log("client_refused", client=self.actor_id, kind=msg.kind, reason=str(exc)[:200])
            return
        seconds = self.compute_time(self.actor_id, ctx.work_flop, msg.round)
        if self.real_time:
            seconds = max(0.0, seconds - (wall_time() - started))
        if seconds > 0:
            await asyncio.sleep(seconds)
        if reply is None or self.crashed:
            return
        version = msg.version if reply.version is None else reply.version
        self.node.send(Message(src=self.actor_id, dst=SERVER, round=msg.round, kind=msg.kind, version=version,
                               payload=reply))
