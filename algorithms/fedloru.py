"""FedLoRU: federated low-rank updates (Park & Klabjan, "Communication-efficient federated
low-rank update algorithm and its connection to implicit regularization", 2024).

Source followed: the authors' code haemPark/fedloru_official, files
``src/algorithm/fedloru/lorumodel.py`` (the low-rank module, its init and
``merge_and_reinit``), ``src/algorithm/fedloru/client.py`` (the local optimizer) and
``main.py`` (defaults: r = α = 64, SGD momentum 0.9, weight decay 1e-4, clipping at norm 0.1,
B = 32, E = 1), all read for this module.

Every factorised layer is W = W0 + s·B A with s = α / r (``alpha``; 0 means α = r, the
official default ratio): a frozen base W0 (n×m) plus a low-rank module B (n×r, the official
``up``), A (r×m, ``down``). Factorised are the 2-D weights of ``nn.Linear`` layers (all but
the head with ``keep_last_dense``) and the weights of ``nn.Conv2d`` layers where a rank-r
module is smaller than the weight, r (n + m) < n m, with n = out channels and m = in·k·k: the
official wrapping (``down`` a k×k conv in→r, ``up`` a 1×1 conv r→out) is exactly W0 + s·B A
with A the down kernel flattened to r × (in·k·k) and B the up kernel as out × r. Clients
train only the modules (and the dense parameters: biases, dense layers, which travel as
FedAvg's deltas). Round t:

1. ``train``: the server broadcasts the global modules A, B and the dense parameters (plus
   what a client needs to hold the current base, below). Each client takes ``local_steps``
   steps on its modules (``local_step``, below) and returns A_c, B_c and its dense deltas.
2. the server averages the modules and deltas (sample-weighted, client-id order);
3. every τ rounds (``merge_every``) it merges the modules' product into the base,
   W0 ← W0 + s·B A, and restarts the modules (``init``). Repeated merges accumulate rank:
   the model is not confined to rank r although each round only moves r-dimensional factors.

``init``:

* ``official`` (default): as ``lorumodel.py`` when training from scratch
  (``keep_original_weights = False``): the frozen base W0 and the bias of every factorised
  layer start at 0, both factors Kaiming-uniform (a = √5, i.e. U(±1/√fan_in): fan_in = m for
  A, r for B); at a merge A is redrawn Kaiming and B set to 0 (``merge_and_reinit``);
* ``subspace`` (this project's): W0 = the model's dense random init; modules B A = 0 with
  one factor an orthonormal random subspace on the smaller side (:func:`init_modules`).

``local_step``:

* ``official`` (default): the official client's ``torch.optim.SGD`` with ``momentum`` 0.9,
  ``weight_decay`` 1e-4 on every trained tensor, the gradient of all of them clipped to
  2-norm ``max_grad_norm`` 0.1 (``clip_grad_norm_``), a fresh optimizer (momentum 0) each
  round, at ``lr`` (official CLI: 0.1);
* ``preconditioned`` (this project's): plain steps on B and A scaled by the other factor's
  Gram matrix (``lowrank.scaled_factor_grads``, ``damping``): plain SGD on a product moves W
  by a step that grows with the factors' size. With ``init = "subspace"`` and lr 0.3 this is
  the configuration the project tuned before (see bench/settings.py).

Departures from the official code: it wraps only the Conv2d layers of its ResNets (no Linear),
this module also wraps Linear layers (an MLP would otherwise train nothing low-rank); the
official forward computes conv(x, W0) + s·up(down(x)), here the dense kernel W0 + s·B A is
composed (the same function); no dropout inside the modules (official default 0.1: the
project's models carry no dropout); a constant ``lr`` (the official server anneals it with
cosine warm restarts over the rounds); a fixed merge period τ (the official code takes a list
of merge rounds, default one merge at round 500); the official server sends the whole model,
this one only what changed (protocol below).

The base is shared state. The server tracks which base version (number of merges) it sent
each client: a client one merge behind receives the merged factors (B, A) and applies
W0 ← W0 + s·B A itself, bit-identically to the server; a client with no or an older base
receives W0 in full. A client whose base version is not the one the message names does not
train: it drops its base, replies ``resync`` (no tensors) and the server resends the full base
in the same round. A message older than one the client handled is ignored. The server's
mirror moves when it builds a message. ``client_digest``/``server_digest`` hash
(base version, W0). Invariant: the server's base equals the initial base plus the sum of all
merged products.

Personalised variant (``personal_rank`` > 0, pFedLoRU, the paper's answer to heterogeneous
clients; not checked against the official code): each client also keeps personal modules
B_p (n×r_p), A_p (r_p×m) that never leave it (``ctx.state["personal"]``, ``subspace`` init,
unscaled): W_c = W0 + s·B A + B_p A_p. Per round the client first trains the global modules
with its personal ones fixed, then its personal modules (``local_steps`` steps each) with the
global ones fixed. The global model (``model_params``) excludes personal modules;
:meth:`FedLoRU.personal_params` gives a client's personalised model.

Bits per client and round (float32: 32 bits per value). Sums run over factorised layers
(n×m, module rank r); D is the number of dense (non-factorised) parameter values.

downlink ``train``:  32·[Σ r·(n + m) + D]
                     + 32·Σ r·(n + m)   when the client is one merge behind (merged factors)
                     + 32·Σ n·m         when it holds no or an older base (full W0: round 0, resync)
uplink:              32·[Σ r·(n + m) + D]   (A_c, B_c, dense deltas); a ``resync`` reply: 0.

Scenario keys (``[algorithm]``): ``rank``, ``alpha``, ``init``, ``local_step``, ``momentum``,
``weight_decay``, ``max_grad_norm``, ``damping``, ``merge_every`` (τ, rounds),
``local_steps``, ``lr``, ``batch_size`` (0: full local data), ``keep_last_dense``, ``loss``,
``personal_rank`` (0: off), ``init_seed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .base import Algorithm, Params, Payload, ProtocolError, check, check_int, register, state_digest
from .local_training import LocalSteps, Training, many_trainings, one_training
from .lowrank import (LOSSES, check_rank_fits, conv_weights, expect_tensors, float_bits, linear_weights,
                      mean_by, positive_samples, scaled_factor_grads)

INITS = ("official", "subspace")
LOCAL_STEPS = ("official", "preconditioned")


def init_modules(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator,
                 ) -> tuple[Params, Params]:
    """Fresh modules with B A = 0: one factor spans a random r-dimensional subspace
    (orthonormal columns of B, or rows of A), the other is 0.

    While the zero factor trains alone, a step moves W by the gradient G projected onto that
    subspace at full step size: −λ·B BᵀG (B random) or −λ·G AᵀA (A random). A random
    r-subspace keeps about r/d of G, d the dimension of the side it projects, so the random
    factor goes on the *smaller* side (B for n <= m, A otherwise). On an input layer (784
    pixels, 200 units) LoRA's convention (A random, B = 0) keeps r/784 of each step; this one
    keeps r/200 and leaves G's input side (the data's own subspace) intact. That is also
    what made larger steps diverge before: B learnt r/m as fast as A, and a step large
    enough for B was too large for A. (LoRA's A uniform in ±1/√m shrinks that step further.)"""
    A, B = {}, {}
    for k, (n, m) in shapes.items():
        Q, _ = torch.linalg.qr(torch.randn((min(n, m), rank), generator=generator))
        if n <= m:
            B[k], A[k] = Q.contiguous(), torch.zeros((rank, m))
        else:
            A[k], B[k] = Q.T.contiguous(), torch.zeros((n, rank))
    return A, B


def kaiming_uniform(shape: tuple[int, int], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=√5)`` from a seeded generator: U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / fan_in ** 0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def official_modules(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator, *,
                     restart: bool) -> tuple[Params, Params]:
    """The official modules: A (``down``, r×m) Kaiming; B (``up``, n×r) Kaiming at the start,
    0 at a restart (``merge_and_reinit``), so a restart leaves W unchanged."""
    A, B = {}, {}
    for k, (n, m) in shapes.items():
        A[k] = kaiming_uniform((rank, m), m, generator)
        B[k] = torch.zeros((n, rank)) if restart else kaiming_uniform((n, rank), rank, generator)
    return A, B


def merge(base: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """W0 + s·B A in W0's shape: the one expression both ends evaluate, so their bases stay
    bit-identical."""
    return base + (scale * (B @ A)).reshape(base.shape)


@register
class FedLoRU(Algorithm):
    name = "fedloru"
    stateful = True
    statesync_config = {"rank": 2, "local_steps": 2, "merge_every": 2}
    """Small settings for the shared state-sync harness (tests/statesync.py): merges happen."""

    @dataclass
    class Config(Algorithm.Config):
        """Defaults: the official code's semantics (init, merge/re-init, local optimizer) at
        this project's rank, period and local steps for Fashion-MNIST (784-200-10, 10 clients:
        188 steps of 32 = the official E = 1, B = 32)."""

        lr: float = 0.2
        """Client step λ on the modules (and dense parameters). The official CLI requires it
        (its help's default: 0.1); 0.2 is FeDLRT's default here, so both compare against one
        FedAvg run (bench/settings.py)."""
        rank: int = 16
        """r: rank of the global modules of every factorised layer (1 <= r <= min(n, m))."""
        alpha: float = 0.0
        """α: the modules' product is scaled by s = α / r; 0 means α = r (s = 1, the official
        default r = α = 64)."""
        init: str = "official"
        """``official`` | ``subspace`` (module docstring)."""
        local_step: str = "official"
        """``official`` (SGD with momentum, weight decay, clipping) | ``preconditioned``."""
        momentum: float = 0.9
        """Heavy-ball momentum of the official local optimizer (reset each round)."""
        weight_decay: float = 1e-4
        """Weight decay of the official local optimizer, on every trained tensor."""
        max_grad_norm: float = 0.1
        """Official local optimizer: clip the gradient of all trained tensors to this 2-norm
        (0: no clipping)."""
        merge_every: int = 5
        """τ (rounds): merge B A into the base and restart the modules every τ rounds."""
        local_steps: int = 188
        """Client SGD steps on the modules per round (188 x 32 samples: one epoch of a
        Fashion-MNIST client of 6,000)."""
        batch_size: int = 32
        """Samples per local step; 0 uses the client's full local data."""
        keep_last_dense: bool = True
        """Leave the last Linear layer dense (it then travels as FedAvg's deltas): a 10-class
        head is too narrow for a rank-r module to save anything."""
        loss: str = "cross_entropy"
        """Client objective: ``cross_entropy`` | ``mse`` (see ``lowrank.LOSSES``)."""
        personal_rank: int = 0
        """pFedLoRU: rank of each client's personal modules (never sent); 0 turns it off."""
        init_seed: int = 0
        """Seed of the modules' (re)initialisation at start and after every merge."""
        damping: float = 0.1
        """δ of the ``preconditioned`` local steps (``lowrank.scaled_factor_grads``); 0 takes
        plain SGD steps on the factors (LoRA's), whose step in W grows with the factors' size: on
        Fashion-MNIST (784-200-10, rank 16, 188 steps, τ = 5) plain steps diverged at lr 0.5
        (and at rank 32, τ = 1, lr 0.3), scaled ones reach 0.848 at lr 0.5 and 0.855 at lr 0.3
        after 20 rounds. δ = 0.1 keeps 1/1.1 of the step along the random factor's subspace."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_int("rank", self.rank, 1)
            check(isinstance(self.merge_every, int) and self.merge_every >= 1, "merge_every", self.merge_every,
                  "must be an integer >= 1 (rounds)")
            check(isinstance(self.local_steps, int) and self.local_steps >= 1, "local_steps", self.local_steps,
                  "must be an integer >= 1")
            check_int("batch_size", self.batch_size, 0, note=" (0: full local data)")
            check(self.loss in LOSSES, "loss", self.loss, f"must be one of {', '.join(LOSSES)}")
            check(isinstance(self.personal_rank, int) and self.personal_rank >= 0, "personal_rank",
                  self.personal_rank, "must be an integer >= 0 (0: off)")
            check(self.damping >= 0, "damping", self.damping, "must be >= 0 (0: plain SGD on the factors)")
            check(self.alpha >= 0, "alpha", self.alpha, "must be >= 0 (0: alpha = rank)")
            check(self.init in INITS, "init", self.init, f"must be one of {', '.join(INITS)}")
            check(self.local_step in LOCAL_STEPS, "local_step", self.local_step,
                  f"must be one of {', '.join(LOCAL_STEPS)}")
            check(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
            check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
            check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "must be >= 0 (0: no clipping)")

    def __init__(self, config: "FedLoRU.Config", model: torch.nn.Module):
        super().__init__(config, model)
        self._step_maps: dict[tuple[str, str], Any] = {}
        linear = linear_weights(model, config.keep_last_dense)
        if linear:
            check_rank_fits(linear, self.params, config.rank)
        convs = []
        for k in conv_weights(model):
            n, m = self.params[k].shape[0], self.params[k][0].numel()
            if config.rank * (n + m) < n * m and (not config.personal_rank or config.personal_rank <= min(n, m)):
                convs.append(k)
        order = list(self.params)
        self.factorised = sorted(linear + convs, key=order.index)
        check_rank_fits(self.factorised, {k: self.params[k].reshape(self.params[k].shape[0], -1)
                                          for k in self.factorised}, config.rank)
        if config.personal_rank:
            check_rank_fits(self.factorised, {k: self.params[k].reshape(self.params[k].shape[0], -1)
                                              for k in self.factorised}, config.personal_rank, "personal_rank")
        self.scale = (config.alpha or config.rank) / config.rank
        """s = α / r, the factor of every module's product."""
        self.shapes = {k: (self.params[k].shape[0], self.params[k][0].numel()) for k in self.factorised}
        """(n, m) of every factorised weight as a matrix (a conv: out × in·k·k)."""
        self.dense_names = [k for k in self.params if k not in self.factorised]
        official = config.init == "official"
        self.base: Params = {k: torch.zeros_like(self.params[k]) if official else self.params[k].clone()
                             for k in self.factorised}
        zeroed = {k.rsplit(".", 1)[0] + ".bias" for k in self.factorised} if official else set()
        self.dense: Params = {k: torch.zeros_like(self.params[k]) if k in zeroed else self.params[k].clone()
                              for k in self.dense_names}
        self.base_version = 0
        """Number of merges so far."""
        self.A, self.B = self._fresh_modules()
        self.last_merge: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """(B, A) of every layer at the latest merge (sent to clients one merge behind)."""
        self.version = 0
        self._client_base: dict[int, int] = {}
        self._base_digests: dict[int, bytes] = {0: self._base_digest()}
        self.params = self.model_params()

    def _fresh_modules(self) -> tuple[Params, Params]:
        g = torch.Generator().manual_seed(self.config.init_seed * 1_000_003 + self.base_version)
        if self.config.init == "official":
            return official_modules(self.shapes, self.config.rank, g, restart=self.base_version > 0)
        return init_modules(self.shapes, self.config.rank, g)

    def _base_digest(self) -> bytes:
        return state_digest({"base_version": self.base_version, **{f"{k}.W0": w for k, w in self.base.items()}})

    # ------------------------------------------------------------------ server

    def model_params(self) -> Params:
        return {k: (merge(self.base[k], self.B[k], self.A[k], self.scale) if k in self.base else self.dense[k])
                for k in self.params}

    def _payload_for(self, client: int) -> Payload:
        tensors: Params = {}
        for k in self.factorised:
            tensors[f"{k}.A"], tensors[f"{k}.B"] = self.A[k], self.B[k]
        tensors.update(self.dense)
        meta: dict[str, Any] = {"base_version": self.base_version}
        held = self._client_base.get(client)
        # The mirror moves as the message is built: it is what the client holds once it handles it.
        self._client_base[client] = self.base_version
        self._prune()
        if held == self.base_version - 1 and self.last_merge:
            for k, (B, A) in self.last_merge.items():
                tensors[f"{k}.mergeB"], tensors[f"{k}.mergeA"] = B, A
            meta["merge_from"] = held
        elif held != self.base_version:
            tensors.update({f"{k}.W0": w for k, w in self.base.items()})
        return Payload(tensors, meta, payload_bits=float_bits(tensors))

    async def server_round(self, comm) -> None:
        self.version += 1
        v = self.version
        await comm.broadcast("train", self._payload_for, version=v)
        replies = await comm.gather("train", version=v)
        resync = [c for c, r in replies.items() if r.payload.meta.get("resync")]
        if resync:
            # A client without the base named in the message: resend it in full, same round.
            comm.count("fedloru_resync", len(resync))
            for c in resync:
                self._client_base.pop(c, None)
                await comm.send(c, "train", self._payload_for(c), version=v)
            again = await comm.gather("train", version=v, clients=resync)
            replies = {**{c: r for c, r in replies.items() if c not in resync}, **again}
            replies = {c: r for c, r in sorted(replies.items()) if not r.payload.meta.get("resync")}
        wrong = [c for c, r in replies.items() if r.payload.meta["base_version"] != self.base_version]
        if wrong:  # trained on another base: never applied
            comm.count("fedloru_wrong_base", len(wrong))
            replies = {c: r for c, r in replies.items() if c not in wrong}
        if replies:
            w = [float(r.payload.meta["samples"]) for r in replies.values()]
            for k in self.factorised:
                self.A[k] = mean_by(replies, f"{k}.A", w)
                self.B[k] = mean_by(replies, f"{k}.B", w)
            for k in self.dense_names:
                self.dense[k] = self.dense[k] + mean_by(replies, f"{k}.delta", w)
        else:
            comm.count("fedloru_rounds_without_replies")
        # The merge schedule counts rounds, replies or not (merging unchanged modules is harmless).
        if (comm.round + 1) % self.config.merge_every == 0:
            self._merge()
            comm.log("fedloru_merge", base_version=self.base_version)
        self.params = self.model_params()

    def _merge(self) -> None:
        self.last_merge = {k: (self.B[k], self.A[k]) for k in self.factorised}
        self.base = {k: merge(self.base[k], self.B[k], self.A[k], self.scale) for k in self.factorised}
        self.base_version += 1
        self.A, self.B = self._fresh_modules()
        self._base_digests[self.base_version] = self._base_digest()
        self._prune()

    def _prune(self) -> None:
        live = set(self._client_base.values()) | {self.base_version}
        for version in [v for v in self._base_digests if v not in live]:
            del self._base_digests[version]

    def check_reply(self, kind: str, payload: Payload) -> None:
        if kind != "train":
            raise ProtocolError(f"fedloru: unexpected reply kind {kind!r}")
        positive_samples(payload, "fedloru reply")
        fields = {"samples", "resync", "held_base"} if payload.meta.get("resync") else {"samples", "base_version"}
        if set(payload.meta) != fields:
            raise ProtocolError(f"fedloru reply: meta fields {sorted(payload.meta)}, expected {sorted(fields)}")
        if payload.meta.get("resync"):
            if payload.tensors:
                raise ProtocolError("fedloru reply: a resync reply carries no tensors")
            return
        shapes: dict[str, tuple[int, ...]] = {}
        for k, (n, m) in self.shapes.items():
            shapes[f"{k}.A"], shapes[f"{k}.B"] = (self.config.rank, m), (n, self.config.rank)
        shapes.update({f"{k}.delta": tuple(self.dense[k].shape) for k in self.dense_names})
        expect_tensors(payload, shapes, "fedloru reply")

    # ------------------------------------------------------------------ state digests

    def client_digest(self, state: dict[str, Any]) -> bytes:
        return state_digest(state.get("shared", {}))

    def server_digest(self, client: int) -> bytes:
        held = self._client_base.get(client)
        return state_digest({}) if held is None else self._base_digests[held]

    # ------------------------------------------------------------------ client

    def client_handlers(self):
        return {"train": self.on_train}

    def client_batch_handlers(self):
        """Local training for the clients of an instant together (:mod:`algorithms.local_training`)."""
        return {"train": self.on_train_batch}

    def on_train(self, ctx, payload: Payload) -> Payload | None:
        return one_training(self._on_train, ctx, payload)

    def on_train_batch(self, ctxs, payloads) -> list:
        return many_trainings(self._on_train, ctxs, payloads)

    def _sync_base(self, ctx, payload: Payload) -> dict[str, Any] | None:
        """The client's base after this message, or None when it cannot hold the named version."""
        t, version = payload.tensors, payload.meta.get("base_version")
        shared = ctx.state.get("shared")
        if all(f"{k}.W0" in t for k in self.factorised):
            shared = {"base_version": version, **{f"{k}.W0": t[f"{k}.W0"] for k in self.factorised}}
        elif shared is not None and "merge_from" in payload.meta and shared["base_version"] == payload.meta["merge_from"]:
            merged = {f"{k}.W0": merge(shared[f"{k}.W0"], t[f"{k}.mergeB"], t[f"{k}.mergeA"], self.scale)
                      for k in self.factorised}
            shared = {"base_version": payload.meta["merge_from"] + 1, **merged}
        if shared is None or shared["base_version"] != version:
            return None
        ctx.state["shared"] = shared
        return shared

    def _on_train(self, ctx, payload: Payload) -> Training:
        cfg = self.config
        if payload.version < ctx.state.get("newest", payload.version):
            return None  # a late message of an older round: ignored, the state stays
        ctx.state["newest"] = payload.version
        expected: dict[str, tuple[int, ...]] = {}
        for k, (n, m) in self.shapes.items():
            expected[f"{k}.A"], expected[f"{k}.B"] = (cfg.rank, m), (n, cfg.rank)
            if f"{k}.W0" in payload.tensors:
                expected[f"{k}.W0"] = tuple(self.params[k].shape)
            if f"{k}.mergeB" in payload.tensors:
                expected[f"{k}.mergeB"], expected[f"{k}.mergeA"] = (n, cfg.rank), (cfg.rank, m)
        expected.update({k: tuple(self.params[k].shape) for k in self.dense_names})
        expect_tensors(payload, expected, "fedloru train")
        shared = self._sync_base(ctx, payload)
        if shared is None:
            # Never train on another base: drop it and ask for the full base.
            held = ctx.state.pop("shared", {}).get("base_version", -1)
            return Payload(meta={"samples": len(ctx.x), "resync": True, "held_base": held}, payload_bits=0,
                           version=payload.version)
        base = {f"{k}.W0": shared[f"{k}.W0"] for k in self.factorised}
        t = payload.tensors
        start = {f"{k}.{f}": t[f"{k}.{f}"] for k in self.factorised for f in ("A", "B")}
        start.update({k: t[k] for k in self.dense_names})
        generator = ctx.generator
        personal = self._personal(ctx, generator)
        steps = {"loss": cfg.loss, "lr": cfg.lr, "steps": cfg.local_steps, "batch_size": cfg.batch_size}
        # the global modules, the personal ones fixed (held with the base: what the steps do not train)
        trained, seen = yield LocalSteps(ctx.model, self._compose_global, base, start, ctx.x, ctx.y, generator,
                                         None, {**steps, **self._step_rule("B", "A")}, private=personal)
        if personal:
            # then the personal modules, the global ones fixed at their trained values
            trained_global = {f"trained:{key}": v for key, v in trained.items()}
            personal_trained, more = yield LocalSteps(ctx.model, self._compose_personal, base, personal, ctx.x, ctx.y,
                                                      generator, None, {**steps, **self._step_rule("Bp", "Ap")},
                                                      private=trained_global)
            ctx.state["personal"] = personal_trained
            seen += more
        ctx.charge(seen)
        out = {key: trained[key] for key in start if key not in self.dense_names}
        out.update({f"{k}.delta": trained[k] - start[k] for k in self.dense_names})
        return Payload(out, meta={"samples": len(ctx.x), "base_version": shared["base_version"]},
                       payload_bits=float_bits(out), version=payload.version)

    def _step_rule(self, b: str, a: str) -> dict[str, Any]:
        """Keyword arguments of ``local_steps`` for ``local_step``."""
        cfg = self.config
        if cfg.local_step == "official":
            return {"momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm}
        return {"precondition": self._scaled(b, a)}

    def _scaled(self, b: str, a: str):
        """The step map of ``local_steps``: scaled factor gradients (or None: plain SGD); one
        function per (b, a), so that the clients' requests compare equal and train together."""
        if not self.config.damping:
            return None
        cached = self._step_maps.get((b, a))
        if cached is not None:
            return cached

        def precondition(grads: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = dict(grads)
            for k in self.factorised:
                kb, ka = f"{k}.{b}", f"{k}.{a}"
                out[kb], out[ka] = scaled_factor_grads(grads[kb], grads[ka], leaves[kb], leaves[ka],
                                                       self.config.damping)
            return out
        self._step_maps[(b, a)] = precondition
        return precondition

    def _compose(self, base: Params, leaves: dict[str, torch.Tensor], personal: dict[str, torch.Tensor]) -> Params:
        """W0 + s B A (+ Bp Ap) per factorised layer, the dense leaves as they are; the
        modules may carry a leading dimension of clients (stacked local steps)."""
        out = {}
        for k in self.params:
            if k in base:
                prod = self.scale * (leaves[f"{k}.B"] @ leaves[f"{k}.A"])
                if personal:
                    prod = prod + personal[f"{k}.Bp"] @ personal[f"{k}.Ap"]
                out[k] = base[k] + prod.reshape(prod.shape[:-2] + base[k].shape)
            else:
                out[k] = leaves[k]
        return out

    def _compose_global(self, fixed: Mapping[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> Params:
        """The model while the global modules train: ``fixed`` holds the base (``<k>.W0``)
        and the personal modules (``<k>.Bp``, ``<k>.Ap``, if any)."""
        base = {k: fixed[f"{k}.W0"] for k in self.factorised}
        return self._compose(base, leaves, {key: v for key, v in fixed.items() if not key.endswith(".W0")})

    def _compose_personal(self, fixed: Mapping[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> Params:
        """The model while the personal modules train: ``fixed`` holds the base and the
        trained global modules (``trained:<name>``)."""
        base = {k: fixed[f"{k}.W0"] for k in self.factorised}
        trained = {key.removeprefix("trained:"): v for key, v in fixed.items() if key.startswith("trained:")}
        return self._compose(base, trained, leaves)

    def _personal(self, ctx, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """This client's personal modules (created on first use), or {} when off."""
        rank = self.config.personal_rank
        if not rank:
            return {}
        if "personal" not in ctx.state:
            A, B = init_modules(self.shapes, rank, generator)
            ctx.state["personal"] = {**{f"{k}.Ap": a for k, a in A.items()}, **{f"{k}.Bp": b for k, b in B.items()}}
        return ctx.state["personal"]

    def personal_params(self, state: dict[str, Any]) -> Params:
        """A client's personalised model: the global model plus its personal modules (from its state)."""
        params = self.model_params()
        personal = state.get("personal")
        if personal:
            for k in self.factorised:
                params[k] = params[k] + (personal[f"{k}.Bp"] @ personal[f"{k}.Ap"]).reshape(params[k].shape)
        return params
