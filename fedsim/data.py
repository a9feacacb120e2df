"""Data sets and their partition over clients.

Three data sets, none downloaded at run time:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, always present),
  split into train/test by a seeded stratified split;
* ``fashion-mnist``: the real 28x28 Fashion-MNIST (60,000 train / 10,000 test images), read
  from IDX files: Debian's package ``dataset-fashion-mnist`` or any directory holding the
  four files (``data.data_dir``);
* ``synthetic``: a seeded Gaussian classification problem of any size.

Partitions (``iid``, ``dirichlet``, ``shards``) assign every training sample to exactly one
client, deterministically for a seed, and never leave a client empty.

Randomness: every function here takes an explicit ``seed`` and draws from its own generator
(derived from the seed and a purpose tag), so the data split, the synthetic generator and the
partition are independent streams and nothing touches the global RNGs.
"""
from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from .errors import DataError, ScenarioError

DATASETS = ("digits", "fashion-mnist", "synthetic", "folder")
PARTITIONS = ("iid", "dirichlet", "shards")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` installs the IDX files (gzipped)."""
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------- seeds

def derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed for one purpose, from the run seed and tags (e.g. ``"partition"``).

    Hashing keeps streams for different purposes unrelated (the split and the partition of
    one run do not draw the same numbers) and accepts any Python int as a run seed.
    """
    h = hashlib.sha256(repr((int(seed),) + tuple(tags)).encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _numpy_rng(seed: int, *tags: Any) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *tags)))


# --------------------------------------------------------------------------- config

def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass
class DataConfig:
    """Settings under ``[data]``."""

    dataset: str = "digits"
    """``digits`` | ``fashion-mnist`` | ``synthetic``."""
    clients: int = 20
    """Number of clients the training set is partitioned over."""
    partition: str = "dirichlet"
    """``iid`` (seeded shuffle, near-equal split) | ``dirichlet`` (label skew, see ``alpha``)
    | ``shards`` (sort by label, deal ``shards_per_client`` label-pure shards to each)."""
    alpha: float = 0.5
    """Dirichlet concentration: small (0.1) = each client sees few labels; large (100) ~ iid."""
    shards_per_client: int = 2
    """Shards each client receives under ``partition = "shards"``."""
    data_dir: str | None = None
    """Directory of the four Fashion-MNIST IDX files (gzipped or not); default: Debian's
    ``/usr/share/datasets/fashion-mnist``. For ``folder``: a directory holding ``train.npz`` and
    ``test.npz`` (arrays ``x``, ``y``) or the four IDX files under Fashion-MNIST's names."""
    test_fraction: float = 0.2
    """Fraction of samples held out for testing (``digits`` and ``synthetic``; Fashion-MNIST
    keeps its official 60,000 / 10,000 split)."""
    samples: int = 0
    """Synthetic: total samples, train + test. 0 = auto: ``max(4000, 10 * clients)``, so each
    client holds about 8 training samples even with 10,000 clients."""
    features: int = 20
    """Synthetic: input dimension."""
    classes: int = 10
    """Synthetic: number of classes."""

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, reason: str) -> None:
            if not ok:
                raise ScenarioError(f"data.{key}", getattr(self, key), reason)

        need(self.dataset in DATASETS, "dataset", f"unknown data set (known: {', '.join(DATASETS)})")
        need(_is_int(self.clients) and self.clients >= 1, "clients", "must be an integer >= 1")
        need(self.partition in PARTITIONS, "partition", f"unknown partition (known: {', '.join(PARTITIONS)})")
        need(_is_real(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0, "alpha",
             "must be a finite number > 0")
        self.alpha = float(self.alpha)
        need(_is_int(self.shards_per_client) and self.shards_per_client >= 1, "shards_per_client",
             "must be an integer >= 1")
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)
        need(self.data_dir is None or (isinstance(self.data_dir, str) and self.data_dir != ""), "data_dir",
             "must be a directory path")
        need(_is_real(self.test_fraction) and 0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        self.test_fraction = float(self.test_fraction)
        need(_is_int(self.features) and self.features >= 1, "features", "must be an integer >= 1")
        need(_is_int(self.classes) and self.classes >= 2, "classes", "must be an integer >= 2")
        need(_is_int(self.samples) and (self.samples == 0 or self.samples >= 2 * self.classes), "samples",
             f"must be 0 (auto) or an integer >= 2 * classes ({2 * self.classes if _is_int(self.classes) else '?'})")

    @property
    def synthetic_samples(self) -> int:
        """Total synthetic samples (train + test) after resolving ``samples = 0``."""
        return self.samples or max(4000, 10 * self.clients)


@dataclass
class Dataset:
    """A loaded data set. Inputs are float32, labels int64 in ``[0, num_classes)``.

    Images are (N, C, H, W) in [0, 1]: digits (N, 1, 8, 8), Fashion-MNIST (N, 1, 28, 28);
    synthetic inputs are (N, features).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    """Shape of one sample, without the batch dimension."""
    name: str


# --------------------------------------------------------------------------- loading

SYNTHETIC_SEP = 2.5
"""Scale of the synthetic class means (in noise standard deviations, see _make_synthetic)."""

def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load (or generate) ``cfg.dataset``; ``seed`` drives the split and the generator."""
    if cfg.dataset == "digits":
        return _load_digits(cfg, seed)
    if cfg.dataset == "fashion-mnist":
        return _load_fashion_mnist(cfg)
    if cfg.dataset == "synthetic":
        return _make_synthetic(cfg, seed)
    if cfg.dataset == "folder":
        return load_folder(cfg.data_dir)
    raise ScenarioError("data.dataset", cfg.dataset, f"unknown data set (known: {', '.join(DATASETS)})")


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices holding ``round(test_fraction * n_c)`` of each class c in test.

    Vectorised: a random permutation, stably sorted by label, gives each sample a random rank
    within its class; the lowest ranks go to test. Both index arrays come out shuffled.
    """
    labels = np.asarray(labels)
    perm = rng.permutation(len(labels))
    by_class = perm[np.argsort(labels[perm], kind="stable")]
    counts = np.bincount(labels)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - starts[labels[by_class]]
    n_test = np.rint(counts * test_fraction).astype(np.int64)
    is_test = rank < n_test[labels]
    return perm[~is_test[perm]], perm[is_test[perm]]


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits, parsed once per process (~0.1 s a time: sweeps and tests build many
    runs). Never handed out: ``_load_digits`` returns copies (indexed by the split)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: never downloads

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    return x, y


def _load_digits(cfg: DataConfig, seed: int) -> Dataset:
    x, y = _digits_arrays()
    train, test = stratified_split(y, cfg.test_fraction, _numpy_rng(seed, "split", "digits"))
    x = torch.from_numpy(x).unsqueeze(1)
    y = torch.from_numpy(y)
    return Dataset(x[train].contiguous(), y[train].contiguous(), x[test].contiguous(), y[test].contiguous(),
                   num_classes=10, input_shape=(1, 8, 8), name="digits")


def _make_synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Gaussian classes sharing one anisotropic covariance.

    x = mu_y + Q diag(s) z with z ~ N(0, I): class means mu_c ~ N(0, (SEP^2 / features) I),
    Q a random rotation and scales s spread over [0.5, 1.5], so features are correlated and
    of unequal noise. Scaling the means by 1/sqrt(features) keeps the distance between class
    means (about SEP * sqrt(2)) the same in any dimension: classes overlap, a linear model is
    Bayes-optimal here and reaches well above chance (about 0.8 with the defaults) but not
    100 %. Labels are balanced.
    """
    n, d, k = cfg.synthetic_samples, cfg.features, cfg.classes
    rng = _numpy_rng(seed, "synthetic")
    means = rng.standard_normal((k, d)) * (SYNTHETIC_SEP / math.sqrt(d))
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.linspace(0.5, 1.5, d) if d > 1 else np.ones(1)
    y = rng.permutation(np.arange(n) % k)
    x = means[y] + (rng.standard_normal((n, d)) * scales) @ rotation.T
    train, test = stratified_split(y, cfg.test_fraction, _numpy_rng(seed, "split", "synthetic"))
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    return Dataset(xt[train].contiguous(), yt[train].contiguous(), xt[test].contiguous(), yt[test].contiguous(),
                   num_classes=k, input_shape=(d,), name="synthetic")


def _fashion_hint(where: Path) -> str:
    names = ", ".join(FASHION_MNIST_FILES.values())
    return (f"Fashion-MNIST IDX files not found in {where}. Get them with "
            f"`apt-get update && apt-get install -y dataset-fashion-mnist` (installs them under "
            f"{FASHION_MNIST_DIR}), or point `--set data.data_dir=DIR` at a directory holding the "
            f"four IDX files ({names}; each may be gzipped, ending in .gz).")


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def _load_fashion_mnist(cfg: DataConfig) -> Dataset:
    directory = Path(cfg.data_dir) if cfg.data_dir is not None else FASHION_MNIST_DIR
    found = {key: _find_idx(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise DataError(_fashion_hint(directory) + f" Missing: {', '.join(missing)}.")
    arrays = {key: read_idx(path) for key, path in found.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_x"], arrays[f"{part}_y"]
        px, py = found[f"{part}_x"], found[f"{part}_y"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{px}: expected uint8 images of shape (N, 28, 28), got {images.dtype}{images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise DataError(f"{py}: expected a 1-D uint8 label array, got {labels.dtype}{labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{px} holds {len(images)} images but {py} holds {len(labels)} labels")
        if len(labels) and int(labels.max()) >= 10:
            raise DataError(f"{py}: label {int(labels.max())} out of range 0..9")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(torch.float32).div_(255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(images(arrays["train_x"]), labels(arrays["train_y"]),
                   images(arrays["test_x"]), labels(arrays["test_y"]),
                   num_classes=10, input_shape=(1, 28, 28), name="fashion-mnist")


def load_folder(data_dir: str | os.PathLike | None) -> Dataset:
    """A data set of one's own (``dataset = "folder"``): ``train.npz`` and ``test.npz`` with
    arrays ``x`` (samples first) and ``y`` (integer labels 0..K-1), or the four IDX files
    named as Fashion-MNIST's (``train-images-idx3-ubyte[.gz]`` ...).

    Inputs: uint8 are scaled to [0, 1], floats kept; (N, H, W) images get a channel axis
    (N, 1, H, W) so the CNN takes them; (N, D) vectors and (N, C, H, W) images as they are.
    The number of classes is the largest label + 1.
    """
    if data_dir is None:
        raise ScenarioError("data.data_dir", None, 'dataset = "folder" needs data_dir = "DIR" (train.npz, test.npz)')
    directory = Path(data_dir)
    arrays: dict[str, np.ndarray] = {}
    if (directory / "train.npz").is_file() and (directory / "test.npz").is_file():
        for part in ("train", "test"):
            try:
                with np.load(directory / f"{part}.npz", allow_pickle=False) as f:
                    arrays[f"{part}_x"], arrays[f"{part}_y"] = np.asarray(f["x"]), np.asarray(f["y"])
            except (KeyError, ValueError, OSError) as exc:
                raise DataError(f"{directory / (part + '.npz')}: needs arrays x and y ({exc})") from None
    else:
        found = {key: _find_idx(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if any(p is None for p in found.values()):
            raise DataError(f"{directory}: no train.npz and test.npz, nor the four IDX files "
                            f"({', '.join(FASHION_MNIST_FILES.values())})")
        arrays = {key: read_idx(path) for key, path in found.items()}
    out = {}
    for part in ("train", "test"):
        x, y = arrays[f"{part}_x"], arrays[f"{part}_y"]
        if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or x.ndim < 2:
            raise DataError(f"{directory}: {part} needs x of shape (N, ...) and N integer labels y, "
                            f"got x{x.shape} {x.dtype}, y{y.shape} {y.dtype}")
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{directory}: {part} labels must be >= 0")
        xt = torch.from_numpy(np.ascontiguousarray(x))
        xt = xt.to(torch.float32).div_(255.0) if x.dtype == np.uint8 else xt.to(torch.float32)
        out[part] = (xt.unsqueeze(1) if x.ndim == 3 else xt, torch.from_numpy(y.astype(np.int64)))
    classes = int(max(out["train"][1].max(), out["test"][1].max())) + 1
    if classes < 2:
        raise DataError(f"{directory}: need at least two classes")
    return Dataset(*out["train"], *out["test"], num_classes=classes, input_shape=tuple(out["train"][0].shape[1:]),
                   name="folder")


# --------------------------------------------------------------------------- IDX files

IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type code (third magic byte) -> element type; multi-byte values are big-endian."""


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of one IDX file into a new, writable numpy array in native byte order.

    Layout: magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 dimensions, then
    exactly prod(dims) elements. Anything else raises :class:`DataError` naming ``source``.
    """
    if len(data) < 4:
        raise DataError(f"{source}: not an IDX file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES or data[3] == 0:
        raise DataError(f"{source}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise DataError(f"{source}: {what} IDX file ({len(data)} bytes, expected {expected} for "
                        f"{dtype} of shape {dims})")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a copy: writable, and frees ``data``


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected by the gzip magic, not the name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(raw, str(path))
    return parse_idx(raw, str(path))


_GUNZIPPED: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
"""xxh3-128 of gzipped bytes -> those bytes gunzipped, the last four (a data set's files)."""


def _gunzip(raw: bytes, path: str) -> bytes:
    """``raw`` gunzipped, kept for the next read of the same bytes: gunzipping Fashion-MNIST's
    training images takes ~0.3 s, paid otherwise by every run and sweep cell of a process;
    hashing them to recognise them, ~3 ms."""
    digest = xxhash.xxh3_128_digest(raw)
    out = _GUNZIPPED.get(digest)
    if out is not None:
        _GUNZIPPED.move_to_end(digest)
        return out
    try:
        out = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    _GUNZIPPED[digest] = out
    while len(_GUNZIPPED) > 4:
        _GUNZIPPED.popitem(last=False)
    return out


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzipped when ``compress`` or the name ends in .gz).

    The inverse of :func:`read_idx`: for building a ``data.data_dir`` of one's own.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("=") if dt.itemsize > 1 else dt: code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=") if array.dtype.itemsize > 1 else array.dtype
    if native not in codes or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX cannot hold {array.dtype} of {array.ndim} dimensions")
    code = codes[native]
    data = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
            + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes())
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


# --------------------------------------------------------------------------- partitions

def partition(labels: torch.Tensor, cfg: DataConfig, seed: int) -> list[torch.Tensor]:
    """Indices into the training set, one int64 tensor per client (ascending within a client).

    Disjoint, covering every sample, no client empty, identical for identical
    (labels, cfg, seed). ``iid``: a seeded shuffle split into near-equal parts.
    ``dirichlet``: for each class, client shares p ~ Dir(alpha, ..., alpha) and the class's
    shuffled samples cut at the cumulative shares (Hsu et al. 2019). ``shards``: samples
    sorted by label and cut into ``clients * shards_per_client`` label-pure shards (each class
    gets shards in proportion to its size), ``shards_per_client`` dealt to each client at
    random (McMahan et al. 2017); so a client sees at most ``shards_per_client`` labels when
    ``clients * shards_per_client >= classes`` and no client needed repairing.

    A client left empty by the draw is repaired deterministically: samples move one at a time
    from the currently largest client (see :func:`_fill_empty`).
    """
    y = labels.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    n, k = len(y), cfg.clients
    if n < k:
        raise ScenarioError("data.clients", k, f"more clients than training samples ({n}); every client needs at least one")
    if n and y.min() < 0:
        raise ValueError("labels must be >= 0")
    rng = _numpy_rng(seed, "partition", cfg.partition)
    if cfg.partition == "iid":
        owner = _iid_owner(n, k, rng)
    elif cfg.partition == "dirichlet":
        owner = _dirichlet_owner(y, k, cfg.alpha, rng)
    elif cfg.partition == "shards":
        owner = _shards_owner(y, k, cfg.shards_per_client, rng)
    else:
        raise ScenarioError("data.partition", cfg.partition, f"unknown partition (known: {', '.join(PARTITIONS)})")
    owner = _fill_empty(owner, k, rng)
    order = np.argsort(owner, kind="stable")  # ascending sample index within each client
    cuts = np.cumsum(np.bincount(owner, minlength=k))[:-1]
    return [torch.from_numpy(part) for part in np.split(order, cuts)]


def _iid_owner(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(n, dtype=np.int64)
    # Client i gets the i-th of k near-equal slices of a random permutation.
    owner[rng.permutation(n)] = (np.arange(n) * k) // n
    return owner


def dirichlet_shares(alpha: float, classes: int, clients: int, rng: np.random.Generator) -> np.ndarray:
    """(classes, clients) rows drawn from Dir(alpha, ..., alpha), computed in log space.

    Gamma(alpha) draws underflow to 0 for small alpha (a whole row can vanish, then 0/0), so
    use Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha) and normalise the logs.
    """
    log_g = np.log(rng.gamma(alpha + 1.0, size=(classes, clients))) + np.log1p(-rng.random((classes, clients))) / alpha
    log_g -= log_g.max(axis=1, keepdims=True)
    shares = np.exp(log_g)
    return shares / shares.sum(axis=1, keepdims=True)


def _class_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample indices grouped by label (ascending), random order within each label."""
    perm = rng.permutation(len(y))
    return perm[np.argsort(y[perm], kind="stable")]


def _dirichlet_owner(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(y)
    shares = dirichlet_shares(alpha, len(counts), k, rng)
    # Cut class c's n_c samples at floor(cumsum(p_c) * n_c); the last cut is exactly n_c.
    cuts = np.floor(np.cumsum(shares, axis=1) * counts[:, None]).astype(np.int64)
    cuts[:, -1] = counts
    per_client = np.diff(cuts, axis=1, prepend=0)  # (classes, clients), rows sum to n_c
    owner = np.empty(len(y), dtype=np.int64)
    owner[_class_order(y, rng)] = np.repeat(np.tile(np.arange(k), len(counts)), per_client.ravel())
    return owner


def _shards_owner(y: np.ndarray, k: int, per_client: int, rng: np.random.Generator) -> np.ndarray:
    n, total = len(y), k * per_client
    counts = np.bincount(y)
    order = _class_order(y, rng)
    present = np.flatnonzero(counts)
    if total >= len(present):
        # Label-pure shards: one per present class, the rest by largest remainder of
        # (total - #classes) * n_c / n (ties to the lower class id).
        quota = (total - len(present)) * counts[present] / n
        alloc = np.floor(quota).astype(np.int64)
        rest = total - len(present) - int(alloc.sum())
        alloc[np.argsort(-(quota - alloc), kind="stable")[:rest]] += 1
        shards_of = np.zeros(len(counts), dtype=np.int64)
        shards_of[present] = alloc + 1
        first_shard = np.concatenate(([0], np.cumsum(shards_of)[:-1]))
        class_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
        sorted_y = y[order]
        rank = np.arange(n) - class_start[sorted_y]
        shard = first_shard[sorted_y] + rank * shards_of[sorted_y] // counts[sorted_y]
    else:
        # Fewer shards than labels: equal cuts of the label-sorted order (shards mix labels).
        shard = (np.arange(n) * total) // n
    client_of_shard = np.empty(total, dtype=np.int64)
    client_of_shard[rng.permutation(total)] = np.arange(total) // per_client
    owner = np.empty(n, dtype=np.int64)
    owner[order] = client_of_shard[shard]
    return owner


def _fill_empty(owner: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Give every empty client one sample, taken one at a time from the largest client.

    Equivalent to repeating "move a random sample of the largest client (lowest id on ties)
    to the next empty client" but vectorised: the largest clients are cut down to a water
    level L (taking everything above it), then the lowest-id clients at L give one more.
    """
    counts = np.bincount(owner, minlength=k)
    empty = np.flatnonzero(counts == 0)
    need = len(empty)
    if need == 0:
        return owner
    owner = owner.copy()
    # Smallest level L >= 1 whose surplus sum(max(0, counts - L)) is at most `need`.
    sorted_counts = np.sort(counts)[::-1]
    lo, hi = 1, int(sorted_counts[0])
    while lo < hi:
        mid = (lo + hi) // 2
        if int(np.maximum(counts - mid, 0).sum()) <= need:
            hi = mid
        else:
            lo = mid + 1
    level = lo
    give = np.maximum(counts - level, 0)
    extra = need - int(give.sum())
    if extra:
        at_level = np.flatnonzero(counts >= level)[:extra]  # lowest ids among those now at L
        give[at_level] += 1
    # Each donor gives its `give` first samples in a random order.
    perm = rng.permutation(len(owner))
    by_client = perm[np.argsort(owner[perm], kind="stable")]
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(len(owner)) - start[owner[by_client]]
    donated = by_client[rank < give[owner[by_client]]]  # grouped by donor id
    owner[donated] = empty
    return owner
