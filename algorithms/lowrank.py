"""Low-rank factorised layers: the math FeDLRT and FedLoRU share (a support module).

Sources: the factorisations of the FeDLRT paper (U S Vᵀ, augmentation, truncation) and of
FedLoRU's official ``lorumodel.py`` (W0 + s·up·down, convolutions as a k×k ``down`` and a 1×1
``up``); the local optimizer options mirror ``torch.optim.SGD`` with ``clip_grad_norm_`` as
FedLoRU's official client uses them. ``scaled_factor_grads`` is this project's (Zhang &
Pilanci 2024's preconditioner), used only by FedLoRU's ``preconditioned`` option.

Both methods keep the runtime's plain ``nn.Module`` as the architecture and parametrise the
2-D weights of its ``nn.Linear`` layers in low-rank form. A forward pass composes the dense
weights from the factors and calls ``torch.func.functional_call(model, params, x)``, so
autograd reaches the factors and the runtime needs no new module:

* FeDLRT:  W = U S Vᵀ, U (n×r) and V (m×r) with orthonormal columns, S (r×r);
* FedLoRU: W = W0 + B A, W0 (n×m) frozen, B (n×r), A (r×m).

Here n is ``out_features`` and m ``in_features`` (an ``nn.Linear`` weight is n×m). Every
function is pure (tensors in, tensors out) so it can be tested alone.

Every factor travels as float32: 32 bits per value (:data:`FLOAT_BITS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import fastpath
from .base import ConfigError, Params, Payload, ProtocolError
from .common import all_finite

FLOAT_BITS = 32
"""Bits of one float32 value on the wire."""

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}
"""Client objectives by scenario name (``algorithm.loss``): ``cross_entropy`` (class labels,
the runtime's classification tasks) or ``mse`` (mean over all output entries of the squared
error; float targets shaped like the model's output, e.g. synthetic regression)."""


def float_bits(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bits of sending ``tensors`` as float32: 32 per value."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return FLOAT_BITS * sum(t.numel() for t in values)


# --------------------------------------------------------------------------- layers

def linear_weights(model: nn.Module, keep_last_dense: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` weights to factorise, in ``named_parameters`` order.

    ``keep_last_dense`` leaves the last Linear layer (the classifier head) dense.
    """
    names = [f"{prefix}.weight" if prefix else "weight"
             for prefix, module in model.named_modules() if isinstance(module, nn.Linear)]
    order = [name for name, _ in model.named_parameters()]
    names.sort(key=order.index)
    return names[:-1] if keep_last_dense else names


def conv_weights(model: nn.Module) -> list[str]:
    """Names of the (ungrouped) ``nn.Conv2d`` weights, in ``named_parameters`` order. A conv
    weight (out, in, k, k) is factorised as the matrix out × (in·k·k): FedLoRU's ``down``
    (a k×k conv in→r) and ``up`` (a 1×1 conv r→out)."""
    names = [f"{prefix}.weight" if prefix else "weight"
             for prefix, module in model.named_modules() if isinstance(module, nn.Conv2d) and module.groups == 1]
    order = [name for name, _ in model.named_parameters()]
    names.sort(key=order.index)
    return names


def check_rank_fits(names: list[str], params: Params, rank: int, key: str = "rank") -> None:
    """ConfigError unless ``1 <= rank <= min(n, m)`` for every factorised weight."""
    if not names:
        raise ConfigError(key, rank, "the model has no Linear layer to factorise")
    for name in names:
        n, m = params[name].shape
        if rank > min(n, m):
            raise ConfigError(key, rank, f"exceeds the size of layer {name!r} ({n}x{m}: rank at most {min(n, m)})")


@dataclass
class Factors:
    """One layer as W = U S Vᵀ (U n×r, S r×r, V m×r; U and V orthonormal columns)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def dense(self) -> torch.Tensor:
        return self.U @ self.S @ self.V.T


def svd_factors(W: torch.Tensor, rank: int) -> Factors:
    """The best rank-``rank`` approximation of ``W`` (truncated SVD), as factors."""
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    return Factors(U[:, :rank].contiguous(), torch.diag(sigma[:rank]), Vh[:rank].T.contiguous())


def augment_basis(U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """New orthonormal columns that extend ``U`` (n×r) towards the gradient ``G`` (n×r).

    FeDLRT's augmentation Ū = orth([U | G]) keeps U and adds k = min(r, n - r) columns:
    the part of G outside span(U), orthonormalised. A Householder QR of [U | G - U UᵀG]
    returns orthonormal columns even when G lies (nearly) inside span(U), and its first r
    columns span U, so the rest are orthogonal to U. Returns the n×k new columns.
    """
    n, r = U.shape
    k = min(r, n - r)
    if k == 0:
        return U.new_zeros((n, 0))
    outside = G - U @ (U.T @ G)
    outside = outside - U @ (U.T @ outside)  # second Gram-Schmidt pass: orthogonality to rounding
    Q, _ = torch.linalg.qr(torch.cat([U, outside], dim=1))
    return Q[:, r:r + k].contiguous()


def pad_coefficients(S: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """S̃ = [[S, 0], [0, 0]] of shape rows×cols: S in the augmented basis [U, Ũ], [V, Ṽ]."""
    out = S.new_zeros((rows, cols))
    out[:S.shape[0], :S.shape[1]] = S
    return out


def truncation_rank(sigma: torch.Tensor, tolerance: float, max_rank: int) -> int:
    """Smallest r1 >= 1 whose discarded tail ||σ[r1:]||₂ <= tolerance · ||σ||₂, capped at ``max_rank``.

    This is how FeDLRT's rank adapts, up (augmentation doubles it, little is discarded) or
    down (small singular values are dropped).
    """
    total = float(torch.linalg.vector_norm(sigma))
    if total == 0.0:
        return 1
    # tail[i] = ||σ[i:]||₂, computed from the small end so rounding does not cancel.
    tail = torch.flip(torch.sqrt(torch.cumsum(torch.flip(sigma.double(), [0]) ** 2, 0)), [0])
    keep = len(sigma)
    for r1 in range(1, len(sigma)):
        if float(tail[r1]) <= tolerance * total:
            keep = r1
            break
    return max(1, min(keep, max_rank))


def truncate(U_aug: torch.Tensor, S_aug: torch.Tensor, V_aug: torch.Tensor, tolerance: float,
             max_rank: int) -> Factors:
    """FeDLRT's compression: P Σ Qᵀ = svd(S̃), keep r1 values, U = Ū P_r1, V = V̄ Q_r1, S = Σ_r1."""
    P, sigma, Qh = torch.linalg.svd(S_aug, full_matrices=False)
    r1 = truncation_rank(sigma, tolerance, max_rank)
    return Factors((U_aug @ P[:, :r1]).contiguous(), torch.diag(sigma[:r1]).contiguous(),
                   (V_aug @ Qh[:r1].T).contiguous())


# --------------------------------------------------------------------------- training

Builder = Callable[[dict[str, torch.Tensor]], Params]
"""Maps the trainable leaves (factors, dense tensors) to the model's named parameters."""


def loss_and_grads(model: nn.Module, build: Builder, leaves: dict[str, torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor, loss: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss (a float) at ``build(leaves)`` and its gradient w.r.t. every leaf.

    On a model the lean path covers (:mod:`algorithms.fastpath`, cross-entropy only), the
    model's forward and backward run without autograd and only the small graph of ``build``
    (factors to weights) is differentiated, by the chain rule from the dense gradients."""
    live = {k: v.detach().requires_grad_(True) for k, v in leaves.items()}
    plan = fastpath.plan(model) if loss == "cross_entropy" else None
    weights = build(live) if plan is not None else None
    if weights is not None and fastpath.covers(plan, weights):
        value, dense = fastpath.loss_and_grad(plan, {k: w.detach() for k, w in weights.items()}, x, y)
        outs = [(w, dense[k]) for k, w in weights.items() if w.requires_grad]
        grads = torch.autograd.grad([w for w, _ in outs], list(live.values()), grad_outputs=[g for _, g in outs],
                                    allow_unused=True) if outs else [None] * len(live)
        return value, {k: (torch.zeros_like(live[k]) if g is None else g) for k, g in zip(live, grads)}
    value = LOSSES[loss](functional_call(model, build(live) if weights is None else weights, (x,)), y)
    grads = torch.autograd.grad(value, list(live.values()), allow_unused=True)
    return float(value.detach()), {k: (torch.zeros_like(live[k]) if g is None else g)
                                   for k, g in zip(live, grads)}


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor | None:
    """A random minibatch of ``batch_size`` indices; ``None`` (the full local set) when 0."""
    if batch_size <= 0 or batch_size >= n:
        return None
    return torch.randperm(n, generator=generator)[:batch_size]


def local_steps(model: nn.Module, build: Builder, leaves: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, *, loss: str, lr: float, steps: int, batch_size: int,
                generator: torch.Generator, correction: Mapping[str, torch.Tensor] | None = None,
                precondition: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                | None = None, momentum: float = 0.0, weight_decay: float = 0.0,
                max_grad_norm: float = 0.0) -> tuple[dict[str, torch.Tensor], int]:
    """``steps`` of (minibatch) gradient descent on the leaves; returns them and samples used.

    ``correction`` (FeDLRT's variance correction, global minus local gradient at the start
    point) is added to every step's gradient of the leaves it names. ``precondition(grads,
    leaves)`` maps each step's gradients to the directions actually taken (FedLoRU's scaled
    steps on B A). ``max_grad_norm`` > 0 clips the gradient of all leaves together to that
    2-norm, then ``weight_decay`` adds wd·p and ``momentum`` keeps a heavy-ball buffer
    (b ← μ b + g, p ← p − λ b; b starts at the first g), in the order of
    ``torch.nn.utils.clip_grad_norm_`` followed by ``torch.optim.SGD.step``; the buffer lives
    for this call only (a fresh optimizer per round, as FedLoRU's official client).
    """
    current = {k: v.detach().clone() for k, v in leaves.items()}
    buffers: dict[str, torch.Tensor] = {}
    seen = 0
    for _ in range(steps):
        idx = batch_indices(len(x), batch_size, generator)
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        _, grads = loss_and_grads(model, build, current, xb, yb, loss)
        descend(current, grads, buffers, lr=lr, correction=correction, precondition=precondition, momentum=momentum,
                weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        seen += len(xb)
    return current, seen


def descend(current: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *,
            lr: float, correction: Mapping[str, torch.Tensor] | None, precondition, momentum: float,
            weight_decay: float, max_grad_norm: float, stacked: bool = False) -> None:
    """One step of :func:`local_steps` on ``current`` (in place) from the step's ``grads``.
    ``stacked``: every tensor holds many clients along its first dimension
    (:mod:`algorithms.local_training`); the clipping norm is then each client's own."""
    if precondition is not None:
        grads = precondition(grads, current)
    if max_grad_norm > 0:
        if stacked:
            total = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads.values()))
            factor = torch.where(total > max_grad_norm, max_grad_norm / (total + 1e-6), torch.ones_like(total))
            grads = {k: g * factor.view((-1,) + (1,) * (g.ndim - 1)) for k, g in grads.items()}
        else:
            total = float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))
            if total > max_grad_norm:
                grads = {k: g * (max_grad_norm / (total + 1e-6)) for k, g in grads.items()}
    for k, g in grads.items():
        if correction is not None and k in correction:
            g = g + correction[k]
        if weight_decay:
            g = g + weight_decay * current[k]
        if momentum:
            buf = buffers.get(k)
            g = buffers[k] = g.clone() if buf is None else buf.mul_(momentum).add_(g)
        current[k].sub_(g, alpha=lr)


def scaled_factor_grads(grad_B: torch.Tensor, grad_A: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                        damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of W = B A rescaled by the other factor's Gram matrix (scaled gradient descent).

    Plain steps on B and A move W by −λ(G AᵀA + B BᵀG) (G = ∂L/∂W, first order): the step in
    W grows with the squared size of the factors, so a step size that is stable while a
    factor is small diverges once it has grown. Scaling by the Gram matrices,
    ∇_B ← ∇_B (A Aᵀ + δI)⁻¹ and ∇_A ← (BᵀB + δI)⁻¹ ∇_A, makes the move
    −λ(G P_A + P_B G) with P_A = Aᵀ(A Aᵀ + δI)⁻¹A and P_B = B(BᵀB + δI)⁻¹Bᵀ, whose
    eigenvalues lie in [0, 1): at most plain gradient descent on W, whatever the factors'
    size (Zhang & Pilanci 2024, Riemannian preconditioned LoRA). ``damping`` δ > 0 keeps the
    r×r systems regular while a factor is still near 0.
    """
    eye = torch.eye(A.shape[-2], dtype=A.dtype)
    # .mT: the factors may carry a leading dimension of clients (stacked local steps)
    grad_B = torch.linalg.solve(A @ A.mT + damping * eye, grad_B.mT).mT  # the Gram matrix is symmetric
    grad_A = torch.linalg.solve(B.mT @ B + damping * eye, grad_A)
    return grad_B, grad_A


# --------------------------------------------------------------------------- messages

def mean_by(replies: Mapping[int, "object"], key: str, weights: list[float]) -> torch.Tensor:
    """Sample-weighted mean of tensor ``key`` over replies, summed in client-id order."""
    total = float(sum(weights))
    tensors = [r.payload.tensors[key] for r in replies.values()]
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w / total)
    return out


def expect_tensors(payload: Payload, shapes: Mapping[str, tuple[int, ...]], who: str) -> None:
    """ProtocolError unless ``payload`` holds exactly ``shapes`` (float32, finite)."""
    if set(payload.tensors) != set(shapes):
        raise ProtocolError(f"{who}: tensors {sorted(payload.tensors)} do not match the expected {sorted(shapes)}")
    for name, shape in shapes.items():
        t = payload.tensors[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != torch.float32:
            raise ProtocolError(f"{who}: tensor {name!r} is {t.dtype}{tuple(t.shape)}, expected float32{tuple(shape)}")
        if not all_finite(t):
            raise ProtocolError(f"{who}: tensor {name!r} holds NaN or Inf")


def positive_samples(payload: Payload, who: str) -> int:
    samples = payload.meta.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ProtocolError(f"{who}: meta.samples must be a positive int, got {samples!r}")
    return samples
