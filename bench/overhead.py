"""Framework overhead: the same FedAvg work through fedsim (virtual time) and a bare loop.

Work: 100 clients, MLP on digits, 1 local epoch, batch 32, lr 0.1, 5 rounds, evaluation
after each round, same partition and initial weights. Both sides are timed from data
loading to the final evaluation, alternately, ``--repeats`` times each; the table reports
medians and the ratio fedsim/bare (target <= 1.15). Run: python bench/overhead.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from algorithms.base import params_digest
from fedsim.data import load_dataset, partition
from fedsim.models import build_model, evaluate
from fedsim.runner import run
from fedsim.scenario import load_scenario

OVERRIDES = ["data.clients=100", "data.partition=iid", "model.kind=mlp", "model.hidden=[64]", "algorithm.name=fedavg",
             "algorithm.local_epochs=1", "algorithm.batch_size=32", "algorithm.lr=0.1", "run.rounds=5"]


def bare(scenario) -> tuple[float, float]:
    """A plain single-process FedAvg loop in idiomatic PyTorch: no actors, no codec, no network."""
    t0 = time.perf_counter()
    seed, cfg = scenario.run.seed, scenario.algorithm
    ds = load_dataset(scenario.data, seed)
    parts = partition(ds.train_y, scenario.data, seed)
    model = build_model(scenario.model, ds.input_shape, ds.num_classes, seed)
    global_w = {k: v.detach().clone() for k, v in model.named_parameters()}
    sizes = [len(p) for p in parts]
    data = [(ds.train_x[p], ds.train_y[p]) for p in parts]
    acc = 0.0
    for r in range(scenario.run.rounds):
        total = float(sum(sizes))
        new_w = {k: torch.zeros_like(v) for k, v in global_w.items()}
        for c, (x, y) in enumerate(data):
            model.load_state_dict(global_w, strict=False)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            g = torch.Generator().manual_seed(seed * 100_003 + c * 101 + r)
            for _ in range(cfg.local_epochs):
                order = torch.randperm(len(x), generator=g)
                for i in range(0, len(x), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            with torch.no_grad():
                for k, v in model.named_parameters():
                    new_w[k].add_(v, alpha=sizes[c] / total)
        global_w = new_w
        acc, _ = evaluate(model, global_w, ds.test_x, ds.test_y)
    return time.perf_counter() - t0, acc


def framework(scenario) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = run(scenario)
    return time.perf_counter() - t0, result.summary["final_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    scenario = load_scenario(None, OVERRIDES)
    framework(scenario), bare(scenario)  # warm-up: imports, allocator, first-call costs
    times = {"bare": [], "fedsim": []}
    accs = {}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("fedsim", framework)):
            t, acc = fn(scenario)
            times[name].append(t)
            accs[name] = acc
    med = {k: statistics.median(v) for k, v in times.items()}
    table = Table(title="bench/overhead.py: FedAvg, 100 clients, MLP 64 on digits, 1 epoch, batch 32, 5 rounds")
    for col in ("loop", "median wall (s)", "min (s)", "max (s)", "final accuracy"):
        table.add_column(col)
    for k in ("bare", "fedsim"):
        table.add_row(k, f"{med[k]:.3f}", f"{min(times[k]):.3f}", f"{max(times[k]):.3f}", f"{accs[k]:.4f}")
    ratio = med["fedsim"] / med["bare"]
    table.add_row("ratio fedsim/bare", f"{ratio:.3f}", "", "", "target <= 1.15")
    Console().print(table)
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
