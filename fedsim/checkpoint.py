"""Checkpoints: what a server must not lose when its process dies.

After every completed round the server writes one file, ``checkpoint.msgpack`` in its
``--out`` directory: the round, the algorithm's server state (global model, mirrors, warm
starts, bases, versions), the emulator's random streams, counters, metrics and the event
log so far. The file is msgpack, like the wire, with tensors as raw little-endian bytes:
never pickle. It is written to a temporary file, fsynced and renamed over the old one, so a
crash at any instant leaves either the previous checkpoint or the new one, never half of one.

Object graphs are encoded generically (:func:`to_plain` / :func:`from_plain`): plain
values, tensors, numpy arrays, lists, tuples, deques, sets, dicts with any msgpack-able keys,
random generators, and dataclasses defined in the ``algorithms`` package (the only classes
rebuilt by name: an allow-list, so a checkpoint file cannot make the server build arbitrary
objects). Anything else is a :class:`CheckpointError` naming the attribute path, so a
method that grows new kinds of state fails loudly in the tests instead of resuming wrong.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

FORMAT = 1
FILENAME = "checkpoint.msgpack"
_ALLOWED_MODULE_PREFIX = "algorithms."
_SKIP_ATTRIBUTES = frozenset({"config", "model"})
"""Rebuilt from the scenario on restore: the settings and the (stateless) model template."""


class CheckpointError(RuntimeError):
    """A state that cannot be saved or a file that cannot be restored."""


def _tensor(t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"__tensor__": dtype, "shape": list(t.shape), "data": raw}


def to_plain(value: Any, path: str = "state") -> Any:
    """An msgpack-able tree for ``value`` (see the module docstring for what is allowed)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
        return {"__bigint__": str(value)}  # a PCG64 generator's 128-bit state
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.dtype.str, "shape": list(value.shape),
                "data": np.ascontiguousarray(value).tobytes()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Generator):
        return {"__torch_generator__": _tensor(value.get_state())}
    if isinstance(value, np.random.Generator):
        return {"__numpy_generator__": to_plain(value.bit_generator.state, path)}
    if isinstance(value, list):
        return [to_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, collections.deque):
        return {"__deque__": [to_plain(v, f"{path}[{i}]") for i, v in enumerate(value)], "maxlen": value.maxlen}
    if isinstance(value, tuple):
        return {"__tuple__": [to_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted((to_plain(v, path) for v in value), key=repr)}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
            return {k: to_plain(v, f"{path}.{k}") for k, v in value.items()}
        return {"__map__": [[to_plain(k, path), to_plain(v, f"{path}[{k!r}]")] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith(_ALLOWED_MODULE_PREFIX):
            raise CheckpointError(f"{path}: dataclass {cls.__module__}.{cls.__qualname__} is outside algorithms/")
        fields = {f.name: to_plain(getattr(value, f.name), f"{path}.{f.name}") for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise CheckpointError(f"{path}: cannot checkpoint a {type(value).__module__}.{type(value).__qualname__}")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown tensor dtype {name!r}")
    return dtype


def from_plain(value: Any) -> Any:
    """Inverse of :func:`to_plain`."""
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__bigint__" in value:
        return int(value["__bigint__"])
    if "__tensor__" in value:
        dtype = _dtype(value["__tensor__"])
        raw = bytearray(value["data"])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(value["shape"]).clone()
    if "__ndarray__" in value:
        return np.frombuffer(value["data"], dtype=np.dtype(value["__ndarray__"])).reshape(value["shape"]).copy()
    if "__torch_generator__" in value:
        g = torch.Generator()
        g.set_state(from_plain(value["__torch_generator__"]))
        return g
    if "__numpy_generator__" in value:
        state = from_plain(value["__numpy_generator__"])
        bit_generator = getattr(np.random, state["bit_generator"])()
        bit_generator.state = state
        return np.random.Generator(bit_generator)
    if "__deque__" in value:
        return collections.deque((from_plain(v) for v in value["__deque__"]), maxlen=value["maxlen"])
    if "__tuple__" in value:
        return tuple(from_plain(v) for v in value["__tuple__"])
    if "__set__" in value:
        return {_hashable(from_plain(v)) for v in value["__set__"]}
    if "__map__" in value:
        return {_hashable(from_plain(k)): from_plain(v) for k, v in value["__map__"]}
    if "__dataclass__" in value:
        module, _, qualname = value["__dataclass__"].partition(":")
        if not module.startswith(_ALLOWED_MODULE_PREFIX):
            raise CheckpointError(f"refusing to rebuild {value['__dataclass__']}: outside algorithms/")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise CheckpointError(f"{value['__dataclass__']} is not a dataclass")
        fields = {k: from_plain(v) for k, v in value["fields"].items()}
        init = {f.name for f in dataclasses.fields(obj) if f.init}
        inst = obj(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                object.__setattr__(inst, k, v)
        return inst
    return {k: from_plain(v) for k, v in value.items()}


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def algorithm_state(algorithm: Any) -> dict[str, Any]:
    """Every attribute of an algorithm instance but its settings and model template."""
    return {k: v for k, v in vars(algorithm).items() if k not in _SKIP_ATTRIBUTES}


def restore_algorithm(algorithm: Any, state: dict[str, Any]) -> None:
    """Overlay a saved state on a freshly built instance of the same method."""
    for k, v in state.items():
        setattr(algorithm, k, v)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old or its new content, whatever
    happens: a temporary file in the same directory, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dumps(state: dict[str, Any]) -> bytes:
    return msgpack.packb({"format": FORMAT, "state": to_plain(state)}, use_bin_type=True)


def loads(data: bytes) -> dict[str, Any]:
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise CheckpointError(f"not a fedsim checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"not a fedsim checkpoint of format {FORMAT}")
    return from_plain(doc["state"])


def save(directory: Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / FILENAME
    write_atomic(path, dumps(state))
    return path


def load(directory: Path) -> dict[str, Any]:
    path = Path(directory) / FILENAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {directory} (expected {FILENAME}; was the server run with --out?)")
    return loads(path.read_bytes())
