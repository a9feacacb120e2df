"""Top-k sparsification with error feedback (EF21: Richtárik, Sokolov & Fatkhullin, NeurIPS 2021).

The worked example of docs/extending.md: a whole method in one file.

Each client i and the server hold the same gradient estimate G_i (per parameter tensor,
zero at the start). Round k:

  1. the server broadcasts w_k (32 bits per value) and, per client, ``ack``: the tag of its
     mirror of G_i;
  2. client i computes a minibatch gradient g_i at w_k and sends the top-k entries (by
     magnitude) of the innovation g_i - G_i, k = ceil(fraction * numel) per tensor, as
     (index, value) pairs; both sides set G_i <- G_i + topk(g_i - G_i);
  3. the server steps w_{k+1} = w_k - lr * mean_i G_i over every client it holds a mirror of,
     in client-id order.

Error feedback: what top-k leaves out this round stays in g_i - G_i and competes for the k
slots next round, so no coordinate is starved (EF21's form of error feedback: the memory
is the shared estimate G_i, not a private residual).

payload_bits (uplink): sum over tensors of 64 * k (a 32-bit index and a 32-bit value per
entry). Downlink: 32 bits per parameter.

State synchronisation (as LAQ's, content-addressed): a tag is 16 hex digits of the xxh3-128
of G_i. An upload carries ``base`` (the ack it answered), ``tag`` (of the client's new G_i)
and ``reset`` (G_i rebuilt from zero). The server applies it only if ``base`` equals its
mirror's tag and the result hashes to ``tag``; otherwise it counts ``stale_rejected`` or
``integrity_rejected`` and changes nothing. The client keeps its committed G_i and one
pending G_i; the next request's ack commits, keeps or (no match: crash, loss, a stale
exchange) drops them, and the client then sends a reset.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from .base import Algorithm, Params, Payload, ProtocolError, check, check_int, content_tag, register, state_digest
from .common import check_like, dense_bits, many_gradients, minibatch_gradient, one_gradient

_TAG = re.compile(r"^[0-9a-f]{16}$")


def estimate_tag(g: Params) -> str:
    """Content tag of a gradient estimate (:func:`base.content_tag`)."""
    return content_tag({"G": g})


@register
class TopK(Algorithm):
    name = "topk"
    stateful = True
    statesync_config = {"fraction": 0.2}
    """Settings the shared state-sync tests use on their tiny model (tests/statesync.py)."""

    @dataclass
    class Config(Algorithm.Config):
        lr: float = 0.5
        """Server step on the mean gradient estimate."""
        fraction: float = 0.1
        """Share of each tensor's entries a client sends per round, in (0, 1]; k = ceil(fraction * numel)."""
        batch_size: int = 32
        """Minibatch size (samples) of each client's gradient; 0 = all local data."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check(isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1, "fraction", self.fraction,
                  "must be in (0, 1]")
            check_int("batch_size", self.batch_size, 0, note=" (0 = full local batch)")

    def __init__(self, config: "TopK.Config", model: torch.nn.Module):
        super().__init__(config, model)
        self.k = {n: max(1, math.ceil(config.fraction * p.numel())) for n, p in self.params.items()}
        self.mirror: dict[int, Params] = {}
        self.tags: dict[int, str] = {}

    # ---- server ----------------------------------------------------------------------------

    async def server_round(self, comm) -> None:
        r = comm.round
        await comm.broadcast("grad", lambda c: Payload(tensors=self.params, meta={"ack": self.tags.get(c)},
                                                       payload_bits=dense_bits(self.params)), version=r)
        for client, reply in (await comm.gather("grad", version=r)).items():
            self._apply(comm, client, reply.payload)
        if not self.mirror:
            return
        clients = sorted(self.mirror)
        for name in self.params:
            mean = torch.zeros_like(self.params[name])
            for c in clients:
                mean.add_(self.mirror[c][name], alpha=1.0 / len(clients))
            self.params[name] = self.params[name] - self.config.lr * mean

    def _apply(self, comm, client: int, payload: Payload) -> None:
        meta = payload.meta
        if meta["base"] != self.tags.get(client) or (not meta["reset"] and client not in self.mirror):
            comm.count("stale_rejected")
            return
        base = self._zeros() if meta["reset"] else self.mirror[client]
        new = {n: _add_sparse(base[n], payload.tensors[f"idx:{n}"], payload.tensors[f"val:{n}"]) for n in self.params}
        if estimate_tag(new) != meta["tag"]:
            comm.count("integrity_rejected")
            return
        self.mirror[client], self.tags[client] = new, meta["tag"]

    def _zeros(self) -> Params:
        return {n: torch.zeros_like(p) for n, p in self.params.items()}

    def check_reply(self, kind: str, payload: Payload) -> None:
        who = f"topk {kind}"
        meta = payload.meta
        if kind != "grad" or set(meta) != {"base", "reset", "tag"} or not isinstance(meta["reset"], bool):
            raise ProtocolError(f"{who}: fields {sorted(meta)} are not base, reset, tag")
        for key, optional in (("base", True), ("tag", False)):
            v = meta[key]
            if not (v is None and optional) and not (isinstance(v, str) and _TAG.match(v)):
                raise ProtocolError(f"{who}: malformed {key} {v!r}")
        expected = {f"{p}:{n}" for n in self.params for p in ("idx", "val")}
        if set(payload.tensors) != expected:
            raise ProtocolError(f"{who}: tensors {sorted(payload.tensors)} are not {sorted(expected)}")
        for n, p in self.params.items():
            idx, val = payload.tensors[f"idx:{n}"], payload.tensors[f"val:{n}"]
            k = self.k[n]
            if idx.dtype != torch.int32 or val.dtype != torch.float32 or idx.shape != (k,) or val.shape != (k,):
                raise ProtocolError(f"{who}: {n!r} needs int32[{k}] indices and float32[{k}] values")
            # strictly increasing and in range: each entry once, so applying is exact and order-free
            if k and (int(idx[0]) < 0 or int(idx[-1]) >= p.numel() or bool((idx[1:] <= idx[:-1]).any())):
                raise ProtocolError(f"{who}: {n!r} indices must be increasing, in 0..{p.numel() - 1}")
            if not bool(torch.isfinite(val).all()):
                raise ProtocolError(f"{who}: {n!r} values must be finite")

    # ---- client ----------------------------------------------------------------------------

    def client_handlers(self):
        return {"grad": self.on_grad}

    def client_batch_handlers(self):
        return {"grad": self.on_grad_batch}

    def on_grad(self, ctx, payload: Payload) -> Payload | None:
        return one_gradient(self._on_grad, ctx, payload)

    def on_grad_batch(self, ctxs, payloads) -> list:
        """``on_grad`` for the clients asked at one instant, their gradients stacked."""
        return many_gradients(self._on_grad, ctxs, payloads)

    def _on_grad(self, ctx, payload: Payload):
        check_like(payload, self.params, "topk model", finite=False)
        state, ack = ctx.state, payload.meta.get("ack")
        if payload.version is not None:
            if payload.version < state.get("newest", payload.version):
                return None  # a late duplicate of an old request: the server has moved on
            state["newest"] = payload.version
        _synchronise(state, ack)
        grads, seen = yield from minibatch_gradient(payload.tensors, ctx.x, ctx.y, self.config.batch_size, ctx.generator)
        ctx.charge(seen)
        reset = "G" not in state
        base = self._zeros() if reset else state["G"]
        tensors, new = {}, {}
        for n, g in grads.items():
            innovation = (g - base[n]).reshape(-1)
            top = torch.topk(innovation.abs(), self.k[n], sorted=False).indices.sort().values
            tensors[f"idx:{n}"] = top.to(torch.int32)
            tensors[f"val:{n}"] = innovation[top].to(torch.float32)
            new[n] = _add_sparse(base[n], tensors[f"idx:{n}"], tensors[f"val:{n}"])
        tag = estimate_tag(new)
        state["pending"] = {"G": new, "tag": tag}
        bits = sum(64 * k for k in self.k.values())
        return Payload(tensors=tensors, meta={"base": ack, "reset": reset, "tag": tag}, payload_bits=bits)

    def client_digest(self, state: dict[str, Any]) -> bytes:
        return state_digest({"G": state["G"]}) if "G" in state else state_digest({})

    def server_digest(self, client: int) -> bytes:
        return state_digest({"G": self.mirror[client]}) if client in self.mirror else state_digest({})


def _add_sparse(base: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """``base`` plus values at flat indices: the same bytes on the client and the server."""
    out = base.clone().reshape(-1)
    out[idx.long()] += val
    return out.reshape(base.shape)


def _synchronise(state: dict[str, Any], ack: str | None) -> None:
    """Commit the pending estimate, keep the committed one, or drop both (then: a reset)."""
    pending = state.pop("pending", None)
    if pending is not None and ack is not None and ack == pending["tag"]:
        state["G"], state["tag"] = pending["G"], pending["tag"]
    elif not ("G" in state and ack is not None and ack == state["tag"]):
        state.pop("G", None)
        state.pop("tag", None)
