"""The gradient step of clients that hold the same weights: one shared pass vs stacked copies.

SGD and the compressing methods send a gradient (compressed or not) each round, computed by
every client on a minibatch at the weights it holds. When the clients of an instant hold the
same weights and their stacked copies would leave the cache, fedsim runs one forward and
backward pass through those weights over every client's samples and batches only the weight
gradients (``algorithms.shared_start.grads``, the default); the other side switches that off,
so the clients are stacked in cache-sized chunks (``fastpath.grads_stacked``, 4 clients of
the 784-200-10 MLP at a time).

Workload: the usual peer benchmark's model and data (MLP 784-200-10 on synthetic 784
features, 100 clients x 100 samples, iid), each method's default minibatch and learning
rate, 6 rounds. The steady round (median wall time between round ends) of each side,
alternated in one process, ``--repeats`` times; medians; the largest parameter difference
between the sides and their final accuracies.

Run: python bench/gradient_pass.py [--methods sgd qrr] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.table import Table

import fedsim.runner
from algorithms import shared_start
from bench import overhead, vectorised
from fedsim.runner import run
from fedsim.scenario import load_scenario

WORKLOAD = ["data.partition=iid", "run.rounds=6", "data.clients=100", "data.dataset=synthetic", "data.features=784",
            "data.samples=12500", "model.kind=mlp", "model.hidden=[200]"]


def _steady_run(scenario, shared: bool):
    pays = shared_start.grads_pay
    if not shared:
        shared_start.grads_pay = lambda *args: False
    marks: list[float] = []
    try:
        result = run(scenario, progress=lambda m, total: marks.append(time.perf_counter()))
    finally:
        shared_start.grads_pay = pays
    return vectorised.steady(marks), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["sgd"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # Generate the synthetic data set once for both sides (setup is not what is compared).
    fedsim.runner.load_dataset = overhead.load_dataset = vectorised._cached_load
    table = Table(title=f"bench/gradient_pass.py: MLP 784-200-10, 100 clients, steady round, median of {args.repeats} "
                        "(1 thread, sides alternated)")
    for col in ("method", "stacked copies (s)", "one shared pass (s)", "shared / stacked", "max |param diff|",
                "final accuracy (shared / stacked)"):
        table.add_column(col)
    for method in args.methods:
        scenario = load_scenario(None, WORKLOAD + [f"algorithm.name={method}"])
        times: dict[bool, list[float]] = {True: [], False: []}
        results = {}
        for rep in range(args.repeats + 1):  # the first pass warms up
            for shared in (True, False):
                steady, results[shared] = _steady_run(scenario, shared)
                if rep:
                    times[shared].append(steady)
        med = {k: statistics.median(v) for k, v in times.items()}
        diff = max(float((results[True].final_params[k] - results[False].final_params[k]).abs().max())
                   for k in results[True].final_params)
        table.add_row(method, f"{med[False]:.3f}", f"{med[True]:.3f}", f"{med[True] / med[False]:.2f}", f"{diff:.1e}",
                      f"{results[True].summary['final_accuracy']:.4f} / {results[False].summary['final_accuracy']:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
