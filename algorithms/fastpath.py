"""Lean client compute: hand-written forward and backward passes, no autograd.

A client step on a small model is dominated by per-operation overhead, not arithmetic: an
autograd step on the 784-200-10 MLP with a batch of 32 does ~20 MFLOP (~0.2 ms on one core
here) but records a graph, allocates gradients and dispatches ~40 operators. The plans below
do the same arithmetic with a dozen fused calls (``addmm``, in-place ReLU masks, one
softmax), and in local SGD fold the gradient into the update (``W.addmm_(g^T, a, alpha=-lr)``)
so no gradient tensor is allocated at all.

Covered models (``fedsim.models``), recognised by structure:

* **dense stacks**: ``Sequential(Flatten?, Linear, (ReLU, Linear)*)`` with biases: the
  ``logistic`` and ``mlp`` kinds;
* **conv stacks**: ``Sequential((Conv2d, ReLU, MaxPool2d(2))+, Flatten, Linear)``: the ``cnn``
  kind (convolution and pooling backward through the same ATen kernels autograd calls); off
  by default (:data:`CONV_ENABLED`: it does not win on this CPU).

Every other model returns ``None`` from :func:`plan` and the caller keeps the autograd path.
The loss is the mean cross-entropy, as ``F.cross_entropy``. Results agree with autograd to
float rounding (the order of a few sums differs), never in what is computed: the same
minibatches, the same samples, the same learning rate. ``set_enabled(model, False)`` (the
runtime's ``run.vectorise = false``) keeps the autograd path for that model.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

Params = dict[str, torch.Tensor]

ENABLED_BY_DEFAULT = True
"""Whether a model nobody configured takes the lean path (the runtime always sets it)."""
CONV_ENABLED = False
"""Whether conv stacks take the lean path. Off: measured here (bench/compress_cost.py, CNN
8-16 on 28x28, batch 32, one thread, busy machine) the lean conv step took 36.6 ms against
autograd's 29.8 ms (the convolutions dominate and both call the same kernels), so the cnn
kind keeps autograd; the plan is kept, and tested against autograd, for hardware where it wins."""


@dataclass(frozen=True)
class DensePlan:
    """Linear layers (weight name, bias name), ReLU between consecutive ones."""

    layers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ConvPlan:
    """Conv blocks (weight, bias, padding), each Conv2d + ReLU + MaxPool2d(2); then a Linear head."""

    convs: tuple[tuple[str, str, tuple[int, int]], ...]
    head: tuple[str, str]


Plan = DensePlan | ConvPlan

_PLANS: weakref.WeakKeyDictionary[nn.Module, Plan | None] = weakref.WeakKeyDictionary()
_ENABLED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Choose the lean path (True) or autograd (False) for every client step on ``model``."""
    _ENABLED[model] = bool(enabled)


def enabled(model: nn.Module) -> bool:
    return _ENABLED.get(model, ENABLED_BY_DEFAULT)


def plan(model: nn.Module) -> Plan | None:
    """The lean plan of ``model``, or ``None`` (disabled, or a structure not covered)."""
    if not _ENABLED.get(model, ENABLED_BY_DEFAULT):
        return None
    try:
        return _PLANS[model]
    except KeyError:
        found = _PLANS[model] = _recognise(model)
        return found


def _recognise(model: nn.Module) -> Plan | None:
    if not isinstance(model, nn.Sequential) or any(p.dtype != torch.float32 for p in model.parameters()):
        return None
    mods = list(model.named_children())
    if any(isinstance(m, nn.Conv2d) for _, m in mods):
        return _recognise_conv(mods) if CONV_ENABLED else None
    if mods and isinstance(mods[0][1], nn.Flatten):
        if (mods[0][1].start_dim, mods[0][1].end_dim) != (1, -1):
            return None
        mods = mods[1:]
    layers = []
    for i, (name, m) in enumerate(mods):
        want_linear = i % 2 == 0
        if want_linear:
            if type(m) is not nn.Linear or m.bias is None:
                return None
            layers.append((f"{name}.weight", f"{name}.bias"))
        elif type(m) is not nn.ReLU:
            return None
    if not layers or len(mods) % 2 == 0:  # must end on a Linear
        return None
    return DensePlan(tuple(layers))


def _recognise_conv(mods) -> ConvPlan | None:
    convs = []
    i = 0
    while i + 2 < len(mods) and type(mods[i][1]) is nn.Conv2d:
        (name, conv), (_, relu), (_, pool) = mods[i:i + 3]
        if (type(relu) is not nn.ReLU or type(pool) is not nn.MaxPool2d or conv.bias is None
                or conv.groups != 1 or conv.stride != (1, 1) or conv.dilation != (1, 1)
                or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros"
                or pool.kernel_size not in (2, (2, 2)) or pool.stride not in (2, (2, 2))
                or pool.padding not in (0, (0, 0)) or pool.dilation not in (1, (1, 1)) or pool.ceil_mode):
            return None
        convs.append((f"{name}.weight", f"{name}.bias", tuple(conv.padding)))
        i += 3
    rest = mods[i:]
    if (not convs or len(rest) != 2 or type(rest[0][1]) is not nn.Flatten
            or (rest[0][1].start_dim, rest[0][1].end_dim) != (1, -1)
            or type(rest[1][1]) is not nn.Linear or rest[1][1].bias is None):
        return None
    name = rest[1][0]
    return ConvPlan(tuple(convs), (f"{name}.weight", f"{name}.bias"))


def names(plan: Plan) -> list[str]:
    """Every parameter name the plan reads."""
    if isinstance(plan, DensePlan):
        return [n for layer in plan.layers for n in layer]
    return [n for w, b, _ in plan.convs for n in (w, b)] + list(plan.head)


def covers(plan: Plan, params: Params) -> bool:
    """True when ``params`` holds every tensor the plan reads (else the caller uses autograd)."""
    return all(n in params for n in names(plan))


# --------------------------------------------------------------------------- cross-entropy

def _logits_grad(logits: torch.Tensor, y: torch.Tensor, want_loss: bool) -> tuple[float, torch.Tensor]:
    """(mean cross-entropy or nan, d loss / d logits) with the mean over the batch."""
    b = logits.shape[0]
    col = y.unsqueeze(1)
    if want_loss:
        logp = torch.log_softmax(logits, 1)
        loss = -float(logp.gather(1, col).sum()) / b
        p = logp.exp_()
    else:
        loss = float("nan")
        p = torch.softmax(logits, 1)
    p.scatter_add_(1, col, _minus_ones(b, p.dtype, p.device))
    return loss, p.mul_(1.0 / b)


_ONES: dict[tuple, torch.Tensor] = {}


def _minus_ones(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (b, dtype, device)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.full((b, 1), -1.0, dtype=dtype, device=device)
    return t


# --------------------------------------------------------------------------- dense stacks

def _dense_forward(layers, params: Params, h: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of every layer (post-ReLU), then the logits."""
    acts = [h]
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        h = torch.addmm(params[b], h, params[w].t())
        if i < last:
            h.clamp_min_(0.0)
        acts.append(h)
    return acts


def _dense_backward(layers, params: Params, acts: list[torch.Tensor], g: torch.Tensor, lr: float | None,
                    grads: Params | None) -> torch.Tensor:
    """Back through the dense layers from d loss / d logits ``g``. With ``lr`` the weights are
    stepped in place (the gradient folded into the update); otherwise gradients land in
    ``grads``. Returns d loss / d input of the first layer only when ``grads`` asks for it
    under the key ``"input"`` (the conv stack needs it)."""
    for i in range(len(layers) - 1, -1, -1):
        w, b = layers[i]
        a = acts[i]
        need_input = i > 0 or (grads is not None and "input" in grads)
        g_in = g @ params[w] if need_input else None  # with the weights before this step
        if lr is None:
            grads[w] = g.t() @ a
            grads[b] = g.sum(0)
        else:
            params[w].addmm_(g.t(), a, alpha=-lr)
            params[b].add_(g.sum(0), alpha=-lr)
        if i > 0:
            g = _relu_backward(g_in, a)
        elif g_in is not None:
            grads["input"] = g_in
    return g


def _relu_backward(grad: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """ReLU's derivative applied to ``grad``: 0 where ``output`` is 0. The kernel autograd
    itself uses for ReLU (bit-identical), ~10x faster here than ``masked_fill_`` with a
    boolean mask (14 us against 149 us on a [4, 32, 200] stack)."""
    return _THRESHOLD_BACKWARD(grad, output, 0)


_THRESHOLD_BACKWARD = torch.ops.aten.threshold_backward


# --------------------------------------------------------------------------- conv stacks

def _conv_forward(plan: ConvPlan, params: Params, x: torch.Tensor):
    saved = []
    h = x
    for w, b, pad in plan.convs:
        z = torch.conv2d(h, params[w], params[b], 1, pad)
        z.clamp_min_(0.0)
        pooled, idx = torch.ops.aten.max_pool2d_with_indices(z, [2, 2], [2, 2])
        saved.append((h, z, idx))
        h = pooled
    return saved, h


def _conv_backward(plan: ConvPlan, params: Params, saved, g: torch.Tensor, lr: float | None, grads: Params | None):
    for j in range(len(plan.convs) - 1, -1, -1):
        w, b, pad = plan.convs[j]
        h, z, idx = saved[j]
        gz = torch.ops.aten.max_pool2d_with_indices_backward(g, z, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
        gz = _relu_backward(gz, z)
        weight = params[w]
        g_in, g_w, g_b = torch.ops.aten.convolution_backward(
            gz, h, weight, [weight.shape[0]], [1, 1], list(pad), [1, 1], False, [0, 0], 1, [j > 0, True, True])
        if lr is None:
            grads[w], grads[b] = g_w, g_b
        else:
            weight.add_(g_w, alpha=-lr)
            params[b].add_(g_b, alpha=-lr)
        g = g_in


def _step(plan: Plan, params: Params, x: torch.Tensor, y: torch.Tensor, lr: float | None,
          want_loss: bool) -> tuple[float, Params | None]:
    if isinstance(plan, DensePlan):
        acts = _dense_forward(plan.layers, params, x.reshape(x.shape[0], -1))
        loss, g = _logits_grad(acts[-1], y, want_loss)
        grads = None if lr is not None else {}
        _dense_backward(plan.layers, params, acts, g, lr, grads)
        return loss, grads
    saved, h = _conv_forward(plan, params, x)
    flat = h.reshape(h.shape[0], -1)
    acts = _dense_forward((plan.head,), params, flat)
    loss, g = _logits_grad(acts[-1], y, want_loss)
    grads: Params = {}
    # The head's input gradient is needed either way; its update must use the old weights.
    head_grads = {"input": None}
    _dense_backward((plan.head,), params, acts, g, lr, head_grads)
    _conv_backward(plan, params, saved, head_grads.pop("input").reshape(h.shape), lr, grads)
    if lr is not None:
        return loss, None
    grads.update(head_grads)
    return loss, grads


# --------------------------------------------------------------------------- entry points

def loss_and_grad(plan: Plan, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Params]:
    """Mean cross-entropy (a float) and its gradient w.r.t. ``params``, in ``params``' order."""
    with torch.no_grad():
        loss, grads = _step(plan, params, x, y, None, True)
    return loss, {name: grads[name] for name in params}


def sgd_steps(plan: Plan, params: Params, x: torch.Tensor, y: torch.Tensor, batches: Iterable[torch.Tensor],
              lr: float) -> int:
    """Plain SGD on ``params`` **in place**, one step per index tensor of ``batches``;
    returns the samples processed."""
    seen = 0
    with torch.no_grad():
        for idx in batches:
            _step(plan, params, x.index_select(0, idx), y.index_select(0, idx), lr, False)
            seen += idx.shape[0]
    return seen


# --------------------------------------------------------------------------- many clients at once

STACK_MAX_FLOATS = 640_000
"""At most this many floats of stacked weights in one chunk (2.5 MB, about what stays in
this CPU's L2 cache); a model that does not fit twice is trained one client at a time.

Measured here (process CPU time per steady round, one thread, 100 clients, FedAvg, 1 epoch
of batch 32): on the 784-200-10 MLP (159k weights) stacks of 4 clients took 0.252 s a round
against 0.316 s for the lean one-client step, stacks of 25 0.277 s and of all 100 (63 MB)
0.305 s, as the copies leave the cache and the weight updates become memory-bound (issue
14's probe found the same with autograd); on the digits MLP 64 (4,810 weights) stacks of 100
took 0.037 s against 0.080 s."""


def _size(plan: DensePlan, params: Params) -> int:
    return sum(params[n].numel() for n in names(plan))


def stackable(plan: Plan | None, params: Params) -> bool:
    """True when clients starting from ``params`` may train stacked (:func:`sgd_stacked`)."""
    return isinstance(plan, DensePlan) and covers(plan, params) and 2 * _size(plan, params) <= STACK_MAX_FLOATS


def stack_chunk(plan: DensePlan, params: Params) -> int:
    """How many clients to stack at once."""
    return max(1, STACK_MAX_FLOATS // max(1, _size(plan, params)))


def sgd_stacked(plan: DensePlan, starts: list[Params], xs: list[torch.Tensor], ys: list[torch.Tensor],
                generators: list[torch.Generator], *, epochs: int, batch_size: int, lr: float) -> list[Params]:
    """Local SGD of B clients at once, each from its own ``starts[i]`` on its own data, with
    its own shuffles: what :func:`sgd_steps` does for each client (the same minibatches,
    drawn from the same generators in the same order), stacked into batched matrix products.

    Every client must hold the same number of samples (the same steps and batch sizes).
    Returns each client's trained parameters (views into the stacked tensors)."""
    b = len(starts)
    n = xs[0].shape[0]
    params = {k: torch.stack([s[k] for s in starts]) for k in names(plan)}
    x = torch.stack([v.reshape(n, -1) for v in xs]).reshape(b * n, -1)
    y = torch.stack(ys).reshape(b * n)
    offsets = (torch.arange(b) * n).unsqueeze(1)
    with torch.no_grad():
        for _ in range(epochs):
            # minibatches(): one permutation per client and epoch, sliced in order
            perms = torch.stack([torch.randperm(n, generator=g) for g in generators]).add_(offsets)
            for start in range(0, n, batch_size):
                rows = perms[:, start:start + batch_size]
                flat = rows.reshape(-1)
                _stacked_step(plan.layers, params, x.index_select(0, flat).view(b, rows.shape[1], -1),
                              y.index_select(0, flat).view(b, rows.shape[1]), lr)
    return per_client(params, b)


def per_client(stacked: Params, clients: int) -> list[Params]:
    """Client ``i``'s views ``{name: stacked[name][i]}``, for each client, from one ``unbind``
    a tensor (indexing each view from Python cost ~3 us, most of a small client's share)."""
    views = {k: v.unbind(0) for k, v in stacked.items()}
    return [{k: v[i] for k, v in views.items()} for i in range(clients)]


def _stacked_step(layers, params: Params, x: torch.Tensor, y: torch.Tensor, lr: float | None,
                  grads: Params | None = None, first=None) -> None:
    """One SGD step of every client of a stack ([clients, batch, features] inputs), in place;
    with ``lr = None`` the stacked gradients land in ``grads`` instead.

    ``first``, when given, stands in for the first layer, whose weights are then not in
    ``params``: ``first.forward(x)`` gives its output before the ReLU and ``first.update(g)``
    takes d loss / d that output (:mod:`algorithms.shared_start`)."""
    acts = [x]
    h = x
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        if i == 0 and first is not None:
            h = first.forward(x)
        else:
            h = torch.baddbmm(params[b].unsqueeze(1), h, params[w].transpose(1, 2))
        if i < last:
            h.clamp_min_(0.0)
        acts.append(h)
    batch = x.shape[1]
    g = torch.softmax(acts[-1], 2)
    g.scatter_add_(2, y.unsqueeze(2), torch.full(y.shape + (1,), -1.0, dtype=g.dtype))
    g.mul_(1.0 / batch)
    for i in range(len(layers) - 1, -1, -1):
        w, b = layers[i]
        a = acts[i]
        if i == 0 and first is not None:
            first.update(g)
            break
        g_in = torch.bmm(g, params[w]) if i > 0 else None  # with the weights before this step
        if lr is None:
            grads[w] = torch.bmm(g.transpose(1, 2), a)
            grads[b] = g.sum(1)
        else:
            params[w].baddbmm_(g.transpose(1, 2), a, alpha=-lr)
            params[b].sub_(g.sum(1), alpha=lr)
        if i > 0:
            g = _relu_backward(g_in, a)


def grads_stacked(plan: DensePlan, starts: list[Params], xs: list[torch.Tensor],
                  ys: list[torch.Tensor]) -> list[Params]:
    """:func:`loss_and_grad`'s gradients for B clients at once (``starts[i]`` on ``xs[i],
    ys[i]``; every ``xs[i]`` the same number of rows). Returns each client's gradients in
    the plan's parameter order (views into stacked tensors)."""
    b = len(starts)
    params = {k: torch.stack([s[k] for s in starts]) for k in names(plan)}
    x = torch.stack([v.reshape(v.shape[0], -1) for v in xs])
    y = torch.stack(ys)
    grads: Params = {}
    with torch.no_grad():
        _stacked_step(plan.layers, params, x, y, None, grads)
    return per_client({k: grads[k] for k in names(plan)}, b)
