"""Privacy study: an eavesdropper on one client's link inverts what the wire carries.

For every (data set, model, method, client batch B) the script runs the real runtime in
virtual time — 4 clients, client 0 holding exactly B images (the others 32 each) so that each of its gradients is
over exactly those images — with a passive tap on client 0's link (``[eavesdropper]``,
``fedsim.eavesdrop``). The tap decodes round 0's frames (the broadcast model, the upload)
and runs DLG, iDLG and Geiping et al.'s inverting gradients (``fedsim.inversion``). The
referee scores each reconstruction against client 0's true images (SSIM, PSNR; ``fedsim.
privacy``). Each setting is repeated on disjoint image groups so that 8 images are scored
(8 runs at B = 1, 2 at B = 4, 1 at B = 8); the same 8 images in every setting, seeds fixed.

Settings: each method's defaults (see the README), except ``batch_size = B`` and the local
work: FedAvg 2 epochs of the client's B images (2 steps, its default), FeDLRT and FedLoRU 2
local steps. On the CNN, FeDLRT and FedLoRU factorise the head (``keep_last_dense =
false``, rank 4): the CNN's only Linear layer; its convolutions travel as dense deltas.

Ablations (digits, MLP) isolate where protection comes from: PowerSGD with one client (P̂
spans client 0's own gradient), error feedback active (the tap listens to rounds 0-2 and
attacks round 2), coarse quantization (LAQ / LQ-SGD at 2 bits), a higher rank.

Usage (about 8 minutes of one core; 50 minutes once under a load of 9-16):
  .venv/bin/python bench/privacy.py --write-readme
  .venv/bin/python bench/privacy.py --datasets digits --models mlp --methods sgd,powersgd --batches 1 --quick
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.data import DataConfig, load_dataset  # noqa: E402
from fedsim.errors import DataError  # noqa: E402
from fedsim.privacy import eavesdrop, run_tapped, write_csv, write_grid  # noqa: E402
from fedsim.scenario import from_dict  # noqa: E402

README = ROOT / "README.md"
START, END = "<!-- privacy:start -->", "<!-- privacy:end -->"
METHODS = ["sgd", "fedavg", "laq", "qrr", "powersgd", "lqsgd", "fedlrt", "fedloru"]
ATTACK_NAMES = {"dlg": "DLG", "idlg": "iDLG", "ig": "IG"}
IMAGES = 8
CLIENTS = 4
SEED = 1


def method_settings(method: str, batch: int, model: str) -> dict:
    cfg: dict = {"name": method, "batch_size": batch}
    if method == "fedavg":
        cfg["local_epochs"] = 2
    if method in ("fedlrt", "fedloru"):
        cfg["local_steps"] = 2
        if model == "cnn":
            cfg.update(keep_last_dense=False, rank=4)
    return cfg


def truth_indices(dataset, n: int, seed: int) -> list[int]:
    """``n`` training images, one per class first (seeded), the same for every setting."""
    rng = np.random.default_rng(seed)
    y = dataset.train_y.numpy()
    order = rng.permutation(len(y))
    picked, seen = [], set()
    for i in order:
        if int(y[i]) not in seen:
            picked.append(int(i))
            seen.add(int(y[i]))
        if len(picked) == n:
            break
    return picked


OTHERS_HOLD = 32
"""Images each other client holds (their local work is not what is measured: kept small)."""


def parts_for(dataset, group: list[int], seed: int) -> list[torch.Tensor]:
    """Client 0 holds ``group``; each other client ``OTHERS_HOLD`` other images (seeded)."""
    rest = np.setdiff1d(np.arange(len(dataset.train_y)), np.array(group))
    rest = np.random.default_rng(seed + 7).permutation(rest)[:OTHERS_HOLD * (CLIENTS - 1)]
    return [torch.tensor(sorted(group))] + [torch.from_numpy(np.sort(p)) for p in np.array_split(rest, CLIENTS - 1)]


def one_setting(dataset, ds_name: str, model: str, algorithm: dict, batch: int, attacks: dict, images: list[int],
                tag: dict, rounds: tuple[int, int] = (0, 1), clients: int = CLIENTS, groups: int | None = None
                ) -> list[dict]:
    """Rows of one setting over the image groups (``groups``: only the first that many, e.g. 1
    for a grid, which shows the first group only)."""
    rows = []
    model_cfg = {"kind": model, "hidden": [64]} if model == "mlp" else {"kind": "cnn", "channels": [8, 16]}
    for g in list(range(0, len(images), batch))[:groups]:
        group = images[g:g + batch]
        raw = {"run": {"seed": SEED, "rounds": rounds[1], "eval_every": 1000},
               "data": {"dataset": ds_name, "clients": clients, "partition": "iid"},
               "model": model_cfg, "algorithm": algorithm,
               "eavesdropper": {"client": 0, "direction": "both", "rounds": list(rounds), **attacks}}
        scenario = from_dict(raw, source="bench/privacy.py")
        parts = parts_for(dataset, group, SEED)
        if clients == 1:
            parts = parts[:1]
        _, tap, _, _ = run_tapped(scenario, dataset, parts)
        report = eavesdrop(scenario, tap, dataset, parts, tag)
        last = max((r["round"] for r in report.rows), default=None)
        rows += [r for r in report.rows if r["round"] == last]
        tag.setdefault("_recons", []).extend(rc for rc in report.recons if rc.round == last)
    return rows


def run_task(task: tuple, methods: list[str], batches: list[int], attacks: dict, started: float,
             groups: int | None = None, ablation_labels: tuple[str, ...] = ()
             ) -> tuple[list[dict], dict[str, list], list[str]]:
    """One (data set, model) block of the grid, or the ablations: (rows, grid panels, skipped)."""
    torch.set_num_threads(1)
    kind, ds_name, model = task
    rows: list[dict] = []
    grids: dict[str, list] = collections.defaultdict(list)
    try:
        dataset = load_dataset(DataConfig(dataset=ds_name), SEED)
    except DataError as exc:
        print(f"skipping {ds_name}: {exc}", file=sys.stderr)
        return rows, grids, [f"{ds_name}: {exc}"]
    # The referee's test set is irrelevant to the attack: evaluate on a sliver, fast.
    dataset.test_x, dataset.test_y = dataset.test_x[:64], dataset.test_y[:64]
    images = truth_indices(dataset, IMAGES, SEED)
    if kind == "ablations":
        return ablations(dataset, images, attacks, started, ablation_labels), grids, []
    for method in methods:
        for batch in batches:
            t0 = time.time()
            tag = {"method": method, "model": model, "dataset": ds_name, "setting": "main"}
            got = one_setting(dataset, ds_name, model, method_settings(method, batch, model), batch, attacks,
                              images, tag, groups=groups)
            recons = tag.pop("_recons", [])
            rows += got
            if batch == 4:
                first = next((rc for rc in recons if rc.attack == "ig"), None)
                if first is not None:
                    grids[f"{ds_name}-{model}"].append((method, first.truth, first.images))
            mean = {a: np.mean([r["ssim"] for r in got if r["attack"] == a]) for a in attacks["attacks"]}
            print(f"{ds_name:13s} {model:3s} {method:8s} B={batch}  " +
                  "  ".join(f"{ATTACK_NAMES[a]} {mean[a]:.3f}" for a in attacks["attacks"]) +
                  f"   ({time.time() - t0:.0f}s, total {time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    return rows, grids, []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/privacy", help="directory for privacy.csv, privacy-*.png, privacy.md")
    ap.add_argument("--datasets", default="digits,fashion-mnist")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--iters", type=int, default=40, help="L-BFGS iterations of DLG and iDLG")
    ap.add_argument("--ig-iters", type=int, default=200, help="Adam steps of inverting gradients")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes, one (data set, model) block each")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--ablations-only", action="store_true", help="run the ablations, not the main grid")
    ap.add_argument("--ablation", action="append", default=[], metavar="LABEL",
                    help="run only the ablations whose label starts with LABEL (repeatable)")
    ap.add_argument("--quick", action="store_true", help="tiny iteration counts (a smoke run)")
    ap.add_argument("--grids-only", action="store_true",
                    help="only redraw the PNG grids (B = 4, inverting gradients, the first image group: "
                         "what the grid shows); csv and tables untouched")
    ap.add_argument("--merge", nargs="+", metavar="CSV",
                    help="no runs: merge privacy.csv files (a later file replaces the settings it holds) "
                         "and write the table from them")
    ap.add_argument("--write-readme", action="store_true", help=f"replace README.md between {START} and {END}")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = merge_csvs([Path(p) for p in args.merge])
        finish(rows, [], out, args.write_readme, None)
        return
    attacks = {"iters": 5 if args.quick else args.iters, "ig_iters": 10 if args.quick else args.ig_iters,
               "attacks": ["ig"] if args.grids_only else list(ATTACK_NAMES)}
    if args.grids_only:
        args.batches, args.no_ablations = "4", True
    methods, batches = args.methods.split(","), [int(b) for b in args.batches.split(",")]
    datasets, models = args.datasets.split(","), args.models.split(",")
    # largest blocks first, so that parallel workers finish together
    tasks = [] if args.ablations_only else [("main", d, m) for d in reversed(datasets) for m in reversed(models)]
    if "digits" in datasets and "mlp" in models and not args.no_ablations:
        tasks.append(("ablations", "digits", "mlp"))
    unknown = [a for a in args.ablation if not any(label.startswith(a) for label, *_ in ABLATIONS)]
    if unknown:
        ap.error(f"--ablation {unknown[0]!r} names no ablation (known: {'; '.join(l for l, *_ in ABLATIONS)})")
    groups = 1 if args.grids_only else None
    labels = tuple(args.ablation)
    started = time.time()
    rows: list[dict] = []
    grids: dict[str, list] = {}
    skipped: list[str] = []
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(run_task, tasks, *([x] * len(tasks) for x in (methods, batches, attacks, started,
                                                                                    groups, labels))))
    else:
        results = [run_task(t, methods, batches, attacks, started, groups, labels) for t in tasks]
    for got, g, sk in results:
        rows += got
        grids.update(g)
        skipped += [s for s in sk if s not in skipped]
    for key, panels in grids.items():
        write_grid(panels, out / f"privacy-{key}.png", per_panel=4)
    if args.grids_only:
        return
    finish(rows, skipped, out, args.write_readme, started)


def merge_csvs(paths: list[Path]) -> list[dict]:
    """Rows of several privacy.csv files; a later file's (setting, data set, model, method,
    batch) groups replace the earlier ones'."""
    import csv

    merged: dict[tuple, list[dict]] = {}
    for path in paths:
        groups: dict[tuple, list[dict]] = collections.defaultdict(list)
        with open(path) as fh:
            for row in csv.DictReader(fh):
                for key in ("batch", "round", "image", "matched_from"):
                    row[key] = int(row[key])
                for key in ("ssim", "psnr", "labels_ok"):
                    row[key] = float(row[key])
                groups[(row["setting"], row["dataset"], row["model"], row["method"], row["batch"])].append(row)
        merged.update(groups)
    return [row for group in merged.values() for row in group]


def finish(rows: list[dict], skipped: list[str], out: Path, write_readme: bool, started: float | None) -> None:
    write_csv([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], out / "privacy.csv")
    md = table(rows, skipped)
    (out / "privacy.md").write_text(md + "\n")
    print(md)
    if started is not None:
        print(f"total {time.time() - started:.0f}s", file=sys.stderr)
    if write_readme:
        text = README.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no {START} ... {END} section")
        README.write_text(pattern.sub(lambda _: f"{START}\n{md}\n{END}", text, count=1))


ABLATIONS = [
    # (label, method settings, batches, tap window, clients)
    ("powersgd, 1 client (P̂ from client 0 alone)", {"name": "powersgd"}, (1, 8), (0, 1), 1),
    ("powersgd, rank 16", {"name": "powersgd", "rank": 16}, (8,), (0, 1), CLIENTS),
    ("powersgd, round 2 (error feedback on)", {"name": "powersgd"}, (1,), (0, 3), CLIENTS),
    ("lqsgd, round 2 (error feedback on)", {"name": "lqsgd"}, (1,), (0, 3), CLIENTS),
    ("laq, 2 bits", {"name": "laq", "bits": 2}, (1,), (0, 1), CLIENTS),
    ("lqsgd, 2 bits", {"name": "lqsgd", "bits": 2}, (1,), (0, 1), CLIENTS),
    ("laq, round 2 (tap from round 0)", {"name": "laq"}, (1,), (0, 3), CLIENTS),
]


def ablations(dataset, images, attacks, started, only: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    for label, algo, batches, window, clients in ABLATIONS:
        if only and not any(label.startswith(o) for o in only):
            continue
        for batch in batches:
            t0 = time.time()
            tag = {"method": algo["name"], "model": "mlp", "dataset": "digits", "setting": label}
            got = one_setting(dataset, "digits", "mlp", {**algo, "batch_size": batch}, batch, attacks, images, tag,
                              rounds=window, clients=clients)
            tag.pop("_recons", None)
            rows += got
            mean = {a: np.mean([r["ssim"] for r in got if r["attack"] == a]) for a in ATTACK_NAMES}
            print(f"ablation {label:45s} B={batch}  " + "  ".join(f"{ATTACK_NAMES[a]} {mean[a]:.3f}" for a in ATTACK_NAMES)
                  + f"   ({time.time() - t0:.0f}s, total {time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], skipped: list[str]) -> str:
    cells = collections.defaultdict(list)
    for r in rows:
        cells[(r["setting"], r["dataset"], r["model"], r["method"], r["batch"], r["attack"])].append((r["ssim"], r["psnr"]))

    def cell(key) -> str:
        v = cells.get(key)
        if not v:
            return "–"
        return f"{np.mean([s for s, _ in v]):.2f} / {np.mean([p for _, p in v]):.1f}"

    lines = []
    combos = sorted({(r["dataset"], r["model"]) for r in rows if r["setting"] == "main"},
                    key=lambda t: (t[0] != "digits", t[1] != "mlp"))
    batches = sorted({r["batch"] for r in rows if r["setting"] == "main"})
    methods = [m for m in METHODS if any(r["method"] == m and r["setting"] == "main" for r in rows)]
    head = "| method | " + " | ".join(f"B={b} {ATTACK_NAMES[a]}" for b in batches for a in ATTACK_NAMES) + " |"
    for ds, model in combos:
        lines += ["", f"**{ds}, {model}** (SSIM / PSNR dB, mean over {IMAGES} images)", "", head,
                  "|---|" + "---|" * (len(batches) * len(ATTACK_NAMES))]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(cell(("main", ds, model, m, b, a)) for b in batches
                                                  for a in ATTACK_NAMES) + " |")
    labels = [label for label, *_ in ABLATIONS if any(r["setting"] == label for r in rows)]
    if labels:
        lines += ["", "**Ablations** (digits, MLP; SSIM / PSNR dB)", "", "| setting | B | DLG | iDLG | IG |",
                  "|---|---|---|---|---|"]
        for label in labels:
            for b in sorted({r["batch"] for r in rows if r["setting"] == label}):
                lines.append(f"| {label} | {b} | " + " | ".join(
                    cell((label, "digits", "mlp", next(r["method"] for r in rows if r["setting"] == label), b, a))
                    for a in ATTACK_NAMES) + " |")
    for s in skipped:
        lines.append(f"\nskipped: {s}")
    return "\n".join(lines).strip()


if __name__ == "__main__":
    main()
