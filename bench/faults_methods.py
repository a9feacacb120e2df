"""Methods under in-simulation faults (issue 10, item 6): why powersgd, lqsgd and sgd lose
accuracy where fedavg, laq, qrr ... do not.

Faults as in the issue: datagram transport, 5% packet loss, 5% duplication and corruption,
5 clients crash for good at round 10, a 2 s round deadline, 20 clients, 30 rounds, lr 0.5.
Virtual clock: deterministic. For each method prints clean vs faulty final accuracy, the
swing over the last 10 rounds, and how many clients each step actually averaged (replies
accepted per round, per phase), with the reasons the others were missing.

    python bench/faults_methods.py --methods sgd,powersgd,lqsgd,fedavg
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsim.runner import run  # noqa: E402
from fedsim.scenario import load_scenario  # noqa: E402

FAULTS = """
[run]
seed = 1
rounds = 30
clock = "virtual"
round_deadline = "2s"
eval_every = 1

[data]
dataset = "digits"
clients = 20

[algorithm]
name = "{method}"
lr = 0.5

[network]
transport = "{transport}"
loss = {loss}
duplicate = {dup}
corrupt = {dup}

{events}
"""
CRASH = """
[[events]]
at_round = 10
action = "crash"
clients = "0-4"
"""


def scenario(method: str, faults: bool, extra: list[str], tmp: Path, *, loss=0.05, dup=0.05, crash=True):
    text = FAULTS.format(method=method, transport="datagram" if faults else "tcp", loss=loss if faults else 0.0,
                         dup=dup if faults else 0.0, events=CRASH if faults and crash else "")
    path = tmp / f"{method}-{int(faults)}.toml"
    path.write_text(text)
    return load_scenario(str(path), extra)


def describe(result) -> str:
    acc = [m.accuracy for m in result.metrics if m.accuracy is not None]
    last = acc[-10:]
    ev = {}
    for _, e, f in result.events.rows:
        if e == "gather_timeout":
            ev.setdefault(f["kind"], []).append(f["missing"])
    c = result.summary["counters"]
    per_phase = {k: f"{statistics.mean(v):.1f}" for k, v in ev.items()}
    return (f"final {acc[-1]:.3f}  last-10 min {min(last):.3f} max {max(last):.3f}  "
            f"missing per round (mean, by phase) {per_phase}  "
            + " ".join(f"{k}={v}" for k, v in sorted(c.items()) if k not in ("rejected",)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="sgd,powersgd,lqsgd,fedavg,laq")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    ap.add_argument("--variants", default="clean,faults",
                    help="clean,faults,loss_only,crash_only: which conditions to run")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in a.methods.split(","):
            for variant in a.variants.split(","):
                if variant == "clean":
                    sc = scenario(method, False, a.set, tmp)
                elif variant == "faults":
                    sc = scenario(method, True, a.set, tmp)
                elif variant == "loss_only":
                    sc = scenario(method, True, a.set, tmp, crash=False)
                elif variant == "crash_only":
                    sc = scenario(method, True, a.set, tmp, loss=0.0, dup=0.0)
                else:
                    raise SystemExit(f"unknown variant {variant!r}")
                r = run(sc)
                print(f"{method:<9} {variant:<10} {describe(r)}", flush=True)


if __name__ == "__main__":
    main()
