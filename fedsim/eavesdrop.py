"""A passive eavesdropper on one client's link: it copies the frames the wire carries and
turns them into gradient-inversion targets (:class:`fedsim.inversion.Target`).

Threat model (LQ-SGD's "trustworthy" claim is made against it: an honest-but-curious
observer of the updates running gradient inversion, measured by SSIM):

* **what it sees**: a copy of every multipart frame list the network model delivers on the
  tapped client's link — the uplink frames as they reach the server, the downlink frames as
  they leave the emulator for the client — after the model's loss (a lost message is never
  seen), duplication (seen twice) and corruption (the flipped bit is in the copy). It sits
  where the link ends, so it sees what the link delivered. A message the model dropped before
  the wire (client offline, unknown client) never reaches it. It is handed bytes only
  (``Node.tap``), never a ``Message``, a tensor or a client's state;
* **what it knows**: the protocol (``fedsim.codec``: it decodes and CRC-checks the frames
  itself; a corrupted message fails the check and is counted ``undecodable``), the
  scenario's public settings (architecture, method and its settings: the wire formats), and
  each method's message format. For the formats it builds *its own* instance of the
  method's class from those settings and uses only its pure decoding helpers (layouts,
  ``decode``, ``rebuild``); it never touches the run's algorithm object;
* **what it rebuilds**: the mirrored state a listener can hold from what it saw since it
  started listening — LAQ/SLAQ/QRR's quantized accumulators and top-k's EF21 estimate
  (verified against the tag every upload carries; an innovation against a base it never
  saw is unusable and counted ``no_base``), FedLoRU's frozen base W0 (sent in full on first
  contact, then merged with the public scale s = α/r), FeDLRT's basis and its augmentation,
  PowerSGD/LQ-SGD's warm-start Q and P̂ (sent every round);
* **what a round may lack**: LAQ/SLAQ's lazy rule lets a client skip an upload (a reply
  without tensors; the server reuses its last Q, which is no gradient at this round's
  model): counted ``skipped_upload``, no target. PowerSGD's ``start_round`` warm-up rounds
  carry raw gradients (``warmup`` messages), decoded as SGD's;
* **what it cannot know**: a client's private memory — PowerSGD/LQ-SGD's error feedback e_i
  (so from the second round on, M_i = g_i + e_i differs from the gradient the attack
  models; with the default ``aggregated`` feedback it is taken against the aggregate Q, which
  the tap hears, but M_i's first term is still private), pFedLoRU's personal modules (counted
  ``personal_modules_unmodelled``), the client's data and its sampling.

Per round of its window it builds one target: the model the server broadcast to that client
(downlink) and the tensors the client uploaded, with ``predict``, the map the method
applies to a gradient before it goes on the wire (identity for SGD and LAQ, after removing
LAQ's public ``l2 * w`` term; G -> (G Q, Gᵀ P̂) for PowerSGD; basis projections for FeDLRT;
factor gradients s·G Aᵀ, s·Bᵀ G for FedLoRU, clipped as its official optimizer clips them;
the sent coordinates for top-k). Multi-step local training (FedAvg, FeDLRT without variance
correction, FedLoRU) is modelled as one step of the summed steps, update ~ -lr * steps *
gradient at the broadcast model (Geiping et al. 2020, Sec. 6, attack FedAvg updates this way
when the local steps are few); FedLoRU's momentum enters as its gain over the steps for a
constant gradient, its weight decay as wd * (broadcast value). FeDLRT with ``full`` or
``simplified`` variance correction sends exact gradients at the broadcast model (the basis
reply; with ``full`` also the start-point coefficient gradient): those are matched, not the
corrected steps, which move along the server's average gradient.

Departures: a message the CRC rejects is discarded (a real attacker could still use all but
one bit of it); the attacker's batch size is the method's ``batch_size`` setting, capped by
the client's sample count when the reply carries it (FedAvg, FeDLRT, FedLoRU); all the
samples for FeDLRT's full-data gradients; one image when the setting is 0 (all local data)
and the wire carries no count (LAQ's default; counted ``batch_size_unknown``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import codec
from .codec import CodecError, Message
from .errors import ScenarioError
from .inversion import ATTACKS, Params, Target, identity

DIRECTIONS = ("up", "down", "both")


@dataclass
class EavesdropperConfig:
    """``[eavesdropper]``: a passive tap on one client's link."""

    client: int = 0
    """The client whose link is tapped."""
    direction: str = "both"
    """Frames recorded: ``up`` (client -> server), ``down`` or ``both``. Inversion needs
    both: the upload and the model it was computed at (downlink)."""
    rounds: list[int] = field(default_factory=lambda: [0, 1])
    """[start, stop): rounds listened to (from ``start`` up to, not including, ``stop``).
    Mirrored state (LAQ's accumulator, FedLoRU's base) is only what was heard from ``start``."""
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    """Attacks run after the run, among ``dlg``, ``idlg``, ``ig``."""
    iters: int = 100
    """L-BFGS iterations of ``dlg`` and ``idlg``."""
    ig_iters: int = 300
    """Adam steps of ``ig`` (Geiping et al.)."""
    tv: float = 1e-2
    """Total-variation weight of ``ig``."""
    seed: int = 0
    """Seed of the attacks' random initialisations."""

    def validate(self, n_clients: int) -> None:
        def need(ok: bool, key: str, reason: str) -> None:
            if not ok:
                raise ScenarioError(f"eavesdropper.{key}", getattr(self, key), reason)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.client) and 0 <= self.client < n_clients, "client",
             f"must be a client id in 0..{n_clients - 1}")
        need(self.direction in DIRECTIONS, "direction", f"must be one of {', '.join(DIRECTIONS)}")
        need(isinstance(self.rounds, list) and len(self.rounds) == 2 and all(is_int(r) for r in self.rounds)
             and 0 <= self.rounds[0] < self.rounds[1], "rounds", "must be [start, stop) with 0 <= start < stop")
        need(isinstance(self.attacks, list) and all(a in ATTACKS for a in self.attacks), "attacks",
             f"must be a list of {', '.join(ATTACKS)}")
        need(is_int(self.iters) and self.iters >= 1, "iters", "must be an integer >= 1")
        need(is_int(self.ig_iters) and self.ig_iters >= 1, "ig_iters", "must be an integer >= 1")
        need(isinstance(self.tv, (int, float)) and not isinstance(self.tv, bool) and self.tv >= 0, "tv",
             "must be a number >= 0")
        need(is_int(self.seed), "seed", "must be an integer")


def parse_eavesdropper(values: Any, n_clients: int) -> EavesdropperConfig:
    """``[eavesdropper]`` -> a validated config (ScenarioError naming the key otherwise)."""
    if not isinstance(values, dict):
        raise ScenarioError("eavesdropper", values, "must be a table")
    known = EavesdropperConfig.__dataclass_fields__
    for key, value in values.items():
        if key not in known:
            raise ScenarioError(f"eavesdropper.{key}", value, f"unknown key (known: {', '.join(sorted(known))})")
    cfg = EavesdropperConfig(**values)
    cfg.validate(n_clients)
    return cfg


# --------------------------------------------------------------------------- the tap

@dataclass
class Captured:
    direction: str
    frames: list[bytes]


class WireTap:
    """The callable a server ``Node`` hands each frame list it puts on / takes off a client's
    link (``tap(direction, client, frames)``). It keeps copies of the bytes, nothing else."""

    def __init__(self, config: EavesdropperConfig):
        self.config = config
        self.captured: list[Captured] = []
        self.counters: dict[str, int] = {"frames_seen": 0, "undecodable": 0}

    def __call__(self, direction: str, client: int, frames: list) -> None:
        cfg = self.config
        if client != cfg.client or (cfg.direction != "both" and direction != cfg.direction):
            return
        copy = [bytes(f) for f in frames]
        self.counters["frames_seen"] += 1
        try:
            head = codec.peek_route(copy[0])  # the round lives in the envelope, as the protocol says
        except (CodecError, IndexError):
            self.counters["undecodable"] += 1
            return
        if cfg.rounds[0] <= head["r"] < cfg.rounds[1]:
            self.captured.append(Captured(direction, copy))

    def messages(self) -> list[tuple[str, Message]]:
        """The captured messages that pass the codec's checks (CRC included), in capture order."""
        out = []
        for c in self.captured:
            try:
                out.append((c.direction, codec.decode(c.frames)))
            except CodecError:
                self.counters["undecodable"] += 1
        return out


# --------------------------------------------------------------------------- decoding into targets

@dataclass
class RoundView:
    """What the tap heard of one round: downlink and uplink messages by kind (last wins)."""

    round: int
    down: dict[str, Message] = field(default_factory=dict)
    up: dict[str, Message] = field(default_factory=dict)


def _rounds(messages: list[tuple[str, Message]]) -> list[RoundView]:
    views: dict[int, RoundView] = {}
    for direction, msg in messages:
        view = views.setdefault(msg.round, RoundView(msg.round))
        (view.up if direction == "up" else view.down)[msg.kind] = msg
    return [views[r] for r in sorted(views)]


def _mat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, -1)


class Decoder:
    """Turns a tap's messages into targets, with the method's public settings.

    ``algorithm`` is the attacker's own instance of the method's class, built from the
    scenario's settings on a fresh model (never the run's object): used for wire layouts only.
    """

    def __init__(self, name: str, config: Any, algorithm: Any, model: torch.nn.Module,
                 input_shape: tuple[int, ...], num_classes: int):
        self.name, self.config, self.algorithm, self.model = name, config, algorithm, model
        self.input_shape, self.num_classes = input_shape, num_classes
        self.param_names = [k for k, _ in model.named_parameters()]
        self._shapes = {k: tuple(t.shape) for k, t in model.named_parameters()}
        self.counters: dict[str, int] = {}

    def count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _batch(self, samples: int | None) -> int:
        b = int(getattr(self.config, "batch_size", 0) or 0)
        if samples is not None:
            b = samples if b <= 0 else min(b, samples)
        elif b <= 0:
            # all local data (LAQ's default) and no sample count on the wire: assume one image
            self.count("batch_size_unknown")
        return max(1, b)

    def _target(self, params: Params, observed: Params, predict, estimate: Params, samples: int | None,
                r: int, batch: int | None = None) -> tuple[int, Target]:
        """``batch``: the images behind the observation when the protocol says so (all local
        data), else the method's ``batch_size`` capped by ``samples``."""
        b = max(1, batch) if batch is not None else self._batch(samples)
        return r, Target(self.model, params, observed, predict, estimate, b, self.input_shape, self.num_classes)

    def targets(self, messages: list[tuple[str, Message]]) -> list[tuple[int, Target]]:
        method = {"sgd": self._sgd, "fedavg": self._fedavg, "laq": self._laq, "slaq": self._laq, "qrr": self._laq,
                  "powersgd": self._powersgd, "lqsgd": self._powersgd, "fedlrt": self._fedlrt,
                  "fedloru": self._fedloru, "topk": self._topk}.get(self.name)
        if method is None:
            # the tap still hears the bytes; it just cannot read this method's messages yet
            self.count("no_decoder_for_method")
            return []
        return method(_rounds(messages))

    def _model(self, msg: Message) -> Params:
        return {k: msg.payload.tensors[k].clone() for k in self.param_names}

    # ---- SGD: the gradient in the clear -------------------------------------------------
    def _sgd(self, views: list[RoundView]):
        out = []
        for v in views:
            if "model" in v.down and "model" in v.up:
                g = {k: t.clone() for k, t in v.up["model"].payload.tensors.items()}
                out.append(self._target(self._model(v.down["model"]), g, identity, g, None, v.round))
            else:
                self.count("incomplete_round")
        return out

    # ---- FedAvg: a model delta after local epochs ---------------------------------------
    def _fedavg(self, views: list[RoundView]):
        cfg, out = self.config, []
        for v in views:
            if "model" not in v.down or "model" not in v.up:
                self.count("incomplete_round")
                continue
            up = v.up["model"].payload
            samples = int(up.meta["samples"])
            steps = cfg.local_epochs * math.ceil(samples / max(1, cfg.batch_size))
            g = {k: -t / (cfg.lr * steps) for k, t in up.tensors.items()}
            out.append(self._target(self._model(v.down["model"]), g, identity, g, samples, v.round))
        return out

    # ---- LAQ / SLAQ / QRR: mirrored quantized accumulators ------------------------------
    def _laq(self, views: list[RoundView]):
        from algorithms import quantizers as qz
        from algorithms.laq import RADII, accumulator_tag

        alg, bits, out = self.algorithm, self.config.bits, []
        known: dict[str, dict[str, torch.Tensor]] = {}
        """tag -> accumulator: every Q this listener decoded (the server acks one of them)."""
        for v in views:
            if "grad" not in v.up:
                self.count("incomplete_round")
                continue
            p = v.up["grad"].payload
            if "skip" in p.meta:
                # LAQ's lazy rule (or a non-finite gradient): the reply carries no tensors and the
                # server reuses its last Q, which is not a gradient at this round's model.
                self.count("skipped_upload")
                continue
            if p.meta["reset"]:
                base = {name: torch.zeros(shape) for name, shape in alg.layout.items()}
            elif p.meta["base"] in known:
                base = known[p.meta["base"]]
            else:
                self.count("no_base")  # an innovation against an accumulator never heard
                continue
            radii = p.tensors[RADII]
            q = {name: qz.laq_dequantize(base[name], radii[i], p.tensors[name], bits)
                 for i, name in enumerate(alg.layout)}
            if accumulator_tag(q) != p.meta["tag"]:
                self.count("tag_mismatch")
                continue
            known[p.meta["tag"]] = q
            if "grad" not in v.down:
                self.count("incomplete_round")
                continue
            params = self._model(v.down["grad"])
            g = alg.rebuild(q)
            # The client quantized g + l2 * w (the published L2 term); w is the broadcast model
            # and l2 a public setting, so the data term is what is left.
            l2 = float(getattr(self.config, "l2", 0.0) or 0.0)
            g = {k: g[k].reshape(alg.shapes[k]) - l2 * params[k] for k in self.param_names}
            out.append(self._target(params, g, identity, g, None, v.round))
        return out

    # ---- PowerSGD / LQ-SGD: P_i = M Q, Q_i = Mᵀ P̂ --------------------------------------
    def _powersgd(self, views: list[RoundView]):
        alg, out = self.algorithm, []
        for v in views:
            if "warmup" in v.down or "warmup" in v.up:
                # ``start_round`` warm-up: raw gradients in the clear, as SGD's
                if "warmup" not in v.down or "warmup" not in v.up or "abstain" in v.up["warmup"].payload.meta:
                    self.count("incomplete_round")
                    continue
                g = {k: t.clone() for k, t in v.up["warmup"].payload.tensors.items()}
                out.append(self._target(self._model(v.down["warmup"]), g, identity, g, None, v.round))
                continue
            if "p" not in v.down or "p" not in v.up or "abstain" in v.up["p"].payload.meta:
                self.count("incomplete_round")
                continue
            down = v.down["p"].payload.tensors
            params = self._model(v.down["p"])
            warm = {k: down[f"Q:{k}"].clone() for k in alg.compressed}
            first = alg.decode(v.up["p"].payload.tensors, alg._p_shapes())
            observed = {key: t.clone() for key, t in first.items()}
            p_hat = None
            if "q" in v.down and "q" in v.up and "abstain" not in v.up["q"].payload.meta:
                p_hat = {k: v.down["q"].payload.tensors[f"P:{k}"].clone() for k in alg.compressed}
                second = alg.decode(v.up["q"].payload.tensors, alg._q_shapes())
                observed.update({key: t.clone() for key, t in second.items()})
                # With P̂ and Q_i = Mᵀ P̂ the attacker holds P̂ P̂ᵀ M, which contains M Q's
                # information when rank(M) <= r; matching P_i = M Q as well lets r random
                # projections (scaled by |Q| ~ sqrt(m)) dominate the distance, which was
                # measured to weaken the attack (Fashion-MNIST MLP, B = 1).
                observed = {key: t for key, t in observed.items() if not key.startswith("P:")}
            else:
                self.count("phase_two_missing")
            plans = alg.plans

            def predict(grads: Params, warm=warm, p_hat=p_hat) -> Params:
                out_: Params = {}
                for k in alg.compressed:
                    m = _mat(grads[k], plans[k].n)
                    if p_hat is None:
                        out_[f"P:{k}"] = m @ warm[k]
                    else:
                        out_[f"Q:{k}"] = m.T @ p_hat[k]
                for k in alg.raw:
                    out_[f"G:{k}"] = grads[k]
                return out_

            estimate: Params = {k: observed[f"G:{k}"] for k in alg.raw}
            for k in alg.compressed:
                if p_hat is not None:
                    estimate[k] = (p_hat[k] @ observed[f"Q:{k}"].T).reshape(plans[k].shape)
                else:  # M Q with Q random: a rank-r sketch; its column space is M's
                    estimate[k] = (observed[f"P:{k}"] @ torch.linalg.pinv(warm[k])).reshape(plans[k].shape)
            out.append(self._target(params, observed, predict, estimate, None, v.round))
        return out

    # ---- FeDLRT: basis gradients G V Sᵀ, Gᵀ U S; coefficient gradients; dense ---------
    def _fedlrt(self, views: list[RoundView]):
        """Per ``variance_correction`` (a public setting), what each reply carries:

        * ``basis`` reply: G_U, G_V at the broadcast model on all local data (plus ∇_S L_c
          and the dense gradients with ``simplified``), exact gradients in every mode;
        * ``full``: the reply to ``augment`` is ∇_S̃ L_c and the dense gradients at the start
          point S̃⁰ (the broadcast model in the augmented basis Ū, V̄), all local data: exact
          too. The trained coefficients that follow moved along g_c(S̃) + ḡ − g_c(S̃⁰); under
          the one-summed-step model that is the server's average ḡ (heard on the downlink),
          so they add nothing about this client and are not matched;
        * ``simplified``: the trained reply carries the same corrected steps: not matched;
        * ``none``: the trained S̃_c and dense deltas are plain local steps, modelled as one
          summed step: −(S̃_c − S̃⁰) / (λ s) ~ Ūᵀ G V̄ on a minibatch.
        """
        from algorithms.lowrank import pad_coefficients

        alg, cfg, out = self.algorithm, self.config, []
        mode = cfg.variance_correction
        for v in views:
            if "basis" not in v.down or "basis" not in v.up or v.up["basis"].payload.meta.get("refused"):
                self.count("incomplete_round")
                continue
            t = v.down["basis"].payload.tensors
            layers = {k: (t[f"{k}.U"].clone(), t[f"{k}.S"].clone(), t[f"{k}.V"].clone()) for k in alg.factorised}
            params = {k: (layers[k][0] @ layers[k][1] @ layers[k][2].T if k in layers else t[k].clone())
                      for k in self.param_names}
            up = v.up["basis"].payload
            samples = int(up.meta["samples"])
            observed = {key: x.clone() for key, x in up.tensors.items()}
            aug: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            if "augment" in v.down:
                a = v.down["augment"].payload.tensors
                aug = {k: (torch.cat([U, a[f"{k}.Ua"]], dim=1), torch.cat([V, a[f"{k}.Va"]], dim=1))
                       for k, (U, _, V) in layers.items()}
            reply = v.up.get("augment")
            if reply is not None and reply.payload.meta.get("refused"):
                reply = None
            batch = samples  # the basis (and ``full``'s start-point) gradients use all local data
            if mode in ("full", "none") and (reply is None or not aug):
                self.count("phase_two_missing")
            elif mode == "full":
                for k in alg.factorised:
                    observed[f"{k}.GSa"] = reply.payload.tensors[f"{k}.GS"].clone()
                for d in alg.dense_names:
                    observed[f"{d}.grad"] = reply.payload.tensors[f"{d}.grad"].clone()
            elif mode == "none":
                scale = cfg.lr * cfg.local_steps
                for k, (Ub, Vb) in aug.items():
                    start = pad_coefficients(layers[k][1], Ub.shape[1], Vb.shape[1])
                    observed[f"{k}.GSa"] = -(reply.payload.tensors[f"{k}.S"] - start) / scale
                for d in alg.dense_names:
                    observed[f"{d}.delta"] = -reply.payload.tensors[f"{d}.delta"] / scale
                batch = self._batch(samples)  # the local steps draw minibatches

            def predict(grads: Params, layers=layers, aug=aug, keys=frozenset(observed)) -> Params:
                o: Params = {}
                for k, (U, S, V) in layers.items():
                    o[f"{k}.GU"] = grads[k] @ V @ S.T
                    o[f"{k}.GV"] = grads[k].T @ U @ S
                    if f"{k}.GS" in keys:
                        o[f"{k}.GS"] = U.T @ grads[k] @ V
                    if f"{k}.GSa" in keys:
                        o[f"{k}.GSa"] = aug[k][0].T @ grads[k] @ aug[k][1]
                for d in alg.dense_names:
                    for suffix in (".delta", ".grad"):
                        if f"{d}{suffix}" in keys:
                            o[f"{d}{suffix}"] = grads[d]
                return o

            estimate = {d: observed.get(f"{d}.grad", observed.get(f"{d}.delta")) for d in alg.dense_names}
            estimate = {k: x for k, x in estimate.items() if x is not None}
            out.append(self._target(params, observed, predict, estimate, samples, v.round, batch=batch))
        return out

    # ---- FedLoRU: trained factors on a frozen base --------------------------------------
    def _fedloru(self, views: list[RoundView]):
        """W = W0 + s·B A (s = α / r, public). The local step (a public setting) maps a
        gradient G of W to the factors' steps:

        * ``official``: SGD with momentum μ, weight decay wd and the gradient of all trained
          tensors clipped to 2-norm c (μ, wd, c public). One summed step: the client moved
          by −λ·m·(clip(g) + wd·p) with m = Σ_t Σ_{j<=t} μ^j the momentum's gain over s steps
          for a constant gradient, p the broadcast values; so the observation is
          −Δ/(λ m) − wd·p and ``predict`` applies the clipping to the candidate's
          (s·G Aᵀ, s·Bᵀ G, dense) as the client's optimizer did;
        * ``preconditioned``: plain steps on Gram-scaled factor gradients (``damping``).

        A client's personal modules (pFedLoRU) never leave it: not modelled.
        """
        from algorithms.fedloru import merge

        alg, cfg, out = self.algorithm, self.config, []
        s = float(alg.scale)
        official = getattr(cfg, "local_step", "preconditioned") == "official"
        momentum = float(cfg.momentum) if official else 0.0
        wd = float(cfg.weight_decay) if official else 0.0
        clip = float(cfg.max_grad_norm) if official else 0.0
        damping = 0.0 if official else float(getattr(cfg, "damping", 0.0) or 0.0)
        gain = sum(sum(momentum ** j for j in range(t + 1)) for t in range(cfg.local_steps))
        if getattr(cfg, "personal_rank", 0):
            self.count("personal_modules_unmodelled")
        bases: dict[int, dict[str, torch.Tensor]] = {}
        for v in views:
            if "train" not in v.down:
                self.count("incomplete_round")
                continue
            down = v.down["train"].payload
            t, version = down.tensors, down.meta.get("base_version")
            if all(f"{k}.W0" in t for k in alg.factorised):
                bases[version] = {k: t[f"{k}.W0"].clone() for k in alg.factorised}
            elif "merge_from" in down.meta and down.meta["merge_from"] in bases:
                held = bases[down.meta["merge_from"]]
                bases[version] = {k: merge(held[k], t[f"{k}.mergeB"], t[f"{k}.mergeA"], s) for k in alg.factorised}
            if version not in bases:
                self.count("no_base")
                continue
            if "train" not in v.up or v.up["train"].payload.meta.get("resync"):
                self.count("incomplete_round")
                continue
            base = bases[version]
            A = {k: t[f"{k}.A"].clone() for k in alg.factorised}
            B = {k: t[f"{k}.B"].clone() for k in alg.factorised}
            dense = {d: t[d].clone() for d in alg.dense_names}
            params = {k: (merge(base[k], B[k], A[k], s) if k in base else t[k].clone()) for k in self.param_names}
            up = v.up["train"].payload
            samples = int(up.meta["samples"])
            step = cfg.lr * gain
            observed: Params = {}
            for k in alg.factorised:
                observed[f"{k}.A"] = -(up.tensors[f"{k}.A"] - A[k]) / step - wd * A[k]
                observed[f"{k}.B"] = -(up.tensors[f"{k}.B"] - B[k]) / step - wd * B[k]
            for d in alg.dense_names:
                observed[f"{d}.delta"] = -up.tensors[f"{d}.delta"] / step - wd * dense[d]

            def predict(grads: Params, A=A, B=B) -> Params:
                o: Params = {}
                for k in alg.factorised:
                    G = grads[k].reshape(B[k].shape[0], A[k].shape[1])
                    gB, gA = s * (G @ A[k].T), s * (B[k].T @ G)
                    if damping:
                        eye = torch.eye(A[k].shape[0])
                        gB = torch.linalg.solve(A[k] @ A[k].T + damping * eye, gB.T).T
                        gA = torch.linalg.solve(B[k].T @ B[k] + damping * eye, gA)
                    o[f"{k}.A"], o[f"{k}.B"] = gA, gB
                for d in alg.dense_names:
                    o[f"{d}.delta"] = grads[d]
                if clip:
                    total = torch.sqrt(sum((x ** 2).sum() for x in o.values()))
                    factor = torch.clamp(clip / (total + 1e-6), max=1.0)
                    o = {key: x * factor for key, x in o.items()}
                return o

            estimate = {d: observed[f"{d}.delta"] for d in alg.dense_names}
            out.append(self._target(params, observed, predict, estimate, samples, v.round))
        return out

    # ---- top-k with EF21 memory: sparse innovations against a mirrored estimate ---------
    def _topk(self, views: list[RoundView]):
        from algorithms.topk import _add_sparse, estimate_tag

        out = []
        known: dict[str, Params] = {}
        """tag -> estimate G_i: every one this listener rebuilt (the server acks one of them)."""
        for v in views:
            if "grad" not in v.up:
                self.count("incomplete_round")
                continue
            p = v.up["grad"].payload
            if p.meta["reset"]:
                base = {k: torch.zeros(shape) for k, shape in self._shapes.items()}
            elif p.meta["base"] in known:
                base = known[p.meta["base"]]
            else:
                self.count("no_base")  # an innovation against an estimate never heard
                continue
            idx = {k: p.tensors[f"idx:{k}"].long() for k in self.param_names}
            new = {k: _add_sparse(base[k], p.tensors[f"idx:{k}"], p.tensors[f"val:{k}"]) for k in self.param_names}
            if estimate_tag(new) != p.meta["tag"]:
                self.count("tag_mismatch")
                continue
            known[p.meta["tag"]] = new
            if "grad" not in v.down:
                self.count("incomplete_round")
                continue
            # At the k sent coordinates the new estimate is the gradient itself
            # (G + (g - G) = g); elsewhere it is stale memory, so only those entries are matched.
            observed = {k: new[k].reshape(-1)[idx[k]].clone() for k in self.param_names}

            def predict(grads: Params, idx=idx) -> Params:
                return {k: grads[k].reshape(-1)[idx[k]] for k in idx}

            out.append(self._target(self._model(v.down["grad"]), observed, predict, new, None, v.round))
        return out


def make_decoder(scenario, input_shape: tuple[int, ...], num_classes: int) -> Decoder:
    """The attacker's decoder for ``scenario``'s method, from its public settings only."""
    from .models import build_model

    model = build_model(scenario.model, input_shape, num_classes, scenario.run.seed)
    algorithm = scenario.algorithm_class(scenario.algorithm, build_model(scenario.model, input_shape, num_classes,
                                                                         scenario.run.seed))
    return Decoder(scenario.algorithm_name, scenario.algorithm, algorithm, model, input_shape, num_classes)


AttackFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
