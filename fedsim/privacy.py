"""Scoring an eavesdropper: run its attacks on what it heard, compare with the true images.

The attack side (:mod:`fedsim.eavesdrop`, :mod:`fedsim.inversion`) never sees a client's data.
This module is the referee: it reads the tapped client's true images from the data set
(``load_dataset`` + ``partition``, as the run built them) **for scoring only**, and reports

* SSIM: ``skimage.metrics.structural_similarity`` on each (H, W) image, ``data_range = 1``
  (pixels in [0, 1]); a reconstruction is clipped to [0, 1] first; 7x7 Gaussian-free
  windows (scikit-image's default), which fit the 8x8 digits;
* PSNR: 10 log10(1 / MSE) in dB over the clipped image (capped at 100 dB for an exact copy).

A batch's reconstructions come in no particular order: they are matched one-to-one to the
true images by the assignment that maximises total SSIM (Hungarian). When the client holds
more images than its batch (the batch is a sample the referee does not know), each
reconstruction is matched among all of the client's images: flagged ``matched_from`` > batch
in ``privacy.csv``, and optimistic for the attacker.

Outputs: ``privacy.csv`` (one row per reconstructed image) and ``privacy.png`` (per method
and attack, true images above, reconstructions below).

LQ-SGD's claim under test: Li, Bai, Wu, Chadli, Mammar & Bouvry, "Trustworthy Efficient
Communication for Distributed Learning using LQ-SGD Algorithm", arXiv:2506.17974 (2025):
"LQ-SGD and other compression-based methods show stronger resistance to gradient inversion
than traditional SGD" (the abstract; the issue states it as lower SSIM than SGD and PowerSGD).
Only the abstract was read here, not the paper's attack settings; the study
(``bench/privacy.py``) measures the claim in this project's own setting.

Departures from the usual evaluation: the attacker works from the wire (so a method's
encoding, its mirrored state and its error feedback all count), the batch's images are
matched to reconstructions by SSIM (the papers order them by label or report the best
image), and one restart per attack.
"""
from __future__ import annotations

import asyncio
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .eavesdrop import EavesdropperConfig, WireTap, make_decoder
from .inversion import ATTACKS, Target, infer_labels


SSIM_WINDOW = 7
"""Side of the SSIM windows, in pixels (scikit-image's default)."""


def ssim(truth: np.ndarray, recon: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(truth, np.clip(recon, 0, 1), data_range=1.0))


def ssim_table(recon: list[np.ndarray], truth: list[np.ndarray], rows_per_block: int = 32) -> np.ndarray:
    """``table[i, j] = ssim(truth[j], recon[i])`` for every pair, computed together.

    The same definition as :func:`ssim` (scikit-image's: uniform windows of
    :data:`SSIM_WINDOW` pixels, sample covariance, data range 1, the mean over the pixels
    whose window lies inside the image), to rounding (~1e-15). Pair by pair it costs ~0.2 ms,
    so a batch of 288 images (FeDLRT's clients send full-data gradients) took ~17 s an attack
    to match; here the windows' means of x*y are inner products of the two images' patch
    vectors, one product per block of reconstructions. Images smaller than a window fall back
    to :func:`ssim` (which refuses them, as before)."""
    h, w = truth[0].shape
    if min(h, w) < SSIM_WINDOW or any(t.shape != (h, w) for t in [*truth, *recon]):
        return np.array([[ssim(t, r) for t in truth] for r in recon])
    win = SSIM_WINDOW

    def patches(images: list[np.ndarray]) -> np.ndarray:
        stack = np.stack(images).astype(np.float64, copy=False)
        view = np.lib.stride_tricks.sliding_window_view(stack, (win, win), axis=(1, 2))
        return view.reshape(len(images), -1, win * win)  # (images, windows, pixels of a window)

    x = patches([np.clip(r, 0, 1) for r in recon])
    y = patches(truth)
    n = win * win
    cov_norm = n / (n - 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K1 R)^2, (K2 R)^2 with R = 1
    ux, uy = x.mean(-1), y.mean(-1)
    vx = cov_norm * ((x * x).mean(-1) - ux * ux)
    vy = cov_norm * ((y * y).mean(-1) - uy * uy)
    table = np.empty((len(recon), len(truth)))
    for lo in range(0, len(recon), rows_per_block):
        hi = lo + rows_per_block
        uxy = np.einsum("rwk,twk->rtw", x[lo:hi], y) / n
        a, b = ux[lo:hi, None, :], uy[None, :, :]
        vxy = cov_norm * (uxy - a * b)
        s = (2 * a * b + c1) * (2 * vxy + c2) / ((a * a + b * b + c1) * (vx[lo:hi, None, :] + vy[None, :, :] + c2))
        table[lo:hi] = s.mean(-1)
    return table


def psnr(truth: np.ndarray, recon: np.ndarray) -> float:
    mse = float(np.mean((truth - np.clip(recon, 0, 1)) ** 2))
    return 100.0 if mse <= 1e-10 else min(100.0, 10.0 * math.log10(1.0 / mse))


def _gray(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) or a flat vector -> (H, W) float64 for the metrics."""
    a = x.detach().double().numpy()
    if a.ndim == 3:
        a = a.mean(0)
    if a.ndim == 1:
        side = int(round(math.sqrt(a.size)))
        a = a.reshape(side, -1)
    return a


def match(recon: torch.Tensor, truth: torch.Tensor) -> list[tuple[int, float, float]]:
    """For each reconstruction: (index of its true image, SSIM, PSNR), one-to-one, by the
    assignment maximising total SSIM."""
    from scipy.optimize import linear_sum_assignment

    r = [_gray(x) for x in recon]
    t = [_gray(x) for x in truth]
    table = ssim_table(r, t)
    rows, cols = linear_sum_assignment(-table)
    out: list[tuple[int, float, float]] = [(0, 0.0, 0.0)] * len(r)
    for i, j in zip(rows, cols):
        out[i] = (int(j), float(table[i, j]), psnr(t[j], r[i]))
    return out


@dataclass
class Reconstruction:
    attack: str
    round: int
    images: torch.Tensor
    truth: torch.Tensor
    scores: list[tuple[int, float, float]]
    labels_ok: float


@dataclass
class Report:
    rows: list[dict[str, Any]] = field(default_factory=list)
    recons: list[Reconstruction] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)


def attack(targets: Iterable[tuple[int, Target]], truth: torch.Tensor, truth_labels: torch.Tensor,
           cfg: EavesdropperConfig, tags: dict[str, Any] | None = None) -> Report:
    """Run ``cfg.attacks`` on every target and score them against ``truth``."""
    report = Report()
    for r, target in targets:
        for name in cfg.attacks:
            kwargs: dict[str, Any] = {"iters": cfg.ig_iters if name == "ig" else cfg.iters, "seed": cfg.seed + r}
            if name == "ig":
                kwargs["tv"] = cfg.tv
            images, labels = ATTACKS[name](target, **kwargs)
            scores = match(images, truth)
            true_sorted = sorted(truth_labels[[j for j, _, _ in scores]].tolist())
            labels_ok = float(np.mean([a == b for a, b in zip(sorted(labels.tolist()), true_sorted)]))
            report.recons.append(Reconstruction(name, r, images, truth[[j for j, _, _ in scores]], scores, labels_ok))
            for i, (j, s, p) in enumerate(scores):
                report.rows.append({**(tags or {}), "round": r, "attack": name, "batch": target.batch, "image": j,
                                    "matched_from": len(truth), "ssim": round(s, 4), "psnr": round(p, 3),
                                    "labels_ok": labels_ok})
    return report


CSV_FIELDS = ["method", "model", "dataset", "batch", "round", "attack", "image", "matched_from", "ssim", "psnr",
              "labels_ok"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = CSV_FIELDS + sorted({k for row in rows for k in row} - set(CSV_FIELDS))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow(row)


def write_grid(panels: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path, per_panel: int = 4,
               panels_per_row: int = 4) -> None:
    """A PNG of labelled panels (title, truth, reconstructions), ``panels_per_row`` side by
    side: in each panel the true images are the top row, their reconstructions below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        return
    h, w = _gray(panels[0][1][0]).shape
    cols = max(1, min(per_panel, max(len(t) for _, t, _ in panels)))
    title_px, gap = max(4, h // 2), max(2, w // 3)
    pw, ph = cols * (w + 1) + gap, title_px + 2 * (h + 1) + gap
    nrow = math.ceil(len(panels) / panels_per_row)
    ncol = min(len(panels), panels_per_row)
    canvas = np.full((nrow * ph, ncol * pw), np.nan)
    for p, (_, truth, recon) in enumerate(panels):
        y0, x0 = (p // panels_per_row) * ph + title_px, (p % panels_per_row) * pw
        for row, src in enumerate((truth, recon)):
            for c in range(min(cols, len(src))):
                y, x = y0 + row * (h + 1), x0 + c * (w + 1)
                canvas[y:y + h, x:x + w] = np.clip(_gray(src[c]), 0, 1)
    scale = max(0.12, 0.5 / w * 8) / 8
    fig = plt.figure(figsize=(max(3.0, canvas.shape[1] * scale * 8 / 6), max(1.5, canvas.shape[0] * scale * 8 / 6)))
    ax = fig.add_axes([0, 0, 1, 1])
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for p, (title, _, _) in enumerate(panels):
        ax.text((p % panels_per_row) * pw, (p // panels_per_row) * ph + title_px * 0.8, title, fontsize=8,
                va="bottom", ha="left")
    ax.axis("off")
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- runs

def client_truth(scenario, client: int, dataset=None, parts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tapped client's images and labels, rebuilt from the data set (scoring only)."""
    from .data import load_dataset, partition

    if dataset is None:
        dataset = load_dataset(scenario.data, scenario.run.seed)
    if parts is None:
        parts = partition(dataset.train_y, scenario.data, scenario.run.seed)
    idx = parts[client]
    return dataset.train_x[idx], dataset.train_y[idx]


def run_tapped(scenario, dataset=None, parts: list[torch.Tensor] | None = None):
    """Run ``scenario`` in virtual time with its eavesdropper's tap on the server's node;
    ``parts`` (client -> training indices) replaces the scenario's partition when given.
    Returns (summary dict, tap, dataset, parts)."""
    from .clock import new_loop
    from .data import load_dataset, partition
    from .models import build_model
    from .runner import Simulation, close_simulation, make_algorithm, quiet_gc, summarise

    cfg = scenario.eavesdropper or EavesdropperConfig()
    seed = scenario.run.seed
    if dataset is None:
        dataset = load_dataset(scenario.data, seed)
    if parts is None:
        parts = partition(dataset.train_y, scenario.data, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(scenario.run.threads)
    loop = new_loop(scenario.run.clock)
    asyncio.set_event_loop(loop)
    sim = None
    tap = WireTap(cfg)
    try:
        model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, seed)
        sim = Simulation(scenario, loop, dataset, parts, model, make_algorithm(scenario, model))
        sim.server_node.tap = tap
        with quiet_gc():
            loop.run_until_complete(sim.main(None))
    finally:
        close_simulation(loop, sim, threads)
    return summarise(sim, 0.0).summary, tap, dataset, parts


def eavesdrop(scenario, tap: WireTap, dataset=None, parts=None, tags: dict[str, Any] | None = None) -> Report:
    """Decode what ``tap`` heard, run the attacks, score them. ``dataset`` and ``parts``
    (the referee's copy, for the true images) are rebuilt from the scenario when not given."""
    from .data import load_dataset

    cfg = scenario.eavesdropper or EavesdropperConfig()
    if dataset is None:
        dataset = load_dataset(scenario.data, scenario.run.seed)
    decoder = make_decoder(scenario, dataset.input_shape, dataset.num_classes)
    targets = decoder.targets(tap.messages())
    truth, labels = client_truth(scenario, cfg.client, dataset, parts)
    if tags is None:
        tags = {"method": scenario.algorithm_name, "model": scenario.model.kind, "dataset": scenario.data.dataset}
    threads = torch.get_num_threads()
    torch.set_num_threads(scenario.run.threads)  # small double-backward graphs: one thread is fastest
    try:
        report = attack(targets, truth, labels, cfg, tags)
    finally:
        torch.set_num_threads(threads)
    report.counters = {**tap.counters, **decoder.counters, "targets": len(targets)}
    return report


def write_report(report: Report, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(report.rows, out_dir / "privacy.csv")
    panels = [(f"{r.attack} r{r.round}", r.truth, r.images) for r in report.recons]
    if panels:
        write_grid(panels, out_dir / "privacy.png")


__all__ = ["attack", "eavesdrop", "match", "psnr", "run_tapped", "ssim", "write_csv", "write_grid", "write_report",
           "infer_labels"]
