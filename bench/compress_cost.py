"""Encode and decode cost per step of each compression method, next to the plain SGD step.

For an MLP 784-200-10 and a small CNN (two conv blocks 1->8->16 on 28x28, then a linear
head), with a 32-sample minibatch: the SGD step (forward + backward) time, then per method
the client's encode time (everything after the gradient: decomposition, quantization,
bit-packing) and the server's decode time (unpacking and rebuilding the gradient estimate),
each also as a multiple of the SGD step. QRR is timed on both SVD paths (its paper reports
3.82x the SGD step time for the whole QRR step). Median of repeated runs; seeded.

Usage:  .venv/bin/python bench/compress_cost.py [--repeats 7]      (< 2 minutes)

Encode time starts once the gradient exists (the methods' gradient call is replaced by a
precomputed one) and ends when the handler returns its payload; it includes hashing the
accumulator for the state-sync tag (LAQ, QRR).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms import get_algorithm  # noqa: E402
from algorithms import quantizers as qz  # noqa: E402
from algorithms.base import Payload  # noqa: E402
from algorithms.common import loss_and_grad  # noqa: E402
from algorithms import laq as laq_module  # noqa: E402
from algorithms import powersgd as powersgd_module  # noqa: E402
from algorithms.powersgd import orthonormalise  # noqa: E402

METHODS = [
    ("laq", {"bits": 8}),
    ("qrr", {"bits": 8, "rank_fraction": 0.3, "svd": "exact"}),
    ("qrr", {"bits": 8, "rank_fraction": 0.3, "svd": "randomized"}),
    ("powersgd", {"rank": 4}),
    ("lqsgd", {"rank": 4, "bits": 8}),
]


class SmallCNN(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                         torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                         torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 10))


def models():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    return [("MLP 784-200-10", mlp, (784,)), ("CNN 8-16 (28x28)", SmallCNN(), (1, 28, 28))]


class Ctx:
    def __init__(self, model, x, y):
        self.client_id, self.round, self.model, self.x, self.y, self.state = 0, 0, model, x, y, {}

    @property
    def generator(self):
        return torch.Generator().manual_seed(self.round)

    def charge(self, samples, factor=1.0):
        pass


def timed_handlers(model, x, y):
    """Make the methods' gradient step free and mark the time a handler starts encoding, so
    that encode time excludes the forward/backward pass (timed separately as the SGD step)."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    _, grads = loss_and_grad(model, params, x, y)

    def precomputed(model_, params_, x_, y_, batch_size, generator):
        _MARK["t"] = time.perf_counter()
        return 0.0, {k: g.clone() for k, g in grads.items()}, len(x_)

    laq_module.gradient = precomputed
    powersgd_module.gradient = precomputed


_MARK = {"t": 0.0}


def _last_handler_time(ctx) -> float:
    return time.perf_counter() - _MARK["t"]


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sgd_step(model, params, x, y):
    return median_time(lambda: loss_and_grad(model, params, x, y), 1)


def measure_laq_family(alg, model, x, y, repeats):
    """Client encode (whole handler minus the gradient) and server decode+rebuild."""
    params = alg.params
    ctx = Ctx(model, x, y)
    req = Payload(tensors=params, meta={"ack": None, "lazy_bound": 0.0}, version=0)
    reply = alg.on_grad(ctx, req)               # warm up; reset against 0
    ack = reply.meta["tag"]
    encode, decode = [], []
    for r in range(1, repeats + 1):
        ctx.round = r
        reply = alg.on_grad(ctx, Payload(tensors=params, meta={"ack": ack, "lazy_bound": 0.0}, version=r))
        encode.append(_last_handler_time(ctx))
        if "skip" in reply.meta:
            continue
        base = ctx.state["Q"] if "Q" in ctx.state else alg._zeros()
        t = time.perf_counter()
        new = {n: qz.laq_dequantize(base[n], reply.tensors["radii"][i], reply.tensors[n], alg.config.bits)
               for i, n in enumerate(alg.layout)}
        alg.rebuild(new)
        decode.append(time.perf_counter() - t)
        ack = reply.meta["tag"]
    return statistics.median(encode), statistics.median(decode) if decode else float("nan"), reply.payload_bits


def measure_powersgd(alg, model, x, y, repeats):
    params = alg.params
    ctx = Ctx(model, x, y)
    encode, decode = [], []
    bits = 0
    for r in range(repeats):
        ctx.round = r
        req = Payload(tensors={**params, **{f"Q:{k}": v for k, v in alg.Q.items()}}, meta={"included": r - 1}, version=r)
        first = alg.on_p(ctx, req)
        enc1 = _last_handler_time(ctx)
        t = time.perf_counter()
        heard = alg.decode(first.tensors, alg._p_shapes())
        p_hat = {k: orthonormalise(heard[f"P:{k}"]) for k in alg.compressed}
        dec1 = time.perf_counter() - t
        t = time.perf_counter()
        second = alg.on_q(ctx, Payload(tensors={f"P:{k}": v for k, v in p_hat.items()}, meta={"p_tag": "0" * 16}, version=r))
        enc2 = time.perf_counter() - t
        t = time.perf_counter()
        done = alg.decode(second.tensors, alg._q_shapes())
        for k in alg.compressed:
            (p_hat[k] @ done[f"Q:{k}"].T).reshape(alg.plans[k].shape)
        dec2 = time.perf_counter() - t
        encode.append(enc1 + enc2)
        decode.append(dec1 + dec2)
        bits = first.payload_bits + second.payload_bits
    return statistics.median(encode), statistics.median(decode), bits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    console = Console()
    for title, model, shape in models():
        x = torch.randn(args.batch, *shape)
        y = torch.randint(0, 10, (args.batch,))
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        loss_and_grad(model, params, x, y)
        sgd_t = median_time(lambda: loss_and_grad(model, params, x, y), args.repeats * 2)
        dense = 32 * sum(p.numel() for p in params.values())
        timed_handlers(model, x, y)
        table = Table(title=f"{title}: per-step cost (batch {args.batch}; SGD step = forward + backward)")
        for col in ("method", "encode ms", "decode ms", "encode / SGD step", "step total / SGD step", "uplink bits", "vs sgd bits"):
            table.add_column(col, justify="right" if col != "method" else "left")
        table.add_row("sgd", f"{sgd_t * 1e3:.2f} (step)", "-", "-", "1.00x", f"{dense:,}", "1.000")
        for name, cfg in METHODS:
            cls = get_algorithm(name)
            alg = cls(cls.make_config(cfg), model)
            if name in ("powersgd", "lqsgd"):
                enc, dec, bits = measure_powersgd(alg, model, x, y, args.repeats)
            else:
                enc, dec, bits = measure_laq_family(alg, model, x, y, args.repeats)
            label = name + (f" ({cfg['svd']} svd)" if name == "qrr" else "")
            table.add_row(label, f"{enc * 1e3:.2f}", f"{dec * 1e3:.2f}", f"{enc / sgd_t:.2f}x",
                          f"{(sgd_t + enc + dec) / sgd_t:.2f}x", f"{bits:,}", f"{bits / dense:.3f}")
        console.print(table)


if __name__ == "__main__":
    main()
