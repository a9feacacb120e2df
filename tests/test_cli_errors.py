"""A user's mistake is one line naming the argument and the value, with exit code 2 (usage)
or 1 (at run time), never a traceback; Ctrl-C stops after the round and keeps the results."""
import json
import signal
import socket

import pytest

from procs import Fedsim, free_port, reap

pytestmark = pytest.mark.realtime
SMALL = ("--set", "data.clients=2", "--set", "run.rounds=2")


def _one_line_error(proc: Fedsim, code: int, *needles: str) -> None:
    rc = proc.wait(300)
    out = proc.output
    assert rc == code, out
    assert "Traceback" not in out, out
    errors = [l for l in out.splitlines() if "error:" in l]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], out


def test_usage_and_runtime_mistakes_are_one_line(tmp_path):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cases = [
            (Fedsim("join", "--clients", "abc", *SMALL), 2, ["--clients", "abc"]),
            (Fedsim("join", "--clients", "0-9", *SMALL), 2, ["--clients", "9"]),
            (Fedsim("serve", "--keys", str(tmp_path / "nokeys"), *SMALL), 2, ["--keys", "nokeys"]),
            (Fedsim("serve", "--bind", "nonsense://x", *SMALL), 2, ["--bind", "nonsense://x"]),
            (Fedsim("serve", "--bind", f"tcp://127.0.0.1:{taken}", *SMALL), 1, ["already in use"]),
            (Fedsim("serve", "--resume", *SMALL), 2, ["--resume", "--out"]),
            (Fedsim("serve", "--resume", "--out", str(tmp_path / "empty"), *SMALL), 1, ["no checkpoint"]),
            (Fedsim("serve", "--bind", f"tcp://127.0.0.1:{port}", "--wait", "2", "--out", str(tmp_path / "lonely"),
                    *SMALL), 1, ["did not join", "0-1"]),
            (Fedsim("join", "--connect", f"tcp://127.0.0.1:{free_port()}", "--wait", "2", *SMALL), 1,
             ["no answer", "--wait"]),
            (Fedsim("run", "--set", "run.rounds=abc"), 2, ["run.rounds", "abc"]),
            (Fedsim("run", "--set", "run.heartbeat=1parsec"), 2, ["run.heartbeat"]),
            (Fedsim("keys", str(tmp_path / "k"), "--clients", "3", "--ids", "0-4,3-6,7-9"), 2, ["--ids", "client 3"]),
        ]
        try:
            for proc, code, needles in cases:
                _one_line_error(proc, code, *needles)
        finally:
            reap(*(p for p, _, _ in cases))
    # nobody joined within --wait: what there is was written anyway
    summary = json.loads((tmp_path / "lonely" / "summary.json").read_text())
    assert summary["rounds"] == 0


def test_ctrl_c_on_run_stops_after_the_round_and_keeps_results(tmp_path):
    out = tmp_path / "run"
    proc = Fedsim("run", "--set", "run.rounds=100000", "--set", "data.clients=2", "--out", str(out))
    try:
        proc.wait_for(r"round 3/100000", 120)
        proc.kill(signal.SIGINT)
        assert proc.wait(60) == 130, proc.output
        assert "Traceback" not in proc.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["interrupted"] is True and 3 <= summary["rounds"] < 100000
        rows = (out / "metrics.csv").read_text().splitlines()
        assert len(rows) == summary["rounds"] + 1
    finally:
        reap(proc)
