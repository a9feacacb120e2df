"""Models, their compute cost, and their evaluation.

Every model is a plain ``nn.Sequential`` so parameter names are stable (``"1.weight"``,
``"3.bias"`` ...) across processes and runs: the names key every payload on the wire.

* ``logistic``: Flatten + Linear (multinomial logistic regression);
* ``mlp``: Flatten + (Linear, ReLU) per hidden size + Linear; the QRR paper's 784-200-10
  MLP is ``hidden = [200]`` on Fashion-MNIST;
* ``cnn``: per entry of ``channels`` a block Conv2d(3x3, padding 1) + ReLU + MaxPool(2x2),
  then Flatten + Linear. Its conv weights are 4-D (out, in, 3, 3), so Tucker
  decompositions apply. Two blocks fit both 8x8 digits (-> 2x2) and 28x28 Fashion-MNIST
  (-> 7x7).
* ``qrr_cnn``: the QRR paper's CNN (Kritsiolis & Kotropoulos; authors' file utils.py of
  Kritsos/QRR-code, the commented-out MNIST ``Net``): Conv2d(16, 3x3, padding 1) + ReLU,
  Conv2d(32, 3x3, padding 1) + ReLU, MaxPool(2x2), Flatten, Linear(64) + ReLU, Linear(classes).
  On 28x28 images the first Linear is 6272 x 64 (32 x 14 x 14 inputs). ``channels`` and
  ``hidden`` do not apply to it.

Models carry no state beyond their parameters (no batch norm, no dropout): clients call them
with ``torch.func.functional_call(model, params, x)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .data import derive_seed
from .errors import ScenarioError

MODEL_KINDS = ("logistic", "mlp", "cnn", "qrr_cnn")


def _positive_ints(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) >= 1
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))


@dataclass
class ModelConfig:
    """Settings under ``[model]``."""

    kind: str = "mlp"
    """``logistic`` | ``mlp`` | ``cnn`` | ``qrr_cnn`` (the QRR paper's CNN, fixed widths)."""
    hidden: list[int] = field(default_factory=lambda: [64])
    """MLP hidden layer widths (units), input side first."""
    channels: list[int] = field(default_factory=lambda: [8, 16])
    """CNN output channels of each conv block; each block halves height and width."""

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ScenarioError("model.kind", self.kind, f"unknown model (known: {', '.join(MODEL_KINDS)})")
        if not _positive_ints(self.hidden):
            raise ScenarioError("model.hidden", self.hidden, "must be a non-empty list of integers >= 1")
        if not _positive_ints(self.channels):
            raise ScenarioError("model.channels", self.channels, "must be a non-empty list of integers >= 1")
        self.hidden, self.channels = list(self.hidden), list(self.channels)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """The architecture of ``cfg`` for samples of ``input_shape``, initialised from ``seed``.

    The default PyTorch initialisation runs under a forked RNG seeded from ``seed``, so the
    same seed gives the same bytes and the caller's global RNG state is left untouched.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if cfg.kind in ("cnn", "qrr_cnn") and len(input_shape) != 3:
        raise ScenarioError("model.kind", cfg.kind, f"a CNN needs image inputs (C, H, W); this data set's samples have shape {input_shape}")
    if cfg.kind == "cnn":
        _, h, w = input_shape
        if min(h, w) >> len(cfg.channels) < 1:
            raise ScenarioError("model.channels", cfg.channels,
                                f"{len(cfg.channels)} pooling blocks shrink {h}x{w} inputs below 1x1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model", cfg.kind))
        return _layers(cfg, input_shape, num_classes)


def _layers(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    f32 = torch.float32
    if cfg.kind == "qrr_cnn":
        c, h, w = input_shape
        return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, dtype=f32), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1, dtype=f32), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * (h // 2) * (w // 2), 64, dtype=f32), nn.ReLU(),
                             nn.Linear(64, num_classes, dtype=f32))
    if cfg.kind == "cnn":
        layers: list[nn.Module] = []
        c, h, w = input_shape
        for out in cfg.channels:
            layers += [nn.Conv2d(c, out, 3, padding=1, dtype=f32), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, num_classes, dtype=f32))
    layers = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in (cfg.hidden if cfg.kind == "mlp" else []):
        layers += [nn.Linear(width, hidden, dtype=f32), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes, dtype=f32))


def work_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Compute of one training sample, in **FLOP** (floating-point operations).

    Forward MACs of every Linear and Conv2d (in_features * out_features; output elements
    * in_channels/groups * kernel area), times 2 FLOP per MAC, times 3 for forward plus
    backward (the backward pass costs about twice the forward: gradients w.r.t. inputs and
    w.r.t. weights). Activations, pooling and biases are ignored (lower order).
    """
    macs = 0

    def count(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features * (output.numel() // module.out_features)
        elif isinstance(module, nn.Conv2d):
            kernel = math.prod(module.kernel_size) * (module.in_channels // module.groups)
            macs += output.numel() * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    return float(2 * 3 * macs)


def evaluate(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 4096) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy in nats) of ``params`` on ``(x, y)``."""
    n = len(x)
    if n == 0:
        raise ValueError("evaluate: no samples")
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            logits = functional_call(model, params, (xb,))
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    return correct / n, loss / n
