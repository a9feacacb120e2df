"""FeDLRT: federated dynamical low-rank training (Schotthöfer & Laiu, arXiv 2406.17887).

Source followed: the paper's algorithm (basis broadcast, augmentation with the averaged basis
gradients, coefficient training with full / simplified / no variance correction, truncation),
as this module's first version transcribed it. For this revision only the paper's abstract
could be read from here (no authors' code was found in the index), so two things are not
checked against the paper's text: its descent theorem's exact step bound (the test's
λ = 1/(12 L s) in tests/test_fedlrt.py is the project's own choice of the bound's form
λ ≲ 1/(L s)) and its exact truncation criterion (here the relative tail
||σ[r1:]||₂ <= θ ||σ||₂). Departures known: only ``nn.Linear`` weights are factorised
(``keep_last_dense`` keeps the head dense, a project choice); the default is the full variance
correction, the variant the paper's descent guarantee covers.

Every factorised layer (the 2-D weights of the model's ``nn.Linear`` layers; all of them, or
all but the classifier head with ``keep_last_dense``) is W = U S Vᵀ with a basis U (n×r),
V (m×r) of orthonormal columns shared by all clients and a small coefficient matrix S (r×r).
Clients train only coefficients. Round t, as the paper's algorithm runs it:

1. ``basis``: the server broadcasts U, S, V (and the dense parameters). Each client returns
   its basis gradients G_U,c = ∇_U L_c, G_V,c = ∇_V L_c at U S Vᵀ (full local data).
2. ``augment``: the server averages them (sample-weighted), augments the basis
   Ū = orth([U | G_U]) = [U | Ũ], V̄ = [V | Ṽ] (rank r → 2r, capped by the layer size) and
   broadcasts the new columns Ũ, Ṽ. Each client starts from S̃ = [[S, 0], [0, 0]].
3. variance correction (``variance_correction``):
   * ``full``: each client returns ∇_S̃ L_c at the start point; the server broadcasts the
     average ∇_S̃ L (``correction``); each client then takes ``local_steps`` steps
     S̃ ← S̃ − λ(∇_S̃ L_c(S̃) + ∇_S̃ L − ∇_S̃ L_c(S̃⁰)), which bounds client drift;
   * ``simplified``: clients send ∇_S L_c (r×r, the non-augmented block) with their basis
     gradients in step 1; the server sends the average with the augmentation; the correction
     acts on that block only, and no extra round trip is needed;
   * ``none``: plain local steps.
   Dense (non-factorised) parameters train alongside S̃ with the same correction.
4. clients return S̃_c (and dense deltas); the server averages them, computes
   P Σ Qᵀ = svd(S̃) and keeps the smallest rank r₁ whose discarded tail satisfies
   ||σ[r₁:]||₂ <= θ ||σ||₂ (``tolerance``): U ← Ū P_r₁, V ← V̄ Q_r₁, S ← Σ_r₁. The rank thus
   adapts up (augmentation) and down (truncation).

Layers that are not factorised (biases, dense heads) travel as FedAvg's deltas would.

State synchronisation: every message carries the basis version v (one per round). A client
keeps the basis it was sent for round v (``ctx.state["shared"]``) and only trains on it
when a later message of the round names the same v. A message of an older round than one it
handled is ignored; for a newer round whose basis it lacks (its ``basis`` was lost, or it
crashed) it drops its shared state and replies ``refused`` with version -1, which
``gather(version=v)`` rejects and counts. A late reply computed on an older basis is
rejected the same way. ``client_digest``/``server_digest`` hash that shared basis (version,
U, S, V, dense, then Ũ, Ṽ); the server's mirror moves when it builds a message.

Bits per client and round (float32: 32 bits per value). Sums run over factorised layers
(n×m, rank r at the round's start, k_U = min(r, n − r), k_V = min(r, m − r),
a_U = r + k_U, a_V = r + k_V); D is the number of dense (non-factorised) parameter values.

downlink:
  ``basis``       32·[Σ (n·r + r² + m·r) + D]
  ``augment``     32·Σ (n·k_U + m·k_V)         (+ 32·[Σ r² + D] with ``simplified``: ∇_S L, dense gradient)
  ``correction``  32·[Σ a_U·a_V + D]            (``full`` only: ∇_S̃ L and the dense gradient)
uplink:
  basis gradients      32·Σ (n·r + m·r)        (+ 32·[Σ r² + D] with ``simplified``: ∇_S L_c, dense gradient)
  coefficient grads    32·[Σ a_U·a_V + D]      (``full`` only, reply to ``augment``)
  coefficients         32·[Σ a_U·a_V + D]      (reply to ``augment``, or to ``correction`` with ``full``)
A refused (stale) reply carries no tensors: 0 bits.

Settings: the ``Config`` defaults are those of Fashion-MNIST 784-200-10 (10 clients). For the
digits MLP 64-512-512-10 (10 clients of ~144 samples) use ``local_steps = 24``, ``lr = 0.3``,
``tolerance = 0.05`` (30 rounds: 0.969 against FedAvg's 0.983 at the same lr and 24 steps,
6.9x fewer uplink bytes); a 64-64-10 MLP cannot reach 5x: the basis gradients alone cost
2·64·r per layer, and the 10-class head is too narrow to factorise.

Scenario keys (``[algorithm]``): ``rank`` (initial rank of every factorised layer),
``tolerance`` (θ), ``local_steps`` (s), ``variance_correction``, ``lr`` (client step λ),
``batch_size`` (0: full local data), ``max_rank`` (0: the layer size), ``keep_last_dense``,
``loss`` (``cross_entropy`` | ``mse``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping

import torch

from .base import Algorithm, Params, Payload, ProtocolError, check, check_int, register, state_digest
from .local_training import LocalSteps, Training, many_trainings, one_training
from .lowrank import (LOSSES, Factors, augment_basis, check_rank_fits, expect_tensors, float_bits,
                      linear_weights, loss_and_grads, mean_by, pad_coefficients,
                      positive_samples, svd_factors, truncate)

VARIANCE_CORRECTIONS = ("full", "simplified", "none")


@dataclass
class _Round:
    """What the server holds during one round: the augmented basis and the replies it expects."""

    version: int
    U_aug: dict[str, torch.Tensor] = field(default_factory=dict)
    V_aug: dict[str, torch.Tensor] = field(default_factory=dict)
    expect: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)


@register
class FeDLRT(Algorithm):
    name = "fedlrt"
    stateful = True
    statesync_config = {"rank": 2, "local_steps": 2}
    """Small settings for the shared state-sync harness (tests/statesync.py)."""

    @dataclass
    class Config(Algorithm.Config):
        """Defaults: the settings that meet the issue's target on Fashion-MNIST (784-200-10,
        10 IID clients): 0.850 test accuracy after 20 rounds against FedAvg's 0.866, with 7.2x
        fewer uplink bytes. A digits MLP needs fewer local steps (see the module docstring)."""

        lr: float = 0.2
        """Client step λ on the coefficients (and dense parameters)."""
        rank: int = 16
        """Initial rank r of every factorised layer (1 <= r <= min(n, m))."""
        tolerance: float = 0.1
        """θ in (0, 1): truncation keeps the fewest singular values whose discarded tail has
        2-norm <= θ times the 2-norm of all of them (relative to the coefficient matrix)."""
        local_steps: int = 188
        """s: client gradient steps on the coefficients per round (188 x 32 samples: one
        epoch of a Fashion-MNIST client of 6,000)."""
        variance_correction: str = "full"
        """``full`` (default) | ``simplified`` | ``none`` (see the module docstring). The
        paper's descent guarantee rests on the full correction (step λ of order 1/(L·s));
        ``simplified`` is its cheaper variant (no extra round trip). Far beyond the
        bound (many local steps at a large ``lr`` on label-skewed clients) the constant
        correction can push along directions the local loss does not curve in (measured
        with ``full``: Fashion-MNIST 784-200-10, 10 Dirichlet(0.5) clients, lr 0.2, 30 steps,
        rank 16: 0.52 test accuracy, 0.77 with ``none`` after 6 rounds)."""
        batch_size: int = 32
        """Samples per local step; 0 uses the client's full local data (gradient descent)."""
        max_rank: int = 0
        """Upper bound on every layer's rank after truncation; 0: the layer size."""
        keep_last_dense: bool = True
        """Leave the last Linear layer dense (it then travels as FedAvg's deltas): the basis
        gradients of a 10-class head cost (10 + hidden)·r, more than its dense delta."""
        loss: str = "cross_entropy"
        """Client objective: ``cross_entropy`` | ``mse`` (see ``lowrank.LOSSES``)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_int("rank", self.rank, 1)
            check(0 < self.tolerance < 1, "tolerance", self.tolerance, "must be in (0, 1)")
            check(isinstance(self.local_steps, int) and self.local_steps >= 1, "local_steps", self.local_steps,
                  "must be an integer >= 1")
            check(self.variance_correction in VARIANCE_CORRECTIONS, "variance_correction", self.variance_correction,
                  f"must be one of {', '.join(VARIANCE_CORRECTIONS)}")
            check_int("batch_size", self.batch_size, 0, note=" (0: full local data)")
            check(isinstance(self.max_rank, int) and (self.max_rank == 0 or self.max_rank >= self.rank),
                  "max_rank", self.max_rank, f"must be 0 (no cap) or >= rank ({self.rank})")
            check(self.loss in LOSSES, "loss", self.loss, f"must be one of {', '.join(LOSSES)}")

    def __init__(self, config: "FeDLRT.Config", model: torch.nn.Module):
        super().__init__(config, model)
        self.factorised = linear_weights(model, config.keep_last_dense)
        check_rank_fits(self.factorised, self.params, config.rank)
        self.dense_names = [k for k in self.params if k not in self.factorised]
        self.layers: dict[str, Factors] = {k: svd_factors(self.params[k], config.rank) for k in self.factorised}
        self.dense: Params = {k: self.params[k].clone() for k in self.dense_names}
        self.rank_cap = {k: min(*self.params[k].shape, config.max_rank or 1 << 30) for k in self.factorised}
        self.version = 0
        self._round: _Round | None = None
        # Mirror of what each client shares with us: (version, stage) -> digest.
        self._client_stage: dict[int, tuple[int, str]] = {}
        self._digests: dict[tuple[int, str], bytes] = {}
        self.params = self.model_params()

    # ------------------------------------------------------------------ server

    def model_params(self) -> Params:
        return {k: (self.layers[k].dense() if k in self.layers else self.dense[k]) for k in self.params}

    @property
    def ranks(self) -> dict[str, int]:
        """Current rank of every factorised layer."""
        return {k: f.rank for k, f in self.layers.items()}

    async def server_round(self, comm) -> None:
        cfg = self.config
        simplified, full = cfg.variance_correction == "simplified", cfg.variance_correction == "full"
        self.version += 1
        v = self.version
        rnd = self._round = _Round(v)

        # 1. broadcast the basis; clients answer with basis gradients.
        shared: dict[str, Any] = {"version": v, **self._basis_tensors()}
        basis = {k: t for k, t in shared.items() if k != "version"}
        rnd.expect["basis"] = self._basis_grad_shapes(simplified)
        # The mirror moves when a message is built: it is what the client holds once it handles it.
        self._mirror(comm.participants, v, "basis", shared)
        await comm.broadcast("basis", Payload(basis, payload_bits=float_bits(basis)), version=v)
        replies = await comm.gather("basis", version=v)
        if not replies:
            comm.count("fedlrt_rounds_without_replies")
            return

        # 2. augment the basis with the averaged basis gradients.
        w = [float(r.payload.meta["samples"]) for r in replies.values()]
        augment: Params = {}
        for k, f in self.layers.items():
            rnd.U_aug[k] = torch.cat([f.U, augment_basis(f.U, mean_by(replies, f"{k}.GU", w))], dim=1)
            rnd.V_aug[k] = torch.cat([f.V, augment_basis(f.V, mean_by(replies, f"{k}.GV", w))], dim=1)
            augment[f"{k}.Ua"] = rnd.U_aug[k][:, f.rank:].contiguous()
            augment[f"{k}.Va"] = rnd.V_aug[k][:, f.rank:].contiguous()
        shared = {**shared, **augment}
        if simplified:
            augment.update(self._mean_grads(replies, w, [f"{k}.GS" for k in self.layers]))
        coefficients = self._coefficient_shapes(".S", ".delta")
        rnd.expect["augment"] = self._coefficient_shapes(".GS", ".grad") if full else coefficients
        to = list(replies)
        self._mirror(to, v, "augment", shared)
        await comm.broadcast("augment", Payload(augment, payload_bits=float_bits(augment)), version=v, to=to)
        replies = await comm.gather("augment", version=v)

        # 3. full variance correction: average the coefficient gradients at the start point.
        if full and replies:
            w = [float(r.payload.meta["samples"]) for r in replies.values()]
            correction = self._mean_grads(replies, w, [f"{k}.GS" for k in self.layers])
            rnd.expect["correction"] = coefficients
            await comm.broadcast("correction", Payload(correction, payload_bits=float_bits(correction)),
                                 version=v, to=list(replies))
            replies = await comm.gather("correction", version=v)
        if not replies:
            comm.count("fedlrt_rounds_without_replies")
            return

        # 4. average the coefficients, truncate, update basis and coefficients.
        w = [float(r.payload.meta["samples"]) for r in replies.values()]
        for k in self.factorised:
            S_aug = mean_by(replies, f"{k}.S", w)
            self.layers[k] = truncate(rnd.U_aug[k], S_aug, rnd.V_aug[k], cfg.tolerance, self.rank_cap[k])
        for k in self.dense_names:
            self.dense[k] = self.dense[k] + mean_by(replies, f"{k}.delta", w)
        self.params = self.model_params()
        comm.log("fedlrt_truncate", version=v, ranks=self.ranks, clients=len(replies))

    def _basis_tensors(self) -> Params:
        out: Params = {}
        for k, f in self.layers.items():
            out[f"{k}.U"], out[f"{k}.S"], out[f"{k}.V"] = f.U, f.S, f.V
        out.update(self.dense)
        return out

    def _basis_grad_shapes(self, simplified: bool) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for k, f in self.layers.items():
            shapes[f"{k}.GU"], shapes[f"{k}.GV"] = tuple(f.U.shape), tuple(f.V.shape)
            if simplified:
                shapes[f"{k}.GS"] = tuple(f.S.shape)
        if simplified:
            shapes.update({f"{k}.grad": tuple(self.dense[k].shape) for k in self.dense_names})
        return shapes

    def _coefficient_shapes(self, suffix: str, dense_suffix: str) -> dict[str, tuple[int, ...]]:
        rnd = self._round
        shapes = {f"{k}{suffix}": (rnd.U_aug[k].shape[1], rnd.V_aug[k].shape[1]) for k in self.factorised}
        shapes.update({f"{k}{dense_suffix}": tuple(self.dense[k].shape) for k in self.dense_names})
        return shapes

    def _mean_grads(self, replies, w: list[float], coefficient_keys: list[str]) -> Params:
        keys = coefficient_keys + [f"{k}.grad" for k in self.dense_names]
        return {key: mean_by(replies, key, w) for key in keys}

    def check_reply(self, kind: str, payload: Payload) -> None:
        rnd = self._round
        if rnd is None or kind not in rnd.expect:
            raise ProtocolError(f"fedlrt: unexpected reply kind {kind!r}")
        if set(payload.meta) != {"samples"}:
            raise ProtocolError(f"fedlrt {kind} reply: meta fields {sorted(payload.meta)}, expected ['samples']")
        expect_tensors(payload, rnd.expect[kind], f"fedlrt {kind} reply")
        positive_samples(payload, f"fedlrt {kind} reply")

    # ------------------------------------------------------------------ state digests

    def _mirror(self, clients: list[int], version: int, stage: str, shared: dict[str, Any]) -> None:
        self._digests[(version, stage)] = state_digest(shared)
        for c in clients:
            self._client_stage[c] = (version, stage)
        live = set(self._client_stage.values())
        for key in [key for key in self._digests if key not in live]:
            del self._digests[key]

    def client_digest(self, state: dict[str, Any]) -> bytes:
        return state_digest(state.get("shared", {}))

    def server_digest(self, client: int) -> bytes:
        stage = self._client_stage.get(client)
        return state_digest({}) if stage is None else self._digests[stage]

    # ------------------------------------------------------------------ client

    def client_handlers(self):
        return {"basis": self.on_basis, "augment": self.on_augment, "correction": self.on_correction}

    def client_batch_handlers(self):
        """The two kinds that train (``local_steps`` on S̃), for the clients of an instant
        together (:mod:`algorithms.local_training`)."""
        return {"augment": self.on_augment_batch, "correction": self.on_correction_batch}

    def on_augment(self, ctx, payload: Payload) -> Payload | None:
        return one_training(self._on_augment, ctx, payload)

    def on_augment_batch(self, ctxs, payloads) -> list:
        return many_trainings(self._on_augment, ctxs, payloads)

    def on_correction(self, ctx, payload: Payload) -> Payload | None:
        return one_training(self._on_correction, ctx, payload)

    def on_correction_batch(self, ctxs, payloads) -> list:
        return many_trainings(self._on_correction, ctxs, payloads)

    def _compose(self, basis: Mapping[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> Params:
        """Named model parameters from coefficients ``<k>.S`` (and dense leaves) in the fixed
        basis ``<k>.U``, ``<k>.V`` (the leaves may be stacked along a first dimension of clients)."""
        return {k: (basis[f"{k}.U"] @ leaves[f"{k}.S"] @ basis[f"{k}.V"].T if f"{k}.U" in basis else leaves[k])
                for k in self.params}

    def _basis(self, U: dict[str, torch.Tensor], V: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**{f"{k}.U": u for k, u in U.items()}, **{f"{k}.V": v for k, v in V.items()}}

    def on_basis(self, ctx, payload: Payload) -> Payload | None:
        cfg = self.config
        if payload.version < ctx.state.get("newest", payload.version):
            return None  # a late message of an older round: ignored, the state stays
        shapes: dict[str, tuple[int, ...]] = {}
        for k in self.factorised:
            r = payload.tensors[f"{k}.S"].shape[0] if f"{k}.S" in payload.tensors else -1
            n, m = self.params[k].shape
            shapes.update({f"{k}.U": (n, r), f"{k}.S": (r, r), f"{k}.V": (m, r)})
        shapes.update({k: tuple(self.params[k].shape) for k in self.dense_names})
        expect_tensors(payload, shapes, "fedlrt basis")
        t = payload.tensors
        ctx.state["shared"] = {"version": payload.version, **t}
        ctx.state["newest"] = payload.version
        ctx.state.pop("private", None)

        # Gradients w.r.t. every factor at W = U S Vᵀ, on the full local data.
        def build(leaves: dict[str, torch.Tensor]) -> Params:
            return {k: (leaves[f"{k}.U"] @ leaves[f"{k}.S"] @ leaves[f"{k}.V"].T if k in self.factorised
                        else leaves[k]) for k in self.params}
        _, grads = loss_and_grads(ctx.model, build, dict(t), ctx.x, ctx.y, cfg.loss)
        ctx.charge(len(ctx.x))
        out = {}
        for k in self.factorised:
            out[f"{k}.GU"], out[f"{k}.GV"] = grads[f"{k}.U"], grads[f"{k}.V"]
        if cfg.variance_correction == "simplified":
            local = {f"{k}.GS": grads[f"{k}.S"] for k in self.factorised}
            local.update({f"{k}.grad": grads[k] for k in self.dense_names})
            ctx.state["private"] = {"start_grads": local}
            out.update(local)
        return Payload(out, meta={"samples": len(ctx.x)}, payload_bits=float_bits(out), version=payload.version)

    def _holds_round(self, ctx, payload: Payload, shared_keys: list[str], private: bool) -> bool:
        """Whether the client holds round ``payload.version``'s basis (and what the step needs)."""
        shared = ctx.state.get("shared")
        return (shared is not None and shared["version"] == payload.version
                and all(key in shared for key in shared_keys)
                and (not private or "start_grads" in ctx.state.get("private", {})))

    def _refuse(self, ctx, payload: Payload) -> Payload | None:
        """The answer of a client that does not hold the round's basis: it never trains.

        A message older than one it handled is ignored (no reply, state unchanged). For a
        newer one it drops its shared state (the next ``basis`` resends it) and replies
        ``refused`` with version -1, which ``gather(version=...)`` rejects and counts.
        """
        if payload.version < ctx.state.get("newest", payload.version):
            return None
        held = ctx.state.get("shared", {}).get("version", -1)
        ctx.state["newest"] = payload.version
        ctx.state.pop("shared", None)
        ctx.state.pop("private", None)
        return Payload(meta={"samples": len(ctx.x), "refused": True, "held_version": held}, payload_bits=0,
                       version=-1)

    def _start(self, shared: dict[str, Any]) -> tuple[dict, dict, dict[str, torch.Tensor]]:
        """Augmented basis Ū, V̄ and the start point S̃ = [[S, 0], [0, 0]] (plus dense values)."""
        U = {k: torch.cat([shared[f"{k}.U"], shared[f"{k}.Ua"]], dim=1) for k in self.factorised}
        V = {k: torch.cat([shared[f"{k}.V"], shared[f"{k}.Va"]], dim=1) for k in self.factorised}
        leaves = {f"{k}.S": pad_coefficients(shared[f"{k}.S"], U[k].shape[1], V[k].shape[1]) for k in self.factorised}
        leaves.update({k: shared[k] for k in self.dense_names})
        return U, V, leaves

    def _on_augment(self, ctx, payload: Payload) -> Training:
        cfg = self.config
        if not self._holds_round(ctx, payload, [], cfg.variance_correction == "simplified"):
            return self._refuse(ctx, payload)
        shared = ctx.state["shared"]
        shapes: dict[str, tuple[int, ...]] = {}
        for k in self.factorised:
            n, m = self.params[k].shape
            r = shared[f"{k}.S"].shape[0]
            shapes[f"{k}.Ua"], shapes[f"{k}.Va"] = (n, min(r, n - r)), (m, min(r, m - r))
            if cfg.variance_correction == "simplified":
                shapes[f"{k}.GS"] = (r, r)
        if cfg.variance_correction == "simplified":
            shapes.update({f"{k}.grad": tuple(self.params[k].shape) for k in self.dense_names})
        expect_tensors(payload, shapes, "fedlrt augment")
        for k in self.factorised:
            shared[f"{k}.Ua"], shared[f"{k}.Va"] = payload.tensors[f"{k}.Ua"], payload.tensors[f"{k}.Va"]
        U, V, start = self._start(shared)
        basis = self._basis(U, V)

        if cfg.variance_correction == "full":
            # The start-point gradient: sent now, kept for the correction of step 3.
            _, grads = loss_and_grads(ctx.model, partial(self._compose, basis), start, ctx.x, ctx.y, cfg.loss)
            ctx.charge(len(ctx.x))
            local = self._grads_as_message(grads)
            ctx.state["private"] = {"start_grads": local}
            return Payload(local, meta={"samples": len(ctx.x)}, payload_bits=float_bits(local), version=payload.version)

        correction = None
        if cfg.variance_correction == "simplified":
            # Only the non-augmented block r×r is corrected (its gradient came with the basis's).
            local = ctx.state["private"]["start_grads"]
            correction = {}
            for k in self.factorised:
                diff = payload.tensors[f"{k}.GS"] - local[f"{k}.GS"]
                correction[f"{k}.S"] = pad_coefficients(diff, U[k].shape[1], V[k].shape[1])
            correction.update({k: payload.tensors[f"{k}.grad"] - local[f"{k}.grad"] for k in self.dense_names})
        return (yield from self._train(ctx, payload, basis, start, correction))

    def _grads_as_message(self, grads: dict[str, torch.Tensor]) -> Params:
        """Leaf gradients renamed for the wire: ``<k>.GS`` for coefficients, ``<k>.grad`` for dense."""
        out = {f"{k}.GS": grads[f"{k}.S"] for k in self.factorised}
        out.update({f"{k}.grad": grads[k] for k in self.dense_names})
        return out

    def _on_correction(self, ctx, payload: Payload) -> Training:
        if not self._holds_round(ctx, payload, [f"{k}.Ua" for k in self.factorised], True):
            return self._refuse(ctx, payload)
        local = ctx.state["private"]["start_grads"]
        expect_tensors(payload, {key: tuple(t.shape) for key, t in local.items()}, "fedlrt correction")
        U, V, start = self._start(ctx.state["shared"])
        correction = {f"{k}.S": payload.tensors[f"{k}.GS"] - local[f"{k}.GS"] for k in self.factorised}
        correction.update({k: payload.tensors[f"{k}.grad"] - local[f"{k}.grad"] for k in self.dense_names})
        return (yield from self._train(ctx, payload, self._basis(U, V), start, correction))

    def _train(self, ctx, payload: Payload, basis: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
               correction: dict[str, torch.Tensor] | None) -> Training:
        cfg = self.config
        trained, seen = yield LocalSteps(ctx.model, self._compose, basis, start, ctx.x, ctx.y, ctx.generator,
                                         correction, {"loss": cfg.loss, "lr": cfg.lr, "steps": cfg.local_steps,
                                                      "batch_size": cfg.batch_size})
        ctx.charge(seen)
        out = {f"{k}.S": trained[f"{k}.S"] for k in self.factorised}
        out.update({f"{k}.delta": trained[k] - start[k] for k in self.dense_names})
        return Payload(out, meta={"samples": len(ctx.x)}, payload_bits=float_bits(out), version=payload.version)
