"""The contract between an algorithm and the runtime that carries its messages.

An algorithm is two halves that never share memory:

* a **server half**: ``server_round(comm)``, one coroutine per round, written with the
  collective primitives of :class:`ServerComm` (broadcast, gather until a deadline, send
  to one). A multi-phase round (PowerSGD's P then Q, FeDLRT's basis / augmentation /
  coefficients) is several primitives in one coroutine, so it reads like the paper;
* a **client half**: plain functions ``handler(ctx, payload) -> Payload | None`` keyed by
  message kind. A handler's reply is gathered by the server under the same kind.

Everything here is pure torch. An algorithm never learns whether it runs in virtual or
real time, over inproc or tcp: the runtime (``fedsim``) provides ``ServerComm`` and
``ClientContext``; tests provide fakes.
"""
from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import torch
import xxhash
from torch import nn

Params = dict[str, torch.Tensor]
"""Named parameters in the order of ``model.named_parameters()``."""


class ConfigError(ValueError):
    """A bad algorithm setting. ``key`` is the scenario key (``algorithm.<key>``)."""

    def __init__(self, key: str, value: Any, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"algorithm.{key} = {value!r}: {reason}")


class ProtocolError(ValueError):
    """A message an algorithm cannot apply (wrong shape, unknown field, NaN ...)."""


@dataclass
class Payload:
    """What one message of an algorithm carries.

    tensors:       named tensors, each sent as its own ZeroMQ frame (already bit-packed
                   where the method quantizes: a ``uint8`` tensor of packed codes).
    meta:          small msgpack-able values (ints, floats, strings, lists, dicts).
    payload_bits:  the size of this message by the method's own formula, in **bits**
                   (what its paper counts); the runtime also measures the real wire bytes.
    version:       the state version this payload was computed against. ``None`` in a
                   client reply means "the version of the request it answers".
    handed_over:   the sender never changes these tensors after sending (they are made for
                   this message, as FedAvg's deltas): the codec may then put a large tensor's
                   own memory on the wire instead of a copy (``fedsim.codec``).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    payload_bits: int = 0
    version: int | None = None
    handed_over: bool = False

    @property
    def tensor_bytes(self) -> int:
        """Raw bytes of all tensors (what travels in frames), in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Reply:
    """A client's answer as the server receives it."""

    client: int
    payload: Payload
    version: int


class ServerComm(Protocol):
    """Collective primitives the runtime gives a server round."""

    round: int
    """The round number, from 0."""
    participants: list[int]
    """Clients selected for this round, sorted by id."""

    async def broadcast(
        self,
        kind: str,
        payload: Payload | Callable[[int], Payload],
        *,
        version: int,
        to: list[int] | None = None,
    ) -> None:
        """Send ``payload`` (or ``payload(client)``) to ``to`` (default: participants)."""

    async def gather(
        self,
        kind: str,
        *,
        version: int | None = None,
        clients: list[int] | None = None,
        deadline_s: float | None = None,
    ) -> dict[int, Reply]:
        """Collect replies of ``kind`` from ``clients`` (default: those broadcast to).

        Returns when every expected client answered or ``deadline_s`` seconds (simulated
        or wall, whichever clock runs) passed. With ``version`` set, a reply computed
        against another version is rejected and counted, never returned. The dict is in
        client-id order so that aggregation does not depend on arrival order.
        """

    async def send(self, client: int, kind: str, payload: Payload, *, version: int) -> None:
        """Send one message to one client."""

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a named counter (appears in summary.json)."""

    def log(self, event: str, **fields: Any) -> None:
        """Append an event to the run's event log."""


class ClientContext(Protocol):
    """What a client handler may use. One per (client, message)."""

    client_id: int
    round: int
    model: nn.Module
    """The architecture, shared by all clients of a process: call it with
    ``torch.func.functional_call(model, params, x)``; never keep state in it."""
    x: torch.Tensor
    y: torch.Tensor
    """This client's local training data."""
    generator: torch.Generator
    """Seeded from (run seed, client id, round): the only randomness a handler uses."""
    state: dict[str, Any]
    """This client's memory across rounds (error feedback, quantizer state ...).
    A crash empties it; handlers must then resynchronise with the server."""

    def charge(self, samples: int, factor: float = 1.0) -> None:
        """Charge compute for ``samples`` forward+backward passes (times ``factor``)."""


Handler = Callable[[ClientContext, Payload], "Payload | None"]
BatchHandler = Callable[[Sequence[ClientContext], Sequence[Payload]], "list[Payload | None | ProtocolError]"]


class Algorithm(ABC):
    """Base class of every method. Subclasses set ``name`` and ``Config``."""

    name: ClassVar[str]
    stateful: ClassVar[bool] = False
    """True when client and server mirror state (the property tests then cover it)."""

    @dataclass
    class Config:
        """Settings under ``[algorithm]``; subclasses extend it. Units in field docs."""

        lr: float = 0.1
        """Learning rate (server step for gradient methods, client step for local ones)."""
        client_fraction: float = 1.0
        """Fraction of clients selected each round."""

        def __post_init__(self) -> None:
            check(self.lr > 0, "lr", self.lr, "must be > 0")
            check(0 < self.client_fraction <= 1, "client_fraction", self.client_fraction, "must be in (0, 1]")

    def __init__(self, config: "Algorithm.Config", model: nn.Module):
        # One instance serves both halves in a single process. Client handlers may read
        # self.config and the shapes of self.params, never the server's values: in a
        # deployment each process has its own instance.
        self.config = config
        self.model = model
        self.params: Params = {k: v.detach().clone() for k, v in model.named_parameters()}

    @abstractmethod
    async def server_round(self, comm: ServerComm) -> None:
        """Run one round: the paper's server pseudo-code, step by step."""

    @abstractmethod
    def client_handlers(self) -> Mapping[str, Handler]:
        """Message kind -> client handler."""

    def client_batch_handlers(self) -> Mapping[str, BatchHandler]:
        """Message kind -> a handler for many clients at once (optional).

        The runtime may hand a batch handler every message of that kind that its clients
        received at one instant of virtual time; it must return, per message and in order,
        what the plain handler would (a payload, ``None``, or the :class:`ProtocolError`
        it would raise), up to float rounding. Default: none (one client at a time)."""
        return {}

    def check_reply(self, kind: str, payload: Payload) -> None:
        """Validate a client's reply before the server uses it; raise :class:`ProtocolError`.

        The runtime calls this inside ``gather``: a reply that fails is rejected with a
        logged, counted reason and never reaches ``server_round``. Override per method.
        """

    def model_params(self) -> Params:
        """Dense parameters of the current global model (for evaluation and hashing)."""
        return self.params

    def client_digest(self, state: dict[str, Any]) -> bytes:
        """Digest of the state a client shares with the server (stateful methods)."""
        return state_digest(state)

    def server_digest(self, client: int) -> bytes:
        """Digest of the server's mirror of one client's shared state."""
        return state_digest({})

    @classmethod
    def make_config(cls, values: Mapping[str, Any]) -> "Algorithm.Config":
        """Build the config from scenario values, naming an unknown key."""
        names = {f.name for f in dataclasses.fields(cls.Config)}
        for key in values:
            if key not in names:
                raise ConfigError(key, values[key], f"unknown key for algorithm '{cls.name}' (known: {', '.join(sorted(names))})")
        return cls.Config(**values)


def check(ok: bool, key: str, value: Any, reason: str) -> None:
    """Raise :class:`ConfigError` unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, reason)


def check_int(key: str, value: Any, low: int, high: int | None = None, note: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int (not a bool) in [low, high]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    span = f"in {low}..{high}" if high is not None else f">= {low}"
    check(ok, key, value, f"must be an integer {span}{note}")


_NUMPY_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool})


def state_digest(state: Mapping[str, Any], new_hash: Callable[[], Any] = hashlib.sha256) -> bytes:
    """A byte digest of tensors (and scalars) in a mapping, independent of insertion order
    (``new_hash``: a hashlib-style constructor, sha256 by default)."""
    h = new_hash()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value
            if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not t.requires_grad and t.is_contiguous():
                # the common case in fewer steps: a CPU tensor's own buffer, in C order
                buf = t.numpy()
                if buf.flags.c_contiguous:
                    h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
                    if t.numel():
                        h.update(buf)
                    continue
            t = t.detach().contiguous().cpu()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            # flatten first: a "contiguous" tensor with a size-1 dim may keep a stride != 1
            # there (a rank-1 QR factor), which view(uint8) refuses
            if t.numel():  # the buffer itself, not a bytes copy of it
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, Mapping):
            h.update(state_digest(value, new_hash))
        else:
            h.update(repr(value).encode())
    return h.digest()


def content_tag(state: Mapping[str, Any]) -> str:
    """16 hex digits (64 bits) naming ``state``'s content: the tags a client and the server
    compare on the wire to know that their mirrored copies agree (LAQ's accumulators, top-k's
    estimates, PowerSGD's Q). The hash is xxh3-128 (xxhash), about 25x faster than sha256 on
    QRR's 240 KB accumulator, where sha256 cost ~15% of a client's encode: a tag detects two
    honest copies drifting apart (chance 2^-64 that two different states share one); it
    authenticates nothing (CURVE does), and a client that forged one could only spoil its own
    contribution, which it can do anyway."""
    return state_digest(state, xxhash.xxh3_128).hex()[:16]


def params_digest(params: Params) -> str:
    """Hex sha256 of parameters' bytes in name order (the run's ``model_sha256``)."""
    return state_digest(params).hex()


_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make a method reachable as ``[algorithm] name = "<cls.name>"``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise ConfigError("name", name, f"unknown algorithm (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)
