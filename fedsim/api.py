"""fedsim from Python: what the command line calls.

    import fedsim
    result = fedsim.run("scenarios/default.toml", {"algorithm.name": "qrr", "run.rounds": 300}, out="runs/qrr")
    result.summary["final_accuracy"], result.rounds[-1]["sim_time_s"]

Overrides are a mapping of dotted keys to Python values (``{"network.uplink": "1Mbps"}``)
or ``--set``-style strings (``["network.uplink=1Mbps"]``). Mistakes raise
:class:`fedsim.ScenarioError` (key, value, reason) before anything runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import ScenarioError

Overrides = Mapping[str, Any] | Sequence[str] | None


class MissingExtra(ScenarioError):
    """An optional dependency a requested feature needs is not installed."""

    def __init__(self, feature: str, package: str, extra: str):
        super().__init__(feature, None, f"needs the {package} package: pip install 'fedsim[{extra}]' "
                                        f"(or pip install {package})")

    def __str__(self) -> str:
        return f"{self.key} {self.reason}"


@dataclass
class Result:
    """A finished run as plain records: ``summary`` (summary.json), ``rounds`` (metrics.csv,
    one dict per round), ``notes`` (hints about the scenario), ``out`` (where files went)."""

    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    out: Path | None = None

    @property
    def final_accuracy(self) -> float | None:
        return self.summary["final_accuracy"]


@dataclass
class SweepResult:
    """A finished sweep: ``rows`` (sweep.csv: per algorithm and uplink, means and spreads over
    seeds), ``runs`` (one summary per run, with its ``algorithm``, ``uplink`` and ``seed``),
    ``files`` written (when ``out`` was given)."""

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)


def _strings(overrides: Overrides) -> list[str]:
    """Overrides as ``key=value`` strings (what travels to worker processes)."""
    from .scenario import _toml_value
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={_toml_value(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return list(overrides)


def load(scenario: str | Path | None = None, overrides: Overrides = None):
    """The validated :class:`fedsim.scenario.Scenario` (``None``: the embedded default)."""
    from .scenario import load_scenario
    return load_scenario(scenario, overrides if isinstance(overrides, Mapping) else _strings(overrides))


def check(scenario: str | Path | None = None, overrides: Overrides = None) -> str:
    """Validate without running (the scenario, the data set's presence, the method's fit to
    the model); the resolved scenario as TOML (every value, defaults included). Fed back to
    :func:`run` it runs the same thing (same ``model_sha256``)."""
    from .data import load_dataset
    from .models import build_model
    from .runner import make_algorithm
    from .scenario import resolved, to_toml
    sc = load(scenario, overrides)
    # What `run` checks before its first round: the data set is there, and the method's
    # settings fit the model (a rank above a layer's size, a low-rank method on a CNN).
    data = load_dataset(sc.data, sc.run.seed)
    make_algorithm(sc, build_model(sc.model, data.input_shape, data.num_classes, sc.run.seed))
    header = f"resolved from {sc.source}" + "".join(f"\nnote: {n}" for n in sc.notes)
    return to_toml(resolved(sc), header)


def _tensorboard_writer(log_dir: str | Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtra("--tensorboard", "tensorboard", "tensorboard") from None
    return SummaryWriter(log_dir=str(log_dir))


def run(scenario: str | Path | None = None, overrides: Overrides = None, *, out: str | Path | None = None,
        progress: Callable[[Any, int], None] | None = None, tensorboard: str | Path | None = None) -> Result:
    """Run a scenario to the end. ``out``: write summary.json, metrics.csv, events.jsonl
    there. ``progress(metrics, total_rounds)`` after every round. ``tensorboard``: a
    directory for TensorBoard scalars (accuracy, loss, bytes each way, simulated time,
    replies), one step per round; needs ``fedsim[tensorboard]``."""
    from .runner import run as run_scenario

    sc = load(scenario, overrides)
    writer = _tensorboard_writer(tensorboard) if tensorboard is not None else None
    hook = progress
    if writer is not None:
        def hook(m, total):
            step = m.round + 1
            for key in ("accuracy", "loss", "uplink_bytes", "downlink_bytes", "sim_time_s", "round_time_s",
                        "replies", "missed_replies"):
                value = getattr(m, key)
                if value is not None:
                    writer.add_scalar(key, value, step)
            if progress is not None:
                progress(m, total)
    try:
        result = run_scenario(sc, out, progress=hook)
    finally:
        if writer is not None:
            writer.close()
    summary = dict(result.summary)
    summary["notes"] = list(sc.notes)
    if out is not None:
        import json
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return Result(summary, [dataclasses.asdict(m) for m in result.metrics], list(sc.notes),
                  None if out is None else Path(out))


def sweep(scenario: str | Path | None = None, *, algorithms: Sequence[str], bandwidths: Sequence[str],
          seeds: Sequence[int] | str | None = None, overrides: Overrides = None, out: str | Path | None = None,
          jobs: int = 1, engine: str = "local", address: str | None = None,
          on_cell: Callable[[Any, int, int], None] | None = None) -> SweepResult:
    """A bandwidth-wall study: every (algorithm, uplink, seed) run of one scenario.

    ``seeds``: a list or ``"1-5"`` (default: the scenario's own seed). ``jobs``: cells run in
    that many processes; ``engine="dask"`` runs them on a Dask cluster (``address`` of its
    scheduler, or a local cluster of ``jobs`` workers). ``out``: write sweep.csv,
    sweep_runs.csv and bandwidth_wall.png there.
    """
    from . import study as sw

    seed_list = sw.parse_seeds(seeds) if isinstance(seeds, str) else (list(seeds) if seeds else None)
    cells = sw.sweep(None if scenario is None else str(scenario), list(bandwidths), list(algorithms),
                     _strings(overrides), on_cell, seeds=seed_list, jobs=jobs, engine=engine, address=address)
    files = []
    if out is not None and cells:
        files = sw.write(cells, out, cells[0].summary["target_accuracy"])
    runs = [{"algorithm": c.algorithm, "uplink": c.uplink, **c.summary} for c in cells]
    return SweepResult(sw.aggregate(cells), runs, files)


def plot(run_dirs: Sequence[str | Path], out: str | Path, bits: str = "payload") -> Path:
    """Accuracy against rounds, simulated time and uplink bits, one line per run directory."""
    import matplotlib.pyplot as plt

    from .figures import runs_figure
    fig = runs_figure(list(run_dirs), bits)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def algorithms() -> list[dict[str, Any]]:
    """Every registered method: ``name``, one-line ``doc`` and ``keys`` (name, type, default,
    doc), read from the code (each Config's fields and the docstrings under them)."""
    from algorithms import algorithm_names, get_algorithm

    from .scenario import field_docs
    out = []
    for name in algorithm_names():
        cls = get_algorithm(name)
        module = __import__(cls.__module__, fromlist=["_"])
        doc = (cls.__doc__ or module.__doc__ or "").strip().splitlines()
        out.append({"name": name, "doc": doc[0].strip() if doc else "", "stateful": cls.stateful,
                    "keys": [dataclasses.asdict(f) for f in field_docs(cls.Config)]})
    return out
