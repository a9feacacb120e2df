"""A scripted server crash in virtual time: the server loses its memory, restarts from the
checkpoint of its last completed round, the clients roll back to that round, and the run
is the same run (same model bytes) as one never interrupted. Plus the checkpoint codec."""
import collections
import copy
import dataclasses

import numpy as np
import pytest
import torch

from algorithms import algorithm_names
from algorithms.powersgd import PowerSGD
from fedsim import checkpoint
from fedsim.runner import run
from fedsim.scenario import from_dict, load_scenario


def _scenario(algorithm, events=()):
    overrides = [f"algorithm.name={algorithm}", "run.rounds=5", "data.clients=4"]
    if algorithm in ("fedlrt", "fedloru"):
        overrides.append("algorithm.local_steps=4")
    if algorithm == "fedavg":
        overrides.append("algorithm.local_epochs=1")
    sc = load_scenario(None, overrides)
    if events:
        raw = copy.deepcopy(sc.raw)
        raw["events"] = list(events)
        sc = from_dict(raw)
    return sc


@pytest.mark.parametrize("algorithm", algorithm_names())
def test_server_crash_mid_round_resumes_the_same_run(algorithm):
    clean = run(_scenario(algorithm)).summary
    # crash in the middle of round 3 (between its sends and its replies), back 2 s later
    t = clean["sim_time_s"] * 0.55
    crashed = run(_scenario(algorithm, [{"action": "server_crash", "at": f"{t:.6f}s", "restart_after": "2s"}])).summary
    assert crashed["rounds"] == 5 and crashed["restarts"] == 1
    assert crashed["counters"]["server_crash"] == 1
    assert crashed["model_sha256"] == clean["model_sha256"]
    assert crashed["sim_time_s"] > clean["sim_time_s"] + 2.0  # the outage and the repeated round cost time
    # the traffic of the round the crash cut short stays counted
    assert crashed["uplink_bytes"] + crashed["downlink_bytes"] > clean["uplink_bytes"] + clean["downlink_bytes"]


def test_server_crash_at_a_round_boundary_and_the_event_is_validated():
    clean = run(_scenario("laq")).summary
    crashed = run(_scenario("laq", [{"action": "server_crash", "at_round": 2, "restart_after": "5s"}])).summary
    assert crashed["model_sha256"] == clean["model_sha256"] and crashed["restarts"] == 1
    from fedsim.errors import ScenarioError
    with pytest.raises(ScenarioError, match="server_crash takes no clients"):
        _scenario("laq", [{"action": "server_crash", "at_round": 2, "clients": "0-1"}])


@dataclasses.dataclass
class _Outside:
    x: int


def test_checkpoint_codec_round_trip_and_refusals(tmp_path):
    g = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(5)
    state = {"t": torch.arange(6, dtype=torch.float32).reshape(2, 3), "bf": torch.ones(2, dtype=torch.bfloat16),
             "empty": torch.empty(0, 4), "arr": np.arange(4, dtype=np.int16), "tuple": (1, "a"), "set": {3, 1},
             "deque": collections.deque([1, 2], maxlen=5), "ints": {0: 1, 7: 2}, "tuple_keys": {(1, 2): "x"},
             "big": 2**100, "gen": g, "np": rng, "plan": PowerSGD.Config(lr=0.3)}
    path = checkpoint.save(tmp_path, state)
    back = checkpoint.load(tmp_path)
    assert path.name == checkpoint.FILENAME and not list(tmp_path.glob("*.tmp"))
    assert torch.equal(back["t"], state["t"]) and back["bf"].dtype == torch.bfloat16 and back["empty"].shape == (0, 4)
    assert np.array_equal(back["arr"], state["arr"]) and back["arr"].dtype == np.int16
    assert back["tuple"] == (1, "a") and back["set"] == {1, 3} and back["deque"].maxlen == 5
    assert back["ints"] == {0: 1, 7: 2} and back["tuple_keys"] == {(1, 2): "x"} and back["big"] == 2**100
    assert torch.equal(torch.rand(3, generator=back["gen"]), torch.rand(3, generator=g))
    assert np.array_equal(back["np"].random(3), rng.random(3))
    assert back["plan"] == state["plan"]
    with pytest.raises(checkpoint.CheckpointError, match="outside algorithms"):
        checkpoint.dumps({"x": _Outside(1)})
    with pytest.raises(checkpoint.CheckpointError, match="cannot checkpoint"):
        checkpoint.dumps({"f": open})
    with pytest.raises(checkpoint.CheckpointError, match="not a fedsim checkpoint"):
        checkpoint.loads(b"\x00garbage")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nothing")
