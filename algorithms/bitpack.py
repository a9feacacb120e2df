"""Bit-packing of quantization codes: b bits per value, b = 1..16. The one packer of the project.

Stable API (other methods build on it; do not change the signatures):

    pack(codes, bits) -> torch.Tensor            # uint8, 1-D, packed_nbytes(codes.numel(), bits) long
    unpack(packed, bits, count) -> torch.Tensor  # int64, 1-D, ``count`` codes in [0, 2**bits)
    unpack_array(packed, bits, count) -> np.ndarray  # the same codes, uint8 (b <= 8) or uint16
    pack_segments(codes, bits, offsets) -> [torch.Tensor]  # pack() of each segment of one array
    packed_nbytes(count, bits) -> int            # bytes that ``count`` codes of ``bits`` bits occupy
    check_bits(bits) -> None                     # ValueError unless 1 <= bits <= 16 (an int)

Layout: code i occupies bits [i*b, (i+1)*b) of the little-endian bit stream, least significant
bit first, so n codes take exactly ceil(n*b / 8) bytes; the unused high bits of the last byte
are zero. ``unpack`` is strict: a buffer of the wrong dtype, rank or length, or one whose
padding bits are not zero, raises ``ValueError`` (the receiver of a malformed message turns it
into a ``ProtocolError``). Empty and odd lengths are fine.

Pure numpy, vectorised (no Python loop over values): pack expands each code into its b bit
planes and lets ``np.packbits`` fuse them; unpack is the inverse. At b = 8 (LAQ's and QRR's
usual width) the layout is the codes themselves: uint8 codes pack with one copy and unpack as a
view.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_BITS = 16


def check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is an int in 1..16."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits each: ceil(count*bits/8)."""
    check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor | np.ndarray, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) (any shape, flattened in C order) into uint8 bytes."""
    check_bits(bits)
    c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    c = c.reshape(-1)
    if c.size == 0:
        return torch.empty(0, dtype=torch.uint8)
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {c.dtype}")
    if bits == 8 and c.dtype == np.uint8:
        # every uint8 is an 8-bit code and the layout is the codes themselves: one copy
        return torch.from_numpy(c.copy())
    if int(c.min()) < 0 or int(c.max()) >= (1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    c = c.astype(np.uint32, copy=False)
    if bits == 8:
        out = c.astype(np.uint8)
    elif bits == 16:
        out = c.astype("<u2").view(np.uint8)
    else:
        planes = ((c[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
        out = np.packbits(planes.reshape(-1), bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(out))


def pack_segments(codes: np.ndarray, bits: int, offsets: list[int]) -> list[torch.Tensor]:
    """:func:`pack` of each segment ``codes[offsets[i]:offsets[i + 1]]`` of one unsigned code
    array whose values are known to fit ``bits`` (a quantizer's own output). At b = 8 the
    packed bytes are the codes: the segments are views of one buffer, no copy."""
    check_bits(bits)
    if bits == 8 and codes.dtype == np.uint8:
        return [torch.from_numpy(codes[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]
    return [pack(codes[offsets[i]:offsets[i + 1]], bits) for i in range(len(offsets) - 1)]


def unpack(packed: torch.Tensor | np.ndarray, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``count`` int64 codes from a uint8 buffer. Strict (see module doc)."""
    return torch.from_numpy(np.ascontiguousarray(unpack_array(packed, bits, count), dtype=np.int64))


def unpack_array(packed: torch.Tensor | np.ndarray, bits: int, count: int) -> np.ndarray:
    """As :func:`unpack`, as a 1-D numpy array of the narrowest unsigned type that holds b bits
    (uint8 for b <= 8, uint16 above; for b = 8 a read-only view of ``packed``): what a caller
    that only converts the codes to float needs, without an int64 copy."""
    need = packed_nbytes(count, bits)
    if isinstance(packed, torch.Tensor):
        if packed.dtype != torch.uint8:
            raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
        p = packed.detach().cpu().numpy()
    else:
        p = np.asarray(packed)
        if p.dtype != np.uint8:
            raise ValueError(f"packed codes must be uint8, got {p.dtype}")
    if p.ndim != 1 or p.size != need:
        raise ValueError(f"packed codes must be a 1-D buffer of {need} bytes for {count} x {bits} bits, got shape {tuple(p.shape)}")
    narrow = np.uint8 if bits <= 8 else np.uint16
    if count == 0:
        return np.empty(0, dtype=narrow)
    spare = need * 8 - count * bits
    if spare and int(p[-1]) >> (8 - spare):
        raise ValueError("non-zero padding bits after the last code")
    if bits == 8:
        out = p.view()
        out.flags.writeable = False
        return out
    if bits == 16:
        return p.view("<u2").astype(np.uint16)
    planes = np.unpackbits(p, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits)).astype(narrow)
    return (planes.astype(narrow) * weights).sum(axis=1, dtype=narrow)
