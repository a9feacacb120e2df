"""Bit-packing: exact round trip for every b in 1..16, any length, strict on malformed buffers."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from algorithms import bitpack


@settings(max_examples=120, deadline=None)
@given(bits=st.integers(1, 16), shape=st.lists(st.integers(0, 7), min_size=0, max_size=3), seed=st.integers(0, 2**31))
def test_roundtrip_every_width_any_shape(bits, shape, seed):
    n = int(np.prod(shape)) if shape else 1
    codes = torch.from_numpy(np.random.default_rng(seed).integers(0, 1 << bits, size=shape, dtype=np.int64))
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == bitpack.packed_nbytes(n, bits) == (n * bits + 7) // 8
    out = bitpack.unpack(packed, bits, n)
    assert out.dtype == torch.int64
    assert torch.equal(out, codes.reshape(-1))


@pytest.mark.parametrize("bits", range(1, 17))
def test_extremes_and_odd_lengths(bits):
    top = (1 << bits) - 1
    for n in (0, 1, 3, 7, 9, 17):
        codes = torch.tensor([top if i % 2 else 0 for i in range(n)], dtype=torch.int64)
        assert torch.equal(bitpack.unpack(bitpack.pack(codes, bits), bits, n), codes)


def test_layout_is_lsb_first_little_endian():
    # 3-bit codes 5 (101), 3 (011), 1 (001) -> bit stream 1 0 1 1 1 0 1 0 | 0 -> bytes 0x5D, 0x00
    assert bitpack.pack(torch.tensor([5, 3, 1]), 3).tolist() == [0b01011101, 0]
    assert bitpack.pack(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


@pytest.mark.parametrize("bits", [0, 17, -1, 2.0, True])
def test_bad_widths_rejected(bits):
    with pytest.raises(ValueError):
        bitpack.pack(torch.zeros(3, dtype=torch.int64), bits)


def test_strict_unpack():
    packed = bitpack.pack(torch.tensor([1, 2, 3]), 3)  # 9 bits -> 2 bytes, 7 padding bits
    with pytest.raises(ValueError):
        bitpack.unpack(packed[:1], 3, 3)                      # too short
    with pytest.raises(ValueError):
        bitpack.unpack(torch.cat([packed, packed]), 3, 3)     # too long
    with pytest.raises(ValueError):
        bitpack.unpack(packed.to(torch.int16), 3, 3)          # wrong dtype
    with pytest.raises(ValueError):
        bitpack.unpack(packed.reshape(1, 2), 3, 3)            # wrong rank
    dirty = packed.clone()
    dirty[-1] |= 0x80
    with pytest.raises(ValueError):
        bitpack.unpack(dirty, 3, 3)                           # non-zero padding
    with pytest.raises(ValueError):
        bitpack.pack(torch.tensor([8]), 3)                    # code out of range
    with pytest.raises(ValueError):
        bitpack.pack(torch.tensor([-1]), 3)
    with pytest.raises(ValueError):
        bitpack.pack(torch.tensor([0.5]), 3)                  # not integers


@pytest.mark.parametrize("bits", [1, 3, 8, 11, 16])
def test_segments_and_narrow_unpack_match_pack_and_unpack(bits):
    rng = np.random.default_rng(bits)
    sizes = [5, 0, 17, 1, 64]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    codes = rng.integers(0, 1 << bits, size=offsets[-1]).astype(np.uint8 if bits <= 8 else np.uint16)
    for i, packed in enumerate(bitpack.pack_segments(codes, bits, offsets)):
        segment = codes[offsets[i]:offsets[i + 1]]
        assert torch.equal(packed, bitpack.pack(segment.astype(np.int64), bits))
        narrow = bitpack.unpack_array(packed, bits, len(segment))
        assert narrow.dtype == codes.dtype and np.array_equal(narrow, segment)
        assert torch.equal(bitpack.unpack(packed, bits, len(segment)), torch.from_numpy(segment.astype(np.int64)))
