"""Parallel studies: `fedsim sweep --jobs N` (and a Dask local cluster) against --jobs 1.

Runs the same 8-cell sweep (2 methods x 4 uplinks of the default scenario) sequentially, in
N local worker processes, and (if Dask distributed is installed) on a local Dask cluster of
N worker processes; checks that sweep.csv is identical apart from wall times and prints the
wall times and speedups. Each configuration is run --repeat times, alternating, and the
median is reported: the machine may be shared, so read the ratios, not the seconds.

    python bench/parallel_sweep.py [--jobs 2] [--rounds 20] [--repeat 1]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsim.cli import main  # noqa: E402


def table(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(open(path))]


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-dask", action="store_true")
    args = ap.parse_args()
    base = ["sweep", "scenarios/default.toml", "--algorithms", "fedavg,sgd",
            "--bandwidths", "100kbps,1Mbps,10Mbps,100Mbps", "--set", f"run.rounds={args.rounds}"]
    configs = {"jobs 1": [], f"jobs {args.jobs}": ["--jobs", str(args.jobs)]}
    try:
        import distributed  # noqa: F401
        if not args.no_dask:
            configs[f"dask local cluster, {args.jobs} workers"] = ["--engine", "dask", "--jobs", str(args.jobs)]
    except ImportError:
        print("dask distributed not installed: skipping the Dask row")
    times: dict[str, list[float]] = {k: [] for k in configs}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            for name, extra in configs.items():
                out = Path(tmp) / f"{name.replace(' ', '_').replace(',', '')}_{rep}"
                t = time.perf_counter()
                rc = main([*base, "--out", str(out), *extra])
                times[name].append(time.perf_counter() - t)
                assert rc == 0, name
                tables[name] = table(out / "sweep.csv")
    ref = tables["jobs 1"]
    print(f"\n8 cells ({args.rounds} rounds each), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"(the machine is shared: ratios are indicative)")
    print(f"{'configuration':36s} {'median wall (s)':>16s} {'speedup':>8s} {'sweep.csv == jobs 1':>20s}")
    t1 = statistics.median(times["jobs 1"])
    for name in configs:
        t = statistics.median(times[name])
        print(f"{name:36s} {t:16.1f} {t1 / t:8.2f} {str(tables[name] == ref):>20s}")


if __name__ == "__main__":
    main_bench()
