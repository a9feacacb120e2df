"""Gradient inversion: recover a client's training images from what its updates reveal.

Pure torch, no I/O: an attack gets a :class:`Target` (the architecture, the model the server
broadcast, the tensors the attacker observed, and a differentiable map from a candidate's
dense parameter gradients to those observations) and returns candidate images. Everything
the target holds comes from the wire (see :mod:`fedsim.eavesdrop`); nothing here reads a
client's state.

Attacks (sources):

* :func:`dlg` — Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019, Alg. 1): dummy
  images and dummy soft labels, both optimised with L-BFGS to minimise the squared L2
  distance between the dummy's gradient and the observed one.
* :func:`idlg` — improved DLG (Zhao, Mopuri & Bilen, arXiv 2001.02610, 2020, Sec. 3): the
  label is read off the last layer's gradient (for one sample and cross-entropy, the true
  class is the only row with a negative gradient), then only the images are optimised
  (L-BFGS, L2 distance).
* :func:`inverting_gradients` — Geiping, Bauermeister, Dröge & Moeller, "Inverting Gradients
  — How easy is it to break privacy in federated learning?", NeurIPS 2020, Sec. 4: cosine
  distance between gradients plus a total-variation prior, Adam on the *signed* gradient,
  step decay at 3/8, 5/8, 7/8 of the iterations, images kept in the valid box [0, 1].

Departures, all for the budget of a 2-core study or for the runtime's setting:

* iterations: DLG and iDLG run one L-BFGS call of ``iters`` iterations with a strong-Wolfe
  line search (the papers: 300 steps of 20 inner iterations, no line search); Geiping et al.
  run 24,000 Adam steps (4,800 in their CIFAR experiments), here ``iters`` (hundreds);
  a single restart (they take the best of several);
* labels for a batch > 1: iDLG is defined for one sample. :func:`infer_labels` generalises it
  with the bias-gradient count estimate of Wainakh et al. (PETS 2022, "User-level label
  leakage"): n_c ~ B (1/K - dL/db_c) assuming near-uniform softmax, labels drawn greedily.
  Geiping et al. assume known labels; here they get the inferred ones (an attacker on the
  wire has nothing better);
* the observation map: the papers match the full dense gradient. Here the attacker matches
  what the method put on the wire, through ``Target.predict`` (identity for SGD; the
  projection P̂P̂ᵀG for PowerSGD; the factor gradients for low-rank methods ...), so a
  compressed update is attacked with the best model of it the attacker can build;
* TV weight ``tv`` is ours (default 1e-2 for 8x8 and 28x28 grey images; Geiping et al.
  tuned 1e-4..1e-1 per data set).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
Predict = Callable[[Params], Params]
"""Dense parameter gradients of a candidate (differentiable) -> the observed tensors' space."""


def identity(grads: Params) -> Params:
    return grads


@dataclass
class Target:
    """One observed update of one client, as an attacker on the wire reconstructs it."""

    model: nn.Module
    """The architecture (a template; parameters are passed by name)."""
    params: Params
    """The model the server broadcast for this round (from the downlink)."""
    observed: Params
    """What the attacker matches, in the space ``predict`` maps into."""
    predict: Predict
    """Candidate's dense gradient -> observation (differentiable, linear for every method here)."""
    dense_estimate: Params
    """The attacker's best dense estimate of each parameter's gradient (for label inference)."""
    batch: int
    """Images in the client's batch (protocol knowledge: the method's ``batch_size``)."""
    input_shape: tuple[int, ...]
    num_classes: int


# --------------------------------------------------------------------------- labels

def last_layer(params: Params, num_classes: int) -> tuple[str | None, str | None]:
    """(weight name, bias name) of the classifier head: the last 2-D tensor with
    ``num_classes`` rows and the last vector of ``num_classes`` entries."""
    weight = bias = None
    for name, t in params.items():
        if t.ndim == 2 and t.shape[0] == num_classes:
            weight = name
        if t.ndim == 1 and t.shape[0] == num_classes:
            bias = name
    return weight, bias


def infer_labels(target: Target) -> torch.Tensor:
    """Labels of the batch from the head's gradient (iDLG; counts as Wainakh et al. for B > 1).

    With the bias gradient g (batch-mean cross-entropy) g_c = mean_i p_ic - n_c / B, so
    n_c ~ B (1/K - g_c) for a near-uniform softmax; B labels are taken greedily from the
    largest estimated counts. Without a bias, the weight rows' sums play g's role (their sign
    carries the same information when the head's inputs are non-negative, after a ReLU).
    For B = 1 both reduce to iDLG's rule: the class whose gradient is most negative.
    """
    weight, bias = last_layer(target.params, target.num_classes)
    est = target.dense_estimate
    if bias is not None and bias in est:
        g = est[bias].detach().double()
    elif weight is not None and weight in est:
        rows = est[weight].detach().double().sum(1)
        g = rows / rows.abs().sum().clamp_min(1e-30) * 2.0
    else:
        g = torch.zeros(target.num_classes, dtype=torch.float64)
    k, b = target.num_classes, target.batch
    score = b * (1.0 / k - g)
    labels = []
    for _ in range(b):
        c = int(torch.argmax(score))
        labels.append(c)
        score[c] -= 1.0
    return torch.tensor(sorted(labels), dtype=torch.int64)


# --------------------------------------------------------------------------- matching losses

def _candidate_grads(target: Target, leaves: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Params:
    params = dict(zip(target.params, leaves))
    logits = functional_call(target.model, params, (x,))
    if y.dtype == torch.int64:
        loss = F.cross_entropy(logits, y)
    else:  # soft labels (DLG's dummy label, a logit vector per image)
        loss = torch.mean(torch.sum(-F.softmax(y, dim=-1) * F.log_softmax(logits, dim=-1), dim=-1))
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    return dict(zip(target.params, grads))


def _leaves(target: Target) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in target.params.values()]


def l2_distance(pred: Params, observed: Params) -> torch.Tensor:
    """sum over tensors of ||pred - observed||^2 (DLG's objective)."""
    return sum(((pred[k] - observed[k]) ** 2).sum() for k in observed)


def cosine_distance(pred: Params, observed: Params) -> torch.Tensor:
    """1 - <pred, observed> / (|pred| |observed|) over all tensors at once (Geiping et al. eq. 4)."""
    dot = sum((pred[k] * observed[k]).sum() for k in observed)
    pn = sum((pred[k] ** 2).sum() for k in observed)
    on = sum((observed[k] ** 2).sum() for k in observed)
    return 1.0 - dot / (pn.sqrt() * on.sqrt() + 1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontal and vertical neighbours (Geiping et al.'s TV)."""
    if x.ndim < 4:
        return x.new_zeros(())
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def _observed(target: Target) -> Params:
    return {k: v.detach().to(torch.float32) for k, v in target.observed.items()}


def _init(target: Target, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((target.batch, *target.input_shape), generator=g)


# --------------------------------------------------------------------------- attacks

def _lbfgs(variables: list[torch.Tensor], objective: Callable[[], torch.Tensor], iters: int) -> None:
    opt = torch.optim.LBFGS(variables, lr=1.0, max_iter=iters, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective()
        if not torch.isfinite(value):
            # a diverged candidate: a large finite value makes the line search back off
            value = value.detach().new_tensor(1e30).requires_grad_(True)
            return value
        value.backward()
        return value
    opt.step(closure)


def dlg(target: Target, *, iters: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """DLG: jointly optimise dummy images and soft labels. Returns (images, labels)."""
    observed, leaves = _observed(target), _leaves(target)
    x = _init(target, seed).requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randn((target.batch, target.num_classes), generator=g).requires_grad_(True)
    _lbfgs([x, y], lambda: l2_distance(target.predict(_candidate_grads(target, leaves, x, y)), observed), iters)
    return x.detach().clamp(0, 1), y.detach().argmax(-1)


def idlg(target: Target, *, iters: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """iDLG: labels from the head's gradient, then L-BFGS on the images. Returns (images, labels)."""
    observed, leaves = _observed(target), _leaves(target)
    labels = infer_labels(target)
    x = _init(target, seed).requires_grad_(True)
    _lbfgs([x], lambda: l2_distance(target.predict(_candidate_grads(target, leaves, x, labels)), observed), iters)
    return x.detach().clamp(0, 1), labels


def inverting_gradients(target: Target, *, iters: int = 300, seed: int = 0, tv: float = 1e-2,
                        lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Geiping et al.: cosine distance + ``tv`` x total variation, signed Adam, box [0, 1]."""
    observed, leaves = _observed(target), _leaves(target)
    labels = infer_labels(target)
    x = _init(target, seed).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for _ in range(iters):
        opt.zero_grad()
        value = cosine_distance(target.predict(_candidate_grads(target, leaves, x, labels)), observed)
        value = value + tv * total_variation(x)
        value.backward()
        x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach(), labels


ATTACKS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "dlg": dlg, "idlg": idlg, "ig": inverting_gradients,
}
"""Attack name (as in privacy.csv) -> function. ``ig``: Geiping et al.'s inverting gradients."""
