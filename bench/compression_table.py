"""Results table of the compression methods through the real runtime (fixed seeds, 10 clients).

Rows: MLP 784-200-10 on Fashion-MNIST (the QRR / LQ-SGD papers' setting), the small CNN on
Fashion-MNIST, and an MLP on digits. Per method: final test accuracy, uplink bytes measured on
the wire, and uplink bytes relative to sgd. Printed as a markdown table.

Usage:  .venv/bin/python bench/compression_table.py [--rounds 50] [--quick] [--rows mlp,cnn,digits]

Paper targets on the Fashion-MNIST MLP: QRR (p = 0.3, b = 8) within 3 accuracy points of sgd
at <= 10% of its uplink bytes; LQ-SGD within 2 points of PowerSGD at the same rank with
<= 30% of PowerSGD's uplink bytes. The script reports what it measures, met or not.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.runner import run  # noqa: E402
from fedsim.scenario import load_scenario  # noqa: E402

METHODS = {
    "sgd": [],
    "laq": ["algorithm.bits=8"],
    "slaq": ["algorithm.bits=8"],
    "qrr": ["algorithm.bits=8", "algorithm.rank_fraction=0.3"],
    "powersgd": ["algorithm.rank=4"],
    "lqsgd": ["algorithm.rank=4", "algorithm.bits=8"],
}
ROWS = {
    "mlp": ("Fashion-MNIST MLP 784-200-10", ["data.dataset=fashion-mnist", "model.kind=mlp", "model.hidden=[200]"]),
    "cnn": ("Fashion-MNIST small CNN", ["data.dataset=fashion-mnist", "model.kind=cnn"]),
    "digits": ("digits MLP 64-64-10", ["data.dataset=digits", "model.kind=mlp", "model.hidden=[64]"]),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--rows", default="mlp,cnn,digits")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5 rounds, to check the plumbing")
    args = ap.parse_args(argv)
    rounds = 5 if args.quick else args.rounds
    print(f"| setting | method | final accuracy | uplink bytes | uplink vs sgd | wall s |")
    print("|---|---|---|---|---|---|")
    for row in args.rows.split(","):
        title, row_overrides = ROWS[row]
        sgd_bytes = None
        for method in args.methods.split(","):
            overrides = [f"algorithm.name={method}", f"algorithm.lr={args.lr}", "data.clients=10",
                         f"run.rounds={rounds}", f"run.seed={args.seed}", *row_overrides, *METHODS[method]]
            start = time.perf_counter()
            summary = run(load_scenario(None, overrides)).summary
            up = summary["uplink_bytes"]
            if method == "sgd":
                sgd_bytes = up
            rel = f"{up / sgd_bytes:.3f}" if sgd_bytes else "n/a"
            acc = summary["final_accuracy"]
            acc_s = "n/a" if acc is None else f"{acc:.4f}"
            print(f"| {title} | {method} | {acc_s} | {up:,} | {rel} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
