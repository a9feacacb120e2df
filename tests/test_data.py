"""Data sets, the IDX reader, and partitions."""
from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from fedsim.data import (FASHION_MNIST_DIR, DataConfig, _fill_empty, dirichlet_shares, load_dataset, parse_idx,
                         partition, read_idx, stratified_split, write_idx)
from fedsim.errors import DataError, ScenarioError
from fedsim.models import ModelConfig, build_model, evaluate


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(), seed=0)


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("key,value", [
    ("dataset", "mnist"), ("clients", 0), ("clients", 2.5), ("clients", True), ("partition", "zipf"),
    ("alpha", 0), ("alpha", -1.0), ("alpha", float("nan")), ("alpha", float("inf")), ("shards_per_client", 0),
    ("data_dir", ""), ("data_dir", 3), ("test_fraction", 0.0), ("test_fraction", 1.0), ("samples", -1),
    ("samples", 5), ("features", 0), ("classes", 1),
])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ScenarioError) as e:
        DataConfig(**{key: value})
    assert e.value.key == f"data.{key}"
    assert f"data.{key}" in str(e.value)


def test_config_normalises_numbers():
    cfg = DataConfig(alpha=1, test_fraction=0.25, data_dir=Path("/tmp"))
    assert isinstance(cfg.alpha, float) and cfg.data_dir == "/tmp"
    assert DataConfig(clients=10).synthetic_samples == 4000
    assert DataConfig(clients=10_000).synthetic_samples == 100_000
    assert DataConfig(samples=300).synthetic_samples == 300


# --------------------------------------------------------------------------- digits

def test_digits_shapes_and_stratified_split(digits):
    ds = digits
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_x.shape[1:] == (1, 8, 8) and len(ds.train_x) + len(ds.test_x) == 1797
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) == 1.0
    # Stratified: every class holds round(0.2 * n_c) test samples.
    total = torch.bincount(torch.cat([ds.train_y, ds.test_y]), minlength=10)
    assert torch.equal(torch.bincount(ds.test_y, minlength=10), torch.round(total * 0.2).long())


def test_digits_split_is_seeded(digits):
    again = load_dataset(DataConfig(), seed=0)
    other = load_dataset(DataConfig(), seed=1)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    assert not torch.equal(other.train_x, digits.train_x)


def test_digits_learnable_with_logistic_model(digits):
    """Loading + evaluate end to end: 300 minibatch SGD steps of a logistic model."""
    ds = digits
    model = build_model(ModelConfig(kind="logistic"), ds.input_shape, ds.num_classes, seed=0)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    acc0, loss0 = evaluate(model, {k: v.detach() for k, v in params.items()}, ds.test_x, ds.test_y)
    for _ in range(300):
        idx = torch.randint(len(ds.train_x), (64,), generator=gen)
        loss = F.cross_entropy(functional_call(model, params, (ds.train_x[idx],)), ds.train_y[idx])
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= 0.5 * g
    acc, loss = evaluate(model, {k: v.detach() for k, v in params.items()}, ds.test_x, ds.test_y, batch_size=100)
    assert acc > 0.9, acc
    assert loss < loss0 and acc > acc0


def test_stratified_split_is_a_partition():
    labels = np.repeat(np.arange(4), [10, 1, 0, 7])
    train, test = stratified_split(labels, 0.3, np.random.default_rng(0))
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[test], minlength=4).tolist() == [3, 0, 0, 2]


# --------------------------------------------------------------------------- synthetic

def test_synthetic_shapes_seeded_and_learnable():
    cfg = DataConfig(dataset="synthetic", features=12, classes=5, samples=2000)
    ds = load_dataset(cfg, seed=3)
    assert ds.input_shape == (12,) and ds.num_classes == 5
    assert ds.train_x.shape == (1600, 12) and ds.test_x.shape == (400, 12)
    assert torch.bincount(ds.train_y).tolist() == [320] * 5
    assert torch.equal(load_dataset(cfg, seed=3).train_x, ds.train_x)
    assert not torch.equal(load_dataset(cfg, seed=4).train_x, ds.train_x)
    # A logistic model learns it well above chance (0.2) but it is not trivial.
    from sklearn.linear_model import LogisticRegression
    fit = LogisticRegression(max_iter=1000).fit(ds.train_x.numpy(), ds.train_y.numpy())
    acc = fit.score(ds.test_x.numpy(), ds.test_y.numpy())
    assert 0.6 < acc < 0.99, acc


def test_synthetic_for_ten_thousand_clients_is_fast():
    cfg = DataConfig(dataset="synthetic", clients=10_000, partition="dirichlet", alpha=0.1)
    start = time.perf_counter()
    ds = load_dataset(cfg, seed=0)
    parts = partition(ds.train_y, cfg, seed=0)
    elapsed = time.perf_counter() - start
    assert len(parts) == 10_000 and min(len(p) for p in parts) >= 1
    assert elapsed < 2.0, elapsed  # measured ~0.1 s; generous for a loaded CI machine


# --------------------------------------------------------------------------- IDX files

def _idx_bytes(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


@pytest.mark.parametrize("compressed", [False, True])
def test_read_handwritten_idx(tmp_path, compressed):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(0x08, (2, 3, 4), images.tobytes())
    path = tmp_path / ("x.gz" if compressed else "x")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    out = read_idx(path)
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    out[0, 0, 0] = 7  # writable, owns its memory


def test_read_big_endian_types(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 1e30]], dtype=">f4")
    (tmp_path / "f").write_bytes(_idx_bytes(0x0D, (2, 2), values.tobytes()))
    out = read_idx(tmp_path / "f")
    assert out.dtype == np.float32 and out.dtype.isnative and np.array_equal(out, values.astype(np.float32))


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
       compress=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_idx_round_trip(tmp_path_factory, shape, dtype, compress, seed):
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path_factory.mktemp("idx") / "a.idx"
    write_idx(path, array, compress=compress)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == tuple(shape) and np.array_equal(out, array)


@pytest.mark.parametrize("raw,match", [
    (b"", "not an IDX"),
    (b"\x00\x00", "not an IDX"),
    (b"\x08\x03\x00\x00" + bytes(20), "bad magic"),            # magic in the wrong place
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),  # unknown type code
    (b"\x00\x00\x08\x00", "bad magic"),                        # zero dimensions
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
    (_idx_bytes(0x08, (2, 3), bytes(5)), "truncated"),
    (_idx_bytes(0x08, (2, 3), bytes(7)), "trailing bytes"),
    (_idx_bytes(0x0C, (2,), bytes(7)), "truncated"),
])
def test_malformed_idx_raises(raw, match):
    with pytest.raises(DataError, match=match):
        parse_idx(raw, "test")


def test_a_gzipped_file_rewritten_in_place_is_read_anew(tmp_path, monkeypatch):
    """Gunzipped bytes are kept by the digest of the gzipped ones: the same file is gunzipped
    once, and a file rewritten with other values of the same size (and perhaps within the
    same timestamp tick) is never taken for the old one."""
    import fedsim.data as data

    calls = []
    real = gzip.decompress
    monkeypatch.setattr(data, "_GUNZIPPED", type(data._GUNZIPPED)())  # nothing kept from other tests
    monkeypatch.setattr(data.gzip, "decompress", lambda raw: calls.append(len(raw)) or real(raw))
    path = tmp_path / "a.gz"
    first, second = np.arange(64, dtype=np.int32).reshape(8, 8), np.arange(64, 128, dtype=np.int32).reshape(8, 8)
    write_idx(path, first)
    assert np.array_equal(read_idx(path), first) and np.array_equal(read_idx(path), first)
    assert len(calls) == 1
    write_idx(path, second)
    assert np.array_equal(read_idx(path), second)
    assert len(calls) == 2


def test_truncated_gzip_raises(tmp_path):
    data = gzip.compress(_idx_bytes(0x08, (100,), bytes(range(100))))
    (tmp_path / "t.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "t.gz")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "absent")


def _write_fake_fashion(directory: Path, n_train=6, n_test=4, compress=False, **override) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    arrays.update(override)
    for name, array in arrays.items():
        write_idx(directory / (name + (".gz" if compress else "")), array)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_from_data_dir(tmp_path, compress):
    _write_fake_fashion(tmp_path, compress=compress)
    ds = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)), seed=0)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.name == "fashion-mnist"
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.test_x.shape == (4, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and float(ds.train_x.max()) <= 1.0
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else "")))
    assert torch.allclose(ds.train_x[:, 0] * 255, torch.from_numpy(raw).float())


def test_fashion_bad_contents(tmp_path):
    _write_fake_fashion(tmp_path, **{"train-labels-idx1-ubyte": np.zeros(5, np.uint8)})
    with pytest.raises(DataError, match="6 images but .* 5 labels"):
        load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)), seed=0)
    _write_fake_fashion(tmp_path, **{"t10k-images-idx3-ubyte": np.zeros((4, 8, 8), np.uint8)})
    with pytest.raises(DataError, match="28, 28"):
        load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)), seed=0)


def test_fashion_missing_says_how_to_get_it(tmp_path):
    _write_fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)), seed=0)
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "data.data_dir" in msg
    assert "Missing: t10k-labels-idx1-ubyte" in msg
    with pytest.raises(DataError, match="apt-get"):
        load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "nowhere")), seed=0)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_dataset(DataConfig(dataset="fashion-mnist"), seed=0)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.train_y.shape == (60000,)
    assert ds.test_x.shape == (10000, 1, 28, 28) and ds.test_y.shape == (10000,)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0


# --------------------------------------------------------------------------- partitions

def _labels(n=1000, classes=10, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, classes, n))


def _check_partition(parts, n, clients):
    assert len(parts) == clients
    assert all(p.dtype == torch.int64 and len(p) >= 1 for p in parts)
    everything = torch.cat(parts)
    assert len(everything) == n and torch.equal(torch.sort(everything).values, torch.arange(n))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partition_is_a_seeded_cover(kind):
    labels = _labels()
    cfg = DataConfig(clients=17, partition=kind, alpha=0.3, shards_per_client=3)
    parts = partition(labels, cfg, seed=5)
    _check_partition(parts, len(labels), 17)
    again = partition(labels, cfg, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, cfg, seed=6)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), clients=st.integers(1, 60), classes=st.integers(1, 12),
       kind=st.sampled_from(["iid", "dirichlet", "shards"]), alpha=st.sampled_from([1e-3, 0.1, 1.0, 100.0]),
       spc=st.integers(1, 4), seed=st.integers(0, 1000))
def test_partition_properties(n, clients, classes, kind, alpha, spc, seed):
    labels = _labels(n, classes, seed)
    cfg = DataConfig(clients=clients, partition=kind, alpha=alpha, shards_per_client=spc)
    if n < clients:
        with pytest.raises(ScenarioError) as e:
            partition(labels, cfg, seed)
        assert e.value.key == "data.clients"
        return
    _check_partition(partition(labels, cfg, seed), n, clients)


def test_iid_is_near_equal():
    parts = partition(_labels(1003), DataConfig(clients=10, partition="iid"), seed=0)
    assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3


def _labels_per_client(parts, labels):
    return np.array([len(torch.unique(labels[p])) for p in parts])


def test_dirichlet_small_alpha_is_skewed():
    labels = _labels(5000)
    iid = _labels_per_client(partition(labels, DataConfig(clients=50, partition="iid"), seed=0), labels)
    skew = _labels_per_client(partition(labels, DataConfig(clients=50, partition="dirichlet", alpha=0.1), 0), labels)
    flat = _labels_per_client(partition(labels, DataConfig(clients=50, partition="dirichlet", alpha=100.0), 0), labels)
    assert iid.mean() == 10.0 and flat.mean() > 9.5
    assert skew.mean() < 4.0, skew.mean()


def test_shards_limit_labels_per_client():
    labels = _labels(2000)
    for spc in (1, 2, 3):
        parts = partition(labels, DataConfig(clients=25, partition="shards", shards_per_client=spc), seed=1)
        _check_partition(parts, 2000, 25)
        assert _labels_per_client(parts, labels).max() <= spc
        sizes = np.array([len(p) for p in parts])
        assert sizes.max() <= 2 * sizes.min() + spc  # shards are near-equal within a class


def test_digits_shards_two_labels_per_client(digits):
    parts = partition(digits.train_y, DataConfig(partition="shards"), seed=0)
    counts = _labels_per_client(parts, digits.train_y)
    assert counts.max() <= 2 and counts.mean() > 1.5


def test_too_few_samples_for_clients():
    with pytest.raises(ScenarioError, match="more clients than training samples") as e:
        partition(_labels(5), DataConfig(clients=6), seed=0)
    assert e.value.key == "data.clients"


def test_dirichlet_shares_survive_tiny_alpha():
    # Plain Gamma(1e-4) draws underflow to 0 (whole rows would be 0/0); the log-space draw does not.
    shares = dirichlet_shares(1e-4, 10, 1000, np.random.default_rng(0))
    assert np.isfinite(shares).all() and np.allclose(shares.sum(axis=1), 1.0)
    assert np.median(shares.max(axis=1)) > 0.9  # Dir with total concentration 0.1: mass piles on few


def test_dirichlet_shares_have_dirichlet_moments():
    a, k = 0.05, 4
    shares = dirichlet_shares(a, 20_000, k, np.random.default_rng(1))
    a0 = a * k
    assert np.allclose(shares.mean(axis=0), 1 / k, atol=0.01)
    var = (a * (a0 - a)) / (a0 ** 2 * (a0 + 1))  # 0.156
    assert np.allclose(shares.var(axis=0), var, atol=0.01)


def _naive_fill(owner, k):
    counts = np.bincount(owner, minlength=k)
    for empty in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))  # lowest id among the largest
        counts[donor] -= 1
        counts[empty] += 1
    return counts


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 30), data=st.data())
def test_fill_empty_matches_one_at_a_time_greedy(k, data):
    n = data.draw(st.integers(k, 3 * k + 5))
    owner = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)), dtype=np.int64)
    filled = _fill_empty(owner, k, np.random.default_rng(0))
    assert np.array_equal(np.bincount(filled, minlength=k), _naive_fill(owner, k))
    moved = filled != owner
    assert moved.sum() == (np.bincount(owner, minlength=k) == 0).sum()
