"""Bandwidth-wall studies: a grid of (uplink bandwidth × algorithm) runs of one scenario.

For each cell the run's summary gives time-to-accuracy (simulated seconds to the first
evaluation at or above ``run.target_accuracy``), final accuracy and bytes. The study writes
``sweep.csv`` and two plots: time-to-target against bandwidth per algorithm (where the
curve bends is the bandwidth wall: below it communication, not compute, decides), and
uplink bytes per algorithm.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from network.units import parse_bandwidth

from .runner import run
from .scenario import load_scenario

FIELDS = ["algorithm", "uplink", "uplink_bps", "final_accuracy", "time_to_target_s", "sim_time_s", "rounds",
          "uplink_bytes", "downlink_bytes", "payload_bits", "wall_time_s"]


@dataclass
class Cell:
    algorithm: str
    uplink: str
    summary: dict

    def row(self) -> dict:
        s = self.summary
        return {"algorithm": self.algorithm, "uplink": self.uplink, "uplink_bps": parse_bandwidth(self.uplink, "uplink"),
                **{k: s[k] for k in FIELDS[3:]}}


def sweep(scenario_path: str | None, bandwidths: list[str], algorithms: list[str], overrides: list[str] = (),
          on_cell: Callable[[Cell, int, int], None] | None = None) -> list[Cell]:
    """Run every (algorithm, uplink) pair; scenario errors surface before the first run."""
    for bw in bandwidths:
        parse_bandwidth(bw, "--bandwidths")
    plans = [(a, bw, load_scenario(scenario_path, [*overrides, f"algorithm.name={a}", f"network.uplink={bw}"]))
             for a in algorithms for bw in bandwidths]
    cells = []
    for i, (algo, bw, scenario) in enumerate(plans):
        cell = Cell(algo, bw, run(scenario).summary)
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell, i + 1, len(plans))
    return cells


def write(cells: list[Cell], out_dir: str | Path, target: float | None) -> list[Path]:
    """Write sweep.csv and the plots; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [c.row() for c in cells]
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in algorithms:
        mine = sorted((r for r in rows if r["algorithm"] == a), key=lambda r: r["uplink_bps"])
        reached = [r for r in mine if r["time_to_target_s"] is not None]
        (line,) = ax1.plot([r["uplink_bps"] / 1e6 for r in reached], [r["time_to_target_s"] for r in reached], "o-",
                           label=a)
        missed = [r for r in mine if r["time_to_target_s"] is None]
        if missed:
            ax1.plot([r["uplink_bps"] / 1e6 for r in missed], [r["sim_time_s"] for r in missed], "x",
                     color=line.get_color(), label=f"{a}: not reached (run's end)")
        ax2.bar(a, mine[0]["uplink_bytes"] / 1e6)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("client uplink (Mbit/s)")
    ax1.set_ylabel(f"simulated time to accuracy {target} (s)")
    ax1.set_title("bandwidth wall")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.set_ylabel("uplink bytes per run (MB)")
    ax2.set_title("what each method puts on the uplink")
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "bandwidth_wall.png", dpi=120)
    plt.close(fig)
    return [out / "sweep.csv", out / "bandwidth_wall.png"]
