"""The LAQ paper's experiment shape on Fashion-MNIST: bits to reach GD's loss, and uploads skipped.

Sun, Chen, Giannakis & Yang (NeurIPS 2019), authors' ``LAQ.py`` (sunjunaimer/LAQ): multinomial
logistic regression, L2 penalty (0.01 / 2) ||w||^2, M = 10 workers, b = 4 bits, full local
gradients; they plot the loss against the bits uploaded. Here Fashion-MNIST replaces MNIST, and
the step is 0.05 on the mean gradient (the authors' 0.02 on the sum, i.e. 0.2 on the mean,
oscillates on Fashion-MNIST: see bench/settings.py, row ``logistic``).

Runs, through the real runtime (virtual clock, in-process ZeroMQ, seeded):

* ``gd``: distributed gradient descent (``sgd`` with ``batch_size = 0``), 32 bits per value;
* ``laq``: LAQ as published (lazy rule, D = 10, xi = 0.8 / D, t-bar = 100);
* ``laq lazy=false``: the same quantizer uploading every round (the paper's QGD).

The loss is the training objective, mean cross-entropy over all 60,000 training images plus
the L2 term, evaluated on the server's model after every round (the bench swaps the runtime's
test-set evaluation for it; nothing else changes). GD's loss after ``--rounds`` rounds is the
target; each run reports the first round at which it reaches it and the uplink bits (each
method's paper count) and wire bytes spent until then, and the fraction of uploads skipped
over the whole run.

Usage:
  .venv/bin/python bench/laq_paper.py                 # 300 rounds of GD, 450 of the others
  .venv/bin/python bench/laq_paper.py --rounds 100
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import settings as S  # noqa: E402

L2 = 0.01
BITS = 4
LR = 0.05


def overrides(method: str, extra: tuple[str, ...], rounds: int) -> list[str]:
    return [f"run.seed={S.SEED}", f"data.clients={S.CLIENTS}", "data.partition=iid", "data.dataset=fashion-mnist",
            "model.kind=logistic", f"algorithm.name={method}", f"algorithm.lr={LR}", f"algorithm.l2={L2}",
            f"run.rounds={rounds}", "run.eval_every=1", *extra]


def run(method: str, extra: tuple[str, ...], rounds: int):
    """One run; returns (objective per round, RoundMetrics list, summary)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from fedsim import runner
    from fedsim.runner import run as run_scenario
    from fedsim.scenario import load_scenario

    objective: list[float] = []

    def train_objective(self) -> tuple[float, float]:
        params = self.algorithm.model_params()
        with torch.no_grad():
            logits = functional_call(self.model, params, (self.dataset.train_x,))
            loss = float(F.cross_entropy(logits, self.dataset.train_y))
            loss += 0.5 * L2 * sum(float(p.pow(2).sum()) for p in params.values())
            acc = float((functional_call(self.model, params, (self.dataset.test_x,)).argmax(1)
                         == self.dataset.test_y).float().mean())
        objective.append(loss)
        return acc, loss

    original = runner.ServerSide.evaluate
    runner.ServerSide.evaluate = train_objective
    try:
        torch.set_num_threads(1)
        result = run_scenario(load_scenario(None, overrides(method, extra, rounds)))
    finally:
        runner.ServerSide.evaluate = original
    return objective, result.metrics, result.summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300, help="rounds of GD (its final loss is the target)")
    ap.add_argument("--extra", type=float, default=1.5, help="the other runs get this many times GD's rounds")
    args = ap.parse_args(argv)
    others = int(args.rounds * args.extra)
    runs = [("gd", "sgd", ("algorithm.batch_size=0",), args.rounds),
            ("laq", "laq", (f"algorithm.bits={BITS}",), others),
            ("laq lazy=false", "laq", (f"algorithm.bits={BITS}", "algorithm.lazy=false"), others)]
    results = {}
    for label, method, extra, rounds in runs:
        start = time.perf_counter()
        results[label] = run(method, extra, rounds)
        print(f"{label:16} {rounds} rounds, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    target = results["gd"][0][-1]
    lines = [f"Target: GD's training loss after {args.rounds} rounds, {target:.5f} (cross-entropy + L2 "
             f"{L2}/2 ||w||^2, Fashion-MNIST logistic regression, {S.CLIENTS} clients, lr {LR}, b = {BITS}).", "",
             "| run | rounds to GD's loss | uplink paper bits to it | vs GD | uplink wire bytes to it | vs GD "
             "| uploads skipped (whole run) | final loss | test accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gd_metrics = results["gd"][1]
    gd_at = next(i for i, v in enumerate(results["gd"][0]) if v <= target)
    gd_bits, gd_bytes = gd_metrics[gd_at].uplink_payload_bits, gd_metrics[gd_at].uplink_bytes
    for label, (objective, metrics, summary) in results.items():
        at = next((i for i, v in enumerate(objective) if v <= target), None)
        counters = summary["counters"]
        skipped, uploaded = counters.get("skipped_uploads", 0), counters.get("quantized_uploads", 0)
        skip = f"{skipped:,} of {skipped + uploaded:,} ({100 * skipped / (skipped + uploaded):.1f}%)" if uploaded else "-"
        if at is None:
            reach = ("not reached", "", "", "", "")
        else:
            m = metrics[at]
            reach = (str(at + 1), f"{m.uplink_payload_bits:,}", f"{m.uplink_payload_bits / gd_bits:.3f}",
                     f"{m.uplink_bytes:,}", f"{m.uplink_bytes / gd_bytes:.3f}")
        lines.append(f"| {label} | {' | '.join(reach)} | {skip} | {objective[-1]:.5f} | "
                     f"{summary['final_accuracy']:.4f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
