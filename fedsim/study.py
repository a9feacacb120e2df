"""Bandwidth-wall studies: a grid of (uplink bandwidth × algorithm × seed) runs of one scenario.

For each cell the run's summary gives time-to-accuracy (simulated seconds to the first
evaluation at or above ``run.target_accuracy``), final accuracy and bytes. The study writes
``sweep.csv`` (one row per algorithm and bandwidth: the mean over seeds and its standard
deviation), ``sweep_runs.csv`` (one row per run) and ``bandwidth_wall.png``.

Cells are independent runs, so they can run side by side: ``jobs > 1`` in that many local
processes, or on a Dask distributed cluster (``engine="dask"``; ``address`` of a running
scheduler, or a local cluster of ``jobs`` worker processes). Every run is deterministic, so
the summaries are the same whichever way the cells ran, apart from wall times.
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from network.units import parse_bandwidth

from .errors import ScenarioError
from .scenario import load_scenario

RUN_FIELDS = ["algorithm", "uplink", "uplink_bps", "seed", "final_accuracy", "time_to_target_s", "sim_time_s",
              "rounds", "uplink_bytes", "downlink_bytes", "payload_bits", "wall_time_s"]
FIELDS = ["algorithm", "uplink", "uplink_bps", "seeds", "reached", "final_accuracy", "final_accuracy_sd",
          "time_to_target_s", "time_to_target_s_sd", "sim_time_s", "sim_time_s_sd", "rounds", "uplink_bytes",
          "downlink_bytes", "payload_bits", "wall_time_s"]
"""sweep.csv: means over seeds; ``*_sd`` the sample standard deviation (0 with one seed);
``reached`` how many seeds reached the target; ``time_to_target_s`` the mean over those
(empty if none did)."""
ENGINES = ("local", "dask")


@dataclass
class Cell:
    algorithm: str
    uplink: str
    summary: dict
    seed: int | None = None

    def row(self) -> dict:
        s = self.summary
        return {"algorithm": self.algorithm, "uplink": self.uplink, "uplink_bps": parse_bandwidth(self.uplink, "uplink"),
                "seed": s["seed"], **{k: s[k] for k in RUN_FIELDS[4:]}}


def parse_seeds(text: str) -> list[int]:
    """``"1-5"``, ``"1,3,7"`` or ``"1-3,10"`` -> the seeds in order, each once."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ScenarioError("--seeds", text, "expected seeds like 1-5 or 1,3,7") from None
    if not seeds:
        raise ScenarioError("--seeds", text, "no seed given")
    return list(dict.fromkeys(seeds))


def run_cell(scenario_path: str | None, overrides: Sequence[str]) -> dict:
    """One cell, in whatever process runs it: the run's summary (plain, picklable)."""
    from .runner import run
    return run(load_scenario(scenario_path, list(overrides))).summary


def sweep(scenario_path: str | None, bandwidths: list[str], algorithms: list[str], overrides: Sequence[str] = (),
          on_cell: Callable[[Cell, int, int], None] | None = None, *, seeds: Sequence[int] | None = None,
          jobs: int = 1, engine: str = "local", address: str | None = None) -> list[Cell]:
    """Run every (algorithm, uplink, seed) cell; scenario errors surface before the first run.

    Cells come back in grid order (algorithm, then uplink, then seed) however they ran.
    """
    for bw in bandwidths:
        parse_bandwidth(bw, "--bandwidths")
    if engine not in ENGINES:
        raise ScenarioError("--engine", engine, f"expected one of {', '.join(ENGINES)}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ScenarioError("--jobs", jobs, "expected an integer >= 1")
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    plans = []
    for a in algorithms:
        for bw in bandwidths:
            for seed in seed_list:
                ov = [*overrides, f"algorithm.name={a}", f"network.uplink={bw}",
                      *([f"run.seed={seed}"] if seed is not None else [])]
                load_scenario(scenario_path, ov)  # validate every cell before running any
                plans.append((a, bw, seed, ov))
    cells: list[Cell | None] = [None] * len(plans)
    done = 0

    def finish(i: int, summary: dict) -> None:
        nonlocal done
        a, bw, seed, _ = plans[i]
        cells[i] = Cell(a, bw, summary, seed)
        done += 1
        if on_cell is not None:
            on_cell(cells[i], done, len(plans))

    path = None if scenario_path is None else str(scenario_path)
    if engine == "dask":
        _dask(path, plans, jobs, address, finish)
    elif jobs == 1:
        for i, (_, _, _, ov) in enumerate(plans):
            finish(i, run_cell(path, ov))
    else:
        _local_pool(path, plans, jobs, finish)
    return [c for c in cells if c is not None]


def _local_pool(path: str | None, plans: list, jobs: int, finish: Callable[[int, dict], None]) -> None:
    """Run cells in ``jobs - 1`` worker processes and in this process too.

    A worker needs a few seconds to import torch before its first cell; this process has
    it loaded already and starts at once. Cells are handed out one at a time, in grid
    order, to whoever is free (a feeder thread per worker waits on it). Each cell is a
    whole, independent run: where it runs changes nothing in its summary.
    """
    import concurrent.futures as cf
    import threading
    pending = list(reversed(range(len(plans))))  # pop() hands out cells in grid order
    lock = threading.Lock()
    failures: list[BaseException] = []

    def next_cell() -> int | None:
        with lock:
            return pending.pop() if pending and not failures else None

    def done(i: int, summary: dict) -> None:
        with lock:
            finish(i, summary)

    with cf.ProcessPoolExecutor(max_workers=min(jobs - 1, len(plans)), mp_context=_process_context()) as pool:
        def feed() -> None:
            try:
                while (i := next_cell()) is not None:
                    done(i, pool.submit(run_cell, path, plans[i][3]).result())
            except BaseException as e:  # re-raised in the caller's thread below
                with lock:
                    failures.append(e)

        feeders = [threading.Thread(target=feed, daemon=True) for _ in range(min(jobs - 1, len(plans)))]
        for t in feeders:
            t.start()
        try:
            while (i := next_cell()) is not None:
                done(i, run_cell(path, plans[i][3]))
        except BaseException:  # Ctrl-C or a failed cell: hand out nothing more
            with lock:
                pending.clear()
            raise
        finally:
            for t in feeders:
                t.join()
    if failures:
        raise failures[0]


def _process_context():
    """Worker processes forked from a fork server that imported fedsim (and torch) once, but
    never ran a torch op: a plain fork of this process could inherit torch thread pools in a
    state that deadlocks the child, and spawn pays the torch import in every worker."""
    import multiprocessing as mp
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fedsim.study", "fedsim.runner", "fedsim.data", "sklearn.datasets"])
    return ctx


def _dask(path: str | None, plans: list, jobs: int, address: str | None, finish: Callable[[int, dict], None]) -> None:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ScenarioError("--engine", "dask", "needs Dask distributed: pip install 'fedsim[dask]' "
                            "(or pip install distributed)") from None
    cluster = None
    if address is None:
        # One single-threaded worker process per job, like --jobs on this machine.
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        with Client(address or cluster) as client:
            futures = [client.submit(run_cell, path, ov, pure=False) for (_, _, _, ov) in plans]
            index = {f.key: i for i, f in enumerate(futures)}
            for fut in as_completed(futures):
                finish(index[fut.key], fut.result())
    finally:
        if cluster is not None:
            cluster.close()


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(cells: list[Cell]) -> list[dict]:
    """sweep.csv's rows: one per (algorithm, uplink), means and spreads over seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c.algorithm, c.uplink), []).append(c.row())
    rows = []
    for (a, bw), runs in groups.items():
        row: dict[str, Any] = {"algorithm": a, "uplink": bw, "uplink_bps": runs[0]["uplink_bps"],
                               "seeds": " ".join(str(r["seed"]) for r in runs)}
        reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        row["reached"] = len(reached)
        row["final_accuracy"], row["final_accuracy_sd"] = _mean_sd([r["final_accuracy"] for r in runs
                                                                     if r["final_accuracy"] is not None])
        row["time_to_target_s"], row["time_to_target_s_sd"] = _mean_sd(reached)
        row["sim_time_s"], row["sim_time_s_sd"] = _mean_sd([r["sim_time_s"] for r in runs])
        for k in ("rounds", "uplink_bytes", "downlink_bytes", "payload_bits", "wall_time_s"):
            row[k] = statistics.fmean(r[k] for r in runs)
            if k != "wall_time_s" and float(row[k]).is_integer():
                row[k] = int(row[k])
        rows.append(row)
    return rows


def write(cells: list[Cell], out_dir: str | Path, target: float | None) -> list[Path]:
    """Write sweep.csv, sweep_runs.csv and the plot; returns the paths written."""
    from .figures import sweep_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(cells)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    with open(out / "sweep_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_FIELDS)
        w.writeheader()
        w.writerows(c.row() for c in cells)
    fig = sweep_figure(rows, target)
    fig.savefig(out / "bandwidth_wall.png", dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return [out / "sweep.csv", out / "sweep_runs.csv", out / "bandwidth_wall.png"]


def read_rows(path: str | Path) -> list[dict]:
    """sweep.csv back as rows with numbers (empty cells: None)."""
    def num(v: str) -> Any:
        if v == "":
            return None
        try:
            x = float(v)
        except ValueError:
            return v
        return int(x) if x.is_integer() and "." not in v and "e" not in v.lower() else x

    with open(path) as f:
        return [{k: (v if k in ("algorithm", "uplink", "seeds") else num(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


__all__ = ["Cell", "FIELDS", "RUN_FIELDS", "aggregate", "parse_seeds", "read_rows", "run_cell", "sweep", "write"]
