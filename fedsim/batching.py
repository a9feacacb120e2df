"""Client compute done together: the messages a node's clients receive at one instant.

In virtual time a broadcast reaches many client actors of a node at the same simulated
instant. Each would run its handler on arrival, one after another. When the algorithm offers
a batch handler for that message kind (``Algorithm.client_batch_handlers``), the clients
instead hand their message to this node's :class:`ComputeBatcher`, which waits until the
instant has nothing else to do (``VirtualTimeLoop.at_instant_end``) and runs the batch
handler once over all of them. What each client then does is unchanged: the reply leaves
after its own modelled compute time, from the same instant, so messages, bytes, modelled
times and events are those of the one-at-a-time path (results agree to float rounding).

Real time does not batch: there a client's compute starts when its message arrives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from algorithms.base import BatchHandler

from .clock import VirtualTimeLoop

if TYPE_CHECKING:
    from .client import ClientCtx, ClientRole
    from .codec import Message


@dataclass
class _Job:
    handler: BatchHandler
    client: "ClientRole"
    msg: "Message"
    ctx: "ClientCtx"
    started: float
    epoch: int


class ComputeBatcher:
    """Collects client work of one instant; runs it per batch handler, in arrival order."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self.loop = loop
        self.jobs: list[_Job] = []

    def submit(self, handler: BatchHandler, client: "ClientRole", msg: "Message", ctx: "ClientCtx",
               started: float) -> None:
        if not self.jobs:
            self.loop.at_instant_end(self.flush)
        self.jobs.append(_Job(handler, client, msg, ctx, started, client.epoch))

    def flush(self) -> None:
        jobs, self.jobs = self.jobs, []
        groups: dict[Any, list[_Job]] = {}
        for job in jobs:
            if job.client.epoch == job.epoch:  # else it crashed or rolled back meanwhile: the work is lost
                groups.setdefault((job.handler, job.msg.kind), []).append(job)
        for (handler, _), group in groups.items():
            results = handler([j.ctx for j in group], [j.msg.payload for j in group])
            for job, result in zip(group, results, strict=True):
                job.client.handled(job.msg, job.ctx, result, job.started)
