"""LQ-SGD (2025): PowerSGD whose factors travel log-quantized, with error feedback end to end.

Source: Li, Bai, Wu, Chadli, Mammar & Bouvry, "Trustworthy Efficient Communication for
Distributed Learning using LQ-SGD Algorithm", arXiv:2506.17974 (2025). No authors' code was
found to read, and from here only the paper's abstract and a third-party summary of its update
could be read (not its full text): error feedback G' = G + E, one power iteration
P = orthonormalise(G' Q), Q = G'^T P, each factor log-quantized with the codec
q(x) = sign(x) log(1 + alpha|x|) / log(1 + alpha) (inverse sign(q) ((1 + alpha)^|q| - 1) / alpha)
at bit widths b_P, b_Q, Ĝ = P Q^T, E = G' - Ĝ, a plain SGD step on the all-reduced Ĝ. Everything
not about the quantizer follows :mod:`algorithms.powersgd` (its sources and departures apply),
including ``error_feedback``: with ``aggregated`` (default) the residual is M_i − P_hat Q^T
with Q the mean of the decoded Q_hat_i.

Departures from that description (unchecked against the full text, so possibly more):

* a server gathers and averages where the paper all-reduces (as :mod:`algorithms.powersgd`);
* what is quantized: the client log-quantizes its raw P_i = M_i Q before upload and the server
  orthonormalises the mean of the decoded P_i (the summary quantizes P after
  orthonormalising); the orthonormal P_hat the server broadcasts travels at 32 bits;
* one bit width ``bits`` for both factors (the paper's b_P and b_Q may differ);
* ``log_alpha`` = 10 and ``bits`` = 8 are this project's defaults (the paper's values were not
  read);
* the codec's input is normalised by the tensor's max |x| (a 32-bit scale per tensor), which
  the summary does not specify;
* the layers PowerSGD leaves uncompressed (vectors, and matrices where rank r does not pay by
  ``min_compression_rate``) are log-quantized too, a project choice, so that every upload is
  b bits per value.

Everything is PowerSGD's (see :mod:`algorithms.powersgd`: rank r clamped per layer,
warm-started shared Q, two round trips through the server, per-client error feedback),
except that every uploaded tensor — P_i in phase 1, Q_i in phase 2, and the gradients of the
layers sent uncompressed — is log-quantized at b = ``bits`` bits (default 8) with companding
parameter alpha = ``log_alpha`` (:func:`quantizers.log_quantize`: normalise by the tensor's
max |x|, q(u) = sign(u) log(1 + alpha|u|) / log(1 + alpha), 2^b-level grid). The error the
client remembers is taken over the whole pipeline, quantization included:
e_i = M_i - P_hat Q^T (``aggregated``) or M_i - P_hat Q_hat_i^T (``own``) for compressed
layers (Q_hat_i: what the server decodes, Q their mean) and e_i = M_i - dequant(quant(M_i))
for the others.

payload_bits (uplink, per client per round): for every uploaded tensor 32 (its scale) +
b * numel, i.e. sum over compressed layers of 64 + b (n r + m r), plus 32 + b * numel per
uncompressed tensor. On the wire each tensor is one uint8 frame of ceil(b numel / 8) bytes
and each phase's scales one float32 frame. Downlink as PowerSGD (32 bits per value).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import bitpack
from . import quantizers as qz
from .base import check, check_int, register
from .powersgd import PowerSGD

SCALES = "scales"


@register
class LQSGD(PowerSGD):
    name = "lqsgd"

    @dataclass
    class Config(PowerSGD.Config):
        bits: int = 8
        """b: bits per uploaded value, 1..16."""
        log_alpha: float = 10.0
        """alpha of the log quantizer, > 0 (larger: finer near zero, coarser near the max)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_int("bits", self.bits, 1, bitpack.MAX_BITS)
            check(isinstance(self.log_alpha, (int, float)) and math.isfinite(self.log_alpha) and self.log_alpha > 0,
                  "log_alpha", self.log_alpha, "must be a finite number > 0")

    def encode(self, values):
        wire, seen, scales, bits = {}, {}, [], 0
        for name, v in values.items():
            q = qz.log_quantize(v, self.config.bits, float(self.config.log_alpha))
            wire[name], seen[name] = q.packed, q.value
            scales.append(q.scale)
            bits += qz.log_bits(v.numel(), self.config.bits)
        wire[SCALES] = torch.stack(scales) if scales else torch.zeros(0)
        return wire, seen, bits

    def decode(self, tensors, shapes):
        scales = tensors[SCALES]
        return {name: qz.log_dequantize(scales[i], tensors[name], self.config.bits, float(self.config.log_alpha), shape)
                for i, (name, shape) in enumerate(shapes.items())}

    def wire_spec(self, shapes):
        spec = {name: (torch.uint8, (bitpack.packed_nbytes(math.prod(shape), self.config.bits),))
                for name, shape in shapes.items()}
        spec[SCALES] = (torch.float32, (len(shapes),))
        return spec
