"""The local steps of many low-rank clients at once (FeDLRT's coefficients, FedLoRU's factors).

A client handler that trains (:func:`lowrank.local_steps`) is written once, as a generator:
it checks its request, yields a :class:`LocalSteps` (what ``local_steps`` needs, with the
tensors its composition closes over named in ``shared``), is sent ``(trained, seen)``, and
returns its reply; it may yield again (FedLoRU's personal modules train after its global
ones). A method's plain handler is ``one_training(self._handler, ctx, payload)``, its batch
handler ``many_trainings(self._handler, ctxs, payloads)``: one code path, so the two cannot
drift apart.

``many_trainings`` groups the requests of an instant that may run as one stack: the same
model and ``build``, equal ``shared`` tensors (every client of a round holds the same basis
or base; compared by value, each client holding its own copy), equal options, leaves and
``private`` tensors (each client's own, stacked like its leaves) of the same shapes and as
many samples. A group trains its leaves stacked along a first dimension
of clients: ``build`` composes every client's weights at once (its products broadcast over
that dimension), the dense model's forward and backward run as batched products
(:func:`algorithms.fastpath._stacked_step`, a small dense MLP only), and autograd carries the
dense gradients back through ``build`` alone, as :func:`lowrank.loss_and_grads` does for one
client. Each client draws its minibatches from its own generator in the same order as alone,
so the run is the same to float tolerance (tests/test_fastpath.py). A model the lean path does
not cover (convolutions, ``loss = "mse"``, ``run.vectorise = false``) trains one client at a
time. Measured (one thread, rank 8, MLP 64 on 64 features, 4 steps of batch 32, 100
clients): 0.11x the time of one client at a time; 784-200-10 at rank 32: 0.76x for stacks of
10, and stacks are cut to cache-sized chunks (:func:`fastpath.stack_chunk`) since 100 copies
of that model lose (1.44x).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Generator, Mapping

import torch
from torch import nn

from . import fastpath
from .base import Params, Payload, ProtocolError
from .lowrank import batch_indices, descend, local_steps

Compose = Callable[[Mapping[str, torch.Tensor], dict[str, torch.Tensor]], Params]
"""``build(shared, leaves)``: the model's named parameters from the fixed ``shared`` tensors
and the trainable leaves (which may carry a leading dimension of clients)."""


@dataclass
class LocalSteps:
    """One client's request for :func:`lowrank.local_steps` (``options``: its keyword
    arguments ``loss, lr, steps, batch_size`` and optionally ``precondition, momentum,
    weight_decay, max_grad_norm``)."""

    model: nn.Module
    build: Compose
    shared: Mapping[str, torch.Tensor]
    leaves: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    generator: torch.Generator
    correction: Mapping[str, torch.Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    private: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Tensors the composition reads but the steps do not train, this client's own (FedLoRU's
    personal modules): ``build`` sees them beside ``shared``; stacked, one per client."""

    def run(self) -> tuple[dict[str, torch.Tensor], int]:
        """This client's steps alone."""
        fixed = {**self.shared, **self.private} if self.private else self.shared
        return local_steps(self.model, partial(self.build, fixed), self.leaves, self.x, self.y,
                           generator=self.generator, correction=self.correction, **self.options)


Training = Generator[LocalSteps, tuple[dict[str, torch.Tensor], int], "Payload | None"]
"""A client handler that trains, written as a generator (module docstring)."""


def one_training(handler: Callable[..., Training], ctx, payload: Payload):
    """A plain client handler from a :data:`Training` one: each request run alone."""
    steps = handler(ctx, payload)
    try:
        request = next(steps)
        while True:
            request = steps.send(request.run())
    except StopIteration as done:
        return done.value


def many_trainings(handler: Callable[..., Training], ctxs, payloads) -> list:
    """A batch handler from a :data:`Training` one: every client's request, then each group
    of compatible requests trained stacked, then the next requests, until every handler has
    replied. Returns, in order, each reply or the :class:`ProtocolError` its handler raised."""
    out: list = [None] * len(ctxs)
    pending: dict[int, tuple[Training, LocalSteps]] = {}

    def advance(i: int, steps: Training, result) -> None:
        try:
            pending[i] = (steps, next(steps) if result is None else steps.send(result))
        except StopIteration as done:
            out[i] = done.value
        except ProtocolError as exc:
            out[i] = exc

    for i, (ctx, payload) in enumerate(zip(ctxs, payloads)):
        try:
            steps = handler(ctx, payload)
        except ProtocolError as exc:
            out[i] = exc
            continue
        advance(i, steps, None)
    while pending:
        asked = list(pending.items())
        pending.clear()
        for (i, (steps, _)), result in zip(asked, train_together([request for _, (_, request) in asked])):
            advance(i, steps, result)
    return out


def train_together(requests: list[LocalSteps]) -> list[tuple[dict[str, torch.Tensor], int]]:
    """Each request's ``(trained, seen)``, in order; compatible requests trained stacked."""
    groups: list[list[int]] = []
    for i, request in enumerate(requests):
        for group in groups:
            if _compatible(requests[group[0]], request):
                group.append(i)
                break
        else:
            groups.append([i])
    out: list = [None] * len(requests)
    for group in groups:
        for i, result in zip(group, _stacked_or_alone([requests[i] for i in group])):
            out[i] = result
    return out


def _same_shapes(a: Mapping[str, torch.Tensor] | None, b: Mapping[str, torch.Tensor] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def _compatible(a: LocalSteps, b: LocalSteps) -> bool:
    return (a.model is b.model and a.build == b.build and a.options == b.options
            and a.x.shape[0] == b.x.shape[0] and a.x.shape[1:] == b.x.shape[1:]
            and _same_shapes(a.leaves, b.leaves) and _same_shapes(a.correction, b.correction)
            and _same_shapes(a.private, b.private) and _same_shapes(a.shared, b.shared)
            and all(torch.equal(a.shared[k], b.shared[k]) for k in a.shared))


def _stacked_or_alone(requests: list[LocalSteps]) -> list[tuple[dict[str, torch.Tensor], int]]:
    first = requests[0]
    plan = fastpath.plan(first.model) if first.options.get("loss") == "cross_entropy" else None
    if len(requests) == 1 or not isinstance(plan, fastpath.DensePlan) or first.x.shape[0] == 0:
        return [r.run() for r in requests]
    with torch.no_grad():
        weights = first.build({**first.shared, **first.private}, first.leaves)
    if set(weights) != set(fastpath.names(plan)):
        return [r.run() for r in requests]
    chunk = fastpath.stack_chunk(plan, weights)
    out: list = []
    for c in range(0, len(requests), chunk):
        part = requests[c:c + chunk]
        out += [part[0].run()] if len(part) == 1 else _stacked(plan, part)
    return out


def _stacked(plan: fastpath.DensePlan, requests: list[LocalSteps]) -> list[tuple[dict[str, torch.Tensor], int]]:
    """:func:`lowrank.local_steps` of compatible requests, their leaves stacked."""
    first, b = requests[0], len(requests)
    options = dict(first.options)
    loss, lr, steps, batch_size = (options.pop(k) for k in ("loss", "lr", "steps", "batch_size"))
    n = first.x.shape[0]
    x = torch.stack([r.x.reshape(n, -1) for r in requests])
    y = torch.stack([r.y for r in requests])
    current = {k: torch.stack([r.leaves[k].detach() for r in requests]) for k in first.leaves}
    fixed = {**first.shared, **{k: torch.stack([r.private[k] for r in requests]) for k in first.private}}
    correction = (None if first.correction is None
                  else {k: torch.stack([r.correction[k] for r in requests]) for k in first.correction})
    offsets = (torch.arange(b) * n).unsqueeze(1)
    buffers: dict[str, torch.Tensor] = {}
    seen = 0
    for _ in range(steps):
        drawn = [batch_indices(n, batch_size, r.generator) for r in requests]  # each its own, as alone
        if drawn[0] is None:
            xb, yb = x, y
        else:
            rows = (torch.stack(drawn) + offsets).reshape(-1)
            xb = x.reshape(b * n, -1).index_select(0, rows).view(b, -1, x.shape[2])
            yb = y.reshape(b * n).index_select(0, rows).view(b, -1)
        grads = _stacked_grads(plan, first.build, fixed, current, xb, yb)
        descend(current, grads, buffers, lr=lr, correction=correction, stacked=True,
                precondition=options.get("precondition"), momentum=options.get("momentum", 0.0),
                weight_decay=options.get("weight_decay", 0.0), max_grad_norm=options.get("max_grad_norm", 0.0))
        seen += xb.shape[1]
    return [(params, seen) for params in fastpath.per_client(current, b)]


def _stacked_grads(plan: fastpath.DensePlan, build: Compose, shared: Mapping[str, torch.Tensor],
                   current: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every client's gradient w.r.t. its leaves ([clients, ...] each): the dense model's
    without autograd, then back through ``build`` (:func:`lowrank.loss_and_grads`, stacked)."""
    live = {k: v.detach().requires_grad_(True) for k, v in current.items()}
    weights = build(shared, live)
    dense: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        fastpath._stacked_step(plan.layers, {k: w.detach() for k, w in weights.items()}, x, y, None, dense)
    outs = [(w, dense[k]) for k, w in weights.items() if w.requires_grad]
    grads = (torch.autograd.grad([w for w, _ in outs], list(live.values()), grad_outputs=[g for _, g in outs],
                                 allow_unused=True) if outs else [None] * len(live))
    return {k: (torch.zeros_like(live[k]) if g is None else g) for k, g in zip(live, grads)}
