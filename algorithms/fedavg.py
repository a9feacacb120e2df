"""Federated Averaging (McMahan et al., 2017): local epochs, model deltas averaged.

Source followed: "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(McMahan, Moore, Ramage, Hampson & Agüera y Arcas, AISTATS 2017), Algorithm 1
(FederatedAveraging: a fraction C of the K clients per round, E local epochs of minibatch SGD
at batch B and step eta, the server takes the sample-weighted average of the returned models).
No authors' code was published with the paper. Departures, each deliberate:

* clients upload the delta w_i - w_k instead of w_i: with ``server_lr = 1`` (the default) the
  server's result is the paper's weighted model average exactly; ``server_lr`` != 1 is this
  project's (a server step on the averaged delta, as in the FedOpt framing of Reddi et al.,
  2021), not in the paper;
* the weights n_i / n run over the replies the server gathered this round (the paper's m_t:
  the selected clients); a selected client whose reply was lost or late drops out of that
  round's average instead of stalling it (the paper's simulation has no faults);
* which clients a round selects (``client_fraction``, the paper's C) is the runtime's seeded
  draw, and local minibatches are reshuffled each epoch from the client's seeded generator;
  the paper's ``B = infinity`` (full local batch) is ``batch_size`` >= the client's samples.

Round k:
  1. server broadcasts w_k (32 bits per value);
  2. client i runs ``local_epochs`` of minibatch SGD (``lr``, ``batch_size``) from w_k and
     uploads its delta d_i = w_i - w_k (32 bits per value);
  3. server sets w_{k+1} = w_k + server_lr * sum_i (n_i / n) d_i, in client-id order,
     with n_i the client's sample count.

payload_bits: 32 * (number of parameters), each direction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Payload, ProtocolError, check, check_int, register
from .common import check_like, check_models, dense_bits, local_sgd, local_sgd_many, weighted_mean


@register
class FedAvg(Algorithm):
    name = "fedavg"

    @dataclass
    class Config(Algorithm.Config):
        lr: float = 0.2
        """Client learning rate."""
        local_epochs: int = 2
        """Passes over the local data per round."""
        batch_size: int = 32
        """Local minibatch size (samples)."""
        server_lr: float = 1.0
        """Step applied to the averaged delta at the server."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_int("local_epochs", self.local_epochs, 1)
            check_int("batch_size", self.batch_size, 1)
            check(self.server_lr > 0, "server_lr", self.server_lr, "must be > 0")

    async def server_round(self, comm) -> None:
        version = comm.round
        await comm.broadcast("model", Payload(tensors=self.params, payload_bits=dense_bits(self.params)), version=version)
        replies = await comm.gather("model", version=version)
        if not replies:
            return
        weights = [float(r.payload.meta["samples"]) for r in replies.values()]
        for name in self.params:
            mean = weighted_mean([r.payload.tensors[name] for r in replies.values()], weights)
            self.params[name] = self.params[name] + self.config.server_lr * mean

    def client_handlers(self):
        return {"model": self.on_model}

    def client_batch_handlers(self):
        return {"model": self.on_model_batch}

    def on_model(self, ctx, payload: Payload) -> Payload:
        check_like(payload, self.params, "fedavg model", finite=False)
        cfg = self.config
        trained, seen = local_sgd(ctx.model, payload.tensors, ctx.x, ctx.y, lr=cfg.lr, epochs=cfg.local_epochs,
                                  batch_size=cfg.batch_size, generator=ctx.generator)
        torch._foreach_sub_(list(trained.values()), [payload.tensors[k] for k in trained])  # in place: trained is ours
        return self._delta(ctx, trained, seen)

    def on_model_batch(self, ctxs, payloads) -> list:
        """``on_model`` for the clients that received the model at one instant (stacked
        where the model is small, :func:`local_sgd_many`)."""
        out, ok = check_models(payloads, self.params, "fedavg model")
        cfg = self.config
        trained = local_sgd_many(ctxs[0].model if ctxs else self.model, [payloads[i].tensors for i in ok],
                                 [ctxs[i].x for i in ok], [ctxs[i].y for i in ok], [ctxs[i].generator for i in ok],
                                 lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size, change=True)
        for i, (delta, seen) in zip(ok, trained):
            out[i] = self._delta(ctxs[i], delta, seen)
        return out

    def _delta(self, ctx, delta, seen: int) -> Payload:
        ctx.charge(seen)
        return Payload(tensors=delta, meta={"samples": ctx.x.shape[0]}, payload_bits=dense_bits(delta),
                       handed_over=True)  # made for this reply, never written again

    def check_reply(self, kind: str, payload: Payload) -> None:
        check_like(payload, self.params, "fedavg delta")
        samples = payload.meta.get("samples")
        if not isinstance(samples, int) or samples < 1:
            raise ProtocolError(f"fedavg delta: meta.samples must be a positive int, got {samples!r}")
