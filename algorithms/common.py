"""Pure helpers shared by methods: losses, gradients, local SGD, parameter arithmetic."""
from __future__ import annotations

import math
import weakref
from typing import Callable, Generator, Iterator, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath, shared_start
from .base import Params, Payload, ProtocolError

T = TypeVar("T")


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


def _one_or_stacked(plan: fastpath.Plan | None, starts: list[Params], xs: list[torch.Tensor],
                    one: Callable[[int], T], stacked: Callable[[list[int]], list[T]], out: list,
                    among: list[int]) -> None:
    """Fill ``out[i]`` for each client ``i`` of ``among``: ``one(i)``, or its share of
    ``stacked(group)`` for groups of clients that may train as one stack
    (:func:`algorithms.fastpath.stackable`: a small dense model, the plan's parameters
    exactly) and hold as many rows of data, cut to cache-sized chunks
    (:func:`algorithms.fastpath.stack_chunk`). A group of one takes ``one``."""
    by_rows: dict[int, list[int]] = {}
    for i in among:
        start, rows = starts[i], xs[i].shape[0]
        if rows > 0 and fastpath.stackable(plan, start) and set(start) == set(fastpath.names(plan)):
            by_rows.setdefault(rows, []).append(i)
        else:
            out[i] = one(i)
    for members in by_rows.values():
        chunk = fastpath.stack_chunk(plan, starts[members[0]])
        for c in range(0, len(members), chunk):
            group = members[c:c + chunk]
            for i, result in zip(group, [one(group[0])] if len(group) == 1 else stacked(group)):
                out[i] = result


def _from_shared_starts(plan: fastpath.Plan | None, starts: list[Params], xs: list[torch.Tensor], out: list,
                        pays: Callable[[Params, int, int], bool], chunk: Callable[[Params, int], int],
                        together: Callable[[Params, list[int]], list[T]]) -> list[int]:
    """Fill ``out[i]`` for the clients of a dense model that start from equal weights (the
    same tensors, as after one broadcast, or equal values) with as many rows of data, where
    ``pays(start, rows, clients)``: ``together(start, members)`` per chunk of ``chunk(start,
    rows)`` of them. Returns the other clients' indices."""
    if not isinstance(plan, fastpath.DensePlan):
        return list(range(len(starts)))
    wanted = set(fastpath.names(plan))
    groups: list[list[int]] = []
    rest: list[int] = []
    for i, (start, x) in enumerate(zip(starts, xs)):
        rows = x.shape[0]
        if set(start) != wanted or rows == 0:
            rest.append(i)
            continue
        for group in groups:
            if xs[group[0]].shape[0] == rows and _equal_params(starts[group[0]], start):
                group.append(i)
                break
        else:
            groups.append([i])
    for group in groups:
        start, rows = starts[group[0]], xs[group[0]].shape[0]
        if not pays(start, rows, len(group)):
            rest.extend(group)
            continue
        size = chunk(start, rows)
        for c in range(0, len(group), size):
            members = group[c:c + size]
            for i, result in zip(members, together(start, members)):
                out[i] = result
    return sorted(rest)


def _equal_params(a: Params, b: Params) -> bool:
    for k, u in a.items():
        v = b[k]
        if u is v or (u.data_ptr() == v.data_ptr() and u.shape == v.shape and u.stride() == v.stride()
                      and u.dtype == v.dtype):
            continue
        if u.shape != v.shape or u.dtype != v.dtype or not torch.equal(u, v):
            return False
    return True


def local_sgd_many(model: nn.Module, starts: list[Params], xs: list[torch.Tensor], ys: list[torch.Tensor],
                   generators: list[torch.Generator], *, lr: float, epochs: int, batch_size: int,
                   change: bool = False) -> list[tuple[Params, int]]:
    """:func:`local_sgd` for many clients (``starts[i]`` on ``xs[i], ys[i]``), in order. Clients
    of a dense model that start from the same weights with as many samples train together with
    their first layer in kernel form (:mod:`algorithms.shared_start`, where it pays); others
    holding as many samples train stacked where the model is small enough
    (:func:`algorithms.fastpath.sgd_stacked`); the rest one at a time. With ``change`` each
    result is the trained parameters minus ``starts[i]`` (FedAvg's delta)."""
    plan = fastpath.plan(model)
    out: list = [None] * len(starts)

    def result(i: int, trained: Params, subtract: bool) -> tuple[Params, int]:
        trained = {k: trained[k] for k in starts[i]}
        if subtract:  # in place: the trained tensors are this call's own
            torch._foreach_sub_(list(trained.values()), [starts[i][k] for k in trained])
        return trained, epochs * xs[i].shape[0]

    def together(start: Params, group: list[int]) -> list[tuple[Params, int]]:
        trained = shared_start.sgd(plan, start, [xs[i] for i in group], [ys[i] for i in group],
                                   [generators[i] for i in group], epochs=epochs, batch_size=batch_size, lr=lr,
                                   change=change)
        return [result(i, p, False) for i, p in zip(group, trained)]

    def one(i: int) -> tuple[Params, int]:
        trained, _ = local_sgd(model, starts[i], xs[i], ys[i], lr=lr, epochs=epochs, batch_size=batch_size,
                               generator=generators[i])
        return result(i, trained, change)

    def stacked(group: list[int]) -> list[tuple[Params, int]]:
        trained = fastpath.sgd_stacked(plan, [starts[i] for i in group], [xs[i] for i in group],
                                       [ys[i] for i in group], [generators[i] for i in group],
                                       epochs=epochs, batch_size=batch_size, lr=lr)
        return [result(i, p, change) for i, p in zip(group, trained)]

    rest = _from_shared_starts(plan, starts, xs, out,
                               lambda start, rows, clients: shared_start.pays(plan, start, rows, epochs, clients),
                               lambda start, rows: shared_start.chunk(plan, start, rows), together)
    _one_or_stacked(plan, starts, xs, one, stacked, out, rest)
    return out


def loss_and_grad_many(model: nn.Module, starts: list[Params], xs: list[torch.Tensor],
                       ys: list[torch.Tensor]) -> list[Params]:
    """The gradients of :func:`loss_and_grad` for many clients, in order. Clients of a dense
    model that hold the same weights and as many rows in ``xs[i]`` share one forward and
    backward pass where their stacked copies would leave the cache
    (:func:`algorithms.shared_start.grads`); others are stacked where the model is small
    enough (:func:`algorithms.fastpath.grads_stacked`); the rest one at a time."""
    plan = fastpath.plan(model)
    out: list = [None] * len(starts)

    def in_callers_order(group: list[int], grads: list[Params]) -> list[Params]:
        return [{k: g[k] for k in starts[i]} for i, g in zip(group, grads)]

    def together(start: Params, group: list[int]) -> list[Params]:
        return in_callers_order(group, shared_start.grads(plan, start, [xs[i] for i in group], [ys[i] for i in group]))

    def stacked(group: list[int]) -> list[Params]:
        return in_callers_order(group, fastpath.grads_stacked(plan, [starts[i] for i in group], [xs[i] for i in group],
                                                              [ys[i] for i in group]))

    rest = _from_shared_starts(plan, starts, xs, out,
                               lambda start, rows, clients: shared_start.grads_pay(plan, start, clients),
                               lambda start, rows: shared_start.grads_chunk(plan, start), together)
    _one_or_stacked(plan, starts, xs, lambda i: loss_and_grad(model, starts[i], xs[i], ys[i])[1], stacked, out, rest)
    return out


GradientSteps = Generator[tuple[Params, torch.Tensor, torch.Tensor], Params, "Payload | None"]
"""A client handler that needs one gradient, written as a generator: it checks its request,
yields ``(params, x, y)``, is sent the gradient of the cross-entropy at ``params`` on those
samples (:func:`loss_and_grad`), and returns its reply. A method's plain handler is
``one_gradient(self._steps, ctx, payload)`` and its batch handler
``many_gradients(self._steps, ctxs, payloads)`` (the gradients stacked): one code path."""


def minibatch_gradient(params: Params, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                       generator: torch.Generator, l2: float = 0.0):
    """Inside a :data:`GradientSteps` handler: ``grads, seen = yield from minibatch_gradient(...)``.

    The gradient at ``params`` on a minibatch of ``batch_size`` samples drawn from
    ``generator`` (0, or at least the data: all of it), and the number of samples used.
    ``l2`` > 0 adds the gradient ``l2 * w`` of the penalty (l2 / 2) ||w||^2 on every tensor
    (the LAQ authors' ``cl * tf.nn.l2_loss``)."""
    if batch_size and batch_size < x.shape[0]:
        idx = sample_batch(x.shape[0], batch_size, generator)
        x, y = x[idx], y[idx]
    grads = yield params, x, y
    if l2:
        grads = {k: g.add(params[k], alpha=l2) for k, g in grads.items()}
    return grads, x.shape[0]


def _send_gradient(steps: GradientSteps, grads: Params):
    try:
        steps.send(grads)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a gradient handler asked for a second gradient")


def one_gradient(handler: Callable[..., GradientSteps], ctx, payload: Payload):
    """A plain client handler from a :data:`GradientSteps` one: ``handler(ctx, payload)``
    run to its reply, its gradient taken on ``ctx.model``."""
    steps = handler(ctx, payload)
    try:
        params, x, y = next(steps)
    except StopIteration as done:  # answered without a gradient (a stale request, a skip)
        return done.value
    return _send_gradient(steps, loss_and_grad(ctx.model, params, x, y)[1])


def many_gradients(handler: Callable[..., GradientSteps], ctxs, payloads) -> list:
    """A batch handler from a :data:`GradientSteps` one: every client's request first, then
    their gradients in one :func:`loss_and_grad_many`, then every reply. Returns, in order,
    each reply or the :class:`ProtocolError` its handler raised (a batch handler's contract).
    Each client draws from its own generator and state, so interleaving them changes nothing."""
    out: list = [None] * len(ctxs)
    asks: list[tuple[int, GradientSteps, tuple[Params, torch.Tensor, torch.Tensor]]] = []
    for i, (ctx, payload) in enumerate(zip(ctxs, payloads)):
        try:
            steps = handler(ctx, payload)
            asks.append((i, steps, next(steps)))
        except StopIteration as done:
            out[i] = done.value
        except ProtocolError as exc:
            out[i] = exc
    if not asks:
        return out
    grads = loss_and_grad_many(ctxs[0].model, [a[0] for *_, a in asks], [a[1] for *_, a in asks],
                               [a[2] for *_, a in asks])
    for (i, steps, _), g in zip(asks, grads):
        try:
            out[i] = _send_gradient(steps, g)
        except ProtocolError as exc:
            out[i] = exc
    return out


def check_models(payloads, reference: Params, who: str) -> tuple[list, list[int]]:
    """A batch handler's model check: :func:`check_like` (``finite=False``) on each payload.
    Returns the replies so far (the :class:`ProtocolError` of each refused payload, else
    ``None``) and the indices of the payloads that passed."""
    out: list = [None] * len(payloads)
    ok = []
    for i, payload in enumerate(payloads):
        try:
            check_like(payload, reference, who, finite=False)
            ok.append(i)
        except ProtocolError as exc:
            out[i] = exc
    return out, ok


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sum in the given (client-id) order so the result does not depend on arrival order."""
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w / total)
    return out


_NUMPY_FLOATS = (torch.float32, torch.float64)


def _finite(t: torch.Tensor) -> bool:
    if t.dtype in _NUMPY_FLOATS:
        # Fast path, numpy being cheaper than torch's dispatch on the small tensors of FL:
        # the sum of squares is NaN or Inf when any entry is (the terms are >= 0, so nothing
        # cancels); only if the squares overflow does the exact test have to decide.
        try:
            flat = t.numpy().reshape(-1)
        except (RuntimeError, TypeError):  # needs grad, or not on the CPU
            return bool(torch.isfinite(t).all())
        return math.isfinite(flat.dot(flat)) or bool(np.isfinite(flat).all())
    if not t.is_floating_point():
        return True
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
PROBE_SEED = 0x9B0E
"""Seed of the fixed Gaussian probes that estimate how much of a matrix a sketch misses."""
PROBES = 8
"""Probe vectors of the residual estimate (:func:`_range_svd`), at least: :func:`_probes` rounds
the sketch and the probes up to a multiple of 16 columns, which MKL's float32 product takes
faster than a ragged width (200 x 784 times 784 x 80: ~0.38 ms here, times 784 x 73: ~0.43)."""


def _probes(width: int) -> int:
    return PROBES + (-(width + PROBES)) % 16
_FIXED: dict[tuple, torch.Tensor | np.ndarray] = {}
_CAPTURED = 1e-4
"""A sketch holds a matrix's range when the residual ||A - Q Q^T A||_F is at most this fraction
of ||A||_F (float32 rounding of an exactly captured range stays near 1e-6)."""
_RANK_TOL = 1e-5
"""Numerical rank of a float32 sketch Y: columns within this fraction of Y's largest column
norm of the span of the others add nothing. A minibatch gradient's sketch has its true
singular values above ~2e-3 of the largest and float32 rounding near 1e-7 (measured on the
784-200-10 MLP, batches 8-60): the threshold sits in that gap."""
_NULL = 1e-6
"""Singular values below this fraction of the largest are float32 rounding: their triplets are
returned as zeros (see :func:`_range_svd`)."""


def align_svd(u, s, vh, u_prev, vh_prev, inplace: bool = False):
    """Flip each pair (u_j, v_j) whose direction disagrees with the previous round's
    (``inplace``: in ``u`` and ``vh`` themselves, which the caller owns)."""
    agree = (u * u_prev).sum(0) + (vh * vh_prev).sum(1)
    sign = torch.where(agree < 0, -1.0, 1.0)
    if inplace:
        return u.mul_(sign), s, vh.mul_(sign[:, None])
    return u * sign, s, vh * sign[:, None]


def _fixed_gaussian(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    key = (rows, cols, seed, dtype)
    t = _FIXED.get(key)
    if t is None:
        t = _FIXED[key] = torch.randn(rows, cols, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return t


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


def _upper_ones(r: int) -> np.ndarray:
    key = ("upper", r)
    mask = _FIXED.get(key)
    if mask is None:
        mask = _FIXED[key] = np.triu(np.ones((r, r)))
    return mask


def _range_svd(a: torch.Tensor, sketch: torch.Tensor, width: int, k: int, align_to=None):
    """Rank-k (U, S, V^T) of a float32 ``a`` whose range a sketch holds, else None.

    ``sketch`` is [Omega | P]: ``width`` sketch columns, then fixed Gaussian probes
    (:func:`_probes`); one product A [Omega | P] serves both. Steps, all on matrices of the sketch's
    size (float64 where squaring a condition number would cost float32 precision):

    1. the numerical rank r of Y = A Omega, and an orthonormal basis Q of its span: pivoted
       Cholesky of Y^T Y (LAPACK ``dpstrf``; it stops when every remaining column of Y lies
       within :data:`_RANK_TOL` of the span of the chosen ones), then Q = Y_S R^-1 (Cholesky
       QR in float64 of the r chosen columns). r = width means A's rank may exceed the
       sketch: None;
    2. whether Q holds A's range: ||(I - Q Q^T) A P||_F <= :data:`_CAPTURED` ||A P||_F
       (E ||M p||^2 = ||M||_F^2 for a Gaussian p, so both sides estimate the Frobenius
       norms of the residual and of A with the same probes; both come from the Gram of
       [Y | A P], without another product with A), else None;
    3. B = Q^T A (r x n) and the eigendecomposition B B^T = W S^2 W^T in float64:
       U = Q W, V^T = S^-1 W^T B, exact up to rounding for the components above :data:`_NULL`;
    4. when fewer than k components remain (A's rank is below k, e.g. a batch-32 gradient
       and k = 60), the missing triplets are zeros: U diag(S) V^T is still A's best rank-k
       approximation. A full SVD would fill them with singular vectors of zero singular
       values, an arbitrary orthonormal basis of A's null space that float32 rounding picks
       anew each call. Zeros cost nothing to compute and, for QRR, to quantize: their
       innovation is nil round after round, where arbitrary unit vectors change every round,
       and the quantization error of their zero singular values no longer multiplies unit
       vectors in the rebuilt gradient (measured on the 784-200-10 MLP, batch 32, p = 0.3,
       b = 8: the mirrored gradient's relative error 3.8% with zeros vs 3.9% with an
       orthonormal completion, exact SVD; 3.7% vs 4.0% randomised).
    """
    from scipy.linalg import lapack  # only here: scipy.linalg costs ~0.1 s to import

    # Small matrices go through numpy and LAPACK directly: a torch call costs several
    # microseconds of dispatch, more than the arithmetic on a 32 x 32 matrix.
    m, n = a.shape
    yp = a @ sketch
    ypd = yp.double()
    gram = (ypd.T @ ypd).numpy()  # [Y | A P]^T [Y | A P], exact sums of float32 products
    top = float(gram.diagonal()[:width].max())
    if not top > 0:  # A Omega = 0: A is zero (or Omega missed all of it: let the full SVD see)
        return (a.new_zeros(m, k), a.new_zeros(k), a.new_zeros(k, n)) if not bool(a.any()) else None
    c, piv, rank, info = lapack.dpstrf(gram[:width, :width], lower=0, tol=_RANK_TOL ** 2 * top)
    if info < 0 or rank >= width:
        return None
    r_inv, info = lapack.dtrtri(c[:rank, :rank], lower=0)  # reads (and writes) the upper triangle only
    if info != 0:
        return None
    r_inv *= _upper_ones(rank)  # what is left below the diagonal is pstrf's input, not R^-1
    chosen = piv[:rank].astype(np.int64) - 1
    # ||(I - Q Q^T) A P||_F^2 = ||A P||_F^2 - ||Q^T A P||_F^2 with Q^T A P = R^-T Y_S^T A P: all
    # from the Gram in float64, whose rounding (~1e-16) is far below the threshold (1e-8 squared)
    seen = r_inv.T @ gram[chosen, width:]
    total = float(np.trace(gram[width:, width:]))
    if total - float((seen * seen).sum()) > _CAPTURED ** 2 * total:
        return None
    qf = (ypd.index_select(1, torch.from_numpy(chosen)) @ torch.from_numpy(r_inv)).to(a.dtype)
    b = qf.T @ a
    bd = b.double()
    lam, w, info = lapack.dsyevd((bd @ bd.T).numpy())
    if info != 0:
        return None
    s = np.sqrt(np.maximum(lam[::-1], 0.0))
    keep = min(k, int((s > _NULL * s[0]).sum()))
    # W and S^-1 W^T padded with zeros to k: the products below give the zero triplets as is.
    # V^T = S^-1 W^T B in float32: B's own float32 rounding (~1e-7 ||A||) already bounds how
    # well a small singular value's vector is known, a float64 product would not add to it.
    w_k = np.zeros((rank, k), dtype=np.float32)
    w_k[:, :keep] = w[:, ::-1][:, :keep]
    s_k = np.zeros(k, dtype=np.float32)
    s_k[:keep] = s[:keep]
    scaled = np.zeros((k, rank), dtype=np.float32)
    scaled[:keep] = w[:, ::-1][:, :keep].T / s[:keep, None]
    if align_to is not None:
        # align_svd's test, u_j . u_prev_j + v_j . v_prev_j < 0, on the small factors of
        # U = Q W_k and V^T = S^-1 W_k^T B, and the flips made there, before the products
        u_prev, vh_prev = align_to
        agree = (w_k * (qf.T @ u_prev).numpy()).sum(0) + (scaled.T * (b @ vh_prev.T).numpy()).sum(0)
        flip = agree < 0
        w_k[:, flip] *= -1
        scaled[flip] *= -1
    return qf @ torch.from_numpy(w_k), torch.from_numpy(s_k), torch.from_numpy(scaled) @ b


def _gram_svd(a: torch.Tensor, k: int, align_to=None):
    """Rank-k (U, S, V^T) of a small float32 matrix from the eigendecomposition of its Gram
    matrix on the smaller side, in float64 (G = A A^T = W S^2 W^T, U = W, V^T = S^-1 W^T A for
    a wide A; the transpose for a tall one): a 10 x 10 eigenproblem for a 10 x 200 gradient,
    where LAPACK's SVD and its torch wrapper cost several times more. Float64 keeps the
    squared condition number harmless down to singular values of 1e-6 of the largest, below
    which (:data:`_NULL`) the triplets are zeros, as on the sketch's path."""
    from scipy.linalg import lapack

    x = a.numpy().astype(np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    lam, w, info = lapack.dsyevd(x @ x.T)
    if info != 0:
        return None
    s = np.sqrt(np.maximum(lam[::-1], 0.0))
    keep = min(k, int((s > _NULL * s[0]).sum())) if s.size and s[0] > 0 else 0
    left = np.zeros((x.shape[0], k))
    left[:, :keep] = w[:, ::-1][:, :keep]
    right = np.zeros((k, x.shape[1]))
    right[:keep] = (left[:, :keep].T @ x) / s[:keep, None]
    if tall:
        left, right = right.T, left.T
    if align_to is not None:
        u_prev, vh_prev = (t.numpy() for t in align_to)
        flip = ((left * u_prev).sum(0) + (right * vh_prev).sum(1)) < 0
        left[:, flip] *= -1
        right[flip] *= -1
    s_k = np.zeros(k, dtype=np.float32)
    s_k[:keep] = s[:keep]
    return (torch.from_numpy(left.astype(np.float32)), torch.from_numpy(s_k),
            torch.from_numpy(right.astype(np.float32)))


def _cpu32(a: torch.Tensor) -> bool:
    return a.dtype == torch.float32 and a.device.type == "cpu" and not a.requires_grad


def _fast_path(a: torch.Tensor, width: int) -> bool:
    """:func:`_range_svd` serves float32 matrices on the CPU whose smaller side is at least twice
    the sketch (the 784-200-10 MLP's first layer). A smaller float32 one (a 10 x 200 head, k = 3:
    a sketch of 8 against rank 9, since a softmax layer's gradient rows sum to zero) goes to
    :func:`_gram_svd` at once; other dtypes and devices keep the QR-based sketch
    (:func:`_sketch_range`, :func:`_svd_from_range`)."""
    return _cpu32(a) and 2 * width <= min(a.shape)


_SMALL = 64
"""Float32 matrices whose smaller side is at most this (and too small for the sketch) take
:func:`_gram_svd`; larger ones that the sketch does not capture take ``torch.linalg.svd``."""


def exact_truncated_svd(a: torch.Tensor, k: int, oversample: int = 5,
                        align_to: tuple[torch.Tensor, torch.Tensor] | None = None,
                        rank_bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-k factors (U, S, V^T) of ``a`` (Eckart-Young), cheaply when ``a`` has low rank.

    A minibatch gradient of a linear layer has rank at most the batch size (32 against 200 for
    the 784-200-10 MLP's first layer), so a sketch A Omega with k + ``oversample`` columns of a
    fixed Gaussian Omega already spans A's whole range; the SVD then comes from matrices of the
    sketch's size (:func:`_range_svd`: about two products of A with a thin matrix). Whether the
    range was captured is checked; when it was not (A's rank exceeds the sketch: e.g. a batch
    of 500), ``torch.linalg.svd`` decides. Float32 matrices too small for the sketch to pay
    (:func:`_fast_path`; smaller side at most :data:`_SMALL`) take :func:`_gram_svd`; float64 or
    non-CPU matrices take a QR-based sketch (a QR of the sketch, the residual A - Q Q^T A, a QR
    and an SVD of the small factor), then ``torch.linalg.svd``.
    Singular vectors are defined up to sign (and within repeated singular values), as with any
    SVD. On the sketch's path, triplets beyond A's numerical rank are zeros (U diag(S) V^T is
    unchanged; see :func:`_range_svd`); the full SVD's are singular vectors of zero singular
    values. ``align_to`` = (U_prev, V^T_prev): flip each pair (u_j, v_j) as :func:`align_svd`
    does (on the sketch's path, on its small factors before the products that form U and V^T).
    ``rank_bound``: what the caller knows of A's rank (a linear layer's gradient from b samples:
    at most b). Below k it narrows the first sketch to rank_bound + ``oversample`` columns
    (QRR's 784-200-10 gradient at batch 32: 48 columns with the probes instead of 80, ~0.25 ms
    less); the capture check still decides, and a bound that was wrong costs one more sketch."""
    m, n = a.shape
    width = min(k + oversample, m, n)
    if width < min(m, n):
        if _fast_path(a, width):
            narrow = width if rank_bound is None else min(width, rank_bound + oversample)
            for w in dict.fromkeys((narrow, width)):  # the narrow sketch first, once each
                out = _range_svd(a, _sketch(n, w), w, k, align_to)
                if out is not None:
                    return out
        elif not _cpu32(a):
            q, b, captured = _sketch_range(a, _fixed_gaussian(n, width, SKETCH_SEED, a.dtype).to(a.device))
            if captured:
                return _aligned(_svd_from_range(q, b, k), align_to)
    if _cpu32(a) and min(m, n) <= _SMALL and not _fast_path(a, width):
        out = _gram_svd(a, k, align_to)
        if out is not None:
            return out
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return _aligned((u[:, :k], s[:k], vh[:k]), align_to)


def _sketch(n: int, width: int) -> torch.Tensor:
    """[Omega | P] of :func:`_range_svd` for a matrix of ``n`` columns (fixed, cached)."""
    sketch = _FIXED.get(("sketch", n, width))
    if sketch is None:
        sketch = _FIXED[("sketch", n, width)] = torch.cat(
            [_fixed_gaussian(n, width, SKETCH_SEED), _fixed_gaussian(n, _probes(width), PROBE_SEED)], dim=1)
    return sketch


def _aligned(factors, align_to):
    """``factors`` (this module's own tensors) with :func:`align_svd` applied in place."""
    return factors if align_to is None else align_svd(*factors, *align_to, inplace=True)


def randomized_svd(a: torch.Tensor, k: int, generator: torch.Generator, oversample: int = 5,
                   power_iters: int = 2,
                   align_to: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-k (U, S, V^T) of ``a`` from a seeded randomised range finder (Halko et al. 2011).

    The power iterations sharpen a sketch that misses part of A's range; when the first
    sketch already holds all of it (A's rank below k + ``oversample``, the usual case for a
    minibatch gradient) they cannot improve anything and are skipped, and the SVD comes from
    the sketch as in :func:`exact_truncated_svd`. The draws from ``generator`` are the same
    either way. ``align_to``: as in :func:`exact_truncated_svd`.
    """
    m, n = a.shape
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=a.dtype)
    if width < min(m, n) and _fast_path(a, width):
        out = _range_svd(a, torch.cat([omega, _fixed_gaussian(n, _probes(width), PROBE_SEED)], dim=1), width, k,
                         align_to)
        if out is not None:
            return out
    q, b, captured = _sketch_range(a, omega)
    if not captured:
        for _ in range(power_iters):
            q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
        b = q.T @ a
    return _aligned(_svd_from_range(q, b, k), align_to)
