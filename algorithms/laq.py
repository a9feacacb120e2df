"""LAQ and SLAQ (Sun, Chen, Giannakis & Yang, NeurIPS 2019): lazily aggregated quantized gradients.

Each client m and the server hold the same quantized accumulator Q_m^{k-1} (per parameter
tensor). Round k:

  1. the server broadcasts w_k (32 bits per value) and, per client, ``ack``: the tag of its
     mirror of Q_m (see "State synchronisation" below);
  2. client m computes a minibatch gradient g_m at w_k (``batch_size``; 0 = all local data),
     quantizes the innovation g_m - Q_m^{k-1} at b bits (:func:`quantizers.laq_quantize`:
     radius R = ||g_m - Q_m^{k-1}||_inf, codes on a 2^b-level grid, |g_m - Q_m^k| <= tau R)
     and uploads R and the bit-packed codes;
  3. the server rebuilds Q_m^k = Q_m^{k-1} + R * level(code) bit-identically and steps
     w_{k+1} = w_k - lr * mean_m Q_m over every client it holds a mirror of, in client-id
     order. A client that did not upload this round (skipped, lost, not selected) counts
     with its last Q_m: the "lazy aggregation" of the paper.

SLAQ adds the paper's lazy rule (its eq. 7, stochastic version): client m skips the upload when

    ||Q_m^k - Q_m^{k-1}||^2 <= (1 / lr^2) * sum_{d=1..D} xi_d ||w_{k+1-d} - w_{k-d}||^2
                               + 3 (||e_m^k||^2 + ||e_m^{k-1}||^2)

with e the quantization errors g - Q of this round and of the client's last upload. Our
simplifications, as constants: D = 10, xi_d = 0.8 / D; the 1/(alpha^2 M^2) of the paper
becomes 1/lr^2 because our server averages (alpha = lr / M). The server computes the model
term (it holds the history) and sends it as one float in the request (``lazy_bound``); a
client uploads anyway after ``MAX_SKIPS`` = 10 consecutive skips (the paper's t-bar). Skips
are counted (``skips``). LAQ here never skips (quantization alone).

payload_bits (uplink, per upload): sum over parameter tensors of 32 + b * numel (one float32
radius per tensor, as :func:`quantizers.laq_bits`); a skip costs 0 bits. Downlink: 32 bits
per parameter. On the wire each tensor's codes travel as one uint8 frame of
ceil(b * numel / 8) bytes and the radii as one float32 frame.

State synchronisation (content-addressed, so no fault can make the server apply an
innovation to the wrong base):

* a tag is a hash of the accumulator's bytes (16 hex digits of sha256);
* every upload carries ``base`` (the ack it answered: the tag of the server's mirror when the
  request left), ``tag`` (the tag of the client's new Q_m^k) and ``reset``;
* the server applies an upload only if ``base`` equals its mirror's current tag, and keeps
  the result only if the rebuilt Q hashes to ``tag``; otherwise it counts ``stale_rejected``
  (or ``integrity_rejected``) and changes nothing;
* the client keeps its committed Q (the one the server acknowledged) and one pending Q (its
  last upload). On a request it commits the pending Q if ``ack`` names it, keeps its Q if
  ``ack`` names that, and otherwise (crash: state emptied; a lost or stale exchange; a
  mirror the server forgot) drops both and sends a full, non-differential quantization
  against 0 flagged ``reset`` (still gated on ``base``, so a delayed reset is never applied).
* the server forgets a mirror not refreshed for ``FORGET_AFTER`` = 30 rounds (a client that
  left stops steering the model); the client's next upload is then a reset.

Bad input: a client whose gradient holds NaN/Inf uploads nothing but a ``skip`` reply with
reason ``nonfinite`` (counted ``client_nonfinite`` at the server; its state is untouched and
the server reuses its last Q). ``check_reply`` rejects unknown fields, wrong dtypes, shapes
or lengths, non-finite or negative radii; non-zero padding bits are rejected when decoding,
before anything is stored.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Any

import torch

from . import bitpack
from . import quantizers as qz
from .base import Algorithm, Params, Payload, ProtocolError, check, check_int, register, state_digest
from .common import check_finite, check_like, dense_bits, loss_and_grad, params_finite, sample_batch

FORGET_AFTER = 30
"""Rounds without an accepted upload after which the server drops a client's mirror."""
LAZY_WINDOW = 10
"""D: model differences remembered by SLAQ's rule."""
LAZY_XI = 0.8
"""sum_d xi_d: SLAQ weights xi_d = LAZY_XI / D."""
MAX_SKIPS = 10
"""t-bar: consecutive skips after which a SLAQ client uploads anyway."""

_TAG = re.compile(r"^[0-9a-f]{16}$")
RADII = "radii"


def accumulator_tag(q: dict[str, torch.Tensor]) -> str:
    """Content tag of an accumulator: 16 hex digits of its sha256 digest."""
    return state_digest({"Q": q}).hex()[:16]


def gradient(model, params: Params, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             generator: torch.Generator) -> tuple[float, Params, int]:
    """Loss, gradient at ``params`` on a minibatch (``batch_size`` 0: all data), samples used."""
    if batch_size and batch_size < len(x):
        idx = sample_batch(len(x), batch_size, generator)
        x, y = x[idx], y[idx]
    loss, grads = loss_and_grad(model, params, x, y)
    return loss, grads, len(x)


class DifferentialQuantized(Algorithm):
    """Mirrored differential quantization of per-client "targets" (LAQ: the gradient
    tensors; QRR: their low-rank factors). Subclasses define the targets and how a gradient
    is rebuilt from them; the protocol, the lazy aggregation and the checks live here."""

    stateful = True
    lazy = False

    @dataclass
    class Config(Algorithm.Config):
        bits: int = 8
        """b: bits per quantized value, 1..16."""
        batch_size: int = 32
        """Minibatch size (samples) of each client's gradient; 0 = all local data."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_int("bits", self.bits, 1, bitpack.MAX_BITS)
            check_int("batch_size", self.batch_size, 0, note=" (0 = full local batch)")

    def __init__(self, config, model):
        super().__init__(config, model)
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.layout: dict[str, tuple[int, ...]] = self.target_layout()
        self.mirror: dict[int, dict[str, torch.Tensor]] = {}
        self.tags: dict[int, str] = {}
        self.estimate: dict[int, Params] = {}
        self.heard: dict[int, int] = {}
        self.model_steps: collections.deque[float] = collections.deque(maxlen=LAZY_WINDOW)

    # ---- what a subclass defines ------------------------------------------------------------

    def target_layout(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every quantized target, in wire order."""
        return dict(self.shapes)

    def targets(self, grads: Params, previous: dict[str, torch.Tensor] | None,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The tensors to quantize for ``grads``; ``previous`` is the committed accumulator."""
        return grads

    def rebuild(self, q: dict[str, torch.Tensor]) -> Params:
        """The gradient estimate the server uses, from one client's accumulator."""
        return q

    # ---- bits ------------------------------------------------------------------------------

    def upload_bits(self) -> int:
        """Paper count of one upload: 32 bits per radius + b bits per quantized value."""
        return sum(qz.laq_bits(_numel(s), self.config.bits) for s in self.layout.values())

    # ---- server ----------------------------------------------------------------------------

    async def server_round(self, comm) -> None:
        r = comm.round
        self._forget(comm, r)
        lazy_bound = (LAZY_XI / LAZY_WINDOW) * sum(self.model_steps) / self.config.lr ** 2

        def request(client: int) -> Payload:
            meta: dict[str, Any] = {"ack": self.tags.get(client)}
            if self.lazy:
                meta["lazy_bound"] = float(lazy_bound)
            return Payload(tensors=self.params, meta=meta, payload_bits=dense_bits(self.params))

        await comm.broadcast("grad", request, version=r)
        replies = await comm.gather("grad", version=r)
        for client, reply in replies.items():
            self._apply(comm, client, reply.payload, r)
        if not self.estimate:
            self.model_steps.append(0.0)
            return
        clients = sorted(self.estimate)
        step = 0.0
        for name in self.params:
            mean = torch.zeros_like(self.params[name])
            for c in clients:
                mean.add_(self.estimate[c][name], alpha=1.0 / len(clients))
            delta = self.config.lr * mean
            self.params[name] = self.params[name] - delta
            step += float(delta.pow(2).sum())
        self.model_steps.append(step)

    def _forget(self, comm, r: int) -> None:
        for c in [c for c, last in self.heard.items() if r - last > FORGET_AFTER]:
            for table in (self.mirror, self.tags, self.estimate, self.heard):
                table.pop(c, None)
            comm.count("mirrors_forgotten")

    def _apply(self, comm, client: int, payload: Payload, r: int) -> None:
        meta = payload.meta
        current = self.tags.get(client)
        if "skip" in meta:
            comm.count("client_nonfinite" if meta["skip"] == "nonfinite" else "skips")
            if meta["skip"] == "lazy" and meta.get("base") == current and current is not None:
                self.heard[client] = r
            return
        if meta["base"] != current:
            comm.count("stale_rejected")
            comm.log("stale_rejected", client=client, base=meta["base"], mirror=current)
            return
        reset = bool(meta["reset"])
        if not reset and client not in self.mirror:
            comm.count("stale_rejected")
            return
        base = self._zeros() if reset else self.mirror[client]
        radii = payload.tensors[RADII]
        try:
            new = {name: qz.laq_dequantize(base[name], radii[i], payload.tensors[name], self.config.bits)
                   for i, name in enumerate(self.layout)}
        except ProtocolError as exc:
            comm.count("rejected")
            comm.log("rejected", client=client, reason=str(exc))
            return
        if accumulator_tag(new) != meta["tag"]:
            comm.count("integrity_rejected")
            comm.log("integrity_rejected", client=client)
            return
        self.mirror[client] = new
        self.tags[client] = meta["tag"]
        self.estimate[client] = self.rebuild(new)
        self.heard[client] = r
        if reset:
            comm.count("resets")

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(shape) for name, shape in self.layout.items()}

    def check_reply(self, kind: str, payload: Payload) -> None:
        who = f"{self.name} {kind}"
        if kind != "grad":
            raise ProtocolError(f"{who}: unexpected message kind")
        meta = payload.meta
        if "skip" in meta:
            if set(meta) != {"skip", "base"} or meta["skip"] not in ("lazy", "nonfinite") or payload.tensors:
                raise ProtocolError(f"{who}: malformed skip {sorted(meta)}")
            _check_tag(meta["base"], who, optional=True)
            return
        if set(meta) != {"base", "reset", "tag"}:
            raise ProtocolError(f"{who}: fields {sorted(meta)} are not base, reset, tag")
        _check_tag(meta["base"], who, optional=True)
        _check_tag(meta["tag"], who, optional=False)
        if not isinstance(meta["reset"], bool):
            raise ProtocolError(f"{who}: reset must be a bool")
        expected = set(self.layout) | {RADII}
        if set(payload.tensors) != expected:
            raise ProtocolError(f"{who}: tensors {sorted(payload.tensors)} are not {sorted(expected)}")
        radii = payload.tensors[RADII]
        if radii.dtype != torch.float32 or tuple(radii.shape) != (len(self.layout),):
            raise ProtocolError(f"{who}: radii must be float32[{len(self.layout)}], got {radii.dtype}{tuple(radii.shape)}")
        if not bool(torch.isfinite(radii).all()) or bool((radii < 0).any()):
            raise ProtocolError(f"{who}: radii must be finite and >= 0")
        for name, shape in self.layout.items():
            t = payload.tensors[name]
            need = bitpack.packed_nbytes(_numel(shape), self.config.bits)
            if t.dtype != torch.uint8 or t.ndim != 1 or t.numel() != need:
                raise ProtocolError(f"{who}: {name!r} must be uint8[{need}], got {t.dtype}{tuple(t.shape)}")

    # ---- client ----------------------------------------------------------------------------

    def client_handlers(self):
        return {"grad": self.on_grad}

    def on_grad(self, ctx, payload: Payload) -> Payload | None:
        check_like(payload, self.params, f"{self.name} model", finite=False)
        ack = payload.meta.get("ack")
        state = ctx.state
        if payload.version is not None:
            if payload.version < state.get("newest", payload.version):
                return None  # a late duplicate of an old request: the server has moved on
            state["newest"] = payload.version
        _synchronise(state, ack)
        _, grads, seen = gradient(ctx.model, payload.tensors, ctx.x, ctx.y, self.config.batch_size, ctx.generator)
        ctx.charge(seen)
        if not params_finite(grads):
            # Never quantize (or mirror) a poisoned gradient: the server keeps our last Q.
            return Payload(meta={"skip": "nonfinite", "base": ack})
        reset = "Q" not in state
        previous = None if reset else state["Q"]
        base = previous if previous is not None else self._zeros()
        targets = self.targets(grads, previous, ctx.generator)
        quantized = {name: qz.laq_quantize(targets[name], base[name], self.config.bits) for name in self.layout}
        new = {name: q.value for name, q in quantized.items()}
        err2 = sum(float((targets[n] - new[n]).pow(2).sum()) for n in self.layout)
        if self.lazy and not reset and state.get("skips", 0) < MAX_SKIPS:
            innovation = sum(float((new[n] - base[n]).pow(2).sum()) for n in self.layout)
            bound = float(payload.meta.get("lazy_bound", 0.0)) + 3.0 * (err2 + state.get("err2", 0.0))
            if innovation <= bound:
                state["skips"] = state.get("skips", 0) + 1
                return Payload(meta={"skip": "lazy", "base": ack})
        tag = accumulator_tag(new)
        state["pending"] = {"Q": new, "tag": tag, "err2": err2}
        tensors = {name: q.packed for name, q in quantized.items()}
        tensors[RADII] = torch.stack([q.scale for q in quantized.values()]) if quantized else torch.zeros(0)
        return Payload(tensors=tensors, meta={"base": ack, "reset": reset, "tag": tag}, payload_bits=self.upload_bits())

    def client_digest(self, state: dict[str, Any]) -> bytes:
        return state_digest({"Q": state["Q"]}) if "Q" in state else state_digest({})

    def server_digest(self, client: int) -> bytes:
        return state_digest({"Q": self.mirror[client]}) if client in self.mirror else state_digest({})


def _synchronise(state: dict[str, Any], ack: str | None) -> None:
    """Commit, keep or drop the client's accumulator according to the server's ack."""
    pending = state.pop("pending", None)
    if pending is not None and ack is not None and ack == pending["tag"]:
        state["Q"], state["tag"], state["err2"] = pending["Q"], pending["tag"], pending["err2"]
        state["skips"] = 0
    elif "Q" in state and ack is not None and ack == state["tag"]:
        pass
    else:
        for key in ("Q", "tag", "err2", "skips"):
            state.pop(key, None)


def _check_tag(value, who: str, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not _TAG.match(value):
        raise ProtocolError(f"{who}: malformed tag {value!r}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@register
class LAQ(DifferentialQuantized):
    name = "laq"
    lazy = False


@register
class SLAQ(DifferentialQuantized):
    name = "slaq"
    lazy = True
