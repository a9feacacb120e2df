"""Local SGD of many clients from one shared start, the first layer in kernel form.

In a FedAvg round every client starts from the same broadcast weights ``W0`` and takes a few
SGD steps on its own data. Stacking the clients' copies of a large first layer (the 784x200
one of the usual benchmark: 628 KB a client) leaves the cache, and every step then reads and
writes every copy. But the first layer's input is the data itself, so after steps on
minibatches ``X_1 .. X_{t-1}`` a client's first layer is

    W_t = W0 + sum_s D_s^T X_s,      D_s = -lr * (d loss / d the layer's output) on batch s,

and its output on the next minibatch needs no copy of the weights at all:

    X_t W_t^T = X_t W0^T + sum_s (X_t X_s^T) D_s.

``X W0^T`` is one large product over every client's samples at once (the weights are
shared), the correction is a product with the small Gram blocks ``X_t X_s^T`` (batch x rows
seen), and each client's trained layer is formed once, at the end, as
``W0 + D^T X`` (one batched product over its whole epoch). The other layers are small and
train stacked as in :func:`algorithms.fastpath.sgd_stacked`, as do the first layer's biases.

The arithmetic is what the plain steps do (a forward and a weight gradient per sample) plus
the correction, which grows with the rows a client has seen; :func:`pays` keeps this form to
clients whose epochs hold few enough rows that the correction costs at most the forward
pass, and whose copies of the first layer would not stay in the cache anyway. The minibatches, their order and the generators they are drawn from are those of
:func:`algorithms.fastpath.sgd_stacked`; results agree with one client at a time to float
rounding (sums are taken in another order).
"""
from __future__ import annotations

import torch

from .fastpath import (STACK_MAX_FLOATS, DensePlan, Params, _dense_forward, _relu_backward, _stacked_step, names,
                       per_client)


def pays(plan: DensePlan, start: Params, rows: int, epochs: int, clients: int) -> bool:
    """True when the kernel form suits ``clients`` clients with ``rows`` samples each training
    ``epochs`` epochs from ``start``: their stacked first layers would not stay in the cache
    (more than :data:`algorithms.fastpath.STACK_MAX_FLOATS` floats, else plain stacking
    costs no more), and the Gram correction of a sample (``epochs * rows / 2`` earlier samples
    on average, each ``inputs + outputs`` multiply-adds) costs no more than its forward pass
    through the first layer (``inputs * outputs``)."""
    outputs, inputs = start[plan.layers[0][0]].shape
    return (rows > 0 and clients * inputs * outputs > STACK_MAX_FLOATS
            and epochs * rows * (inputs + outputs) <= 2 * inputs * outputs)


CHUNK_MAX_FLOATS = 2_621_440
"""At most this many floats of samples in one chunk of clients trained together (10 MiB, a
third of this CPU's 32 MB L3 cache: the samples, their products with ``W0``, the Gram blocks
and the changes being formed share it). Measured here (``bench/vectorised.py``'s 784-200-10
workload, 100 clients, one thread, steady round, chunks alternated in one process, medians
of 7): chunks of 34 clients took 0.256 s and 0.269 s against 0.278 s and 0.287 s for chunks
of 8 (their samples within the L2-sized ``STACK_MAX_FLOATS``), 0.268 s for 20 or 50, 0.288 s
for all 100 (31 MB of samples)."""


def chunk(plan: DensePlan, start: Params, rows: int) -> int:
    """How many clients with ``rows`` samples to train at once: as many as keep their samples
    (read again by every step's Gram block) within :data:`CHUNK_MAX_FLOATS`."""
    inputs = start[plan.layers[0][0]].shape[1]
    return max(2, CHUNK_MAX_FLOATS // max(1, rows * inputs))


class _FirstLayer:
    """Every client's first layer as ``W0 + sum_s D_s^T X_s``, for :func:`_stacked_step`.

    Per epoch it holds the clients' samples in the epoch's order (``[clients, rows,
    inputs]``), their products with ``W0`` and the ``D`` rows filled in so far; the batch in
    progress is ``rows lo:hi`` of that epoch."""

    def __init__(self, bias: torch.Tensor, lr: float) -> None:
        self.bias = bias  # [clients, outputs], stepped in place like any stacked bias
        self.lr = lr
        self.past: list[tuple[torch.Tensor, torch.Tensor]] = []  # (samples, D) of finished epochs
        self.x = self.xw0 = self.d = None
        self.lo = self.hi = 0

    def begin_epoch(self, x: torch.Tensor, xw0: torch.Tensor) -> None:
        if self.x is not None:
            self.past.append((self.x, self.d))
        self.x, self.xw0 = x, xw0
        self.d = torch.empty_like(xw0)

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo, self.hi
        out = torch.add(self.xw0[:, lo:hi], self.bias.unsqueeze(1))
        for x, d in self.past:
            out.baddbmm_(torch.bmm(xt, x.transpose(1, 2)), d)
        if lo:
            out.baddbmm_(torch.bmm(xt, self.x[:, :lo].transpose(1, 2)), self.d[:, :lo])
        return out

    def update(self, g: torch.Tensor) -> None:
        torch.mul(g, -self.lr, out=self.d[:, self.lo:self.hi])
        self.bias.sub_(g.sum(1), alpha=self.lr)

    def change(self) -> torch.Tensor:
        """What each client's steps added to the shared weights, ``[clients, outputs, inputs]``."""
        self.past.append((self.x, self.d))
        (x, d), *later = self.past
        change = torch.bmm(d.transpose(1, 2), x)
        for x, d in later:
            change.baddbmm_(d.transpose(1, 2), x)
        return change


def sgd(plan: DensePlan, start: Params, xs: list[torch.Tensor], ys: list[torch.Tensor],
        generators: list[torch.Generator], *, epochs: int, batch_size: int, lr: float,
        change: bool = False) -> list[Params]:
    """:func:`algorithms.fastpath.sgd_stacked` for clients that all start from ``start`` (every
    ``xs[i]`` the same number of rows). Returns each client's trained parameters or, with
    ``change``, trained minus ``start`` (FedAvg's delta: the first layer's is then formed
    directly, never as a difference of two models). Views into stacked tensors."""
    clients, n = len(xs), xs[0].shape[0]
    w1, b1 = plan.layers[0]
    w0 = start[w1]
    first = _FirstLayer(start[b1].expand(clients, -1).clone(), lr)
    params = {k: start[k].expand(clients, *start[k].shape).clone() for k in names(plan)[2:]}
    offsets = (torch.arange(clients) * n).unsqueeze(1)
    with torch.no_grad():
        # minibatches(): one permutation per client and epoch, sliced in order. The first
        # epoch's samples are gathered once in their order; later epochs reorder those rows.
        perms = [torch.randperm(n, generator=g) for g in generators]
        first_order = torch.stack(perms)
        x = _gathered([xi.reshape(n, -1) for xi in xs], first_order, offsets)
        y = _gathered(ys, first_order, offsets)
        xw0 = (x.view(clients * n, -1) @ w0.t()).view(clients, n, -1)  # every client's samples, one product
        for epoch in range(epochs):
            if epoch == 0:
                xe, ye, xw0e = x, y, xw0
            else:
                # row r of a client's data sits at inverse[r] in the first epoch's order
                inverse = torch.empty_like(first_order).scatter_(1, first_order, torch.arange(n).expand(clients, n))
                rows = inverse.gather(1, torch.stack([torch.randperm(n, generator=g) for g in generators]))
                rows = rows.add_(offsets).reshape(-1)
                xe = x.view(clients * n, -1).index_select(0, rows).view(clients, n, -1)
                ye = y.view(-1).index_select(0, rows).view(clients, n)
                xw0e = xw0.view(clients * n, -1).index_select(0, rows).view(clients, n, -1)
            first.begin_epoch(xe, xw0e)
            for lo in range(0, n, batch_size):
                first.lo, first.hi = lo, min(n, lo + batch_size)
                _stacked_step(plan.layers, params, xe[:, lo:first.hi], ye[:, lo:first.hi], lr, first=first)
        params[b1] = first.bias
        if change:
            for k, v in params.items():
                v.sub_(start[k])
            params[w1] = first.change()
        else:
            params[w1] = first.change().add_(w0)
    return per_client(params, clients)


_GATHER_ONE_BY_ONE_FLOATS = 4096
"""Clients whose rows hold more floats are gathered one copy each (no extra pass over large
data); smaller ones are concatenated and gathered in one ``index_select`` (a call per client
cost more than the copy)."""


def _gathered(parts: list[torch.Tensor], order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[clients, rows, ...]``: client ``i``'s ``parts[i]`` with its rows in ``order[i]``."""
    clients, n = order.shape
    if parts[0].numel() > _GATHER_ONE_BY_ONE_FLOATS:
        out = torch.empty(clients, *parts[0].shape, dtype=parts[0].dtype)
        for i, (part, rows) in enumerate(zip(parts, order)):
            torch.index_select(part, 0, rows, out=out[i])
        return out
    return torch.cat(parts).index_select(0, (order + offsets).view(-1)).view(clients, *parts[0].shape)


def grads_pay(plan: DensePlan, start: Params, clients: int) -> bool:
    """True when :func:`grads` suits ``clients`` clients holding ``start``: their stacked
    copies would not stay in the cache (:data:`algorithms.fastpath.STACK_MAX_FLOATS`)."""
    return clients * _floats(plan, start) > STACK_MAX_FLOATS


def grads_chunk(plan: DensePlan, start: Params) -> int:
    """How many clients' gradients to form at once: their weight gradients (each the model's
    size) within :data:`CHUNK_MAX_FLOATS`."""
    return max(2, CHUNK_MAX_FLOATS // max(1, _floats(plan, start)))


def _floats(plan: DensePlan, start: Params) -> int:
    return sum(start[n].numel() for n in names(plan))


def grads(plan: DensePlan, start: Params, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[Params]:
    """:func:`algorithms.fastpath.grads_stacked` for clients that all hold ``start`` (every
    ``xs[i]`` the same number of rows): each client's gradient of the mean cross-entropy on
    its own samples. The forward pass and the backward pass to each layer's input run once
    over every client's samples through the one set of weights (plain matrix products, no
    stacked copies); only the weight gradients, each client's own, are batched products.
    Views into stacked tensors."""
    clients, rows = len(xs), xs[0].shape[0]
    with torch.no_grad():
        x = torch.cat([v.reshape(rows, -1) for v in xs])
        acts = _dense_forward(plan.layers, start, x)
        g = torch.softmax(acts.pop(), 1)
        g.scatter_add_(1, torch.cat(ys).unsqueeze(1), torch.full((g.shape[0], 1), -1.0, dtype=g.dtype))
        g.mul_(1.0 / rows)  # the mean over each client's own samples
        out: Params = {}
        for i in range(len(plan.layers) - 1, -1, -1):
            w, b = plan.layers[i]
            a = acts[i]
            g_of = g.view(clients, rows, -1)  # each client's rows
            out[w] = torch.bmm(g_of.transpose(1, 2), a.view(clients, rows, -1))
            out[b] = g_of.sum(1)
            if i > 0:
                g = _relu_backward(g @ start[w], a)
    return per_client({k: out[k] for k in names(plan)}, clients)
