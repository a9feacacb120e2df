"""Encode and decode cost per step of each compression method, next to the plain SGD step.

Models: the runtime's MLP 784-200-10 and small CNN (conv 3x3 blocks 1->8->16 on 28x28, then
a linear head; ``fedsim.models``), a minibatch of 32 seeded random images. Per method:

* **encode** (client): everything a client's handler does after its gradient exists:
  decomposition (SVD / Tucker / power step), quantization, bit-packing, hashing the
  accumulator for the state-sync tag, error feedback. The handlers run as in a real round;
  only their gradient call returns one of four precomputed minibatch gradients (cycled), so
  that the forward/backward pass is not counted twice;
* **decode** (server, per client): validating the reply, unpacking and dequantizing, checking
  the tag, rebuilding the gradient estimate (PowerSGD/LQ-SGD: both phases, orthonormalising
  P and forming P Qᵀ);
* the **SGD step**: forward + backward of the same minibatch (``loss_and_grad``, on fedsim's
  default lean path; the autograd step is the next row, for reference); the last
  columns give encode and (step + encode + decode) as multiples of it. QRR's paper reports
  3.82x the SGD step for its whole step; QRR is timed on the exact and the randomised SVD.

FeDLRT and FedLoRU do not compress a gradient: their clients train factors. For them the
second table gives a client's **local step** through the factorisation (W = U S Vᵀ on the
augmented basis, with FeDLRT's default rank doubled by the augmentation; W = W0 + B A) against
the same dense step (what FedAvg's clients take), and the server's per-round math (FeDLRT:
augmenting both bases and truncating; FedLoRU: merging B A into the base, every τ rounds).
Their rank is read from their configs' defaults.

Timings are medians over ``--repeats`` rounds, with the methods interleaved round-robin (one
round of each in turn) so that load from other processes spreads over all of them alike, on
one torch thread. ``--clock cpu`` times with the thread's CPU time instead of the elapsed time:
on a shared machine a longer operation is more often descheduled midway, which inflates its
elapsed time (and its ratio to the short SGD step) by whatever else runs. Uplink bits are each method's paper count per step. The methods' settings
are the results table's (bench/settings.py).

Usage:  .venv/bin/python bench/compress_cost.py [--repeats 41] [--clock wall|cpu]      (about 10 seconds)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algorithms import fastpath, get_algorithm  # noqa: E402
from algorithms import laq as laq_module  # noqa: E402
from algorithms import powersgd as powersgd_module  # noqa: E402
from algorithms.base import Payload  # noqa: E402
from algorithms.common import dense_bits, loss_and_grad  # noqa: E402
from algorithms.powersgd import orthonormalise  # noqa: E402
from algorithms.lowrank import (augment_basis, linear_weights, local_steps, scaled_factor_grads,  # noqa: E402
                                svd_factors, truncate)
from algorithms.fedloru import init_modules, merge  # noqa: E402
from bench import settings as S  # noqa: E402
from fedsim.models import ModelConfig, build_model  # noqa: E402



def method_configs() -> list[tuple[str, str, dict]]:
    """(name, label, config) of each gradient-compression method, with the results table's
    settings (bench/settings.py); QRR once per SVD path."""
    out = []
    for name, extra in S.GRADIENT_METHODS.items():
        if name == "sgd":
            continue
        pairs = (e.removeprefix("algorithm.").split("=", 1) for e in extra)
        cfg = {k: tomllib.loads(f"v = {v}")["v"] for k, v in pairs}  # values as a scenario parses them
        shown = ", ".join(f"{k}={v}" for k, v in cfg.items())
        if name == "qrr":
            out += [(name, f"qrr ({shown}, {svd} svd)", {**cfg, "svd": svd}) for svd in ("exact", "randomized")]
        else:
            out.append((name, f"{name} ({shown})", cfg))
    return out


GRADIENTS = 4
"""Distinct precomputed minibatch gradients the handlers cycle through."""


def models(seed: int = 1) -> list[tuple[str, torch.nn.Module]]:
    shape = (1, 28, 28)
    return [("MLP 784-200-10", build_model(ModelConfig(kind="mlp", hidden=[200]), shape, 10, seed)),
            ("CNN 8-16 (28x28)", build_model(ModelConfig(kind="cnn", channels=[8, 16]), shape, 10, seed))]


class Ctx:
    """The ClientContext a handler sees (one client; its state persists across rounds)."""

    def __init__(self, model, x, y):
        self.client_id, self.round, self.model, self.x, self.y, self.state = 0, 0, model, x, y, {}

    @property
    def generator(self):
        return torch.Generator().manual_seed(1000 + self.round)

    def charge(self, samples, factor=1.0):
        pass


class Comm:
    """The counters and log a server-side method call may touch."""

    def count(self, name, n=1):
        pass

    def log(self, event, **fields):
        pass


class Clock:
    """What every timing reads (``--clock``), and when a handler's (precomputed) gradient was
    ready: encode time starts there."""

    now = staticmethod(time.perf_counter)
    mark = 0.0


def precomputed_gradients(grads: list[dict[str, torch.Tensor]]):
    """A stand-in for the methods' ``minibatch_gradient`` (``algorithms.common``; a handler
    takes its gradient with ``yield from`` it): returns the next precomputed gradient at once,
    without asking the caller for one."""
    state = {"i": 0}

    def minibatch_gradient(params, x, y, batch_size, generator, l2=0.0):
        g = grads[state["i"] % len(grads)]
        state["i"] += 1
        out = {k: v.clone() for k, v in g.items()}
        Clock.mark = Clock.now()
        return out, len(x)
        yield  # a generator, as the real one (never reached)
    return minibatch_gradient


class LaqCase:
    """LAQ, SLAQ and QRR: one upload per step, decoded by the server's own ``_apply``."""

    def __init__(self, alg, model, x, y):
        self.alg, self.ctx, self.comm, self.r = alg, Ctx(model, x, y), Comm(), 0
        self.bits = 0

    def step(self) -> tuple[float, float]:
        alg, ctx = self.alg, self.ctx
        self.r += 1
        ctx.round = self.r
        # lazy_bound 0: SLAQ skips only when its innovation is within the quantization error
        req = Payload(tensors=alg.params, meta={"ack": alg.tags.get(0), "lazy_bound": 0.0}, version=self.r)
        reply = alg.on_grad(ctx, req)
        encode = Clock.now() - Clock.mark
        if "skip" in reply.meta:
            return encode, float("nan")
        start = Clock.now()
        alg.check_reply("grad", reply)
        alg._apply(self.comm, 0, reply, self.r)
        decode = Clock.now() - start
        if alg.tags.get(0) != reply.meta["tag"]:
            raise RuntimeError(f"{alg.name}: the server did not accept the upload")
        self.bits = reply.payload_bits
        return encode, decode


class PowerCase:
    """PowerSGD and LQ-SGD: phase 1 (P) and phase 2 (Q) of one step, both ends."""

    def __init__(self, alg, model, x, y):
        self.alg, self.ctx, self.r, self.bits = alg, Ctx(model, x, y), 0, 0

    def step(self) -> tuple[float, float]:
        alg, ctx = self.alg, self.ctx
        self.r += 1
        r = ctx.round = self.r
        req = Payload(tensors={**alg.params, **{f"Q:{k}": v for k, v in alg.Q.items()}},
                      meta={"included": r - 1}, version=r)
        first = alg.on_p(ctx, req)
        encode = Clock.now() - Clock.mark
        start = Clock.now()
        alg.check_reply("p", first)
        heard = alg.decode(first.tensors, alg._p_shapes())
        p_hat = {k: orthonormalise(heard[f"P:{k}"]) for k in alg.compressed}
        decode = Clock.now() - start
        start = Clock.now()
        second = alg.on_q(ctx, Payload(tensors={f"P:{k}": v for k, v in p_hat.items()}, meta={"p_tag": "0" * 16},
                                       version=r))
        encode += Clock.now() - start
        start = Clock.now()
        alg.check_reply("q", second)
        done = alg.decode(second.tensors, alg._q_shapes())
        for k in alg.compressed:
            (p_hat[k] @ done[f"Q:{k}"].T).reshape(alg.plans[k].shape)
            alg.Q[k] = done[f"Q:{k}"].contiguous()
        decode += Clock.now() - start
        self.bits = first.payload_bits + second.payload_bits
        return encode, decode


class SgdCase:
    """The reference: forward + backward of the minibatch, on fedsim's default lean path
    (``algorithms.fastpath``) or, with ``autograd``, through autograd (``run.vectorise = false``)."""

    def __init__(self, model, x, y, autograd: bool = False):
        self.model, self.x, self.y, self.autograd = model, x, y, autograd
        self.params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def step(self) -> tuple[float, float]:
        fastpath.set_enabled(self.model, not self.autograd)
        start = Clock.now()
        loss_and_grad(self.model, self.params, self.x, self.y)
        elapsed = Clock.now() - start
        fastpath.set_enabled(self.model, True)
        return elapsed, 0.0


class LowRankStepCase:
    """One local step as FeDLRT / FedLoRU clients take it (``lowrank.local_steps``, steps=1)."""

    def __init__(self, model, x, y, build, leaves, precondition=None):
        self.model, self.x, self.y, self.build, self.leaves = model, x, y, build, leaves
        self.precondition, self.generator = precondition, torch.Generator().manual_seed(0)

    def step(self) -> tuple[float, float]:
        start = Clock.now()
        self.leaves, _ = local_steps(self.model, self.build, self.leaves, self.x, self.y, loss="cross_entropy",
                                     lr=0.01, steps=1, batch_size=0, generator=self.generator,
                                     precondition=self.precondition)
        return Clock.now() - start, 0.0


class FedlrtServerCase:
    """FeDLRT's server math of one round: augment U and V with the mean basis gradients, truncate."""

    def __init__(self, params, names, rank, tolerance, generator):
        self.layers = {k: svd_factors(params[k], rank) for k in names}
        self.grads = {k: (torch.randn(f.U.shape, generator=generator), torch.randn(f.V.shape, generator=generator))
                      for k, f in self.layers.items()}
        self.tolerance = tolerance

    def step(self) -> tuple[float, float]:
        start = Clock.now()
        for k, f in self.layers.items():
            U = torch.cat([f.U, augment_basis(f.U, self.grads[k][0])], dim=1)
            V = torch.cat([f.V, augment_basis(f.V, self.grads[k][1])], dim=1)
            S = torch.zeros(U.shape[1], V.shape[1])
            S[:f.rank, :f.rank] = f.S
            truncate(U, S + 1e-3, V, self.tolerance, min(U.shape[0], V.shape[0]))
        return 0.0, Clock.now() - start


class FedloruServerCase:
    """FedLoRU's merge W0 <- W0 + B A of every factorised layer (once every τ rounds)."""

    def __init__(self, params, names, rank, generator):
        shapes = {k: tuple(params[k].shape) for k in names}
        self.base = {k: params[k].clone() for k in names}
        A, B = init_modules(shapes, rank, generator)
        self.A, self.B = A, {k: torch.randn(b.shape, generator=generator) for k, b in B.items()}

    def step(self) -> tuple[float, float]:
        start = Clock.now()
        for k in self.base:
            merge(self.base[k], self.B[k], self.A[k])
        return 0.0, Clock.now() - start


def lowrank_cases(model, x, y, seed):
    """(label, case) of the FedAvg-family comparison: dense step, factorised steps, server math.
    A method whose default rank or ``keep_last_dense`` leaves nothing to factorise is left out."""
    g = torch.Generator().manual_seed(seed)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    fedlrt_cfg, fedloru_cfg = get_algorithm("fedlrt").Config(), get_algorithm("fedloru").Config()
    cases = [("fedavg: dense local step (same local_steps machinery)",
              LowRankStepCase(model, x, y, lambda leaves: leaves, dict(params)))]
    skipped = []

    def factorised(cfg, name):
        names = linear_weights(model, cfg.keep_last_dense)
        fits = names and all(cfg.rank <= min(params[k].shape) for k in names)
        if not fits:
            skipped.append(f"{name}: rank {cfg.rank}, keep_last_dense={cfg.keep_last_dense}: no layer to factorise")
        return names if fits else []

    names = factorised(fedlrt_cfg, "fedlrt")
    if names:
        # FeDLRT trains S̃ (a_U x a_V, about 2r x 2r) in the augmented basis
        U, V, leaves = {}, {}, {k: params[k].clone() for k in params if k not in names}
        for k in names:
            n, m = params[k].shape
            aU, aV = min(n, 2 * fedlrt_cfg.rank), min(m, 2 * fedlrt_cfg.rank)
            U[k] = torch.linalg.qr(torch.randn(n, aU, generator=g)).Q
            V[k] = torch.linalg.qr(torch.randn(m, aV, generator=g)).Q
            leaves[f"{k}.S"] = torch.randn(aU, aV, generator=g) * 0.1

        def build_fedlrt(leaves):
            return {k: (U[k] @ leaves[f"{k}.S"] @ V[k].T if k in U else leaves[k]) for k in params}
        cases.append((f"fedlrt: local step on S̃ (rank {fedlrt_cfg.rank}, augmented)",
                      LowRankStepCase(model, x, y, build_fedlrt, leaves)))
        cases.append(("fedlrt: server augment + truncate / round",
                      FedlrtServerCase(params, names, fedlrt_cfg.rank, fedlrt_cfg.tolerance, g)))
    lora_names = factorised(fedloru_cfg, "fedloru")
    if lora_names:
        base = {k: params[k].clone() for k in lora_names}
        A, B = init_modules({k: tuple(params[k].shape) for k in lora_names}, fedloru_cfg.rank, g)
        lora = {k: params[k].clone() for k in params if k not in lora_names}
        # trained modules are not zero: give the zero factor a value so the step is a typical one
        lora.update({f"{k}.A": A[k] + 0.01 * torch.randn(A[k].shape, generator=g) for k in lora_names})
        lora.update({f"{k}.B": B[k] + 0.01 * torch.randn(B[k].shape, generator=g) for k in lora_names})

        def build_fedloru(leaves):
            return {k: (base[k] + leaves[f"{k}.B"] @ leaves[f"{k}.A"] if k in base else leaves[k]) for k in params}

        def precondition(grads, leaves):  # FedLoRU's scaled steps (its ``damping``)
            out = dict(grads)
            for k in lora_names:
                kb, ka = f"{k}.B", f"{k}.A"
                out[kb], out[ka] = scaled_factor_grads(grads[kb], grads[ka], leaves[kb], leaves[ka],
                                                       fedloru_cfg.damping)
            return out
        damped = getattr(fedloru_cfg, "damping", 0)
        cases.append((f"fedloru: local step on B, A (rank {fedloru_cfg.rank}"
                      + (f", scaled, damping {damped})" if damped else ")"),
                      LowRankStepCase(model, x, y, build_fedloru, lora, precondition if damped else None)))
        cases.append((f"fedloru: server merge / {fedloru_cfg.merge_every} rounds",
                      FedloruServerCase(params, lora_names, fedloru_cfg.rank, g)))
    return cases, skipped


def measure(title: str, model: torch.nn.Module, batch: int, repeats: int, seed: int):
    """Rows (label, encode s, decode s, bits) for ``model``, the SGD step first."""
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(GRADIENTS)]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = [{k: v.detach().clone() for k, v in loss_and_grad(model, params, x, y)[1].items()} for x, y in batches]
    fake = precomputed_gradients(grads)
    laq_module.minibatch_gradient = fake  # QRR's handler is LAQ's; LQ-SGD's is PowerSGD's
    powersgd_module.minibatch_gradient = fake
    x, y = batches[0]
    cases: list[tuple[str, object]] = [("sgd step (forward + backward)", SgdCase(model, x, y)),
                                       ("sgd step through autograd (run.vectorise = false)", SgdCase(model, x, y, True))]
    for name, label, cfg in method_configs():
        cls = get_algorithm(name)
        alg = cls(cls.make_config(cfg), model)
        case = PowerCase(alg, model, x, y) if name in ("powersgd", "lqsgd") else LaqCase(alg, model, x, y)
        cases.append((label, case))
    split = len(cases)
    extra, skipped = lowrank_cases(model, x, y, seed)
    cases += extra
    for _, case in cases:  # warm up: first-call allocations, the reset upload against 0
        case.step()
        case.step()
    times = {label: ([], []) for label, _ in cases}
    for _ in range(repeats):
        for label, case in cases:
            enc, dec = case.step()
            times[label][0].append(enc)
            if dec == dec:  # a SLAQ skip has no decode
                times[label][1].append(dec)
    rows = []
    for label, case in cases:
        enc, dec = times[label]
        bits = getattr(case, "bits", 0) or dense_bits(params)
        rows.append((label, statistics.median(enc), statistics.median(dec) if dec else float("nan"), bits,
                     len(enc) - len(dec)))
    return rows[:split], rows[split:], skipped


def render(title: str, rows, batch: int) -> str:
    """A markdown table: the SGD step, then each method's encode and decode."""
    sgd = rows[0][1]
    dense = rows[0][3]
    out = [f"**{title}**, batch {batch}: SGD step (forward + backward) = {1e3 * sgd:.2f} ms", "",
           "| method | encode ms | decode ms | encode / SGD step | (step + encode + decode) / SGD step "
           "| uplink bits / step | vs sgd |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for label, enc, dec, bits, skips in rows[1:]:
        note = f" ({skips} lazy skips)" if skips else ""
        out.append(f"| {label}{note} | {1e3 * enc:.2f} | {1e3 * dec:.2f} | {enc / sgd:.2f}x "
                   f"| {(sgd + enc + dec) / sgd:.2f}x | {bits:,} | {bits / dense:.3f} |")
    return "\n".join(out)


def render_lowrank(title: str, rows, sgd: float, skipped: list[str]) -> str:
    out = [f"**{title}**: FedAvg-family client step and server math (SGD step = {1e3 * sgd:.2f} ms)", "",
           "| what | ms | / SGD step |", "|---|---:|---:|"]
    for label, enc, dec, _, _ in rows:
        t = enc if enc else dec
        out.append(f"| {label} | {1e3 * t:.2f} | {t / sgd:.2f}x |")
    out += [f"| {why} | - | - |" for why in skipped]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (default); cpu: this thread's CPU time, which leaves out "
                         "the time other processes hold the core (steadier on a shared machine)")
    args = ap.parse_args(argv)
    Clock.now = staticmethod(time.perf_counter if args.clock == "wall" else time.thread_time)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, 1 thread, {args.repeats} interleaved repeats (medians of "
          f"{'elapsed' if args.clock == 'wall' else 'thread CPU'} time); "
          f"load average at start {load:.2f} on {os.cpu_count()} cores\n")
    for title, model in models(args.seed):
        rows, lowrank, skipped = measure(title, model, args.batch, args.repeats, args.seed)
        print(render(title, rows, args.batch), "\n", flush=True)
        print(render_lowrank(title, lowrank, rows[0][1], skipped), "\n", flush=True)


if __name__ == "__main__":
    main()
