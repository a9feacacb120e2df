"""A researcher's day (issue 12): switch any shipped scenario to any method, check before
running, list the methods, plot, use it from Python; parallel and repeated-seed sweeps.

Runs are in-process (``fedsim.cli.main``, ``fedsim.run``) and tiny (2 rounds) so the file
stays fast; the parallel-process and Dask tests start worker processes and take longest.
"""
from __future__ import annotations

import csv
import json
import math
import sys
import tomllib
from glob import glob
from pathlib import Path

import pytest

import fedsim
from algorithms import algorithm_names
from fedsim.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted(glob(str(ROOT / "scenarios" / "*.toml")))
METHODS = algorithm_names()
# Method tables of methods that may not run: they must be ignored, and they keep the
# local methods' 2 rounds cheap.
FAST = ["run.rounds=2", "algorithm.fedavg.local_epochs=1", "algorithm.fedlrt.local_steps=2",
        "algorithm.fedloru.local_steps=2"]


def _sets(items):
    return [x for item in items for x in ("--set", item)]


@pytest.mark.parametrize("path", SCENARIOS, ids=[Path(p).stem for p in SCENARIOS])
def test_every_scenario_switches_to_every_method(path, tmp_path):
    """`run --set algorithm.name=X` and `sweep --algorithms <all>` on each shipped scenario:
    every cell runs its 2 rounds, and a sweep cell is the same run as the `run` of it."""
    by_run = {}
    for method in METHODS:
        out = tmp_path / method
        assert main(["run", path, "--quiet", "--out", str(out), *_sets([*FAST, f"algorithm.name={method}"])]) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["algorithm"] == method and s["rounds"] == 2
        assert s["final_accuracy"] is not None and math.isfinite(s["final_accuracy"])
        by_run[method] = s
    uplink = fedsim.load(path).raw.get("network", {}).get("uplink", "10Mbps")
    sweep_out = tmp_path / "sweep"
    assert main(["sweep", path, "--algorithms", ",".join(METHODS), "--bandwidths", uplink, "--out", str(sweep_out),
                 *_sets(FAST)]) == 0
    rows = list(csv.DictReader(open(sweep_out / "sweep_runs.csv")))
    assert [r["algorithm"] for r in rows] == METHODS
    for r in rows:
        assert float(r["final_accuracy"]) == pytest.approx(by_run[r["algorithm"]]["final_accuracy"], abs=0)
        assert int(r["uplink_bytes"]) == by_run[r["algorithm"]]["uplink_bytes"]


# ------------------------------------------------------------------------------ check, algorithms, errors
def test_check_round_trip_gives_the_same_model(tmp_path, capsys):
    small = ["run.rounds=2", "data.clients=5"]
    assert main(["check", "scenarios/default.toml", *_sets(small)]) == 0
    text = capsys.readouterr().out
    resolved = tomllib.loads(text)
    # every value, defaults included
    assert {"seed", "rounds", "clock", "max_wait", "eval_every", "threads"} <= set(resolved["run"])
    assert set(resolved["algorithm"]["fedavg"]) == {"lr", "client_fraction", "local_epochs", "batch_size", "server_lr"}
    assert {"uplink", "downlink", "latency", "transport", "mtu", "server", "tcp"} <= set(resolved["network"])
    assert resolved["stragglers"]["distribution"] == "none"
    (tmp_path / "resolved.toml").write_text(text)
    a = fedsim.run(str(tmp_path / "resolved.toml"))
    b = fedsim.run("scenarios/default.toml", small)
    assert a.summary["model_sha256"] == b.summary["model_sha256"]
    assert a.summary["events_sha256"] == b.summary["events_sha256"]


@pytest.mark.parametrize("path", SCENARIOS, ids=[Path(p).stem for p in SCENARIOS])
def test_check_output_loads_to_the_same_scenario(path):
    from fedsim.scenario import from_dict
    original = fedsim.load(path)
    again = from_dict(tomllib.loads(fedsim.check(path)), base_dir=Path(path).parent)
    assert (again.run, again.data, again.model, again.algorithm_name, again.algorithm, again.network) == \
        (original.run, original.data, original.model, original.algorithm_name, original.algorithm, original.network)


def test_algorithms_lists_every_method_with_its_keys(capsys):
    import dataclasses

    from algorithms import get_algorithm
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name}" in "\n" + out
        for f in dataclasses.fields(get_algorithm(name).Config):
            assert f"  {f.name} " in out
    # the docs come from the field docstrings
    assert "b: bits per quantized value, 1..16." in out
    listed = {m["name"]: m for m in fedsim.algorithms()}
    assert set(listed) == set(METHODS)
    assert {k["name"]: k["default"] for k in listed["qrr"]["keys"]}["rank_fraction"] == 0.3


def test_type_error_names_key_and_value(capsys):
    assert main(["run", "--set", "algorithm.lr=abc"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.lr = 'abc'" in err and "expected a number" in err
    assert "not supported" not in err and "Traceback" not in err


def test_key_of_another_method_points_at_its_table(capsys):
    long_hint = "to keep it when switching methods"
    assert main(["run", "scenarios/default.toml", "--set", "algorithm.bits=8"]) == 2
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if "algorithm.bits" in l)
    assert long_hint in line, "one line, not wrapped at 80 columns when piped"
    assert len(line) > 80
    assert main(["run", "--set", "algorithm.nosuch.bits=8"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_method_table_applies_only_to_its_method_and_top_level_keys_win():
    s = fedsim.load("scenarios/default.toml", {"algorithm.name": "qrr", "algorithm.qrr.bits": 4})
    assert s.algorithm.bits == 4
    s = fedsim.load("scenarios/default.toml", ["algorithm.local_epochs=1"])
    assert s.algorithm.local_epochs == 1  # over [algorithm.fedavg] local_epochs = 2


def test_gradient_method_with_few_rounds_gets_a_hint(capsys):
    assert fedsim.load("scenarios/default.toml", {"algorithm.name": "qrr"}).notes
    assert not fedsim.load("scenarios/default.toml").notes
    assert not fedsim.load("scenarios/default.toml", {"algorithm.name": "qrr", "run.rounds": 300}).notes
    # FeDLRT's defaults (one epoch of a Fashion-MNIST client) are ~84 passes over a digits client
    (note,) = fedsim.load("scenarios/default.toml", {"algorithm.name": "fedlrt"}).notes
    assert "local_steps=4" in note
    assert not fedsim.load(None, {"algorithm.name": "fedlrt", "data.dataset": "fashion-mnist"}).notes


# ------------------------------------------------------------------------------ no silent foot-guns
def test_datagram_without_deadline_finishes_near_the_network_time(tmp_path):
    """The README's foot-gun: datagram + 1% loss and no deadline used to wait an hour per lost reply."""
    base = {"run.rounds": 5, "network.transport": "datagram"}
    clean = fedsim.run(None, base)
    lossy = fedsim.run(None, {**base, "network.loss": 0.01}, out=tmp_path)
    per_round = clean.summary["sim_time_s"] / 5
    assert lossy.summary["round_deadline_derived"] is True
    assert lossy.summary["sim_time_s"] <= 5 * 1.6 * per_round  # DEADLINE_MARGIN 1.5, nothing like 3600 s
    drops = lossy.summary["drops"]
    assert set(drops) >= {"loss", "partition", "offline", "deadline"}
    assert drops["loss"] > 0
    assert lossy.summary["replies"]["missed"] > 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert all(int(r["replies"]) + int(r["missed_replies"]) == 20 for r in rows)  # fedavg: one gather of 20
    assert sum(int(r["missed_replies"]) for r in rows) == lossy.summary["replies"]["missed"]
    assert json.loads((tmp_path / "summary.json").read_text())["drops"] == drops
    assert clean.summary["drops"]["loss"] == 0 and clean.summary["round_deadline_derived"] is False


def test_shipped_lossy_scenario_counts_drops_by_reason():
    r = fedsim.run("scenarios/partition.toml", {"run.rounds": 8, "algorithm.fedavg.local_epochs": 1})
    assert r.summary["drops"]["partition"] > 0
    assert r.summary["round_deadline_derived"] is False  # the file sets its own


# ------------------------------------------------------------------------------ plots
def _axes_lines(ax):
    return [l for l in ax.get_lines() if not l.get_label().startswith("_")]


def test_plot_three_runs(tmp_path):
    from fedsim.figures import runs_figure
    dirs = []
    for method in ("fedavg", "sgd", "topk"):
        d = tmp_path / method
        fedsim.run("scenarios/default.toml", [*FAST, "data.clients=4", f"algorithm.name={method}"], out=d)
        dirs.append(d)
    assert main(["plot", *map(str, dirs), "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    fig = runs_figure(dirs)
    axes = fig.axes
    assert len(axes) == 3
    assert [ax.get_xlabel().split(" ")[0] for ax in axes] == ["round", "simulated", "uplink"]
    for ax in axes:
        labels = [l.get_label() for l in _axes_lines(ax)]
        assert labels == ["fedavg · default", "sgd · default", "topk · default"]
        assert all(len(l.get_xdata()) == 2 for l in _axes_lines(ax))
    # x of the third panel is the cumulative uplink payload bits from metrics.csv
    rows = list(csv.DictReader(open(dirs[1] / "metrics.csv")))
    assert list(_axes_lines(axes[2])[1].get_xdata()) == [float(r["uplink_payload_bits"]) for r in rows]


def test_sweep_plot_draws_unreached_cells_apart():
    import matplotlib.pyplot as plt

    from fedsim.figures import sweep_figure
    rows = [
        {"algorithm": "a", "uplink": "1Mbps", "uplink_bps": 1e6, "time_to_target_s": 50.0, "time_to_target_s_sd": 5.0,
         "final_accuracy": 0.93, "final_accuracy_sd": 0.01, "uplink_bytes": 1e6},
        {"algorithm": "a", "uplink": "10Mbps", "uplink_bps": 1e7, "time_to_target_s": 10.0, "time_to_target_s_sd": 1.0,
         "final_accuracy": 0.94, "final_accuracy_sd": 0.01, "uplink_bytes": 1e6},
        {"algorithm": "b", "uplink": "1Mbps", "uplink_bps": 1e6, "time_to_target_s": None,
         "final_accuracy": 0.7, "final_accuracy_sd": 0.02, "uplink_bytes": 2e5},
        {"algorithm": "b", "uplink": "10Mbps", "uplink_bps": 1e7, "time_to_target_s": 30.0,
         "final_accuracy": 0.91, "final_accuracy_sd": 0.02, "uplink_bytes": 2e5},
    ]
    fig = sweep_figure(rows, 0.9)
    ax1, ax2, _ = fig.axes
    missed = [l for l in ax1.get_lines() if l.get_gid() == "not_reached"]
    assert len(missed) == 1
    (m,) = missed
    assert m.get_markerfacecolor() == "none" and list(m.get_xdata()) == [1.0]
    # drawn above the axes (axes coordinates > 1), not at any time on the time axis
    x, y = m.get_transform().transform((1.0, m.get_ydata()[0]))
    assert y > ax1.transAxes.transform((0, 1))[1]
    assert any(t.get_gid() == "not_reached_label" for t in ax1.texts)
    # b's reached cell is on the time axis at its time; nothing of b is drawn at the run's end
    reached_y = [y for c in ax1.containers for y in c.lines[0].get_ydata()]
    assert sorted(reached_y) == [10.0, 30.0, 50.0]
    labels = [t.get_text() for t in ax1.get_legend().get_texts()]
    assert labels == ["a", "b", "not reached (above the plot)"] and all(labels)
    assert ax2.get_title() == "final accuracy"
    assert sorted(y for c in ax2.containers for y in c.lines[0].get_ydata()) == sorted([0.93, 0.94, 0.7, 0.91])
    assert all(c.has_yerr for c in ax2.containers)
    plt.close(fig)


# ------------------------------------------------------------------------------ Python API, tensorboard
def test_python_api_returns_plain_records(tmp_path):
    result = fedsim.run("scenarios/default.toml", {"algorithm.name": "sgd", "run.rounds": 2, "data.clients": 4},
                        out=tmp_path / "x")
    assert isinstance(result.summary, dict) and result.summary["algorithm"] == "sgd"
    assert [r["round"] for r in result.rounds] == [0, 1] and isinstance(result.rounds[0], dict)
    assert json.loads((tmp_path / "x" / "summary.json").read_text())["model_sha256"] == result.summary["model_sha256"]
    study = fedsim.sweep("scenarios/default.toml", algorithms=["sgd"], bandwidths=["1Mbps", "10Mbps"],
                         overrides={"run.rounds": 2, "data.clients": 4})
    assert [r["uplink"] for r in study.rows] == ["1Mbps", "10Mbps"]
    assert study.runs[0]["model_sha256"] == study.runs[1]["model_sha256"]  # bandwidth changes time, not training
    with pytest.raises(fedsim.ScenarioError, match="run.rounds"):
        fedsim.run(None, {"run.rounds": 0})


def test_tensorboard_missing_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["run", "--set", "run.rounds=1", "--set", "data.clients=2", "--tensorboard", "tb", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --tensorboard needs the tensorboard package: pip install 'fedsim[tensorboard]' " \
                      "(or pip install tensorboard)"


def test_tensorboard_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    fedsim.run(None, {"run.rounds": 2, "data.clients": 4}, tensorboard=tmp_path)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"accuracy", "loss", "uplink_bytes", "downlink_bytes", "sim_time_s"} <= tags
    assert [e.step for e in acc.Scalars("accuracy")] == [1, 2]


# ------------------------------------------------------------------------------ parallel and repeated sweeps
SMALL_SWEEP = ["sweep", "scenarios/default.toml", "--algorithms", "sgd", "--bandwidths", "1Mbps",
               "--seeds", "1-2", *_sets(["run.rounds=2", "data.clients=4"])]


def _csv_without_wall(path):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(open(path))]


@pytest.fixture(scope="module")
def sequential_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    assert main([*SMALL_SWEEP, "--out", str(out)]) == 0
    return out


def test_seeds_give_mean_and_spread(sequential_sweep):
    rows = list(csv.DictReader(open(sequential_sweep / "sweep.csv")))
    runs = list(csv.DictReader(open(sequential_sweep / "sweep_runs.csv")))
    assert [(r["algorithm"], r["seeds"]) for r in rows] == [("sgd", "1 2")]
    for r in rows:
        accs = [float(x["final_accuracy"]) for x in runs if x["algorithm"] == r["algorithm"]]
        assert len(accs) == 2 and accs[0] != accs[1]
        assert float(r["final_accuracy"]) == pytest.approx(sum(accs) / 2)
        assert float(r["final_accuracy_sd"]) == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))


def test_parallel_jobs_give_the_same_sweep(sequential_sweep, tmp_path):
    assert main([*SMALL_SWEEP, "--out", str(tmp_path), "--jobs", "2"]) == 0
    for name in ("sweep.csv", "sweep_runs.csv"):
        assert _csv_without_wall(tmp_path / name) == _csv_without_wall(sequential_sweep / name)


def test_dask_local_cluster_gives_the_same_sweep(sequential_sweep, tmp_path):
    """Cells submitted to a running Dask scheduler over TCP (--address), as to a cluster of
    other machines. The cluster's worker runs in this process (a thread) to keep the test
    fast; `--engine dask` without --address starts worker processes (bench/parallel_sweep.py)."""
    pytest.importorskip("distributed", reason="Dask distributed is the optional extra fedsim[dask]")
    from dask.distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert main([*SMALL_SWEEP, "--out", str(tmp_path), "--engine", "dask",
                     "--address", cluster.scheduler_address]) == 0
    for name in ("sweep.csv", "sweep_runs.csv"):
        assert _csv_without_wall(tmp_path / name) == _csv_without_wall(sequential_sweep / name)


# ------------------------------------------------------------------------------ a data set of one's own
@pytest.mark.parametrize("fmt", ["npz", "idx"])
def test_folder_dataset_trains_like_the_builtin_one(fmt, tmp_path):
    """docs/extending.md: the digits split written to a folder trains to the same bytes."""
    import numpy as np

    from fedsim.data import DataConfig, FASHION_MNIST_FILES, load_dataset, write_idx
    d = load_dataset(DataConfig(), seed=1)
    arrays = {"train_x": d.train_x.squeeze(1).numpy(), "train_y": d.train_y.numpy(),
              "test_x": d.test_x.squeeze(1).numpy(), "test_y": d.test_y.numpy()}
    if fmt == "npz":
        for part in ("train", "test"):
            np.savez(tmp_path / f"{part}.npz", x=arrays[f"{part}_x"], y=arrays[f"{part}_y"])
    else:
        for key, name in FASHION_MNIST_FILES.items():
            write_idx(tmp_path / name, arrays[key].astype(np.float32 if key.endswith("x") else np.uint8))
    small = {"run.rounds": 2, "data.clients": 4}
    own = fedsim.run(None, {**small, "data.dataset": "folder", "data.data_dir": str(tmp_path)})
    builtin = fedsim.run(None, small)
    assert own.summary["model_sha256"] == builtin.summary["model_sha256"]


def test_folder_dataset_errors_are_one_line(tmp_path, capsys):
    assert main(["run", "--set", "data.dataset=folder", "--set", f"data.data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no train.npz and test.npz" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ the worked example's protocol
# tests/test_state_sync.py already runs topk's state machine (it is registered and stateful);
# its content-addressed protocol must also survive replays the version filter cannot catch.
from tests.statesync import state_sync_machine  # noqa: E402

TestTopkSurvivesReplays = state_sync_machine("topk", replay=True).TestCase


def test_check_catches_what_run_would_refuse_before_its_first_round(capsys):
    assert main(["check", "--set", "algorithm.name=fedlrt", "--set", "model.kind=cnn"]) == 2
    assert "algorithm.rank" in capsys.readouterr().err
    assert main(["check", "--set", "data.dataset=folder", "--set", "data.data_dir=/nonexistent"]) == 2
    assert "no train.npz" in capsys.readouterr().err
