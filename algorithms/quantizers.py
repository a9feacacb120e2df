"""The quantizers of the project, each with its exact inverse. One module, used by every method.

Stable API (signatures fixed; all tensors float32 unless said otherwise):

Uniform grid (shared by both quantizers): 2**b levels on [-1, 1], step 2*tau, tau = 1/(2**b - 1),
level(j) = -1 + 2*tau*j for the code j in 0 .. 2**b - 1.

    tau(bits) -> float
    grid_encode(u, bits) -> int64 codes            # u in [-1, 1]; round to the nearest level
    grid_decode(codes, bits) -> float32 values     # level(code)

LAQ (Sun et al., NeurIPS 2019), the quantized innovation of a gradient g against the
accumulator Q_{k-1} both ends hold:

    R_k = ||g - Q_{k-1}||_inf                      (float32, travels as 32 bits)
    code = round(((g - Q_{k-1}) / R_k + 1) / (2 tau))      (b bits, bit-packed)
    Q_k  = Q_{k-1} + R_k * level(code)                     (what both ends compute)
    |g - Q_k| <= tau * R_k  elementwise;   R_k = 0 gives all-zero codes, Q_k = Q_{k-1}.

    laq_quantize(g, q_prev, bits) -> Quantized     # .scale = R_k, .packed uint8, .value = Q_k
    laq_dequantize(q_prev, scale, packed, bits) -> Q_k
    laq_quantize_many(gs, q_prevs, bits) -> [Quantized]         # several tensors, one radius each
    laq_dequantize_many(q_prevs, scales, packed, bits) -> [Q_k]  # bit-identical to one at a time
    laq_bits(numel, bits) -> int                   # 32 + b * numel  (bits)

Logarithmic quantizer (LQ-SGD): normalise by s = ||x||_inf (float32, 32 bits), then

    q(u) = sign(u) * log(1 + alpha |u|) / log(1 + alpha),      u = x / s in [-1, 1]
    code = grid_encode(q(u)),   x_hat = s * sign(q_hat) * ((1 + alpha)^{|q_hat|} - 1) / alpha

    Monotone in x; |u - u_hat| <= (1 + alpha |u|) * ((1 + alpha)^tau - 1) / alpha.

    log_quantize(x, bits, alpha) -> Quantized      # .scale = s, .packed uint8, .value = x_hat
    log_dequantize(scale, packed, bits, alpha, shape) -> x_hat
    log_bits(numel, bits) -> int                   # 32 + b * numel  (bits)

The LAQ functions run on numpy arrays, all of a message's tensors as one flat float32 array
(``*_many``; the single-tensor functions are the same code with one tensor): each step is one
in-place pass with one radius per tensor, the same float32 operations in the same order as the
per-tensor torch formula (bit-identical codes, bytes and values, tests/test_quantizers.py),
for a fraction of the dispatch overhead when a message has many small tensors (QRR's factors).

Receivers call the ``*_dequantize`` functions on untrusted bytes: they raise
:class:`~algorithms.base.ProtocolError` on a malformed buffer (wrong length, dtype, padding),
a non-finite or negative scale. Encoders raise ``ValueError`` on a non-finite input: a method
decides what a client with a NaN gradient does (see each method's docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import bitpack
from .base import ProtocolError

check_bits = bitpack.check_bits


@dataclass
class Quantized:
    """One quantized tensor as it travels (scale, packed) and as both ends decode it (value)."""

    scale: torch.Tensor
    """float32 scalar tensor: LAQ's radius R_k or the log quantizer's normaliser s."""
    packed: torch.Tensor
    """uint8 1-D: the b-bit codes, bit-packed (see :mod:`algorithms.bitpack`)."""
    value: torch.Tensor
    """float32, the input's shape: the decoded tensor, bit-identical to the receiver's."""


def tau(bits: int) -> float:
    """Half the grid step on [-1, 1]: 1 / (2**b - 1)."""
    check_bits(bits)
    return 1.0 / ((1 << bits) - 1)


def grid_encode(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest of the 2**b levels for values in [-1, 1] (clamped), as int64 codes."""
    top = (1 << bits) - 1
    return torch.clamp(torch.round((u.to(torch.float32) + 1.0) * (top / 2.0)), 0, top).to(torch.int64)


def grid_decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The level of each code: -1 + 2 tau code, float32."""
    top = (1 << bits) - 1
    return codes.to(torch.float32) * (2.0 / top) - 1.0


def _scale_of(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    return x.abs().max().to(torch.float32)


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    try:
        return bitpack.unpack(packed, bits, count)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _check_scale(scale: torch.Tensor) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
        raise ProtocolError(f"scale must be one float32 value, got {scale!r}")
    if not torch.isfinite(scale).all() or float(scale) < 0:
        raise ProtocolError(f"scale must be finite and >= 0, got {float(scale)}")
    return scale.reshape(())


# ---- LAQ: differential uniform quantization of the innovation ------------------------------------

def laq_bits(numel: int, bits: int) -> int:
    """Paper count of one quantized innovation: one 32-bit radius plus b bits per value."""
    check_bits(bits)
    return 32 + bits * numel


def laq_quantize(g: torch.Tensor, q_prev: torch.Tensor, bits: int) -> Quantized:
    """Quantize the innovation g - q_prev at b bits (see module doc)."""
    return laq_quantize_many([g], [q_prev], bits)[0]


def laq_dequantize(q_prev: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_k from Q_{k-1}, the radius and the packed codes; ProtocolError on malformed input."""
    return laq_dequantize_many([q_prev], [scale], [packed], bits)[0]


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    """One float32 array holding the tensors one after another (C order); with one tensor,
    possibly a view of it (callers only read it)."""
    parts = []
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad:
            t = t.detach().to(device="cpu", dtype=torch.float32)
        parts.append(t.numpy().reshape(-1))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)


def _offsets(shapes: list[torch.Size]) -> list[int]:
    out = [0]
    for shape in shapes:
        out.append(out[-1] + math.prod(shape))
    return out


def _laq_values(level: np.ndarray, radii: np.ndarray, offsets: list[int], p_flat: np.ndarray,
                shapes: list[torch.Size]) -> list[torch.Tensor]:
    # The one formula both ends evaluate, q_prev + radius * level(code), in float32, with
    # level(code) = code * (2 / top) - 1 as in grid_decode (done by the caller, in place on
    # ``level``) and one radius per tensor. Bit-identical on both sides and to the per-tensor
    # torch formula this replaced (tests/test_quantizers.py compares them). Each result is
    # written straight into a tensor of its own: a fresh (aligned) allocation, as the torch
    # formula's, since MKL's products may round differently on a view that starts mid-buffer.
    out = []
    for i, shape in enumerate(shapes):
        seg = level[offsets[i]:offsets[i + 1]]
        seg *= radii[i]
        value = torch.empty(shape, dtype=torch.float32)
        np.add(p_flat[offsets[i]:offsets[i + 1]], seg, out=value.numpy().reshape(-1))
        out.append(value)
    return out


def laq_quantize_many(gs: list[torch.Tensor], q_prevs: list[torch.Tensor], bits: int) -> list[Quantized]:
    """:func:`laq_quantize` of several tensors at once, each with its own radius.

    Bit-identical to quantizing them one by one (the same float32 operations in the same
    order, on numpy arrays); the tensors travel through each step as one flat array, in
    place, so a method with many tensors (QRR's factors) pays each step's overhead once."""
    check_bits(bits)
    if len(gs) != len(q_prevs):
        raise ValueError(f"{len(gs)} tensors and {len(q_prevs)} accumulators")
    shapes = []
    for g, q in zip(gs, q_prevs):
        if g.shape != q.shape:
            raise ValueError(f"gradient {tuple(g.shape)} and accumulator {tuple(q.shape)} differ in shape")
        shapes.append(g.shape)
    offsets = _offsets(shapes)
    p_flat = _flat(q_prevs)
    u = np.subtract(_flat(gs), p_flat)  # the innovation d, then (in place) u, the codes, the levels
    radii = np.zeros(len(gs), dtype=np.float32)
    starts = [offsets[i] for i in range(len(gs)) if offsets[i + 1] > offsets[i]]
    if starts:
        radii[[i for i in range(len(gs)) if offsets[i + 1] > offsets[i]]] = np.maximum.reduceat(np.abs(u), starts)
    if not np.isfinite(radii).all():
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    top = (1 << bits) - 1
    for i, r in enumerate(radii):
        if r > 0:
            seg = u[offsets[i]:offsets[i + 1]]
            seg /= r
    # grid_encode: round((u + 1) * top / 2). |d| <= R, so u is in [-1, 1] and the codes in
    # [0, top]: the clamp of grid_encode never acts on a finite input.
    u += np.float32(1.0)
    u *= np.float32(top / 2.0)
    np.rint(u, out=u)
    for i, r in enumerate(radii):
        if r == 0:
            # R_k = 0: the innovation is zero; code the level nearest 0, scaled by 0 it decodes to 0.
            u[offsets[i]:offsets[i + 1]] = (1 << bits) // 2
    codes = u.astype(np.uint8 if bits <= 8 else np.uint16)
    packed = bitpack.pack_segments(codes, bits, offsets)
    u *= np.float32(2.0 / top)
    u -= np.float32(1.0)
    values = _laq_values(u, radii, offsets, p_flat, shapes)
    scales = torch.from_numpy(radii)
    return [Quantized(scales[i], packed[i], values[i]) for i in range(len(gs))]


def laq_dequantize_many(q_prevs: list[torch.Tensor], scales, packed: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """:func:`laq_dequantize` of several tensors at once (``scales``: one float32 scalar
    tensor each, or one float32 vector); bit-identical to one at a time. ProtocolError on
    malformed input."""
    check_bits(bits)
    if len(scales) != len(q_prevs) or len(packed) != len(q_prevs):
        raise ProtocolError(f"{len(q_prevs)} tensors, {len(scales)} scales and {len(packed)} buffers")
    if isinstance(scales, torch.Tensor) and scales.ndim == 1:
        if scales.dtype != torch.float32:
            raise ProtocolError(f"scales must be float32, got {scales.dtype}")
        radii = scales.detach().cpu().numpy()
        if not np.isfinite(radii).all() or (radii < 0).any():
            raise ProtocolError(f"scales must be finite and >= 0, got {radii.tolist()}")
    else:
        radii = np.array([float(_check_scale(s)) for s in scales], dtype=np.float32)
    shapes = [q.shape for q in q_prevs]
    offsets = _offsets(shapes)
    try:
        parts = [bitpack.unpack_array(p, bits, offsets[i + 1] - offsets[i]) for i, p in enumerate(packed)]
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    level = np.concatenate(parts, dtype=np.float32) if parts else np.empty(0, dtype=np.float32)
    top = (1 << bits) - 1
    level *= np.float32(2.0 / top)
    level -= np.float32(1.0)
    return _laq_values(level, radii, offsets, _flat(q_prevs), shapes)


# ---- Logarithmic quantizer (LQ-SGD) --------------------------------------------------------------

def log_bits(numel: int, bits: int) -> int:
    """Paper count of one log-quantized tensor: one 32-bit scale plus b bits per value."""
    check_bits(bits)
    return 32 + bits * numel


def log_compand(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """q(u) = sign(u) log(1 + alpha |u|) / log(1 + alpha), for u in [-1, 1]."""
    return torch.sign(u) * torch.log1p(alpha * u.abs()) / math.log1p(alpha)


def log_expand(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Inverse of :func:`log_compand`: sign(q) ((1 + alpha)^|q| - 1) / alpha."""
    return torch.sign(q) * torch.expm1(q.abs() * math.log1p(alpha)) / alpha


def _log_apply(scale: torch.Tensor, codes: torch.Tensor, bits: int, alpha: float, shape) -> torch.Tensor:
    return (scale * log_expand(grid_decode(codes, bits), alpha)).reshape(shape)


def log_quantize(x: torch.Tensor, bits: int, alpha: float) -> Quantized:
    """Log-quantize ``x`` at b bits with companding parameter alpha > 0 (see module doc)."""
    check_bits(bits)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x = x.detach().to(torch.float32)
    scale = _scale_of(x)
    u = x / scale if float(scale) > 0 else torch.zeros_like(x)
    codes = grid_encode(log_compand(u, alpha), bits)
    return Quantized(scale, bitpack.pack(codes, bits), _log_apply(scale, codes, bits, alpha, x.shape))


def log_dequantize(scale: torch.Tensor, packed: torch.Tensor, bits: int, alpha: float, shape) -> torch.Tensor:
    """x_hat from the scale and packed codes; ProtocolError on malformed input."""
    s = _check_scale(scale)
    codes = _unpack(packed, bits, math.prod(shape))
    return _log_apply(s, codes, bits, alpha, tuple(shape))


def log_error_bound(u: torch.Tensor, bits: int, alpha: float) -> torch.Tensor:
    """Elementwise bound on |u - u_hat| for normalised u in [-1, 1] (see module doc)."""
    return (1 + alpha * u.abs()) * math.expm1(tau(bits) * math.log1p(alpha)) / alpha
