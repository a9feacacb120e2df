"""Pure helpers shared by methods: losses, gradients, local SGD, parameter arithmetic."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import Params, Payload, ProtocolError


def loss_and_grad(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Params]:
    """Cross-entropy loss (a float) and its gradient w.r.t. ``params`` at ``params``."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return float(loss.detach()), dict(zip(leaves.keys(), grads))


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of one shuffled epoch over ``n`` samples, ``batch_size`` at a time."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def sample_batch(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one random minibatch (without replacement, at most ``n``)."""
    return torch.randperm(n, generator=generator)[: min(batch_size, n)]


def local_sgd(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *, lr: float,
              epochs: int, batch_size: int, generator: torch.Generator) -> tuple[Params, int]:
    """Plain minibatch SGD from ``params``; returns new params and samples processed."""
    current = {k: v.detach().clone() for k, v in params.items()}
    seen = 0
    for _ in range(epochs):
        for idx in minibatches(len(x), batch_size, generator):
            _, grads = loss_and_grad(model, current, x[idx], y[idx])
            for k, g in grads.items():
                current[k].sub_(g, alpha=lr)
            seen += len(idx)
    return current, seen


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sum in the given (client-id) order so the result does not depend on arrival order."""
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w / total)
    return out


def check_finite(payload: Payload, who: str) -> None:
    """Refuse a payload carrying NaN or Inf in a floating tensor."""
    for name, t in payload.tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ProtocolError(f"{who}: tensor {name!r} holds NaN or Inf")


def check_like(payload: Payload, reference: Params, who: str) -> None:
    """Refuse a payload whose tensors do not match ``reference`` by name, shape and dtype."""
    if set(payload.tensors) != set(reference):
        raise ProtocolError(f"{who}: tensors {sorted(payload.tensors)} do not match the model's {sorted(reference)}")
    for name, ref in reference.items():
        t = payload.tensors[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ProtocolError(f"{who}: tensor {name!r} is {t.dtype}{tuple(t.shape)}, expected {ref.dtype}{tuple(ref.shape)}")
    check_finite(payload, who)


def dense_bits(params: Params) -> int:
    """Bits of sending ``params`` uncompressed: 32 per value (the papers' SGD count)."""
    return 32 * sum(t.numel() for t in params.values())
