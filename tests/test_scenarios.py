"""Every scenario in scenarios/ runs to completion through the CLI, in virtual time, and
shows the feature it is there to show.

The list is ``sorted(glob("scenarios/*.toml"))``: a new file is covered automatically by
the generic checks (exit code 0, summary.json, every round run, a description line);
the files shipped here also get a check of their own, keyed by file name.
"""
from __future__ import annotations

import copy
import csv
import json
from collections import Counter
from glob import glob
from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.runner import run
from fedsim.scenario import from_dict, load_scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted(glob(str(ROOT / "scenarios" / "*.toml")))


class Outcome:
    """What one CLI run left in its --out directory."""

    def __init__(self, path: str, out: Path):
        self.path = path
        self.scenario = load_scenario(path)
        self.summary = json.loads((out / "summary.json").read_text())
        self.events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        with open(out / "metrics.csv") as f:
            self.metrics = list(csv.DictReader(f))

    @property
    def counters(self) -> dict[str, int]:
        return self.summary["counters"]

    def of(self, event: str, **match) -> list[dict]:
        return [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]

    def round_times(self) -> list[float]:
        return [float(m["round_time_s"]) for m in self.metrics]


# ----------------------------------------------------------------------------- per scenario
def check_default(o: Outcome) -> None:
    assert not o.of("drop") and o.counters.get("missed_replies", 0) == 0
    assert o.summary["final_accuracy"] >= 0.9


def check_lossy_uplink(o: Outcome) -> None:
    losses = o.of("drop", reason="loss")
    assert losses, "1% packet loss on 13-packet datagrams must lose some updates"
    assert {e["direction"] for e in losses} == {"up"}, "loss is configured on the uplinks only"
    # Every lost update is a reply the server missed, and only those are missed.
    assert o.counters["missed_replies"] == len(losses)
    deadline = o.scenario.run.round_deadline
    lossy_rounds = {max(i for i, r in enumerate(o.of("round_start")) if r["t"] <= e["t"]) for e in losses}
    times = o.round_times()
    assert {i for i, t in enumerate(times) if t >= deadline - 1e-9} == lossy_rounds
    # The same network without the loss: no drops, and every round well under the deadline.
    raw = copy.deepcopy(o.scenario.raw)
    del raw["network"]["group"]
    raw["run"]["rounds"] = 5
    clean = run(from_dict(raw, source="lossless variant", base_dir=Path(o.path).parent))
    assert not [1 for _, e, f in clean.events.rows if e == "drop"]
    assert clean.summary["sim_time_s"] < sum(times[:5])
    assert max(m.round_time_s for m in clean.metrics) < deadline / 2


def check_stragglers(o: Outcome) -> None:
    deadline = o.scenario.run.round_deadline
    times = o.round_times()
    assert o.counters["missed_replies"] > 0
    assert max(times) <= deadline + 1e-9, "the deadline caps every round"
    assert sum(t >= deadline - 1e-9 for t in times) >= len(times) // 2
    assert o.counters["late"] > 0, "stragglers still reply, after their round closed"
    slow = o.of("net_event", action="slowdown")
    assert len(slow) == 2 and slow[1].get("phase") == "end"
    assert slow[1]["t"] - slow[0]["t"] == pytest.approx(5.0)


def check_flaky_clients(o: Outcome) -> None:
    assert o.counters["fault_crash"] == 3 and o.counters["fault_restart"] == 3
    crash, = o.of("net_event", action="crash")
    restart, = o.of("net_event", action="restart")
    assert restart["t"] - crash["t"] == pytest.approx(4.0) and restart["cause"] == "restart_after"
    crashed = o.of("drop", reason="crashed")
    assert crashed and {e["client"] for e in crashed} <= {0, 1, 2}
    assert all(crash["t"] <= e["t"] <= restart["t"] for e in crashed)
    toggles = [e for e in o.of("net_event") if e.get("cause") == "availability"]
    assert {e["action"] for e in toggles} == {"offline", "online"}
    assert {int(e["clients"]) for e in toggles} <= set(range(10, 20)), "only clients 10-19 churn"
    offline = o.of("drop", reason="offline")
    assert offline and {e["client"] for e in offline} <= set(range(10, 20))
    assert o.counters["missed_replies"] > 0


def check_partition(o: Outcome) -> None:
    parts = o.of("net_event", action="partition")
    heals = o.of("net_event", action="heal")
    assert [p["clients"] for p in parts] == ["0-6", "14-19"]
    assert [h["clients"] for h in heals] == ["0-6", "14-19"]
    assert heals[0]["t"] == pytest.approx(4.0) and heals[1]["cause"] == "duration"
    assert heals[1]["t"] - parts[1]["t"] == pytest.approx(2.0)
    windows = [(parts[0]["t"], heals[0]["t"], set(range(0, 7))), (parts[1]["t"], heals[1]["t"], set(range(14, 20)))]
    drops = o.of("drop")
    assert drops and {e["reason"] for e in drops} == {"partition"}
    for e in drops:
        assert any(a <= e["t"] <= b and e["client"] in who for a, b, who in windows), e
    assert o.counters["missed_replies"] > 0
    # Outside the partitions every round is short; inside, the round deadline decides.
    assert min(o.round_times()) < o.scenario.run.round_deadline / 2


def check_shared_bottleneck(o: Outcome) -> None:
    net = o.scenario.network
    n = o.scenario.data.clients
    latency = net.uplinks[0].latency
    assert not o.of("drop")
    per_round_up = o.summary["uplink_bytes"] / len(o.metrics)
    for r, t in enumerate(o.round_times()):
        down = sum(e["bytes"] for e in o.of("send", round=r))
        # All downloads share the server uplink and finish together; uploads start within
        # a few ms of each other and keep the server downlink busy until the last ends.
        shared = 8 * down / net.server_uplink + 8 * per_round_up / net.server_downlink + 2 * latency
        # TCP adds per-segment headers, handshakes and slow start on top of the fluid time
        # (tests/test_network_tcp.py checks those terms exactly); here: the sharing decides.
        assert shared <= t <= 1.15 * shared + 0.02, (r, t, shared)
    alone = 8 * per_round_up / n / net.uplinks[0].bandwidth_at(0)
    assert min(o.round_times()) > 10 * alone, "without sharing an upload would take ~16 ms"


CHECKS = {
    "default": check_default,
    "lossy_uplink": check_lossy_uplink,
    "stragglers": check_stragglers,
    "flaky_clients": check_flaky_clients,
    "partition": check_partition,
    "shared_bottleneck": check_shared_bottleneck,
}


# ----------------------------------------------------------------------------- tests
def test_library_is_complete():
    names = {Path(p).stem for p in SCENARIOS}
    assert set(CHECKS) <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: Path(p).stem)
def test_scenario_runs_through_the_cli(path, tmp_path, capsys):
    first = Path(path).read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 10, "first line: a one-line '# description'"
    out = tmp_path / "out"
    assert main(["run", path, "--quiet", "--out", str(out)]) == 0
    o = Outcome(path, out)
    s = o.summary
    assert s["clock"] == "virtual"
    assert s["rounds"] == o.scenario.run.rounds == len(o.metrics), "a full run of the file"
    assert s["final_accuracy"] is not None and s["sim_time_s"] > 0
    assert len(s["model_sha256"]) == 64 and len(s["events_sha256"]) == 64
    assert len(o.of("round_end")) == s["rounds"]
    check = CHECKS.get(Path(path).stem)
    if check is not None:
        check(o)


def test_scenarios_command_lists_descriptions(capsys):
    assert main(["scenarios"]) == 0
    listed = capsys.readouterr().out
    for path in SCENARIOS:
        description = Path(path).read_text().splitlines()[0].lstrip("# ").strip()
        assert f"{Path(path).name}" in listed and description in listed
