"""FeDLRT's and FedLoRU's local steps: the clients of an instant stacked vs one at a time.

Both methods' clients train low-rank factors (FeDLRT: the coefficients S̃ in the round's
augmented basis; FedLoRU: the modules B, A over the base W0) with ``local_steps`` steps of
``lowrank.local_steps``. With ``run.batch_clients = true`` (the default) the clients that
receive the round's message at one instant train together (``algorithms/local_training.py``);
``false`` trains them one at a time. Both sides use the lean dense step (``run.vectorise``).

Workloads (digits, iid, ``--rounds`` rounds, ``--steps`` local steps of batch 32, the methods'
default ranks): 100 clients on an MLP 64 (the small model: every client of the instant in one
stack), and 10 clients on the FeDLRT paper's MLP 64-512-512 (stacks cut to the cache size).
Process CPU time of the whole run (data set generation included, the same on both sides), the
sides alternated, the fastest of ``--repeats``; the largest parameter difference between the
two sides and their final accuracies are printed (FeDLRT's rank truncation amplifies float
rounding over rounds: compare with its autograd vs lean difference, ``--reference``).

Run: python bench/lowrank_stacked.py [--repeats 2] [--rounds 2] [--steps 50]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.table import Table

from fedsim.runner import run
from fedsim.scenario import load_scenario

WORKLOADS = [(100, "[64]"), (10, "[64,512,512]")]
METHODS = [("fedlrt", []), ("fedloru", []), ("fedloru personal_rank=4", ["algorithm.personal_rank=4"])]
"""(label, scenario overrides): FedLoRU also with personal modules (pFedLoRU), each client's own."""


def _max_diff(a, b) -> float:
    return max(float((a.final_params[k] - b.final_params[k]).abs().max()) for k in a.final_params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reference", action="store_true",
                    help="also run one client at a time through autograd (run.vectorise = false) and print its "
                         "parameter difference from the lean path: the rounding scale of each method")
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = Table(title=f"bench/lowrank_stacked.py: process CPU of a {args.rounds}-round run, {args.steps} local steps, "
                        f"fastest of {args.repeats} (1 thread)")
    for col in ("method", "clients", "model", "one at a time (s)", "stacked (s)", "stacked / one at a time",
                "max |param diff|", "final accuracy (stacked / alone)"):
        table.add_column(col)
    for method, extra in METHODS:
        for clients, hidden in WORKLOADS:
            base = ["data.dataset=digits", f"data.clients={clients}", "data.partition=iid", "model.kind=mlp",
                    f"model.hidden={hidden}", f"algorithm.name={method.split()[0]}", f"run.rounds={args.rounds}",
                    f"algorithm.local_steps={args.steps}", *extra]
            times: dict[str, list[float]] = {"false": [], "true": []}
            results = {}
            for _ in range(args.repeats):
                for batch in ("false", "true"):
                    start = time.process_time()
                    results[batch] = run(load_scenario(None, base + [f"run.batch_clients={batch}"]))
                    times[batch].append(time.process_time() - start)
            alone, stacked = min(times["false"]), min(times["true"])
            diff = f"{_max_diff(results['true'], results['false']):.1e}"
            if args.reference:
                autograd = run(load_scenario(None, base + ["run.batch_clients=false", "run.vectorise=false"]))
                diff += f" (autograd vs lean: {_max_diff(autograd, results['false']):.1e})"
            table.add_row(method, str(clients), f"MLP {hidden}", f"{alone:.2f}", f"{stacked:.2f}",
                          f"{stacked / alone:.2f}", diff,
                          f"{results['true'].summary['final_accuracy']:.4f} / "
                          f"{results['false'].summary['final_accuracy']:.4f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
