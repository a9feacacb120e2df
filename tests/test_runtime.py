"""End to end through the real runtime: ZeroMQ inproc sockets, the virtual clock, the emulator."""
import asyncio

import pytest
import torch
import zmq

from algorithms.base import Payload
from fedsim import codec
from fedsim.clock import VirtualTimeLoop
from fedsim.codec import Message
from fedsim.runner import build, run, summarise
from fedsim.scenario import load_scenario
from network.transport import Transport

FAST = ["run.rounds=3", "data.clients=5"]


def test_default_scenario_file_equals_embedded_default():
    a, b = load_scenario(None), load_scenario("scenarios/default.toml")
    assert (a.run, a.data, a.model, a.algorithm_name, a.algorithm) == (b.run, b.data, b.model, b.algorithm_name, b.algorithm)
    assert a.network == b.network


def test_same_seed_same_bytes_other_seed_differs():
    s = load_scenario(None, FAST)
    r1, r2 = run(s), run(s)
    assert r1.summary["events_sha256"] == r2.summary["events_sha256"]
    assert r1.summary["model_sha256"] == r2.summary["model_sha256"]
    r3 = run(load_scenario(None, FAST + ["run.seed=7"]))
    assert r3.summary["model_sha256"] != r1.summary["model_sha256"]


def test_outputs_written(tmp_path):
    import csv, json
    result = run(load_scenario(None, FAST), out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_accuracy", "rounds", "uplink_bytes", "downlink_bytes", "payload_bits", "sim_time_s",
                "wall_time_s", "time_to_target_s", "model_sha256", "events_sha256"):
        assert key in summary
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 3 and float(rows[-1]["sim_time_s"]) == pytest.approx(summary["sim_time_s"])
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == summary["events"] and any('"event":"round_end"' in l for l in lines)
    import hashlib
    assert hashlib.sha256((tmp_path / "events.jsonl").read_bytes()).hexdigest() == summary["events_sha256"]


def test_sgd_round_time_matches_link_formula():
    """10 clients, 1 Mbps uplinks, 50 ms latency: per round, downlink leg + compute + uplink leg."""
    s = load_scenario(None, ["data.clients=10", "algorithm.name=sgd", "run.rounds=3", "network.uplink=1Mbps",
                             "network.downlink=10Mbps", "network.latency=50ms", "model.hidden=[2048]",
                             "network.transport=datagram"])  # the fluid formula: no TCP window or headers
    result = run(s)
    up = result.summary["uplink_bytes"] / result.summary["messages_up"]
    down = result.summary["downlink_bytes"] / result.summary["messages_down"]
    # every client's message has the same size in sgd (same tensors, same envelope size +-1 byte)
    from fedsim.models import work_per_sample
    wps = work_per_sample(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10)), (1, 8, 8))
    compute = 32 * wps / s.network.stragglers.speed
    expected = (0.05 + down * 8 / 10e6) + compute + (0.05 + up * 8 / 1e6)
    assert up > 600_000  # a 64-2048-10 MLP's float32 gradient: about 4.8 s on a 1 Mbps uplink
    for m in result.metrics:
        assert m.round_time_s == pytest.approx(expected, rel=0.01)
    # an hour of simulated link costs only the compute: here seconds of simulated time, far less wall
    assert result.summary["wall_time_s"] * 3 < result.summary["sim_time_s"]
