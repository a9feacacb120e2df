"""Standard (uncompressed) distributed SGD: the baseline of the QRR and LQ-SGD papers.

Source: the baselines as the QRR authors' ``sgd.py`` / ``sgd_client.py`` (Kritsos/QRR-code: one
batch per client, the server steps on the clients' gradients) and the LAQ authors' GD (full
local gradients); departure: ``lr`` steps on the mean, not the sum, of the gradients.

Round k:
  1. server broadcasts the model w_k (32 bits per value);
  2. each client computes a minibatch gradient g_i at w_k and uploads it (32 bits per value);
  3. server steps w_{k+1} = w_k - lr * mean_i g_i, summing in client-id order.

With ``batch_size = 0`` every client uses all its data: distributed gradient descent (GD,
the baseline of the LAQ paper); ``l2`` adds the gradient ``l2 * w`` of (l2 / 2) ||w||^2.

payload_bits: 32 * (number of parameters), each direction.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Algorithm, Payload, check, check_int, register
from .common import check_like, dense_bits, loss_and_grad, sample_batch, weighted_mean


@register
class SGD(Algorithm):
    name = "sgd"

    @dataclass
    class Config(Algorithm.Config):
        batch_size: int = 32
        """Minibatch size (samples) of each client's gradient; 0 = all local data (GD)."""
        l2: float = 0.0
        """L2 penalty coefficient: clients add ``l2 * w`` to their gradient (0: none)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_int("batch_size", self.batch_size, 0, note=" (0 = full local batch)")
            check(self.l2 >= 0, "l2", self.l2, "must be >= 0")

    async def server_round(self, comm) -> None:
        version = comm.round
        await comm.broadcast("model", Payload(tensors=self.params, payload_bits=dense_bits(self.params)), version=version)
        replies = await comm.gather("model", version=version)
        if not replies:
            return
        for name in self.params:
            mean = weighted_mean([r.payload.tensors[name] for r in replies.values()], [1.0] * len(replies))
            self.params[name] = self.params[name] - self.config.lr * mean

    def client_handlers(self):
        return {"model": self.on_model}

    def on_model(self, ctx, payload: Payload) -> Payload:
        check_like(payload, self.params, "sgd model", finite=False)
        if self.config.batch_size:
            idx = sample_batch(len(ctx.x), self.config.batch_size, ctx.generator)
            x, y = ctx.x[idx], ctx.y[idx]
        else:
            x, y = ctx.x, ctx.y
        _, grads = loss_and_grad(ctx.model, payload.tensors, x, y)
        if self.config.l2:
            grads = {k: g.add(payload.tensors[k], alpha=self.config.l2) for k, g in grads.items()}
        ctx.charge(len(x))
        return Payload(tensors=grads, payload_bits=dense_bits(grads))

    def check_reply(self, kind: str, payload: Payload) -> None:
        check_like(payload, self.params, "sgd gradient")
