"""QRR (Kritsiolis & Kotropoulos, 2025): reduced-rank gradients, then LAQ on the factors.

Source followed: the authors' code Kritsos/QRR-code, read for this module: ``utils.py``
(``svd_decomp``, ``tucker_decomp``, ``quantize_to_int``: eq. 5-7), ``quantized_rank_red_client.py``
(client), ``quantized_rank_red.py`` (server: bits, aggregation) and ``sim_config.py`` (10 clients,
b = 8, one batch of 500 per round, SGD lr 0.001 on the **sum** of the clients' gradients,
p in {0.1, 0.2, 0.3}). Departures, each deliberate:

* ``lr`` steps on the **mean** of the clients' gradients: the authors' lr on the sum is
  lr / M here (0.001 on the sum of 10 = 0.01 on the mean, bench/settings.py ``QRR_LR``);
* ``align_signs`` (default on) is this project's: the authors quantize the factors as the SVD
  returns them;
* ``svd = "randomized"`` is this project's option; Tucker runs 5 HOOI iterations here, the
  authors call tensorly's ``tucker`` with its defaults (up to 100);
* a tensor whose factors would not be smaller than itself is quantized directly (the authors
  always decompose 2-D and 4-D gradients);
* the authors' QRR client never skips an upload (``should_skip_upload`` exists in their
  ``utils.py`` but their QRR client does not call it): ``lazy`` is false here by default too;
* ``batch_size`` defaults to 32 (the table's QRR rows set the authors' 500);
* state synchronisation and bad-input handling are LAQ's (:mod:`algorithms.laq`), the
  authors' simulation has no faults.

Per parameter tensor of client m's minibatch gradient, with p = ``rank_fraction``:

* 2-D (m x n): truncated SVD keeping k = ceil(p min(m, n)) singular triplets, U (m x k),
  S (k), V^T (k x n). ``svd = "exact"``: the best rank-k factors; a minibatch gradient has
  rank at most the batch b, so when a fixed Gaussian sketch of min(k, b) + 5 columns holds
  its whole range (checked; else one of k + 5) they come from sketch-sized matrices (:func:`common.exact_truncated_svd`;
  triplets beyond the gradient's rank are zeros), otherwise from ``torch.linalg.svd``;
  ``"randomized"`` a randomised range finder (Halko et al.: k + 5 columns, 2 power
  iterations, skipped when the first sketch already holds the range) drawn from the
  client's seeded generator;
* 4-D conv (o x i x h x w): Tucker decomposition (tensorly, pytorch backend, HOOI from an SVD
  start) with ranks ceil(p dim) on all four modes: a core and four factor matrices;
* vectors (biases), and any tensor whose factors would not be smaller than itself (e.g.
  p near 1), are quantized as they are, without decomposition.

Each factor (and each undecomposed tensor) is then a LAQ target: quantized differentially at
b bits against the accumulator of that factor that client and server mirror, one radius per
tensor (protocol, checks and lazy aggregation are LAQ's: see :mod:`algorithms.laq`). The
server rebuilds client m's gradient from the mirrored factors (U diag(S) V^T, or the core
multiplied by the four factors) and steps w <- w - lr * mean_m of them.

Singular vectors and Tucker factors are defined up to sign, and an SVD may return a column
negated between rounds, which turns a tiny innovation into one of twice the factor's size.
With ``align_signs`` (default) each component is flipped to agree with the mirrored factor
of the previous round before quantizing (for SVD the pair (u_j, v_j) together; for Tucker a
factor column together with the core slice it multiplies), which leaves the product
unchanged. tests/test_compression_qrr.py measures the radius it saves.

Cost (bench/compress_cost.py, MLP 784-200-10, batch 32, one thread): a client's encode is
the sketch's two products with the 200 x 784 gradient, small float64 factorisations, one
batched quantizer pass over all factors (:func:`quantizers.laq_quantize_many`) and the
accumulator's hash; see the README's benchmark table for the figures.

payload_bits (uplink, per upload), from the authors' code (Kritsos/QRR-code):
  FC layer (m x n, rank k):  3 * 32 + b (m k + k + k n)
  conv layer (Tucker):       5 * 32 + b (prod(r) + sum_i d_i r_i)
  vector / undecomposed:     32 + b * numel
SGD's count is 32 bits per value. Downlink: the model, 32 bits per value.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .base import Params, check, register
from .common import align_svd, exact_truncated_svd, randomized_svd as common_randomized_svd  # noqa: F401 (align_svd: re-exported)
from .laq import DifferentialQuantized

SEP = "|"
"""Separates a parameter's name from its factor's: ``fc.weight|U``."""
OVERSAMPLE = 5
POWER_ITERS = 2


def truncated_svd(a: torch.Tensor, k: int, align_to=None,
                  rank_bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-k factors (U, S, V^T) of ``a`` (Eckart-Young); cheap for a low-rank ``a``
    (:func:`common.exact_truncated_svd`, with ``rank_bound`` what is known of its rank);
    ``align_to`` = (U_prev, V^T_prev): signs aligned as :func:`align_svd` does."""
    return exact_truncated_svd(a, k, align_to=align_to, rank_bound=rank_bound)


def randomized_svd(a: torch.Tensor, k: int, generator: torch.Generator,
                   oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS, align_to=None):
    """Rank-k (U, S, V^T) of ``a`` from a seeded randomised range finder (Halko et al. 2011;
    :func:`common.randomized_svd`)."""
    return common_randomized_svd(a, k, generator, oversample, power_iters, align_to)


def tucker(t: torch.Tensor, ranks: tuple[int, ...], n_iter_max: int = 5) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Tucker decomposition (core, factors) of ``t`` with tensorly on its pytorch backend."""
    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    with tl.backend.BackendManager.backend_context("pytorch"), warnings.catch_warnings():
        # tensorly warns when a mode's rank exceeds another unfolding's size and clamps it
        warnings.simplefilter("ignore", UserWarning)
        core, factors = tl_tucker(t, rank=list(ranks), init="svd", n_iter_max=n_iter_max, tol=1e-6, random_state=0)
    return core.to(torch.float32), [f.to(torch.float32) for f in factors]


def tucker_to_tensor(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """core x_1 F_1 x_2 F_2 ... (mode products), for any order."""
    out = core
    for mode, f in enumerate(factors):
        out = torch.movedim(torch.tensordot(f, torch.movedim(out, mode, 0), dims=([1], [0])), 0, mode)
    return out


def align_tucker(core, factors, previous):
    """Flip factor columns that disagree with the previous round's, negating the core slice."""
    core = core.clone()
    out = []
    for mode, (f, f_prev) in enumerate(zip(factors, previous)):
        sign = torch.where((f * f_prev).sum(0) < 0, -1.0, 1.0)
        out.append(f * sign)
        shape = [1] * core.ndim
        shape[mode] = -1
        core = core * sign.reshape(shape)
    return core, out


@register
class QRR(DifferentialQuantized):
    name = "qrr"
    lazy = False

    @dataclass
    class Config(DifferentialQuantized.Config):
        rank_fraction: float = 0.3
        """p: fraction of each dimension's rank kept, in (0, 1]."""
        svd: str = "exact"
        """How 2-D gradients are factored: "exact" or "randomized"."""
        align_signs: bool = True
        """Align singular vectors / Tucker factors with the previous round's before quantizing."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check(0 < self.rank_fraction <= 1, "rank_fraction", self.rank_fraction, "must be in (0, 1]")
            check(self.svd in ("exact", "randomized"), "svd", self.svd, 'must be "exact" or "randomized"')
            check(isinstance(self.align_signs, bool), "align_signs", self.align_signs, "must be true or false")

    def target_layout(self) -> dict[str, tuple[int, ...]]:
        p = self.config.rank_fraction
        self.plan: dict[str, tuple] = {}
        layout: dict[str, tuple[int, ...]] = {}
        for name, shape in self.shapes.items():
            numel = math.prod(shape)
            if len(shape) == 2:
                m, n = shape
                k = math.ceil(p * min(m, n))
                if k * (m + n + 1) < numel:
                    self.plan[name] = ("svd", k)
                    layout.update({f"{name}{SEP}U": (m, k), f"{name}{SEP}S": (k,), f"{name}{SEP}V": (k, n)})
                    continue
            if len(shape) == 4:
                ranks = tuple(math.ceil(p * d) for d in shape)
                if math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks)) < numel:
                    self.plan[name] = ("tucker", ranks)
                    layout[f"{name}{SEP}core"] = ranks
                    layout.update({f"{name}{SEP}F{i}": (d, r) for i, (d, r) in enumerate(zip(shape, ranks))})
                    continue
            self.plan[name] = ("direct",)
            layout[name] = tuple(shape)
        return layout

    def targets(self, grads: Params, previous, generator: torch.Generator, samples: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        align = self.config.align_signs and previous is not None
        # a linear layer's gradient over b samples is a sum of b outer products: rank <= b
        # (an L2 term adds the full-rank weights; other 2-D tensors are checked by the sketch)
        rank_bound = samples if self.config.l2 == 0 else None
        for name, plan in self.plan.items():
            g = grads[name].detach().to(torch.float32)
            if plan[0] == "svd":
                k = plan[1]
                # align_svd's flips, made by the SVD itself (on its small factors where it can)
                prev = (previous[f"{name}{SEP}U"], previous[f"{name}{SEP}V"]) if align else None
                if self.config.svd == "exact":
                    u, s, vh = truncated_svd(g, k, align_to=prev, rank_bound=rank_bound)
                else:
                    u, s, vh = randomized_svd(g, k, generator, align_to=prev)
                out.update({f"{name}{SEP}U": u, f"{name}{SEP}S": s, f"{name}{SEP}V": vh})
            elif plan[0] == "tucker":
                core, factors = tucker(g, plan[1])
                if align:
                    core, factors = align_tucker(core, factors, [previous[f"{name}{SEP}F{i}"] for i in range(4)])
                out[f"{name}{SEP}core"] = core
                out.update({f"{name}{SEP}F{i}": f for i, f in enumerate(factors)})
            else:
                out[name] = g
        return out

    def rebuild(self, q: dict[str, torch.Tensor]) -> Params:
        out: Params = {}
        for name, plan in self.plan.items():
            if plan[0] == "svd":
                out[name] = (q[f"{name}{SEP}U"] * q[f"{name}{SEP}S"]) @ q[f"{name}{SEP}V"]
            elif plan[0] == "tucker":
                out[name] = tucker_to_tensor(q[f"{name}{SEP}core"], [q[f"{name}{SEP}F{i}"] for i in range(4)])
            else:
                out[name] = q[name]
        return out
