"""LAQ and SLAQ (Sun, Chen, Giannakis & Yang, "Communication-efficient distributed learning
via lazily aggregated quantized gradients", NeurIPS 2019): lazily aggregated quantized gradients.

Source followed: the paper's Algorithm 1 (LAQ) and its stochastic version (SLAQ, Section 4), and
the authors' code sunjunaimer/LAQ, files ``NeurIPS2019:LAQ/LAQ.py`` and ``NeurIPS2019:LAQ/SLAQ.py``
(both read; SLAQ here is LAQ's rule on a minibatch gradient, see the departures for what
SLAQ.py does differently).

Each client m and the server hold the same quantized accumulator Q_m^{k-1} (per parameter
tensor). Round k:

  1. the server broadcasts w_k (32 bits per value), the model term of the lazy rule
     (``lazy_bound``, one float) and, per client, ``ack``: the tag of its mirror of Q_m (see
     "State synchronisation" below);
  2. client m computes its gradient g_m at w_k: ``laq`` on all its local data (the paper's
     full local gradient; ``batch_size = 0``), ``slaq`` on a minibatch (``batch_size``), plus
     ``l2`` * w_k (the gradient of (l2 / 2) ||w||^2, the authors' ``cl * tf.nn.l2_loss``);
     it quantizes the innovation g_m - Q_m^{k-1} at b bits (:func:`quantizers.laq_quantize`:
     radius R = ||g_m - Q_m^{k-1}||_inf, codes on a 2^b-level grid, |g_m - Q_m^k| <= tau R);
  3. lazy rule (``lazy = true``, the default of both): the client skips the upload when

        ||Q_m^k - Q_m^{k-1}||^2 < (1 / lr^2) * sum_{d=1..D} xi_d ||w_{k+1-d} - w_{k-d}||^2
                                   + 3 (||e_m^k||^2 + ||e_m^{k-1}||^2)

     (paper eq. 7 / the authors' test), e the quantization errors g - Q of this round and of
     the client's last upload; it uploads anyway after ``max_skips`` (t-bar) consecutive
     skips. D = ``lazy_window`` = 10, xi_d = ``lazy_xi`` / D with ``lazy_xi`` = 0.8, t-bar =
     100 (the authors' ``D``, ``ck``, ``C``). The server computes the model term (it holds
     the history) and sends it; a skip is a reply without tensors, counted
     ``skipped_uploads`` at the server (uploads applied: ``quantized_uploads``);
  4. the server rebuilds Q_m^k = Q_m^{k-1} + R * level(code) bit-identically and steps
     w_{k+1} = w_k - lr * mean_m Q_m over every client it holds a mirror of, in client-id
     order. A client that did not upload (skipped, lost, not selected) counts with its last
     Q_m: the "lazy aggregation" of the paper.

``lazy = false`` turns the rule off: every client uploads its quantized innovation every round
(the non-lazy differential quantizer, the paper's "QGD" baseline when ``batch_size = 0``).

Departures from the authors' code, each deliberate:

* step: the authors step alpha on the **sum** of the M clients' Q_m (alpha = 0.02, M = 10);
  ``lr`` here steps on their **mean**, so lr = M alpha (0.2) is the same step, and the rule's
  1 / (alpha^2 M^2) becomes 1 / lr^2;
* radius: one radius per parameter tensor (the authors quantize the whole flattened gradient
  with one radius): a bias is no longer quantized on the scale of the largest weight; it costs
  32 bits per tensor instead of per vector;
* xi in the first D rounds: the authors weight the k model differences available at round
  k <= D by ck / k; so does this module (``lazy_xi`` times the mean of the available ones);
* bits: the authors count b bits per value and no radius; ``payload_bits`` adds the 32-bit
  radius of each tensor (what the wire carries);
* SLAQ: the authors' ``SLAQ.py`` (MNIST, minibatch 500, b = 3, alpha = 0.008 on the sum, L2
  0.01, t-bar ``C`` = 100) uploads when ||dQ||^2 >= (1 / (alpha^2 M^2)) sum_d xi_d ||dw||^2 +
  ec * 3 (e + e_hat) + ade with ec = 0.5 and a constant ade = 0.2: a lighter error term and an
  additive threshold that make it skip more. ``slaq`` here keeps LAQ's rule (weight 3, no
  constant) on its minibatch, whose default is 32 samples, not 500;
* state synchronisation and bad-input handling (below) are this project's: the authors'
  simulation has no faults.

payload_bits (uplink, per upload): sum over parameter tensors of 32 + b * numel (one float32
radius per tensor, as :func:`quantizers.laq_bits`); a skip costs 0 bits. Downlink: 32 bits
per parameter. On the wire each tensor's codes travel as one uint8 frame of
ceil(b * numel / 8) bytes and the radii as one float32 frame.

State synchronisation (content-addressed, so no fault can make the server apply an
innovation to the wrong base):

* a tag is a hash of the accumulator's bytes (16 hex digits of xxh3-128: :func:`base.content_tag`);
* every upload carries ``base`` (the ack it answered: the tag of the server's mirror when the
  request left), ``tag`` (the tag of the client's new Q_m^k) and ``reset``; a skip carries
  ``base`` (the mirror it relied on);
* the server applies an upload only if ``base`` equals its mirror's current tag, and keeps
  the result only if the rebuilt Q hashes to ``tag``; otherwise it counts ``stale_rejected``
  (or ``integrity_rejected``) and changes nothing;
* the client keeps its committed Q (the one the server acknowledged) and one pending Q (its
  last upload). On a request it commits the pending Q if ``ack`` names it, keeps its Q if
  ``ack`` names that, and otherwise (crash: state emptied; a lost or stale exchange; a
  mirror the server forgot) drops both and sends a full, non-differential quantization
  against 0 flagged ``reset`` (still gated on ``base``, so a delayed reset is never applied).
  A client never skips while it has no acknowledged Q (first round, after a reset): its skip
  would leave the server without a mirror;
* the server forgets a mirror not refreshed for ``FORGET_AFTER`` = 30 rounds (a client that
  left stops steering the model); a lazy skip against the current mirror refreshes it. The
  client's next upload after a forget is a reset.

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
from .base import Algorithm, Params, Payload, ProtocolError, check, check_int, content_tag, register, state_digest
from .common import check_like, dense_bits, many_gradients, minibatch_gradient, one_gradient, params_finite

FORGET_AFTER = 30
"""Rounds without an accepted upload after which the server drops a client's mirror."""

_TAG = re.compile(r"^[0-9a-f]{16}$")
RADII = "radii"


def accumulator_tag(q: dict[str, torch.Tensor]) -> str:
    """Content tag of an accumulator (:func:`base.content_tag`)."""
    return content_tag({"Q": q})


class DifferentialQuantized(Algorithm):
    """Mirrored differential quantization of per-client "targets" (LAQ: the gradient
    tensors; QRR: their low-rank factors). Subclasses define the targets and how a gradient
    is rebuilt from them; the protocol, the lazy aggregation and the checks live here."""

    stateful = True

    @dataclass
    class Config(Algorithm.Config):
        bits: int = 8
        """b: bits per quantized value, 1..16."""
        batch_size: int = 32
        """Minibatch size (samples) of each client's gradient; 0 = all local data."""
        lazy: bool = False
        """Apply the lazy skip rule (module docstring, step 3); false: upload every round."""
        lazy_window: int = 10
        """D (rounds): how many recent model differences the lazy rule weighs."""
        lazy_xi: float = 0.8
        """sum_d xi_d of the lazy rule (xi_d = lazy_xi / D; the authors' ``ck``)."""
        max_skips: int = 100
        """t-bar (rounds): consecutive skips after which a client uploads anyway."""
        l2: float = 0.0
        """L2 penalty coefficient: clients add ``l2 * w`` to their gradient (0: none)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_int("bits", self.bits, 1, bitpack.MAX_BITS)
            check_int("batch_size", self.batch_size, 0, note=" (0 = full local batch)")
            check(isinstance(self.lazy, bool), "lazy", self.lazy, "must be true or false")
            check_int("lazy_window", self.lazy_window, 1, note=" (rounds)")
            check(self.lazy_xi >= 0, "lazy_xi", self.lazy_xi, "must be >= 0")
            check_int("max_skips", self.max_skips, 0, note=" (rounds)")
            check(self.l2 >= 0, "l2", self.l2, "must be >= 0")

    def __init__(self, config, model):
        super().__init__(config, model)
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.layout: dict[str, tuple[int, ...]] = self.target_layout()
        self.mirror: dict[int, dict[str, torch.Tensor]] = {}
        self.tags: dict[int, str] = {}
        self.estimate: dict[int, Params] = {}
        self.heard: dict[int, int] = {}
        self.model_steps: collections.deque[float] = collections.deque(maxlen=config.lazy_window)

    # ---- what a subclass defines ------------------------------------------------------------

    def target_layout(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every quantized target, in wire order."""
        return dict(self.shapes)

    def targets(self, grads: Params, previous: dict[str, torch.Tensor] | None,
                generator: torch.Generator, samples: int) -> dict[str, torch.Tensor]:
        """The tensors to quantize for ``grads``, the gradient over ``samples`` samples;
        ``previous`` is the committed accumulator."""
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
        # The authors weigh the k <= D differences of the first rounds by ck / k each:
        # lazy_xi times the mean of the differences available.
        steps = self.model_steps
        lazy_bound = self.config.lazy_xi * (sum(steps) / len(steps) if steps else 0.0) / self.config.lr ** 2

        def request(client: int) -> Payload:
            meta: dict[str, Any] = {"ack": self.tags.get(client)}
            if self.config.lazy:
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
            comm.count("client_nonfinite" if meta["skip"] == "nonfinite" else "skipped_uploads")
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
        names = list(self.layout)
        try:
            new = dict(zip(names, qz.laq_dequantize_many([base[n] for n in names], payload.tensors[RADII],
                                                         [payload.tensors[n] for n in names], self.config.bits)))
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
        comm.count("quantized_uploads")
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

    def client_batch_handlers(self):
        return {"grad": self.on_grad_batch}

    def on_grad(self, ctx, payload: Payload) -> Payload | None:
        return one_gradient(self._on_grad, ctx, payload)

    def on_grad_batch(self, ctxs, payloads) -> list:
        """``on_grad`` for the clients asked at one instant, their gradients stacked."""
        return many_gradients(self._on_grad, ctxs, payloads)

    def _on_grad(self, ctx, payload: Payload):
        check_like(payload, self.params, f"{self.name} model", finite=False)
        ack = payload.meta.get("ack")
        state = ctx.state
        if payload.version is not None:
            if payload.version < state.get("newest", payload.version):
                return None  # a late duplicate of an old request: the server has moved on
            state["newest"] = payload.version
        _synchronise(state, ack)
        grads, seen = yield from minibatch_gradient(payload.tensors, ctx.x, ctx.y, self.config.batch_size,
                                                    ctx.generator, self.config.l2)
        ctx.charge(seen)
        if not params_finite(grads):
            # Never quantize (or mirror) a poisoned gradient: the server keeps our last Q.
            return Payload(meta={"skip": "nonfinite", "base": ack})
        reset = "Q" not in state
        previous = None if reset else state["Q"]
        base = previous if previous is not None else self._zeros()
        targets = self.targets(grads, previous, ctx.generator, seen)
        names = list(self.layout)
        quantized = dict(zip(names, qz.laq_quantize_many([targets[n] for n in names], [base[n] for n in names],
                                                         self.config.bits)))
        new = {name: q.value for name, q in quantized.items()}
        # e = g - Q enters only the lazy rule: without it, nothing reads err2
        err2 = sum(float((targets[n] - new[n]).pow(2).sum()) for n in self.layout) if self.config.lazy else 0.0
        if self.config.lazy and not reset and state.get("skips", 0) < self.config.max_skips:
            innovation = sum(float((new[n] - base[n]).pow(2).sum()) for n in self.layout)
            bound = float(payload.meta.get("lazy_bound", 0.0)) + 3.0 * (err2 + state.get("err2", 0.0))
            if innovation < bound:  # the authors upload when innovation >= bound
                state["skips"] = state.get("skips", 0) + 1
                return Payload(meta={"skip": "lazy", "base": ack})
        tag = accumulator_tag(new)
        state["pending"] = {"Q": new, "tag": tag, "err2": err2}
        tensors = {name: q.packed for name, q in quantized.items()}
        tensors[RADII] = torch.tensor([float(q.scale) for q in quantized.values()], dtype=torch.float32)
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
    """LAQ as published: the full local gradient, the lazy rule on (``lazy = false``: the
    non-lazy differential quantizer)."""

    name = "laq"

    @dataclass
    class Config(DifferentialQuantized.Config):
        batch_size: int = 0
        """Samples of each client's gradient; 0 (default, the paper's LAQ) = all local data."""
        lazy: bool = True
        """The paper's lazy skip rule (module docstring, step 3); false: upload every round."""


@register
class SLAQ(DifferentialQuantized):
    """SLAQ: LAQ's rule on a minibatch gradient (t-bar = 100 as the authors' ``C``)."""

    name = "slaq"

    @dataclass
    class Config(DifferentialQuantized.Config):
        lazy: bool = True
        """The paper's lazy skip rule (module docstring, step 3); false: upload every round."""
