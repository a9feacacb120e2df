"""PowerSGD (Vogels, Karimireddy & Jaggi, NeurIPS 2019), aggregated through a server.

Sources followed: the paper's Algorithm 1 (rank-r power iteration with a warm-started Q and
error feedback), PyTorch's DDP communication hook
(``torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py``: ``min_compression_rate``,
``start_powerSGD_iter``, which layers compress) and the authors' reducer (epfml/powersgd,
``RankKReducer``: memory = gradient + memory - the decompressed **aggregate**). PyTorch's hook
was read for this revision (the version in pytorch/pytorch at commit 00c22ce: ``_should_compress``,
``PowerSGDState``, ``powerSGD_hook``'s error feedback ``error = input - decompressed aggregate``);
the authors' reducer was not re-read line by line.

Each weight with more than one dimension is viewed as a matrix M (shape[0] x rest) and
compressed at rank r = min(``rank``, n, m) when that pays by ``min_compression_rate``, i.e.
(n + m) r * min_compression_rate < n m (PyTorch's test, default 2); vectors and layers where it
does not pay travel uncompressed. A rank larger than a matrix is therefore clamped per layer,
never an error. The first ``start_round`` rounds are an uncompressed warm-up (PyTorch's
``start_powerSGD_iter``): clients upload their raw gradients (message ``warmup``), the server
steps on their mean, and no error is accumulated.

Round k (two round trips, as the paper's all-reduces become gathers at the server):

  1. server broadcasts w_k and the shared warm-start Q (m x r per compressed layer);
  2. client i: M_i = g_i + e_i (error feedback, kept by the client alone), P_i = M_i Q;
     uploads P_i and the uncompressed layers' gradients;
  3. server: P = mean_i P_i, P_hat = orthonormalise(P) (reduced QR); broadcasts P_hat to the
     clients it heard from;
  4. client i: Q_i = M_i^T P_hat, uploads Q_i; its new error (committed only once the server
     confirms it used Q_i) is, by ``error_feedback``:
     * ``aggregated`` (default, as the authors' reducer and PyTorch's hook): e_i = M_i - P_hat Q^T
       with Q the server's aggregate (the client learns it as the next round's warm start);
     * ``own``: e_i = M_i - P_hat Q_i^T, its own contribution. The two are equal only under
       full participation with identical M_i; ``own`` needs no aggregate to be known;
  5. server: Q = mean_i Q_i over the clients of step 4; w_{k+1} = w_k - lr (P_hat Q^T, and
     the mean of the uncompressed gradients of the same clients); Q becomes the next warm start.

State: every party holds the same Q (the server sends it each round; ``client_digest`` /
``server_digest`` digest it). Error feedback is local; a client learns whether its round
counted from ``included`` (the last round whose aggregate used its Q_i) in the next request,
and keeps its residual if so, e = M_i (nothing got through) otherwise. With ``aggregated`` the
aggregate Q is the warm start of the next request; a client that sat out a round in between
cannot tell it from a later aggregate and falls back to its own Q_i for that residual, and a
column of Q the server redrew (below) counts as the zero column it was (``revived`` in meta). A crash
empties e (it restarts from 0). Each reply names what it was computed against by content
(``tag``: hash of the model and Q it received; ``p_tag``: hash of P_hat), so a stale reply is
rejected (``stale_rejected``) even if its version were wrong. A client with a NaN/Inf
gradient answers ``abstain`` (counted ``client_nonfinite``) and keeps its error memory. A
column of Q that collapses to zero is redrawn (seeded) so the warm start never dies.

Departures from the sources:

* a server gathers and averages where the paper all-reduces (same arithmetic);
* ``start_round`` defaults to 0 (no warm-up): PyTorch's ``start_powerSGD_iter`` is 10 in the
  version read (1,000 in later releases) and must be >= 2 with error feedback on;
* the warm-start Q is the previous round's aggregate as it is (the paper's Algorithm 1);
  PyTorch's hook re-orthogonalises the warm-started Q before use; the first Q is standard
  normal here, orthogonalised there;
* P is orthonormalised by a reduced QR here, by Gram-Schmidt with epsilon 1e-8 in PyTorch's
  hook (the same span; column signs may differ, and P̂ Qᵀ does not depend on them);
* PyTorch batches layers into buckets, here every layer is its own;
* a column of Q that collapses to zero is redrawn (seeded), a project addition (below).

payload_bits (uplink, per client per round): 32 (n r + m r) per compressed layer plus 32 per
uncompressed value (phase 1 carries the n r and the uncompressed values, phase 2 the m r);
a warm-up round: 32 per parameter. Downlink: 32 bits per model value and per Q value
(phase 1), per P_hat value (phase 2); a warm-up round: 32 per parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .base import Algorithm, Payload, ProtocolError, check, check_int, register, state_digest
from .common import all_finite, check_like, dense_bits, many_gradients, minibatch_gradient, one_gradient, params_finite
from .laq import accumulator_tag

Q_SEED = 0x5EED


def orthonormalise(p: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``p`` (reduced QR; safe on zero columns)."""
    return torch.linalg.qr(p, mode="reduced").Q


def low_rank_step(m: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One power-iteration compression of M on one worker: (P_hat, Q_new), M ~ P_hat Q_new^T."""
    p_hat = orthonormalise(m @ q)
    return p_hat, m.T @ p_hat


@dataclass
class Plan:
    """How one parameter travels: as an (n x m) matrix at rank r, or raw."""

    shape: tuple[int, ...]
    n: int
    m: int
    rank: int

    @property
    def compressed(self) -> bool:
        return self.rank > 0


@register
class PowerSGD(Algorithm):
    name = "powersgd"
    stateful = True

    @dataclass
    class Config(Algorithm.Config):
        rank: int = 4
        """r: rank of each compressed matrix (clamped to min(n, m) per layer)."""
        batch_size: int = 32
        """Minibatch size (samples) of each client's gradient; 0 = all local data."""
        min_compression_rate: float = 2.0
        """Compress a layer only if (n + m) r * this < n m (PyTorch's default 2)."""
        start_round: int = 0
        """Rounds of uncompressed warm-up before compression starts (PyTorch's
        ``start_powerSGD_iter``, counted in rounds); 0: compress from the first round."""
        error_feedback: str = "aggregated"
        """Residual a client keeps: ``aggregated`` (M_i - P_hat Q^T, the authors' and PyTorch's)
        or ``own`` (M_i - P_hat Q_i^T)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_int("rank", self.rank, 1)
            check_int("batch_size", self.batch_size, 0, note=" (0 = full local batch)")
            check(isinstance(self.min_compression_rate, (int, float)) and self.min_compression_rate >= 1,
                  "min_compression_rate", self.min_compression_rate, "must be a number >= 1")
            check_int("start_round", self.start_round, 0, note=" (rounds)")
            check(self.error_feedback in ("aggregated", "own"), "error_feedback", self.error_feedback,
                  'must be "aggregated" or "own"')

    def __init__(self, config, model):
        super().__init__(config, model)
        self.plans: dict[str, Plan] = {}
        for name, t in self.params.items():
            shape = tuple(t.shape)
            if len(shape) >= 2:
                n, m = shape[0], math.prod(shape[1:])
                r = min(config.rank, n, m)
                if (n + m) * r * config.min_compression_rate < n * m:
                    self.plans[name] = Plan(shape, n, m, r)
                    continue
            self.plans[name] = Plan(shape, 0, 0, 0)
        self.compressed = [k for k, p in self.plans.items() if p.compressed]
        self.raw = [k for k, p in self.plans.items() if not p.compressed]
        self.Q: dict[str, torch.Tensor] = {k: self._fresh_q(k, 0) for k in self.compressed}
        self.included: dict[int, int] = {}
        self.revived: dict[str, list[int]] = {}
        """Columns of Q redrawn after the last aggregation (zero columns of the aggregate)."""

    def _fresh_q(self, name: str, salt: int) -> torch.Tensor:
        plan = self.plans[name]
        g = torch.Generator().manual_seed(Q_SEED + 7919 * self.compressed.index(name) + 104729 * salt)
        return torch.randn(plan.m, plan.rank, generator=g)

    # ---- encoding of P_i, Q_i and raw gradients (LQ-SGD overrides) -----------------------------

    def encode(self, values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """(wire tensors, values as the server will decode them, payload bits)."""
        return dict(values), dict(values), 32 * sum(v.numel() for v in values.values())

    def decode(self, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        return {k: tensors[k] for k in shapes}

    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (torch.float32, s) for k, s in shapes.items()}

    def _p_shapes(self) -> dict[str, tuple[int, ...]]:
        out = {f"P:{k}": (self.plans[k].n, self.plans[k].rank) for k in self.compressed}
        out.update({f"G:{k}": self.plans[k].shape for k in self.raw})
        return out

    def _q_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"Q:{k}": (self.plans[k].m, self.plans[k].rank) for k in self.compressed}

    # ---- server ----------------------------------------------------------------------------

    def _round_tag(self) -> str:
        return accumulator_tag({**{f"w:{k}": v for k, v in self.params.items()}, **{f"Q:{k}": v for k, v in self.Q.items()}})

    def _accepted(self, comm, replies, tag_key: str, tag: str, shapes, abstain_counter: str
                  ) -> dict[int, dict[str, torch.Tensor]]:
        """The replies of one phase computed against ``tag`` (the state this phase sent),
        decoded; abstentions, stale tags and undecodable replies are counted and left out."""
        accepted: dict[int, dict[str, torch.Tensor]] = {}
        for c, reply in replies.items():
            if "abstain" in reply.payload.meta:
                comm.count(abstain_counter)
            elif reply.payload.meta[tag_key] != tag:
                comm.count("stale_rejected")
            else:
                try:
                    accepted[c] = self.decode(reply.payload.tensors, shapes)
                except ProtocolError as exc:
                    comm.count("rejected")
                    comm.log("rejected", client=c, reason=str(exc))
        return accepted

    async def server_round(self, comm) -> None:
        r = comm.round
        if r < self.config.start_round:
            await self._warmup_round(comm, r)
            return
        tag = self._round_tag()
        q_bits = 32 * sum(q.numel() for q in self.Q.values())
        tensors = {**self.params, **{f"Q:{k}": v for k, v in self.Q.items()}}
        revived = {k: cols for k, cols in self.revived.items() if cols}

        def request(client: int) -> Payload:
            meta: dict[str, Any] = {"included": self.included.get(client, -1)}
            if revived:
                meta["revived"] = revived
            return Payload(tensors=tensors, meta=meta, payload_bits=dense_bits(self.params) + q_bits)

        await comm.broadcast("p", request, version=r)
        first = await comm.gather("p", version=r)
        heard = self._accepted(comm, first, "tag", tag, self._p_shapes(), "client_nonfinite")
        if not heard:
            return
        p_hat = {}
        for k in self.compressed:
            p_hat[k] = orthonormalise(_mean([heard[c][f"P:{k}"] for c in sorted(heard)]))
        p_tag = accumulator_tag(p_hat)
        await comm.broadcast("q", Payload(tensors={f"P:{k}": v for k, v in p_hat.items()}, meta={"p_tag": p_tag},
                                          payload_bits=32 * sum(v.numel() for v in p_hat.values())),
                             version=r, to=sorted(heard))
        second = await comm.gather("q", version=r, clients=sorted(heard))
        done = self._accepted(comm, {c: r for c, r in second.items() if c in heard}, "p_tag", p_tag,
                              self._q_shapes(), "client_abstained")
        if not done:
            return
        clients = sorted(done)
        self.revived = {}
        for k in self.compressed:
            q_mean = _mean([done[c][f"Q:{k}"] for c in clients])
            update = (p_hat[k] @ q_mean.T).reshape(self.plans[k].shape)
            self.params[k] = self.params[k] - self.config.lr * update
            self.Q[k] = self._revive(k, q_mean, r)
        for k in self.raw:
            self.params[k] = self.params[k] - self.config.lr * _mean([heard[c][f"G:{k}"] for c in clients])
        for c in clients:
            self.included[c] = r

    def _revive(self, name: str, q: torch.Tensor, r: int) -> torch.Tensor:
        dead = q.norm(dim=0) <= 1e-12
        if bool(dead.any()):
            q = torch.where(dead[None, :], self._fresh_q(name, r + 1), q)
            self.revived[name] = [int(i) for i in torch.nonzero(dead).flatten()]
        return q.contiguous()

    async def _warmup_round(self, comm, r: int) -> None:
        """An uncompressed round: raw gradients up, their mean applied (no error feedback)."""
        await comm.broadcast("warmup", Payload(tensors=self.params, payload_bits=dense_bits(self.params)), version=r)
        replies = await comm.gather("warmup", version=r)
        grads = {c: reply.payload.tensors for c, reply in replies.items() if "abstain" not in reply.payload.meta}
        if len(grads) < len(replies):
            comm.count("client_nonfinite", len(replies) - len(grads))
        if not grads:
            return
        for k in self.params:
            self.params[k] = self.params[k] - self.config.lr * _mean([grads[c][k] for c in sorted(grads)])

    def check_reply(self, kind: str, payload: Payload) -> None:
        who = f"{self.name} {kind}"
        if kind not in ("p", "q", "warmup"):
            raise ProtocolError(f"{who}: unexpected message kind")
        meta = payload.meta
        if "abstain" in meta:
            if set(meta) != {"abstain"} or not isinstance(meta["abstain"], str) or payload.tensors:
                raise ProtocolError(f"{who}: malformed abstain")
            return
        if kind == "warmup":
            if meta:
                raise ProtocolError(f"{who}: unexpected fields {sorted(meta)}")
            check_like(payload, self.params, who)
            return
        key = "tag" if kind == "p" else "p_tag"
        if set(meta) != {key} or not isinstance(meta[key], str):
            raise ProtocolError(f"{who}: fields {sorted(meta)} are not [{key!r}]")
        spec = self.wire_spec(self._p_shapes() if kind == "p" else self._q_shapes())
        if set(payload.tensors) != set(spec):
            raise ProtocolError(f"{who}: tensors {sorted(payload.tensors)} are not {sorted(spec)}")
        for name, (dtype, shape) in spec.items():
            t = payload.tensors[name]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ProtocolError(f"{who}: {name!r} is {t.dtype}{tuple(t.shape)}, expected {dtype}{tuple(shape)}")
            if not all_finite(t):
                raise ProtocolError(f"{who}: {name!r} holds NaN or Inf")
            if name.startswith("scale") and bool((t < 0).any()):
                raise ProtocolError(f"{who}: negative scale")

    # ---- client ----------------------------------------------------------------------------

    def client_handlers(self):
        return {"p": self.on_p, "q": self.on_q, "warmup": self.on_warmup}

    def client_batch_handlers(self):
        return {"p": self.on_p_batch, "warmup": self.on_warmup_batch}

    def on_warmup(self, ctx, payload: Payload) -> Payload | None:
        return one_gradient(self._on_warmup, ctx, payload)

    def on_warmup_batch(self, ctxs, payloads) -> list:
        return many_gradients(self._on_warmup, ctxs, payloads)

    def on_p(self, ctx, payload: Payload) -> Payload | None:
        return one_gradient(self._on_p, ctx, payload)

    def on_p_batch(self, ctxs, payloads) -> list:
        """``on_p`` for the clients asked at one instant, their gradients stacked."""
        return many_gradients(self._on_p, ctxs, payloads)

    def _on_warmup(self, ctx, payload: Payload):
        if not _fresh(ctx.state, payload.version):
            return None
        check_like(payload, self.params, f"{self.name} model", finite=False)
        grads, seen = yield from minibatch_gradient(payload.tensors, ctx.x, ctx.y, self.config.batch_size, ctx.generator)
        ctx.charge(seen)
        if not params_finite(grads):
            return Payload(meta={"abstain": "nonfinite"})
        return Payload(tensors=grads, payload_bits=dense_bits(grads))

    def _on_p(self, ctx, payload: Payload):
        if not _fresh(ctx.state, payload.version):
            return None
        model = {k: payload.tensors[k] for k in self.params if k in payload.tensors}
        check_like(Payload(tensors=model), self.params, f"{self.name} model", finite=False)
        q = {k: payload.tensors.get(f"Q:{k}") for k in self.compressed}
        for k, t in q.items():
            plan = self.plans[k]
            if t is None or tuple(t.shape) != (plan.m, plan.rank) or not all_finite(t):
                raise ProtocolError(f"{self.name} request: bad warm start for {k!r}")
        state = ctx.state
        self._settle_error(state, payload.meta.get("included"), payload.version, q, payload.meta.get("revived"))
        state["Q"] = q
        grads, seen = yield from minibatch_gradient(model, ctx.x, ctx.y, self.config.batch_size, ctx.generator)
        ctx.charge(seen)
        if not params_finite(grads):
            state.pop("M", None)
            return Payload(meta={"abstain": "nonfinite"})
        error = state.get("e", {})
        mats = {k: (grads[k] + error[k]) if k in error else grads[k].clone() for k in self.params}
        values = {f"P:{k}": mats[k].reshape(self.plans[k].n, self.plans[k].m) @ q[k] for k in self.compressed}
        values.update({f"G:{k}": mats[k] for k in self.raw})
        wire, seen_by_server, bits = self.encode(values)
        raw_error = {k: mats[k] - seen_by_server[f"G:{k}"] for k in self.raw}
        state["M"] = {"version": payload.version, "mats": mats, "raw_error": raw_error}
        tag = accumulator_tag({**{f"w:{k}": v for k, v in model.items()}, **{f"Q:{k}": v for k, v in q.items()}})
        return Payload(tensors=wire, meta={"tag": tag}, payload_bits=bits)

    def on_q(self, ctx, payload: Payload) -> Payload | None:
        if not _fresh(ctx.state, payload.version):
            return None
        state = ctx.state
        pending = state.get("M")
        if pending is None or pending["version"] != payload.version:
            return Payload(meta={"abstain": "no phase-1 state"})
        p_hat = {}
        for k in self.compressed:
            t = payload.tensors.get(f"P:{k}")
            plan = self.plans[k]
            if t is None or tuple(t.shape) != (plan.n, plan.rank) or not all_finite(t):
                raise ProtocolError(f"{self.name} request: bad P for {k!r}")
            p_hat[k] = t
        mats = pending["mats"]
        values = {f"Q:{k}": mats[k].reshape(self.plans[k].n, self.plans[k].m).T @ p_hat[k] for k in self.compressed}
        wire, seen_by_server, bits = self.encode(values)
        after = dict(pending["raw_error"])
        for k in self.compressed:
            approx = p_hat[k] @ seen_by_server[f"Q:{k}"].T
            after[k] = mats[k] - approx.reshape(self.plans[k].shape)
        state["e_pending"] = {"version": payload.version, "after": after, "before": mats, "p_hat": p_hat,
                              "raw_error": pending["raw_error"]}
        return Payload(tensors=wire, meta={"p_tag": payload.meta.get("p_tag")}, payload_bits=bits)

    def _settle_error(self, state: dict[str, Any], included, version, q_agg: dict[str, torch.Tensor],
                      revived) -> None:
        """Error feedback: keep the residual of a round the server used, else all of M.

        With ``aggregated`` the residual is taken against the aggregate Q, which this request
        carries as its warm start when it directly follows the client's round."""
        pending = state.pop("e_pending", None)
        state.pop("M", None)
        if pending is None:
            return
        used = isinstance(included, int) and included == pending["version"]
        if not used:
            state["e"] = pending["before"]
            return
        follows = isinstance(version, int) and version == pending["version"] + 1
        if self.config.error_feedback == "own" or not follows:
            state["e"] = pending["after"]
            return
        after = dict(pending["raw_error"])
        mats = pending["before"]
        for k in self.compressed:
            q = q_agg[k]
            cols = (revived or {}).get(k) if isinstance(revived, dict) else None
            if cols:
                # the server redrew these columns of a (numerically) zero aggregate
                q = q.clone()
                q[:, [c for c in cols if isinstance(c, int) and 0 <= c < q.shape[1]]] = 0.0
            approx = pending["p_hat"][k] @ q.T
            after[k] = mats[k] - approx.reshape(self.plans[k].shape)
        state["e"] = after

    def client_digest(self, state: dict[str, Any]) -> bytes:
        return state_digest({"Q": state["Q"]}) if "Q" in state else state_digest({})

    def server_digest(self, client: int) -> bytes:
        return state_digest({"Q": self.Q})


def _fresh(state: dict[str, Any], version: int | None) -> bool:
    """False for a request older than one this client already handled (a late duplicate):
    the server has moved on, so answering it would only cost bits and disturb our state."""
    newest = state.get("newest")
    if version is not None and newest is not None and version < newest:
        return False
    if version is not None:
        state["newest"] = version
    return True


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t in tensors:
        out.add_(t, alpha=1.0 / len(tensors))
    return out
