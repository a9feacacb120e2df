"""Figures: accuracy against rounds, simulated time and uplink bits for runs; the
bandwidth-wall figure of a sweep.

Both build a matplotlib ``Figure`` (Agg backend, no display) that callers save; tests read
its artists. Artists that mark cells which never reached the target carry
``gid = "not_reached"``.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ScenarioError

X_AXES = (
    ("round", "round"),
    ("sim_time_s", "simulated time (s)"),
    ("uplink_bits", "uplink bits, cumulative"),
)


@dataclass
class RunCurve:
    """One run directory read back: its label and per-round series."""

    label: str
    summary: dict
    rows: list[dict]


def _num(v: str) -> float | None:
    return None if v in ("", "None") else float(v)


def read_run(run_dir: str | Path, bits: str = "payload") -> RunCurve:
    """A run directory (``--out``) as a curve. ``bits``: ``payload`` (each method's own bit
    count, what the QRR and LQ-SGD papers plot) or ``wire`` (8 x uplink wire bytes)."""
    d = Path(run_dir)
    try:
        summary = json.loads((d / "summary.json").read_text())
        with open(d / "metrics.csv") as f:
            raw = list(csv.DictReader(f))
    except (OSError, ValueError) as exc:
        raise ScenarioError("RUN_DIR", str(run_dir), f"not a run directory with summary.json and metrics.csv ({exc})") from None
    rows = []
    for r in raw:
        acc = _num(r.get("accuracy", ""))
        if acc is None:
            continue
        up_bits = _num(r["uplink_payload_bits"]) if bits == "payload" else 8 * (_num(r["uplink_bytes"]) or 0)
        rows.append({"round": int(r["round"]) + 1, "sim_time_s": _num(r["sim_time_s"]), "uplink_bits": up_bits,
                     "accuracy": acc})
    scenario = Path(str(summary.get("scenario", "<default>"))).stem.strip("<>") or "default"
    return RunCurve(f"{summary.get('algorithm', '?')} · {scenario}", summary, rows)


def runs_figure(run_dirs: list[str | Path], bits: str = "payload"):
    """Three panels, one line per run: accuracy against rounds, simulated time and uplink bits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [read_run(d, bits) for d in run_dirs]
    labels = [c.label for c in curves]
    for i, c in enumerate(curves):  # two runs of one method and scenario: tell them apart
        if labels.count(c.label) > 1:
            c.label = f"{c.label} ({Path(run_dirs[i]).name})"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, (key, xlabel) in zip(axes, X_AXES):
        for c in curves:
            ax.plot([r[key] for r in c.rows], [r["accuracy"] for r in c.rows], label=c.label)
        if key == "uplink_bits":
            xlabel = "uplink bits, cumulative (" + ("each method's payload count" if bits == "payload" else "wire") + ")"
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    target = next((c.summary.get("target_accuracy") for c in curves if c.summary.get("target_accuracy")), None)
    if target:
        for ax in axes:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    axes[0].legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def sweep_figure(rows: list[dict[str, Any]], target: float | None):
    """The bandwidth wall from sweep.csv's rows: (1) time to target against uplink per
    method, error bars over seeds, cells that never reached the target as hollow markers
    above the plot area (labelled "not reached"); (2) final accuracy against uplink;
    (3) uplink bytes per run, per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    above = blended_transform_factory(ax1.transData, ax1.transAxes)
    any_missed = False
    # one row of hollow markers per method that missed somewhere, so they never hide each other
    missing_rows = [a for a in algorithms if any(r["algorithm"] == a and r["time_to_target_s"] is None for r in rows)]
    row_y = {a: 1.04 + 0.045 * k for k, a in enumerate(missing_rows)}
    for i, a in enumerate(algorithms):
        color = colors[i % len(colors)]
        mine = sorted((r for r in rows if r["algorithm"] == a), key=lambda r: r["uplink_bps"])
        reached = [r for r in mine if r["time_to_target_s"] is not None]
        if reached:
            ax1.errorbar([r["uplink_bps"] / 1e6 for r in reached], [r["time_to_target_s"] for r in reached],
                         yerr=[r.get("time_to_target_s_sd") or 0.0 for r in reached], fmt="o-", color=color,
                         capsize=3, label=a)
        missed = [r for r in mine if r["time_to_target_s"] is None]
        if missed:
            any_missed = True
            # Drawn above the axes, hollow, never on the time axis: a method that never got
            # there must not look faster than one that did.
            ax1.plot([r["uplink_bps"] / 1e6 for r in missed], [row_y[a]] * len(missed), "o", markerfacecolor="none",
                     markeredgecolor=color, markersize=9, transform=above, clip_on=False, gid="not_reached",
                     label="_nolegend_")
        ax2.errorbar([r["uplink_bps"] / 1e6 for r in mine], [r["final_accuracy"] for r in mine],
                     yerr=[r.get("final_accuracy_sd") or 0.0 for r in mine], fmt="o-", color=color, capsize=3, label=a)
        ax3.bar(a, mine[0]["uplink_bytes"] / 1e6, color=color)
    if any_missed:
        ax1.text(1.0, 1.04, " not reached", transform=ax1.transAxes, va="center", ha="left", fontsize="small",
                 gid="not_reached_label", clip_on=False)
    ax1.set_xscale("log")
    if any(r["time_to_target_s"] for r in rows):
        ax1.set_yscale("log")
    else:
        ax1.set_yticks([])
        ax1.text(0.5, 0.5, "no cell reached the target", transform=ax1.transAxes, ha="center", va="center")
    ax1.set_xlabel("client uplink (Mbit/s)")
    ax1.set_ylabel(f"simulated time to accuracy {target} (s)")
    ax1.set_title("bandwidth wall", pad=12 + 14 * len(missing_rows))
    ax1.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colors[i % len(colors)], marker="o", label=a) for i, a in enumerate(algorithms)]
    if any_missed:
        handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="none",
                              label="not reached (above the plot)"))
    ax1.legend(handles=handles, fontsize="small")
    ax2.set_xscale("log")
    ax2.set_xlabel("client uplink (Mbit/s)")
    ax2.set_ylabel("final test accuracy")
    ax2.set_title("final accuracy")
    if target:
        ax2.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax2.grid(True, which="both", alpha=0.3)
    ax3.set_ylabel("uplink bytes per run (MB)")
    ax3.set_title("what each method puts on the uplink")
    ax3.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig
