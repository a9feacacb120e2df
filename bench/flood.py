"""Floods against a live `fedsim serve` on tcp://127.0.0.1 (issue 10, items 1-2).

The server runs in this process (so its RSS is measured here); the two client processes
are `fedsim join` subprocesses; the hostile peer is `python -m fedsim.hostile` (its own
process, bounded in count and seconds). Cases:

  stranger   200,000 messages from an unregistered peer during a run with a round deadline:
             longest single read, round times during the flood vs an undisturbed run, RSS,
             model_sha256 against the undisturbed run.
  million    1,000,000 rejected messages from a stranger, with the default guard (banned
             after its burst: discarded at read time) and with the guard off (every message
             parsed, rejected, counted): RSS before / peak / after.
  big        one message of 4 x 200 MiB frames: refused at the frame that crosses the
             256 MiB cap; RSS peak.
  registered a registered node (hosting clients 10-11) floods 5,000 x 100 KB as its own
             clients while answering its requests: rounds and RSS against the same node
             not flooding.

    python bench/flood.py                 # all cases (several minutes; the machine was shared)
    python bench/flood.py --case stranger
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import network.guard  # noqa: E402
from fedsim.hostile import attacker, live_run  # noqa: E402
from fedsim.node import inbound_balance  # noqa: E402

BASE = ["data.clients=10", "run.clock=real", "network.latency=50ms", "run.round_deadline=2s"]
JOINS = ["0-4", "5-9"]


def rounds_line(label: str, times: list[float]) -> str:
    if not times:
        return f"{label:<28} (none)"
    return (f"{label:<28} n={len(times):>3}  median {statistics.median(times) * 1e3:7.1f} ms  "
            f"max {max(times) * 1e3:7.1f} ms")


def report(label: str, r: dict) -> None:
    s = r["summary"]
    came, went = inbound_balance(s["inbound"])
    print(f"--- {label}")
    print(f"attack: {r['attack']}")
    print(f"server read {r['received']:,} messages in {r['reads']:,} reads; longest single read "
          f"{r['longest_read_s'] * 1e3:.1f} ms wall, {r['longest_read_cpu_s'] * 1e3:.1f} ms CPU")
    print(f"RSS at attack start {r['rss_start_mb']:.1f} MB, peak after {r['rss_peak_mb']:.1f} MB, "
          f"end {r['rss_end_mb']:.1f} MB (end - start {r['rss_end_mb'] - r['rss_start_mb']:+.1f} MB)")
    during = [r["round_times"][i] for i in r["rounds_during_attack"]]
    print(rounds_line("rounds during the attack", during))
    print(f"inbound: received+copies {came:,} = outcomes {went:,}: "
          + ", ".join(f"{k}={v:,}" for k, v in s["inbound"].items()))
    print(f"model_sha256 {s['model_sha256'][:16]}  missed_replies {s['counters'].get('missed_replies', 0)}")


def case_stranger(count: int) -> None:
    clean = live_run(BASE + ["run.rounds=20"], JOINS, join_processes=True)
    flood = live_run(BASE + ["run.rounds=100"], JOINS, join_processes=True, attack=lambda a, go: attacker(
        a, "flood", "--count", str(count), "--seconds", "60", go_file=go))
    print(f"=== stranger flood: {count:,} messages during a deadline run")
    print(rounds_line("undisturbed rounds", clean["round_times"]))
    report("flood", flood)
    during = [flood["round_times"][i] for i in flood["rounds_during_attack"]]
    ref = statistics.median(clean["round_times"])
    print(f"worst round under the flood / undisturbed median: {max(during) / ref:.2f}x  "
          f"(/ undisturbed max: {max(during) / max(clean['round_times']):.2f}x)")
    same = clean["summary"]["model_sha256"] == flood["summary"]["model_sha256"]
    # the clean run has fewer rounds: compare with a 100-round virtual run instead
    from fedsim.runner import run
    from fedsim.scenario import load_scenario
    ref_model = run(load_scenario(None, BASE + ["run.rounds=100", "run.clock=virtual"])).summary["model_sha256"]
    print(f"model_sha256 equals the undisturbed (virtual-clock) run's: {flood['summary']['model_sha256'] == ref_model}"
          f"  (clean 20-round live run equals its virtual run: {same or 'n/a'})")


def case_million(count: int) -> None:
    for label, config in (("default guard", None),
                          ("guard off", network.guard.GuardConfig(rate=1e9, burst=1e9))):
        saved = network.guard.DEFAULT
        if config is not None:
            network.guard.DEFAULT = config
        try:
            t = time.perf_counter()
            r = live_run(BASE + ["run.rounds=400"], JOINS, join_processes=True, attack=lambda a, go: attacker(
                a, "flood", "--count", str(count), "--seconds", "240", go_file=go))
        finally:
            network.guard.DEFAULT = saved
        rejected = r["summary"]["counters"].get("rejected", 0)
        print(f"=== {rejected:,} rejected messages ({label}); run took {time.perf_counter() - t:.0f} s")
        report(label, r)


def case_big(frames: int, size: int) -> None:
    r = live_run(BASE + ["run.rounds=60"], JOINS, join_processes=True, attack=lambda a, go: attacker(
        a, "flood", "--kind", f"big:{frames}:{size}", "--count", "1", "--seconds", "60", "--linger", "10", go_file=go))
    print(f"=== one message of {frames} x {size / 2**20:.0f} MiB frames")
    report("big", r)
    print(f"discarded by the transport: {r['discarded']}; RSS peak - start: "
          f"{r['rss_peak_mb'] - r['rss_start_mb']:+.1f} MB")


def case_registered(count: int, size: int) -> None:
    overrides = BASE + ["data.clients=12", "run.rounds=40"]
    joins = ["0-4", "5-9"]
    runs = {}
    for label, n in (("registered node, not flooding", 0), ("registered node flooding", count)):
        runs[label] = live_run(overrides, joins, join_processes=True, attack_at_round=None,
                               attack=lambda a, go, n=n: attacker(
                                   a, "registered", "--clients", "10,11", "--count", str(n), "--size", str(size),
                                   "--seconds", "120"), registration_timeout=90)
    print(f"=== registered node: {count:,} x {size / 1e3:.0f} KB as its own clients 10-11")
    quiet, loud = runs.values()
    print(rounds_line("rounds, not flooding", quiet["round_times"]))
    report("flooding", loud)
    during = [loud["round_times"][i] for i in loud["rounds_during_attack"]]
    print(f"worst round under the flood / undisturbed median: "
          f"{max(during) / statistics.median(quiet['round_times']):.2f}x")
    print(f"uploads dropped as the link's queue overflowing: "
          f"{loud['summary']['inbound'].get('network_queue_overflow', 0):,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=["stranger", "million", "big", "registered", "all"], default="all")
    ap.add_argument("--count", type=int, default=None, help="messages (default per case)")
    a = ap.parse_args()
    cases = ["stranger", "million", "big", "registered"] if a.case == "all" else [a.case]
    for c in cases:
        if c == "stranger":
            case_stranger(a.count or 200_000)
        elif c == "million":
            case_million(a.count or 1_000_000)
        elif c == "big":
            case_big(4, 200 * 2**20)
        else:
            case_registered(a.count or 5_000, 100_000)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
