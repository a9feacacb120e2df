"""Fast client compute vs the plain path vs a bare PyTorch loop, side by side in one process.

Workloads: ``mlp784`` (the usual peer-framework benchmark): FedAvg, MLP 784-200-10 (159k
parameters, 636 KB a message), synthetic 784-feature data, 100 samples a client, 1 local
epoch, batch 32, lr 0.05, 5 rounds; 100 clients, then 1,000 (3 rounds there, to keep the
script short). ``digits``: the same on the 8x8 digits with an MLP 64 (4,810 parameters).

* **bare**: a plain sequential PyTorch loop (``bench/overhead.py``): load_state_dict,
  torch.optim.SGD, autograd, no actors, no codec, no network;
* **fedsim plain**: ``run.vectorise = false``: every client step through autograd;
* **fedsim lean, one at a time**: ``run.vectorise = true, run.batch_clients = false``: the
  lean per-client step of :mod:`algorithms.fastpath` (hand-written forward/backward, the
  gradient folded into the update);
* **fedsim fast**: the defaults: what fedsim picks on this hardware. The clients a broadcast
  reaches at one instant are trained together (``fedsim.batching``). On the 784-200-10 MLP
  they share the broadcast weights, so the first layer takes the kernel form
  (``algorithms.shared_start``: every client's samples through the shared weights in one
  product, each client's change formed once at the end, chunks of 33 clients); smaller models
  are stacked into ``bmm``s (``fastpath.STACK_MAX_FLOATS``; the ``digits`` MLP 64 stacks all
  100).

The **steady round** is the median wall time between consecutive round ends (training,
messages, aggregation and evaluation of a round; data generation and setup excluded, and the
data set is generated once and shared by all sides). Sides alternate, ``--repeats`` times;
the table gives medians. The machine is shared with other work, so absolute times drift:
read the ratios. Final accuracies: fedsim plain and fast must agree to float tolerance (same
seeds, same minibatches; the largest parameter difference is printed); the bare loop
shuffles with its own seeds, so it agrees within noise only.

``--threads 1 2`` repeats every table with both sides given two torch threads (the bare loop
by ``torch.set_num_threads``, fedsim by ``run.threads``): the stacked products of the fast
path use a second core, the bare loop's small per-client products barely do (on the
digits they run slower). Those tables add the bare loop on one thread, and the summary line
gives fast over the bare loop at its best thread count as well. ``--stacked`` adds the fast
path with the kernel form switched off (the clients stacked, 4 at a time on 784-200-10).

Run: python bench/vectorised.py [--repeats 3] [--clients 100 1000] [--workload mlp784|digits|both]
[--threads 1 2] [--stacked]
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
from bench import overhead
from algorithms import shared_start
from fedsim.runner import run
from fedsim.scenario import load_scenario


_load = fedsim.runner.load_dataset
_DATASETS: dict[tuple[str, int], object] = {}


def _cached_load(cfg, seed):
    key = (repr(cfg), seed)
    if key not in _DATASETS:
        _DATASETS[key] = _load(cfg, seed)
    return _DATASETS[key]


def _bare(scenario, threads: int | None = None) -> tuple[list[float], float, dict | None]:
    marks: list[float] = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        _, acc = overhead.bare(scenario, marks)
    finally:
        torch.set_num_threads(before)
    return marks, acc, None


def _fedsim(scenario) -> tuple[list[float], float, dict | None]:
    marks: list[float] = []
    result = run(scenario, progress=lambda m, total: marks.append(time.perf_counter()))
    return marks, result.summary["final_accuracy"], result.final_params


def _fedsim_stacked(scenario) -> tuple[list[float], float, dict | None]:
    """The fast path with the kernel form switched off (clients stacked as before it)."""
    pays = shared_start.pays
    shared_start.pays = lambda *args: False
    try:
        return _fedsim(scenario)
    finally:
        shared_start.pays = pays


def steady(marks: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(marks, marks[1:]))


def measure(workload: str, clients: int, rounds: int, repeats: int, threads: int = 1,
            stacked: bool = False) -> dict:
    torch.set_num_threads(threads)  # the bare loop's; fedsim's sides set theirs from run.threads
    base = overhead.workload(workload, clients, [f"run.rounds={rounds}", f"run.threads={threads}"])
    sides = {
        "bare loop": (_bare, load_scenario(None, base)),
        "fedsim plain": (_fedsim, load_scenario(None, base + ["run.vectorise=false"])),
        "fedsim lean, one at a time": (_fedsim, load_scenario(None, base + ["run.vectorise=true",
                                                                              "run.batch_clients=false"])),
        "fedsim fast": (_fedsim, load_scenario(None, base + ["run.vectorise=true"])),
    }
    if stacked:
        sides["fedsim fast, no kernel form"] = (_fedsim_stacked, sides["fedsim fast"][1])
    if threads > 1:  # the bare loop may be faster on one thread: the fair reference is its best
        sides["bare loop, 1 thread"] = (lambda sc: _bare(sc, 1), load_scenario(None, base))
    rounds_s: dict[str, list[float]] = {k: [] for k in sides}
    accs, params = {}, {}
    for rep in range(repeats + 1):  # the first pass warms up (and generates the data once)
        for label, (fn, scenario) in sides.items():
            marks, acc, final = fn(scenario)
            if rep:
                rounds_s[label].append(steady(marks))
            accs[label], params[label] = acc, final
    diff = max(float((params["fedsim fast"][k] - params["fedsim plain"][k]).abs().max()) for k in params["fedsim fast"])
    return {"rounds": rounds_s, "accs": accs, "param_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="torch threads, the same for every side (bare: torch.set_num_threads; fedsim: run.threads); "
                         "one table per count")
    ap.add_argument("--stacked", action="store_true",
                    help="add the fast path without the kernel form (algorithms/shared_start.py): clients stacked")
    ap.add_argument("--workload", choices=["mlp784", "digits", "both"], default="both",
                    help="mlp784: the 784-200-10 MLP (lean steps, no stacking); digits: MLP 64 on the 8x8 digits "
                         "(small enough to stack)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # Generate each synthetic data set once for all sides (setup is not what is compared).
    fedsim.runner.load_dataset = overhead.load_dataset = _cached_load
    console = Console()
    workloads = ["mlp784", "digits"] if args.workload == "both" else [args.workload]
    for workload, clients, threads in [(w, c, t) for w in workloads for c in args.clients for t in args.threads]:
        if workload == "digits" and clients > 1000:
            continue
        # 1,000 clients on 784-200-10: a round takes seconds, so fewer rounds and one repeat;
        # the digits' rounds are short enough for the full count (one sample is too noisy here)
        cheap = clients <= 100 or workload == "digits"
        rounds = 5 if cheap else 3
        repeats = args.repeats if cheap else 1
        res = measure(workload, clients, rounds, repeats, threads, args.stacked)
        med = {k: statistics.median(v) for k, v in res["rounds"].items()}
        what = ("MLP 784-200-10, {c} clients x 100 samples, 1 epoch, batch 32, lr 0.05" if workload == "mlp784" else
                "MLP 64 on the 8x8 digits, {c} clients (1,437 samples split evenly), 1 epoch, batch 32, lr 0.1")
        table = Table(title=f"bench/vectorised.py: FedAvg, {what.format(c=clients)}, {rounds} rounds; steady round, "
                            f"median of {repeats} (CPU, {threads} thread{'s' if threads > 1 else ''} each, shared machine)")
        for col in ("path", "steady round (s)", "all repeats (s)", "/ bare loop", "final accuracy"):
            table.add_column(col)
        for k, v in res["rounds"].items():
            table.add_row(k, f"{med[k]:.3f}", " ".join(f"{t:.3f}" for t in v), f"{med[k] / med['bare loop']:.2f}",
                          f"{res['accs'][k]:.4f}")
        console.print(table)
        best_bare = min(v for k, v in med.items() if k.startswith("bare loop"))
        print(f"{workload} clients={clients} threads={threads}: fast/bare={med['fedsim fast'] / med['bare loop']:.2f} "
              f"fast/(bare at its best thread count)={med['fedsim fast'] / best_bare:.2f} (target <= 0.5) "
              f"plain/bare={med['fedsim plain'] / med['bare loop']:.2f} "
              f"max |fast - plain| parameter={res['param_diff']:.2e}")
    if torch.cuda.is_available():
        print("A GPU is present: fedsim has no batched GPU client path yet; the figures above are CPU only.")
    else:
        print("No GPU on this machine: CPU figures only.")


if __name__ == "__main__":
    main()
