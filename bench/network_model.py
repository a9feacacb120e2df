"""The network model's cost: the emulator alone, and inside FedAvg runs, old vs new side by side.

"old" is the same code with the two speed-ups switched off: TCP caps evaluated afresh at
every transfer (Padhye's formula, as before the per-link cache) and the general max-min
solver for every component (``FluidNetwork.shared_min = inf``, no single-bottleneck fast
path). "new" is the code as shipped. Both give the same delivery times (checked here).
Under TCP (the default) those times come from the per-round window model (handshake, slow
start, loss response: docs/network-model.md section 3b); the cached response function is
reported by ``tcp_cap`` but caps no flow, so the "old" cap only costs its evaluation.

Run: python bench/network_model.py            (about a minute on 2 cores)
     python bench/network_model.py --quick    (emulator only, small old-solver sizes)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

import network.emulator as emulator_mod
from network.config import parse_network
from network.emulator import Emulator
from network.fluid import FluidNetwork
from network.simclock import HeapClock


@contextlib.contextmanager
def mode(old: bool):
    """Switch the emulator to the old algorithms (uncached caps, general solver only)."""
    if not old:
        yield
        return
    saved_cap, saved_fluid = Emulator.tcp_cap, emulator_mod.FluidNetwork
    Emulator.tcp_cap = Emulator._padhye_cap
    emulator_mod.FluidNetwork = lambda now=0.0: FluidNetwork(now, shared_min=math.inf)
    try:
        yield
    finally:
        Emulator.tcp_cap, emulator_mod.FluidNetwork = saved_cap, saved_fluid


def emulator(n: int, sections: dict) -> tuple[Emulator, HeapClock]:
    clock = HeapClock()
    return Emulator(parse_network(sections, n, Path(".")), n, clock, 1, lambda *a, **k: None), clock


def star(n: int, sections: dict, size: Callable[[int], int], direction: str = "up") -> tuple[float, list]:
    """n transfers started at once, run to the end: (seconds, deliveries)."""
    em, clock = emulator(n, sections)
    got: list = []
    t = time.perf_counter()
    for c in range(n):
        em.transfer(direction, c, size(c), lambda corrupt, c=c: got.append((c, clock.now())))
    clock.run()
    return time.perf_counter() - t, got


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """Best of 3 of ``repeat`` calls, microseconds per call."""
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / repeat * 1e6


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and math.isclose(x[1], y[1], rel_tol=1e-9) for x, y in zip(a, b))


def run_fedavg(clients: int, rounds: int) -> float:
    from fedsim.runner import run
    from fedsim.scenario import load_scenario
    sc = load_scenario(None, [f"data.clients={clients}", "data.dataset=synthetic", "data.partition=iid",
                              "model.kind=logistic", "algorithm.name=fedavg", "algorithm.local_epochs=1",
                              f"run.rounds={rounds}"])
    t = time.perf_counter()
    run(sc)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="emulator only; old solver at 1,000 flows at most")
    args = ap.parse_args()
    rows: list[tuple[str, str, str, str]] = []

    # --- per call: the TCP cap and the loss draw --------------------------------------
    lossy = {"network": {"loss": 0.001, "jitter": "5ms"}}
    em, _ = emulator(100, lossy)
    old_cap = per_call(lambda: em._padhye_cap("up", 7), 20_000)
    new_cap = per_call(lambda: em.tcp_cap("up", 7), 20_000)
    rows.append(("tcp_cap(), per call (µs)", f"{old_cap:.2f}", f"{new_cap:.2f}", "Padhye per call → per-link cache"))

    def old_loss():   # the former _loss: a product over the burst table, rebuilt per call
        extra = 1.0
        for p in em._bursts.get(("up", 7), {}).values():
            extra *= 1.0 - p
        return em._links["up"][7].loss, 1.0 - extra
    rows.append(("_loss(), per call (µs)", f"{per_call(old_loss, 20_000):.2f}",
                 f"{per_call(lambda: em._loss('up', 7), 20_000):.2f}", "burst overlay kept per link"))

    # --- per transfer: 10,000 clients, unlimited server --------------------------------
    for label, sections, direction in (("10,000 uploads, unlimited server, tcp", lossy, "up"),
                                       ("10,000 uploads, datagram loss", {"network": {"loss": 0.001,
                                                                                      "transport": "datagram"}}, "up"),
                                       ("10,000 downloads, server uplink 1 Gbps", {"network": {"server": {"uplink": "1Gbps"}}},
                                        "down")):
        out = {}
        for old in (True, False):
            with mode(old):
                runs = [star(10_000, sections, lambda c: 100_000, direction) for _ in range(3)]
            out[old] = (min(r[0] for r in runs), runs[0][1])
        assert same(out[True][1], out[False][1]), label
        rows.append((f"{label}: per transfer, start to delivery (µs)", f"{out[True][0] / 1e-2:.1f}",
                     f"{out[False][0] / 1e-2:.1f}", "same delivery times"))

    # --- a finite server link, uploads finishing at distinct times ---------------------
    shared = {"network": {"uplink": "1Gbps", "server": {"downlink": "100Mbps"}}}
    sizes = lambda c: 10_000 + 37 * c   # noqa: E731  every upload ends at its own time
    old_limit = 1_000 if args.quick else 3_000
    for n in (1_000, 3_000, 10_000):
        new_s, new_got = star(n, shared, sizes)
        if n <= old_limit:
            with mode(True):
                old_s, old_got = star(n, shared, sizes)
            assert same(old_got, new_got), n
            old_txt = f"{old_s:.2f}"
        else:
            old_txt = "(skipped: quadratic, minutes)"
        rows.append((f"{n:,} uploads through one 100 Mbps server link (s)", old_txt, f"{new_s:.3f}",
                     "same delivery times" if n <= old_limit else ""))

    # --- inside the runtime -------------------------------------------------------------
    if not args.quick:
        for clients, rounds in ((10_000, 1), (100, 5)):
            t = {}
            for old in (True, False):
                with mode(old):
                    t[old] = run_fedavg(clients, rounds)
            rows.append((f"FedAvg run, {clients:,} clients x {rounds} round(s), whole run (s)", f"{t[True]:.2f}",
                         f"{t[False]:.2f}", "unlimited server: the model is a small share"))

    table = Table(title="bench/network_model.py: the network model, old vs new (same process, best of runs)")
    for col, just in (("measure", "left"), ("old", "right"), ("new", "right"), ("note", "left")):
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(*r)
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
