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
from .common import check_like, check_models, dense_bits, loss_and_grad, loss_and_grad_many, sample_batch, weighted_mean


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

    def client_batch_handlers(self):
        return {"model": self.on_model_batch}

    def on_model(self, ctx, payload: Payload) -> Payload:
        check_like(payload, self.params, "sgd model", finite=False)
        x, y = self._batch(ctx)
        _, grads = loss_and_grad(ctx.model, payload.tensors, x, y)
        return self._reply(ctx, payload, len(x), grads)

    def on_model_batch(self, ctxs, payloads) -> list:
        """``on_model`` for the clients that received the model at one instant: their
        minibatches drawn one by one, their gradients stacked (:func:`loss_and_grad_many`)."""
        out, ok = check_models(payloads, self.params, "sgd model")
        batches = [self._batch(ctxs[i]) for i in ok]
        grads = loss_and_grad_many(ctxs[0].model if ctxs else self.model, [payloads[i].tensors for i in ok],
                                   [x for x, _ in batches], [y for _, y in batches])
        for i, (x, _), g in zip(ok, batches, grads):
            out[i] = self._reply(ctxs[i], payloads[i], len(x), g)
        return out

    def _batch(self, ctx) -> tuple:
        if self.config.batch_size:
            idx = sample_batch(len(ctx.x), self.config.batch_size, ctx.generator)
            return ctx.x[idx], ctx.y[idx]
        return ctx.x, ctx.y

    def _reply(self, ctx, payload: Payload, samples: int, grads) -> Payload:
        if self.config.l2:
            grads = {k: g.add(payload.tensors[k], alpha=self.config.l2) for k, g in grads.items()}
        ctx.charge(samples)
        return Payload(tensors=grads, payload_bits=dense_bits(grads))

    def check_reply(self, kind: str, payload: Payload) -> None:
        check_like(payload, self.params, "sgd gradient")
