"""Fuzz a live `fedsim serve` over tcp on 127.0.0.1, with CURVE and without (issue 10, must-show 5).

The server runs in this process; its clients are two `fedsim join` processes; the fuzzer is
`python -m fedsim.hostile fuzz` (mutated valid messages, lying tensor declarations, odd
hellos, long kinds, random frames; deterministic in --seed, bounded in count and seconds).
The guard is switched off here so that every message reaches the parser. Prints
messages/s, rejections by reason, RSS before and after, and whether the run ended with
the undisturbed model.

    python bench/fuzz_live.py --count 100000
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import network.guard  # noqa: E402
from fedsim.deploy import make_keys  # noqa: E402
from fedsim.hostile import attacker, live_run  # noqa: E402
from fedsim.node import inbound_balance  # noqa: E402
from fedsim.runner import run  # noqa: E402
from fedsim.scenario import load_scenario  # noqa: E402

BASE = ["data.clients=10", "run.clock=real", "network.latency=50ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=150, help="long enough to outlast the fuzzing")
    ap.add_argument("--curve", choices=["both", "on", "off"], default="both")
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    overrides = BASE + [f"run.rounds={a.rounds}"]
    reference = run(load_scenario(None, overrides + ["run.clock=virtual"])).summary["model_sha256"]
    network.guard.DEFAULT = network.guard.GuardConfig(rate=1e9, burst=1e9)
    modes = {"both": [False, True], "on": [True], "off": [False]}[a.curve]
    for curve in modes:
        with tempfile.TemporaryDirectory() as tmp:
            keys = make_keys(Path(tmp) / "keys", clients=1, n_clients=10) if curve else None
            args = ["--count", str(a.count), "--seconds", "600", "--seed", str(a.seed)]
            if keys is not None:
                args += ["--keys", str(keys)]
            r = live_run(overrides, ["0-4", "5-9"], keys=keys, join_processes=True,
                         attack=lambda address, go: attacker(address, "fuzz", *args, go_file=go))
        s = r["summary"]
        att = r["attack"]
        came, went = inbound_balance(s["inbound"])
        print(f"=== fuzz, CURVE {'on' if curve else 'off'}: {att.get('sent', 0):,} messages, "
              f"{att.get('frames', 0):,} frames, {att.get('bytes', 0) / 1e6:.1f} MB in {att.get('seconds')} s "
              f"= {att.get('per_s')} messages/s (sender side; the server keeps up or pushes back)")
        print(f"server: {s['rounds']} rounds finished; read {r['received']:,} messages; longest read "
              f"{r['longest_read_s'] * 1e3:.1f} ms wall / {r['longest_read_cpu_s'] * 1e3:.1f} ms CPU")
        print(f"RSS at fuzz start {r['rss_start_mb']:.1f} MB, peak {r['rss_peak_mb']:.1f} MB, "
              f"end {r['rss_end_mb']:.1f} MB ({r['rss_end_mb'] - r['rss_start_mb']:+.1f} MB)")
        reasons = sorted(((k, v) for k, v in s["inbound"].items() if k.startswith("rejected_")), key=lambda kv: -kv[1])
        print("rejections by reason: " + ", ".join(f"{k[9:]}={v:,}" for k, v in reasons))
        print(f"accounting: received {came:,} = outcomes {went:,}: {came == went}")
        print(f"model_sha256 equals the undisturbed run's: {s['model_sha256'] == reference}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
