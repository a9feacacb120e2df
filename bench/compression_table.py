"""Results table of the compression methods through the real runtime (fixed seeds, 10 clients).

Rows (``--rows``, bench/settings.py): ``logistic`` (the LAQ paper's logistic regression on
Fashion-MNIST), ``mlp`` (Fashion-MNIST, MLP 784-200-10: the QRR / LQ-SGD papers' setting),
``qrr_mlp`` and ``qrr_cnn`` (the QRR authors' batch and step on the paper's MLP and CNN, p in
{0.1, 0.2, 0.3}), ``cnn_local`` (FeDLRT / FedLoRU / FedAvg on the paper CNN), ``cnn`` (the
small CNN, on digits), ``digits`` (MLP 64-64-10) and ``digits_wide``. Methods: sgd, laq, slaq,
qrr (p = 0.3, b = 8), powersgd (r = 4), lqsgd (r = 4, b = 8), fedavg, fedlrt and fedloru
(their own defaults), plus each row's labelled variants (``gd``, ``qrr p=0.1``,
``fedloru~precond`` ...). Per run: test accuracy
(mean over the last 10% of the rounds; the final evaluation beside it), uplink wire bytes,
uplink per round relative to sgd (and, for FeDLRT and FedLoRU, total uplink relative to
fedavg), and whether the paper's target holds:

* QRR (p = 0.3, b = 8) within 3 points of sgd at <= 10% of its uplink bytes;
* LQ-SGD within 2 points of PowerSGD (same rank) at <= 30% of its uplink bytes;
* FeDLRT within 2 points of FedAvg with >= 5x fewer client upload bytes;
* FedLoRU within 2 points of FedAvg with >= 4x fewer client upload bytes.

Every setting lives in bench/settings.py (shared with tests/test_paper_targets.py).

Usage:
  .venv/bin/python bench/compression_table.py                    # all rows (~15 min on 2 cores)
  .venv/bin/python bench/compression_table.py --write-readme     # ... and update README.md
  .venv/bin/python bench/compression_table.py --rows digits --rounds 50 --local-rounds 20
  # rows in parallel processes, then one table from their saved results:
  .venv/bin/python bench/compression_table.py --rows mlp --save /tmp/mlp.json
  .venv/bin/python bench/compression_table.py --rows qrr_mlp,qrr_cnn --save /tmp/qrr.json
  .venv/bin/python bench/compression_table.py --combine /tmp/mlp.json /tmp/qrr.json --write-readme

The markdown table goes to stdout, the progress to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import settings as S  # noqa: E402

README = ROOT / "README.md"
NO_SIGNAL = 0.2
"""A reference below this accuracy (10 classes: chance is 0.1) has not learnt: no target verdict."""
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class Result:
    row: str
    label: str
    method: str
    rounds: int
    measured: S.Measured | None
    error: str = ""
    """Why the method cannot run on this row (its configuration does not fit the model)."""

    @property
    def accuracy(self) -> float:
        return self.measured.accuracy

    @property
    def uplink_bytes(self) -> int:
        return self.measured.uplink_bytes


def run_one(row_key: str, run: S.Run, rounds: int) -> Result:
    """One seeded run through the runtime, on one torch thread."""
    import torch

    from fedsim.errors import ScenarioError

    torch.set_num_threads(1)
    try:
        return Result(row_key, run.label, run.method, rounds, S.measure(S.ROWS[row_key], run, rounds))
    except ScenarioError as exc:  # e.g. a low-rank default that the model's layers cannot take
        return Result(row_key, run.label, run.method, rounds, None, f"{exc.key} = {exc.value!r}: {exc.reason}")


def target_cells(result: Result, by_label: dict[str, Result]) -> str:
    target = S.TARGETS.get(result.label) or S.TARGETS.get(result.method)
    if target is None:
        return ""
    ref = by_label.get(S.reference_label(target, S.ROWS[result.row]))
    if ref is None or ref.measured is None or result.measured is None:
        return "n/a"
    if ref.accuracy < NO_SIGNAL:
        return f"n/a: {ref.label} at {ref.accuracy:.3f}, near chance (0.1): accuracy says nothing yet"
    gap, ratio, ok = target.check(result.accuracy, ref.accuracy, result.uplink_bytes, ref.uplink_bytes)
    bits_ratio = result.measured.uplink_payload_bits / ref.measured.uplink_payload_bits
    return (f"{'**met**' if ok else '**not met**'}: {-gap:+.1f} pts, {100 * ratio:.1f}% "
            f"[{100 * bits_ratio:.1f}%]")


def markdown(results: list[Result]) -> str:
    lines = ["| setting | method | rounds | accuracy | uplink bytes | uplink/round vs sgd | uplink vs fedavg "
             "| paper target: accuracy vs reference, uplink bytes [paper bits] vs reference |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row_key in dict.fromkeys(r.row for r in results):
        rows = [r for r in results if r.row == row_key]
        by_label = {r.label: r for r in rows}
        sgd = by_label.get("sgd") if by_label.get("sgd") and by_label["sgd"].measured else None
        for r in rows:
            if r.measured is None:
                lines.append(f"| {S.ROWS[row_key].title} | {r.label} | {r.rounds} | not run: {r.error} | | | | n/a |")
                continue
            vs_sgd = (f"{(r.uplink_bytes / r.rounds) / (sgd.uplink_bytes / sgd.rounds):.4f}" if sgd else "")
            ref = (by_label.get(S.reference_label(S.TARGETS[r.method], S.ROWS[row_key]))
                   if r.method in ("fedlrt", "fedloru") else None)
            ref = ref if ref and ref.measured else None
            vs_fedavg = (f"{r.uplink_bytes / ref.uplink_bytes:.4f} ({ref.uplink_bytes / r.uplink_bytes:.1f}x)"
                         if ref else "")
            acc = f"{r.accuracy:.4f} ({r.measured.final_accuracy:.4f})"
            lines.append(f"| {S.ROWS[row_key].title} | {r.label} | {r.rounds} | {acc} | {r.uplink_bytes:,} "
                         f"| {vs_sgd} | {vs_fedavg} | {target_cells(r, by_label)} |")
    return "\n".join(lines)


def settings_notes(rows: list[S.Row], methods: tuple[str, ...], ran: set[tuple[str, str]] | None = None) -> str:
    """How the runs were configured, as markdown bullets (what a reader needs to reproduce them)."""
    from algorithms import get_algorithm

    notes = ["- Accuracy: the mean test accuracy over the evaluations in the last "
             f"{100 * S.FINAL_WINDOW:g}% of the rounds, at least the last {S.MIN_WINDOW} "
             f"(at most {S.EVALUATIONS} evaluations per run), the final "
             "evaluation in parentheses; one evaluation swings by several points between rounds.",
             "- Paper targets (the last column: accuracy points of the method minus its reference's, its uplink "
             "bytes and [paper bits] as a share of the reference's): "
             + "; ".join(f"{t.method} {t.describe()} ({t.source})" for t in S.TARGETS.values())
             + ". They are stated for the Fashion-MNIST MLP (QRR at p = 0.3, LQ-SGD) and for the Fashion-MNIST "
             "and digits MLPs (FeDLRT, FedLoRU); other rows and variants (QRR at p = 0.1 and 0.2, "
             "fedloru~precond) show them for information.",
             f"- {S.CLIENTS} clients, `{S.PARTITION}` partition, seed {S.SEED}, on the full test set. Uplink bytes "
             "are wire bytes (frames plus ZMTP framing); [paper bits] are each method's own count.",
             f"- Gradient methods: server step `lr = {S.GRADIENT_LR}`, one step per round, their default batch; "
             + ", ".join(f"{m} `{', '.join(o.removeprefix('algorithm.') for o in extra)}`"
                         for m, extra in S.GRADIENT_METHODS.items() if extra) + "."]
    if set(methods) & set(S.LOCAL_METHODS):
        for name in ("fedlrt", "fedloru"):
            cfg = dataclasses.asdict(get_algorithm(name).Config())
            shown = ", ".join(f"{k} = {v!r}" for k, v in cfg.items())
            notes.append(f"- {name}: its defaults, `{shown}`.")
        for row in rows:
            for run in S.plan(row, tuple(m for m in methods if m == "fedavg")):
                extra = ", ".join(e.removeprefix("algorithm.") for e in run.extra)
                matched = "FedLoRU's" if run.label == "fedavg~fedloru" else "FeDLRT's"
                notes.append(f"- {run.label} on {row.title}: {matched} client lr and local steps, `{extra}`: "
                             f"{run.note}.")
    for row in rows:
        if row.gradient_lr is not None or row.gradient_extra:
            extra = ", ".join(e.removeprefix("algorithm.") for e in row.gradient_extra)
            notes.append(f"- {row.title}: gradient methods at server step `lr = {row.gradient_lr or S.GRADIENT_LR}`"
                         + (f", `{extra}`" if extra else "") + ".")
        if row.local_common:
            notes.append(f"- {row.title}: every local-training run with "
                         f"`{', '.join(e.removeprefix('algorithm.') for e in row.local_common)}`.")
        for label, method, extra in row.variants:
            if method in methods and (ran is None or (row.key, label) in ran):
                notes.append(f"- {label} on {row.title}: {method} with "
                             f"`{', '.join(e.removeprefix('algorithm.') for e in extra)}`.")
    notes.append("- Per-row rounds are in the table; the uplink-per-round ratio compares families run for different "
                 "numbers of rounds.")
    return "\n".join(notes)


def write_readme(block: str) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    README.write_text(pattern.sub(lambda _: f"{START}\n{block}\n{END}", text, count=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(S.ROWS), help=f"comma-separated subset of {', '.join(S.ROWS)}")
    ap.add_argument("--methods", default=",".join(S.METHODS), help="comma-separated subset of the methods")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the gradient methods (default: per row)")
    ap.add_argument("--local-rounds", type=int, default=None,
                    help="rounds of fedavg, fedlrt, fedloru (default: per row)")
    ap.add_argument("--write-readme", action="store_true", help=f"replace README.md between {START} and {END}")
    ap.add_argument("--labels", default="", help="comma-separated run labels to keep (default: all runs of the rows)")
    ap.add_argument("--save", metavar="JSON", help="also write the results of these runs to JSON (for --combine)")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="run nothing: build the table from results saved with --save (rows in the given order)")
    args = ap.parse_args(argv)
    if args.combine:
        combine(args.combine, args.write_readme, argv)
        return
    bad_rows = set(args.rows.split(",")) - set(S.ROWS)
    if bad_rows:
        ap.error(f"unknown rows {sorted(bad_rows)} (known: {', '.join(S.ROWS)})")
    rows = [S.ROWS[k] for k in args.rows.split(",")]
    methods = tuple(m for m in S.METHODS if m in args.methods.split(","))
    unknown = set(args.methods.split(",")) - set(S.METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)} (known: {', '.join(S.METHODS)})")

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    jobs = []
    for row in rows:
        for run in S.plan(row, methods):
            if args.labels and run.label not in args.labels.split(","):
                continue
            rounds = S.rounds_of(row, run.method)
            if run.method in S.GRADIENT_METHODS and args.rounds:
                rounds = args.rounds
            if run.method in S.LOCAL_METHODS and args.local_rounds:
                rounds = args.local_rounds
            jobs.append((row.key, run, rounds))
    ordered: list[Result] = []
    console = Console(stderr=True, width=100)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("runs", total=len(jobs))
        for row_key, run, rounds in jobs:
            progress.update(task, description=f"{S.ROWS[row_key].title}: {run.label} ({rounds} rounds)")
            r = run_one(row_key, run, rounds)
            ordered.append(r)
            if args.save:  # after every run: a long table interrupted keeps what it measured
                save(args.save, ordered, " ".join([".venv/bin/python bench/compression_table.py",
                                                     *map(shlex.quote, argv or sys.argv[1:])]),
                     [row.key for row in rows], methods)
            if r.measured is None:
                progress.console.print(f"{r.row:6} {r.label:14} not run: {r.error}")
            else:
                progress.console.print(f"{r.row:6} {r.label:14} {r.rounds:4d} rounds  acc {r.accuracy:.4f} "
                                       f"(final {r.measured.final_accuracy:.4f})  up {r.uplink_bytes:>13,}  "
                                       f"[{r.measured.uplink_payload_bits:,} bits]  {r.measured.wall_s:6.1f} s")
            progress.advance(task)
    command = " ".join([".venv/bin/python bench/compression_table.py", *map(shlex.quote, argv or sys.argv[1:])])
    if args.save:
        save(args.save, ordered, command.strip(), [row.key for row in rows], methods)
    emit(ordered, rows, methods, f"`{command.strip()}`", args.write_readme, console)


def emit(ordered: list[Result], rows: list[S.Row], methods: tuple[str, ...], how: str, write: bool, console) -> None:
    block = "\n".join([
        f"Generated {_dt.date.today().isoformat()} by {how} "
        f"({sum(r.measured.wall_s for r in ordered if r.measured) / 60:.1f} minutes of runs on 2 shared cores).",
        "",
        markdown(ordered),
        "",
        settings_notes(rows, methods, {(r.row, r.label) for r in ordered}),
    ])
    print(block)
    if write:
        write_readme(block)
        console.print(f"README.md updated between {START} and {END}")


def save(path: str, results: list[Result], command: str, rows: list[str], methods: tuple[str, ...]) -> None:
    import json
    payload = {"command": command, "rows": rows, "methods": list(methods),
               "results": [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "measured"},
                            "measured": None if r.measured is None else dataclasses.asdict(r.measured)}
                           for r in results]}
    Path(path).write_text(json.dumps(payload, indent=1))


def combine(paths: list[str], write: bool, argv) -> None:
    """One table from several ``--save`` files (rows run in parallel processes)."""
    import json

    from rich.console import Console
    ordered, rows, methods, commands = [], [], [], []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        commands.append(f"`{payload['command']}`")
        rows += [S.ROWS[k] for k in payload["rows"] if S.ROWS[k] not in rows]
        methods += [m for m in payload["methods"] if m not in methods]
        for r in payload["results"]:
            measured = None if r["measured"] is None else S.Measured(**r["measured"])
            ordered.append(Result(r["row"], r["label"], r["method"], r["rounds"], measured, r["error"]))
    combined = " ".join([".venv/bin/python bench/compression_table.py", *map(shlex.quote, argv or sys.argv[1:])])
    how = "; ".join(commands) + f", combined by `{combined}`"
    emit(ordered, rows, tuple(m for m in S.METHODS if m in methods), how, write, Console(stderr=True, width=100))


if __name__ == "__main__":
    main()
