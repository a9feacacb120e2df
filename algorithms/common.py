"""Pure helpers shared by methods: losses, gradients, local SGD, parameter arithmetic."""
from __future__ import annotations

import math
import weakref
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath
from .base import Params, Payload, ProtocolError


_PARAMETERS: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, nn.Parameter]]] = weakref.WeakKeyDictionary()


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # Walking the module tree costs ~10 us per call on a small MLP; the tree of a model
    # template never changes after it is built, so walk it once.
    named = _PARAMETERS.get(model)
    if named is None:
        named = _PARAMETERS[model] = list(model.named_parameters())
    return named


def bind_params(model: nn.Module, params: Params) -> list[nn.Parameter]:
    """Point the shared model's parameters at ``params`` (no copy) and return them in order.

    Cheaper than ``torch.func.functional_call`` (which re-parametrises the module on every
    call, ~100 us for a small MLP): the model is a template shared by all clients of a
    process, and a handler runs to completion before the next one binds its own tensors.
    """
    bound = []
    for name, p in _named_parameters(model):
        p.data = params[name].detach()
        bound.append(p)
    return bound


def loss_and_grad(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Params]:
    """Cross-entropy loss (a float) and its gradient w.r.t. ``params`` at ``params``.

    Models the lean path covers (:mod:`algorithms.fastpath`) skip autograd."""
    plan = fastpath.plan(model)
    if plan is not None:
        return fastpath.loss_and_grad(plan, params, x, y)
    bound = bind_params(model, params)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, bound)
    return float(loss.detach()), {name: g for name, g in zip(params, grads)}


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of one shuffled epoch over ``n`` samples, ``batch_size`` at a time."""
    order = torch.randperm(n, generator=generator)
    if 0 < n <= batch_size:  # one batch: the permutation itself, without a slice view
        yield order
        return
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def sample_batch(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one random minibatch (without replacement, at most ``n``)."""
    return torch.randperm(n, generator=generator)[: min(batch_size, n)]


def local_sgd(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *, lr: float,
              epochs: int, batch_size: int, generator: torch.Generator) -> tuple[Params, int]:
    """Plain minibatch SGD from ``params``; returns new params and samples processed."""
    current = {k: v.clone() for k, v in params.items()}
    plan = fastpath.plan(model)
    if plan is not None:
        batches = (idx for _ in range(epochs) for idx in minibatches(x.shape[0], batch_size, generator))
        return current, fastpath.sgd_steps(plan, current, x, y, batches, lr)
    bound = bind_params(model, current)  # steps below update `current` in place through `bound`
    seen = 0
    for _ in range(epochs):
        for idx in minibatches(x.shape[0], batch_size, generator):  # shape[0]: Tensor.__len__ is Python
            # index_select: the same rows as x[idx], without the generic indexing machinery
            grads = torch.autograd.grad(F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx)), bound)
            with torch.no_grad():
                # p -= lr * g for every tensor in one dispatch (what torch.optim.SGD's foreach path does)
                torch._foreach_add_(bound, grads, alpha=-lr)
            seen += idx.shape[0]
    return current, seen


def local_sgd_many(model: nn.Module, starts: list[Params], xs: list[torch.Tensor], ys: list[torch.Tensor],
                   generators: list[torch.Generator], *, lr: float, epochs: int,
                   batch_size: int) -> list[tuple[Params, int]]:
    """:func:`local_sgd` for many clients (``starts[i]`` on ``xs[i], ys[i]``), in order.

    Clients holding the same number of samples train stacked when the model is small
    enough to win from it (:func:`algorithms.fastpath.stackable`); the rest one at a time."""
    out: list[tuple[Params, int] | None] = [None] * len(starts)
    plan = fastpath.plan(model)
    by_size: dict[int, list[int]] = {}
    for i, (start, x) in enumerate(zip(starts, xs)):
        if x.shape[0] > 0 and fastpath.stackable(plan, start):
            by_size.setdefault(x.shape[0], []).append(i)
        else:
            out[i] = local_sgd(model, start, x, ys[i], lr=lr, epochs=epochs, batch_size=batch_size,
                               generator=generators[i])
    for n, members in by_size.items():
        chunk = fastpath.stack_chunk(plan, starts[members[0]])
        for c in range(0, len(members), chunk):
            group = members[c:c + chunk]
            if len(group) == 1:
                i = group[0]
                out[i] = local_sgd(model, starts[i], xs[i], ys[i], lr=lr, epochs=epochs, batch_size=batch_size,
                                   generator=generators[i])
                continue
            trained = fastpath.sgd_stacked(plan, [starts[i] for i in group], [xs[i] for i in group],
                                           [ys[i] for i in group], [generators[i] for i in group],
                                           epochs=epochs, batch_size=batch_size, lr=lr)
            for i, params in zip(group, trained):
                # names the plan does not read (none on the covered models) pass through, as copies
                out[i] = ({k: params[k] if k in params else v.clone() for k, v in starts[i].items()}, epochs * n)
    return out  # type: ignore[return-value]


def loss_and_grad_many(model: nn.Module, starts: list[Params], xs: list[torch.Tensor],
                       ys: list[torch.Tensor]) -> list[Params]:
    """The gradients of :func:`loss_and_grad` for many clients, in order: stacked for
    clients with as many rows in ``xs[i]`` where the model is small enough, else one at a time."""
    out: list[Params | None] = [None] * len(starts)
    plan = fastpath.plan(model)
    by_rows: dict[int, list[int]] = {}
    for i, (start, x) in enumerate(zip(starts, xs)):
        if x.shape[0] > 0 and fastpath.stackable(plan, start) and set(start) == set(fastpath.names(plan)):
            by_rows.setdefault(x.shape[0], []).append(i)
        else:
            out[i] = loss_and_grad(model, start, x, ys[i])[1]
    for members in by_rows.values():
        chunk = fastpath.stack_chunk(plan, starts[members[0]])
        for c in range(0, len(members), chunk):
            group = members[c:c + chunk]
            if len(group) == 1:
                out[group[0]] = loss_and_grad(model, starts[group[0]], xs[group[0]], ys[group[0]])[1]
                continue
            grads = fastpath.grads_stacked(plan, [starts[i] for i in group], [xs[i] for i in group],
                                           [ys[i] for i in group])
            for i, g in zip(group, grads):
                out[i] = {name: g[name] for name in starts[i]}  # in the caller's order, as loss_and_grad
    return out  # type: ignore[return-value]


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sum in the given (client-id) order so the result does not depend on arrival order."""
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w / total)
    return out


def _finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    if t.dtype in (torch.float32, torch.float64) and t.is_cpu and not t.requires_grad:
        # Fast path, numpy being cheaper than torch's dispatch on the small tensors of FL:
        # the sum of squares is NaN or Inf when any entry is (the terms are >= 0, so nothing
        # cancels); only if the squares overflow does the exact test have to decide.
        flat = t.numpy().reshape(-1)
        return math.isfinite(flat.dot(flat)) or bool(np.isfinite(flat).all())
    return bool(torch.isfinite(t).all())


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry of ``t`` is NaN or Inf (integer tensors always are)."""
    with np.errstate(over="ignore"):  # the fast path's squares may overflow; that is handled
        return _finite(t)


def params_finite(params: Params) -> bool:
    """True when every tensor of ``params`` is free of NaN and Inf."""
    with np.errstate(over="ignore"):
        return all(_finite(t) for t in params.values())


def check_finite(payload: Payload, who: str) -> None:
    """Refuse a payload carrying NaN or Inf in a floating tensor."""
    with np.errstate(over="ignore"):
        for name, t in payload.tensors.items():
            if not _finite(t):
                raise ProtocolError(f"{who}: tensor {name!r} holds NaN or Inf")


def check_like(payload: Payload, reference: Params, who: str, *, finite: bool = True) -> None:
    """Refuse a payload whose tensors do not match ``reference`` by name, shape and dtype,
    or (``finite``) that holds NaN or Inf.

    A server checks everything a client sends. A client checking the server's model passes
    ``finite=False``: names, shapes and dtypes are what its own code needs, while a model
    that went NaN would only make the client send NaN back, which the server refuses.
    """
    if payload.tensors.keys() != reference.keys():
        raise ProtocolError(f"{who}: tensors {sorted(payload.tensors)} do not match the model's {sorted(reference)}")
    for name, ref in reference.items():
        t = payload.tensors[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ProtocolError(f"{who}: tensor {name!r} is {t.dtype}{tuple(t.shape)}, expected {ref.dtype}{tuple(ref.shape)}")
    if finite:
        check_finite(payload, who)


def dense_bits(params: Params) -> int:
    """Bits of sending ``params`` uncompressed: 32 per value (the papers' SGD count)."""
    return 32 * sum(t.numel() for t in params.values())


# --------------------------------------------------------------------------- truncated SVD

SKETCH_SEED = 0x5EC7
"""Seed of the fixed Gaussian test matrices of :func:`exact_truncated_svd` (no client randomness)."""
_SKETCHES: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
_CAPTURED = 1e-4
"""A sketch holds a matrix's range when the residual ||A - Q Q^T A||_F is at most this fraction
of ||A||_F (float32 rounding of an exactly captured range stays near 1e-6)."""


def _sketch_range(a: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(Q, Q^T A, captured): an orthonormal basis of A's sketch and whether it holds A's range."""
    q = torch.linalg.qr(a @ omega).Q
    b = q.T @ a
    residual = torch.addmm(a, q, b, alpha=-1.0)
    captured = float(residual.norm()) <= _CAPTURED * float(a.norm())
    return q, b, captured


def _svd_from_range(q: torch.Tensor, b: torch.Tensor, k: int):
    """Rank-k SVD of A = Q B from the SVD of the small square R of B^T = Q_b R (a wide B's
    own SVD costs ~3x more here: LAPACK's wide-matrix path on 65 x 784 vs a QR and a 65 x 65 SVD)."""
    qb, rb = torch.linalg.qr(b.T)
    ur, s, vhr = torch.linalg.svd(rb.T)
    return (q @ ur[:, :k]), s[:k], vhr[:k] @ qb.T


def exact_truncated_svd(a: torch.Tensor, k: int, oversample: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-k factors (U, S, V^T) of ``a`` (Eckart-Young), cheaply when ``a`` has low rank.

    A minibatch gradient of a linear layer has rank at most the batch size (32 against 200 for
    the 784-200-10 MLP's first layer), so a sketch A Omega with k + ``oversample`` columns of a
    fixed Gaussian Omega already spans A's whole range: then A = Q (Q^T A) exactly and the SVD
    of the small Q^T A gives A's singular triplets. Whether the range was captured is checked
    (the residual A - Q Q^T A, :data:`_CAPTURED`); when it was not, the full
    ``torch.linalg.svd`` decides. Costs about 3 products of A with a thin matrix instead of a
    full SVD: ~5x less on a 200 x 784 gradient here. Singular vectors are defined up to sign
    (and within repeated singular values), as with any SVD.
    """
    m, n = a.shape
    width = min(k + oversample, m, n)
    if width < min(m, n):
        key = (n, width, a.dtype)
        omega = _SKETCHES.get(key)
        if omega is None:
            omega = _SKETCHES[key] = torch.randn(n, width, dtype=a.dtype,
                                                 generator=torch.Generator().manual_seed(SKETCH_SEED))
        q, b, captured = _sketch_range(a, omega.to(a.device))
        if captured:
            return _svd_from_range(q, b, k)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def randomized_svd(a: torch.Tensor, k: int, generator: torch.Generator, oversample: int = 5,
                   power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-k (U, S, V^T) of ``a`` from a seeded randomised range finder (Halko et al. 2011).

    The power iterations sharpen a sketch that misses part of A's range; when the first
    sketch already holds all of it (A's rank at most k + ``oversample``, the usual case for a
    minibatch gradient) they cannot improve anything and are skipped. The draws from
    ``generator`` are the same either way.
    """
    m, n = a.shape
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=a.dtype)
    q, b, captured = _sketch_range(a, omega)
    if not captured:
        for _ in range(power_iters):
            q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
        b = q.T @ a
    return _svd_from_range(q, b, k)
