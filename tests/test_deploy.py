"""The same actors across processes over tcp (real time), with and without CURVE."""
import subprocess
import sys

import pytest

from fedsim.deploy import make_keys, serve
from fedsim.scenario import load_scenario

pytestmark = pytest.mark.realtime
OVERRIDES = ["run.rounds=2", "data.clients=4", "run.clock=real", "network.latency=5ms"]


def _join(address, clients, keys=None):
    cmd = [sys.executable, "-m", "fedsim.cli", "join", "--connect", address, "--clients", clients]
    for o in OVERRIDES:
        cmd += ["--set", o]
    if keys:
        cmd += ["--keys", str(keys)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("curve", [False, True])
def test_server_and_two_client_processes_over_tcp(tmp_path, curve):
    keys = make_keys(tmp_path / "keys", 1, n_clients=4) if curve else None
    procs = []

    def ready(address):
        procs.append(_join(address, "0-1", keys))
        procs.append(_join(address, "2-3", keys))

    result = serve(load_scenario(None, OVERRIDES), "tcp://127.0.0.1:0", keys=keys, ready=ready,
                   registration_timeout=60)
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    s = result.summary
    assert s["rounds"] == 2 and s["messages_up"] == 8 and s["messages_down"] == 8
    assert s["final_accuracy"] > 0.2
    assert s["counters"].get("rejected", 0) == 0


# A key the server does not know, and a key claiming another key's ids: tests/test_deploy_survives.py
