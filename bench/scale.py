"""Scale: 10,000 client actors in one process (synthetic data, logistic model), one round.

Targets: 10,000 clients (the default): the round in <= 10 s of wall time, <= 2 GiB peak RSS;
100,000 clients (``--clients 100000``): <= 30 s and <= 4 GiB. Run: python bench/scale.py
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

import torch

from fedsim.clock import VirtualTimeLoop
from fedsim.runner import build, quiet_gc, summarise
from fedsim.scenario import load_scenario


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--algorithm", default="fedavg")
    args = ap.parse_args()
    scenario = load_scenario(None, [f"data.clients={args.clients}", "data.dataset=synthetic", "data.partition=iid",
                                    "model.kind=logistic", f"algorithm.name={args.algorithm}", "run.rounds=1",
                                    *(["algorithm.local_epochs=1"] if args.algorithm == "fedavg" else [])])
    torch.set_num_threads(scenario.run.threads)
    t0 = time.perf_counter()
    loop = VirtualTimeLoop()
    sim = build(scenario, loop)  # data, partition, model, 10,000 actors, sockets
    t_build = time.perf_counter() - t0
    marks = {}

    def progress(m, total):
        marks["round_end"] = time.perf_counter()
        marks["round_end_cpu"] = time.process_time()

    original_main = sim.main

    async def timed_main(progress_cb):
        marks["start"] = time.perf_counter()
        marks["start_cpu"] = time.process_time()
        await original_main(progress_cb)

    with quiet_gc():  # as fedsim.runner.run does
        loop.run_until_complete(timed_main(progress))
    sim.close()
    loop.close()
    total = time.perf_counter() - t0
    result = summarise(sim, total)
    limit_s, limit_gib = (10, 2) if args.clients <= 10_000 else (30, 4)
    round_wall = marks["round_end"] - marks["start"]  # registration + broadcast + train + gather + eval
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux
    s = result.summary
    table = Table(title=f"bench/scale.py: {args.clients} client actors, one round ({args.algorithm}, logistic, synthetic)")
    for col in ("measure", "value", "target"):
        table.add_column(col)
    table.add_row("wall time, one round (hello, broadcast, train, gather, eval)", f"{round_wall:.2f} s", f"<= {limit_s} s")
    table.add_row("CPU time of this process, same round (the machine may be shared)",
                  f"{marks['round_end_cpu'] - marks['start_cpu']:.2f} s", "")
    table.add_row("wall time, setup (data, partition, model, actors, sockets)", f"{t_build:.2f} s", "")
    table.add_row("wall time, whole run", f"{total:.2f} s", "")
    table.add_row("peak RSS", f"{rss_gib:.2f} GiB", f"<= {limit_gib} GiB")
    table.add_row("messages (up + down)", f"{s['messages_up'] + s['messages_down']:,}", "")
    table.add_row("simulated round time", f"{s['sim_time_s']:.2f} s", "")
    table.add_row("events logged", f"{s['events']:,}", "")
    table.add_row("final accuracy", f"{s['final_accuracy']:.3f}", "")
    Console().print(table)
    ok = round_wall <= limit_s and rss_gib <= limit_gib
    print("PASS" if ok else "FAIL", f"round={round_wall:.2f}s total={total:.2f}s rss={rss_gib:.2f}GiB")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
