"""Framework overhead: the same FedAvg work through fedsim (virtual time) and a bare loop.

Two workloads, each FedAvg, 1 local epoch, batch 32, 5 rounds, evaluation after each round,
the same partition and initial weights on both sides:

* ``digits``: 100 clients, MLP 64 on the 8x8 digits, lr 0.1;
* ``mlp784``: 100 clients, MLP 784-200-10 (159k parameters, 636 KB a message) on synthetic
  784-feature data, 100 samples a client, lr 0.05 (the usual peer-framework benchmark).

fedsim runs its plain path (``run.vectorise = false``: autograd, one client at a time, as the
bare loop) and its default lean path (``run.vectorise = true``). The sides are timed from data
loading to the final evaluation, alternately in one process, ``--repeats`` times each; the
table reports medians and the ratios to the bare loop (target: plain/bare <= 1.10), for the
whole run and for the steady round (median wall time between round ends: no data loading;
synthetic 784-feature data takes seconds to generate, the same on every side, which
dilutes the whole-run ratio of that workload).
Run: python bench/overhead.py [--workload digits|mlp784|both] [--repeats 7]
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

from fedsim.data import load_dataset, partition
from fedsim.models import build_model, evaluate
from fedsim.runner import run
from fedsim.scenario import load_scenario

COMMON = ["data.partition=iid", "algorithm.name=fedavg", "algorithm.local_epochs=1", "algorithm.batch_size=32",
          "run.rounds=5"]
WORKLOADS = {
    "digits": ("100 clients, MLP 64 on digits, lr 0.1",
               ["data.clients=100", "model.kind=mlp", "model.hidden=[64]", "algorithm.lr=0.1"]),
    "mlp784": ("100 clients, MLP 784-200-10 on synthetic 784 features, 100 samples/client, lr 0.05",
               ["data.clients=100", "data.dataset=synthetic", "data.features=784", "data.samples=12500",
                "model.kind=mlp", "model.hidden=[200]", "algorithm.lr=0.05"]),
}


def workload(name: str, clients: int | None = None, extra: list[str] = ()) -> list[str]:
    """Scenario overrides of a workload; ``clients`` rescales the synthetic one (100 samples each)."""
    overrides = COMMON + WORKLOADS[name][1] + list(extra)
    if clients is not None:
        overrides += [f"data.clients={clients}"]
        if name == "mlp784":
            overrides += [f"data.samples={125 * clients}"]  # 100 train samples a client + 20% test
    return overrides


def bare(scenario, marks: list[float] | None = None) -> tuple[float, float]:
    """A plain single-process FedAvg loop in idiomatic PyTorch: no actors, no codec, no network.
    ``marks`` receives the wall time at the end of each round."""
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
        if marks is not None:
            marks.append(time.perf_counter())
    return time.perf_counter() - t0, acc


def framework(scenario, marks: list[float] | None = None) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = run(scenario, progress=None if marks is None else (lambda m, total: marks.append(time.perf_counter())))
    return time.perf_counter() - t0, result.summary["final_accuracy"]


def measure(name: str, repeats: int) -> dict:
    sides = {
        "bare": (bare, load_scenario(None, workload(name))),
        "fedsim plain": (framework, load_scenario(None, workload(name, extra=["run.vectorise=false"]))),
        "fedsim lean": (framework, load_scenario(None, workload(name, extra=["run.vectorise=true"]))),
    }
    for fn, scenario in sides.values():  # warm-up: imports, allocator, first-call costs
        fn(scenario)
    times: dict[str, list[float]] = {k: [] for k in sides}
    rounds: dict[str, list[float]] = {k: [] for k in sides}
    accs: dict[str, float] = {}
    for _ in range(repeats):
        for label, (fn, scenario) in sides.items():
            marks: list[float] = []
            t, acc = fn(scenario, marks)
            times[label].append(t)
            rounds[label].append(statistics.median(b - a for a, b in zip(marks, marks[1:])))
            accs[label] = acc
    return {"times": times, "rounds": rounds, "accs": accs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in (WORKLOADS if args.workload == "both" else [args.workload]):
        res = measure(name, args.repeats)
        med = {k: statistics.median(v) for k, v in res["times"].items()}
        table = Table(title=f"bench/overhead.py [{name}]: FedAvg, {WORKLOADS[name][0]}, 1 epoch, batch 32, 5 rounds "
                            f"(medians of {args.repeats}, sides alternated in one process)")
        rnd = {k: statistics.median(v) for k, v in res["rounds"].items()}
        for col in ("loop", "median wall (s)", "min (s)", "max (s)", "/ bare", "steady round (s)", "/ bare",
                    "final accuracy"):
            table.add_column(col)
        for k, v in res["times"].items():
            table.add_row(k, f"{med[k]:.3f}", f"{min(v):.3f}", f"{max(v):.3f}", f"{med[k] / med['bare']:.3f}",
                          f"{rnd[k]:.3f}", f"{rnd[k] / rnd['bare']:.3f}", f"{res['accs'][k]:.4f}")
        Console().print(table)
        print(f"{name}: whole run plain/bare={med['fedsim plain'] / med['bare']:.3f} (target <= 1.10) "
              f"lean/bare={med['fedsim lean'] / med['bare']:.3f}; steady round (median round-to-round, "
              f"without setup) plain/bare={rnd['fedsim plain'] / rnd['bare']:.3f} "
              f"lean/bare={rnd['fedsim lean'] / rnd['bare']:.3f}")


if __name__ == "__main__":
    main()
