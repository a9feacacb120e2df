"""The wire schema: round trips, and every kind of bad input rejected with a reason."""
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from algorithms.base import Payload
from fedsim import codec
from fedsim.codec import CodecError, Limits, Message

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.bool]


def msg(tensors=None, meta=None, bits=0):
    return Message(src=3, dst=-1, round=7, kind="model", version=7,
                   payload=Payload(tensors or {}, meta or {}, bits), msg_id=11, sent_at=1.25)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 5), max_size=4))
def test_round_trip_any_dtype_and_shape(dtype, shape):
    t = (torch.rand(shape) * 100).to(dtype)
    m = msg({"w": t, "b": torch.arange(3.0)}, {"samples": 4, "nested": {"a": [1, 2.5, "x"]}}, bits=123)
    out = codec.decode(codec.encode(m))
    assert out.payload.tensors["w"].dtype == dtype and tuple(out.payload.tensors["w"].shape) == tuple(shape)
    assert torch.equal(out.payload.tensors["w"], t)
    assert out.payload.meta == m.payload.meta and out.payload.payload_bits == 123
    assert (out.src, out.dst, out.round, out.kind, out.version, out.msg_id, out.sent_at) == (3, -1, 7, "model", 7, 11, 1.25)


def test_wire_bytes_are_frames_plus_zmtp_framing():
    frames = codec.encode(msg({"w": torch.zeros(1000)}))
    assert codec.wire_size(frames) == sum(len(f) for f in frames) + 9 + (2 if len(frames[0]) <= 255 else 9)
    assert len(frames[1]) == 4000  # raw float32 bytes, nothing added


def test_broadcast_shares_tensor_frames_between_envelopes():
    p = Payload({"w": torch.randn(10)})
    shared = codec.encode_tensors(p)
    a = codec.encode(Message(-1, 0, 1, "model", 1, p), shared)
    b = codec.encode(Message(-1, 5, 1, "model", 1, p), shared)
    assert a[1] is b[1]
    assert codec.decode(a).dst == 0 and codec.decode(b).dst == 5


def test_decode_cache_serves_a_broadcast_and_still_catches_every_flipped_bit():
    p = Payload({"w": torch.randn(3, 4), "b": torch.randn(4)})
    shared = codec.encode_tensors(p)
    copies = [[bytes(f) for f in codec.encode(Message(-1, c, 1, "model", 1, p), shared)] for c in range(4)]
    cache = codec.DecodeCache()
    first = codec.decode(copies[0], cache=cache)
    second = codec.decode(copies[1], cache=cache)
    assert second.dst == 1 and second.payload.tensors["w"] is first.payload.tensors["w"]  # decoded once
    assert second.payload.tensors is not first.payload.tensors  # each message owns its dict
    assert torch.equal(second.payload.tensors["b"], p.tensors["b"])
    rng = np.random.default_rng(1)
    for _ in range(200):  # a flipped bit anywhere (envelope or tensor) fails, cached or not
        bad = codec.corrupt(copies[2], rng)
        with pytest.raises(CodecError, match="checksum|bad_msgpack|bad_envelope|bad_tensor|bad_dtype|bad_shape|shape_mismatch|oversized|bad_version"):
            codec.decode(bad, cache=cache)
    assert torch.equal(codec.decode(copies[3], cache=cache).payload.tensors["w"], p.tensors["w"])
    other = Payload({"w": torch.zeros(3, 4), "b": torch.zeros(4)})  # same specs, new bytes: a miss
    assert torch.equal(codec.decode(codec.encode(Message(-1, 0, 2, "model", 2, other)), cache=cache).payload.tensors["w"],
                       torch.zeros(3, 4))


def test_large_frames_arrive_as_views_and_a_broadcast_is_checked_once_per_buffer():
    """Through real inproc sockets: frames of at least ``ZERO_COPY_BYTES`` reach the node as
    read-only views of the sender's bytes; the cache serves receivers of the same buffer
    and still computes the CRC of any other memory (equal bytes elsewhere, a flipped bit)."""
    import zmq
    from network.transport import ZERO_COPY_BYTES, Transport
    p = Payload({"w": torch.randn(ZERO_COPY_BYTES // 4 + 10), "b": torch.randn(4)})
    shared = codec.encode_tensors(p)
    ctx = zmq.Context()
    server = Transport(router=True, address="inproc://views", context=ctx)
    node = Transport(router=False, address="inproc://views", identity=b"n", context=ctx)
    got = []
    node.on_message = lambda peer, frames: got.append(frames)
    try:
        node.send(codec.encode(Message(0, -1, 0, "hello", 0, Payload())))
        server.on_message = lambda peer, frames: None
        assert server.drain() == 1
        for c in range(3):
            server.send(codec.encode(Message(-1, c, 1, "model", 1, p), shared), b"n")
        assert node.drain() == 3
    finally:
        node.close(), server.close(), ctx.term()
    assert [type(f) for f in got[0]] == [bytes, memoryview, bytes]  # envelope, w, b (small)
    assert got[0][1].readonly
    cache = codec.DecodeCache()
    first = codec.decode(got[0], cache=cache)
    second = codec.decode(got[1], cache=cache)
    assert second.payload.tensors["w"] is first.payload.tensors["w"]  # the same buffer: decoded once
    assert torch.equal(first.payload.tensors["w"], p.tensors["w"])
    elsewhere = [got[2][0], memoryview(bytes(got[2][1])), got[2][2]]  # equal bytes, other memory
    assert torch.equal(codec.decode(elsewhere, cache=cache).payload.tensors["w"], p.tensors["w"])
    flipped = bytearray(got[2][1])
    flipped[12345] ^= 4
    with pytest.raises(CodecError, match="checksum"):
        codec.decode([got[2][0], memoryview(bytes(flipped)), got[2][2]], cache=cache)


def test_random_bytes_rejected():
    rng = np.random.default_rng(0)
    for n in [0, 1, 3, 4, 5, 17, 300]:
        with pytest.raises(CodecError):
            codec.decode([rng.bytes(n)])


def test_truncated_msgpack_rejected():
    frames = codec.encode(msg({"w": torch.ones(4)}))
    with pytest.raises(CodecError) as e:
        codec.decode([frames[0][:-3], frames[1]])
    assert e.value.reason in ("bad_msgpack", "checksum", "bad_envelope")


def test_shape_disagreeing_with_bytes_rejected():
    frames = codec.encode(msg({"w": torch.ones(4)}))
    with pytest.raises(CodecError) as e:
        codec.decode([frames[0], frames[1][:-4]])
    assert e.value.reason == "shape_mismatch"


def forge(head_updates, tensor_frames=()):
    head = codec.peek_route(codec.encode(msg())[0])
    head.update(head_updates)
    env = msgpack.packb(head, use_bin_type=True)
    crc = 0
    for f in tensor_frames:
        crc = codec.checksum(f, crc)
    return [codec._CRC.pack(codec.checksum(env, crc)) + env, *tensor_frames]


def test_huge_declared_size_rejected_before_allocation():
    frames = forge({"tn": [["w", "float32", [2 ** 29]]]}, [b"\0" * 16])  # 2 GiB declared
    with pytest.raises(CodecError) as e:
        codec.decode(frames, Limits(max_message_bytes=256 * 2 ** 20))
    assert e.value.reason == "oversized"


@pytest.mark.parametrize("update, reason", [
    ({"tn": [["w", "object", [1]]]}, "bad_dtype"),
    ({"tn": [["w", "float32", [-1]]]}, "bad_shape"),
    ({"tn": [["w", "float32", [1] * 9]]}, "bad_shape"),
    ({"tn": [["w", "float32"]]}, "bad_tensor_spec"),
    ({"tn": [["w", "float32", [1]], ["w", "float32", [1]]]}, "bad_tensor_spec"),
    ({"v": 99}, "bad_version"),
    ({"src": "three"}, "bad_envelope"),
    ({"round": 1, "r": None}, "bad_envelope"),
])
def test_malformed_envelopes_rejected(update, reason):
    with pytest.raises(CodecError) as e:
        codec.decode(forge(update, [b"\0" * 4] * len(update.get("tn", []))))
    assert e.value.reason == reason


def test_missing_field_rejected():
    head = codec.peek_route(codec.encode(msg())[0])
    del head["k"]
    env = msgpack.packb(head)
    with pytest.raises(CodecError, match="missing field 'k'"):
        codec.peek_route(b"\0\0\0\0" + env)


def test_wrong_frame_count_rejected():
    frames = codec.encode(msg({"w": torch.ones(2)}))
    with pytest.raises(CodecError) as e:
        codec.decode([frames[0]])
    assert e.value.reason == "frame_count"


def test_every_single_bit_flip_is_caught():
    frames = codec.encode(msg({"w": torch.arange(6.0)}, {"samples": 3}))
    rng = np.random.default_rng(1)
    for _ in range(200):
        bad = codec.corrupt(frames, rng)
        with pytest.raises(CodecError):
            codec.decode(bad)


def test_oversized_header_rejected():
    with pytest.raises(CodecError) as e:
        codec.peek_route(b"\0" * 100, Limits(max_header_bytes=50))
    assert e.value.reason == "oversized_header"


def test_a_handed_over_large_tensor_travels_as_its_own_memory_and_decodes_the_same():
    """``Payload.handed_over``: a large tensor's frame is a view of the tensor itself (no
    copy), a small one and any tensor of a payload not handed over are copied; either way
    the frames decode to the same tensors, with the same CRC, and a flipped bit is caught."""
    import numpy as np

    from fedsim.codec import HANDED_OVER_BYTES, CodecError, decode, encode
    big = torch.arange(HANDED_OVER_BYTES // 4 + 7, dtype=torch.float32)
    small = torch.ones(3)
    tensors = {"big": big, "small": small}
    frames = {}
    for handed_over in (True, False):
        msg = Message(src=3, dst=-1, round=1, kind="model", version=1,
                      payload=Payload(tensors=dict(tensors), payload_bits=32, handed_over=handed_over))
        frames[handed_over] = encode(msg)
        got = decode(frames[handed_over])
        assert torch.equal(got.payload.tensors["big"], big) and torch.equal(got.payload.tensors["small"], small)
    view, copy = frames[True][1], frames[False][1]
    assert isinstance(view, memoryview) and view.readonly
    assert np.frombuffer(view, dtype=np.uint8).ctypes.data == big.data_ptr()  # the tensor's own memory
    assert isinstance(copy, bytes) and isinstance(frames[True][2], bytes)
    assert frames[True][0] == frames[False][0]  # the same envelope and CRC
    flipped = bytearray(view)
    flipped[5] ^= 0x10
    with pytest.raises(CodecError):
        decode([frames[True][0], bytes(flipped), frames[True][2]])
