"""Bounded accounting of what a node refuses: counted always, logged with a rate limit.

A hostile peer can make a node reject a million messages; the log must not grow a million
rows (nor the memory holding them). :class:`RejectLog` logs the first ``full`` rejections
of each (peer, reason) in full — a run with a handful of rejections logs exactly what it
always did — and after that one ``reject_summary`` row per (peer, reason) at most every
``every_s`` seconds of the node's clock, plus a last one when the run ends
(:meth:`RejectLog.flush`). The table of (peer, reason) pairs is bounded too: past
``max_keys`` pairs, new peers share one ``"*"`` entry per reason.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

MAX_PEER_CHARS = 40
"""Characters of a routing id (as hex) kept in a log row."""


def peer_label(peer: bytes) -> str:
    """A routing id as a short, log-safe string (hex, capped)."""
    return peer.hex()[:MAX_PEER_CHARS]


class _Entry:
    __slots__ = ("total", "suppressed", "last_summary")

    def __init__(self) -> None:
        self.total = 0
        self.suppressed = 0
        self.last_summary = float("-inf")


class RejectLog:
    """``log(event, **fields)`` receives ``reject`` rows (the first ``full`` per key) and
    ``reject_summary`` rows (``peer``, ``reason``, ``suppressed`` since the last row,
    ``total`` so far). ``now()`` is the node's clock in seconds."""

    def __init__(self, log: Callable[..., None], now: Callable[[], float], *, full: int = 100,
                 every_s: float = 10.0, max_keys: int = 1024):
        self.log, self.now = log, now
        self.full, self.every_s, self.max_keys = full, every_s, max_keys
        self._entries: dict[tuple[bytes, str], _Entry] = {}

    def __call__(self, peer: bytes, reason: str, **fields: Any) -> None:
        key = (peer, reason)
        e = self._entries.get(key)
        if e is None:
            if len(self._entries) >= self.max_keys:
                key = (b"*", reason)
                e = self._entries.get(key)
            if e is None:
                e = self._entries[key] = _Entry()
        e.total += 1
        if e.total <= self.full:
            self.log("reject", reason=reason, **fields)
            return
        e.suppressed += 1
        now = self.now()
        if now - e.last_summary >= self.every_s:
            self._summary(key, e, now)

    def _summary(self, key: tuple[bytes, str], e: _Entry, now: float) -> None:
        peer, reason = key
        self.log("reject_summary", peer="*" if peer == b"*" else peer_label(peer), reason=reason,
                 suppressed=e.suppressed, total=e.total)
        e.suppressed = 0
        e.last_summary = now

    def flush(self) -> None:
        """Log what was suppressed since each key's last summary (in key order: deterministic)."""
        now = self.now()
        for key in sorted(k for k, e in self._entries.items() if e.suppressed):
            self._summary(key, self._entries[key], now)

    @property
    def keys(self) -> int:
        return len(self._entries)


def upload_budget(model: torch.nn.Module, *, factor: int = 4, floor: int = 256 * 1024) -> int:
    """Bytes of one client's uploads the server's network model holds at once, at least:
    ``factor`` times the model's float32 size, and ``floor``. A method's reply is at most
    about one model's worth, so a legitimate client's replies always fit; the emulator
    allows more on a fast link (:data:`UPLOAD_QUEUE_S` of its line rate)."""
    n = sum(p.numel() for p in model.parameters())
    return max(floor, factor * 4 * n)


UPLOAD_QUEUE_S = 0.25
"""Seconds of a client's uplink rate the server's network model may hold for it (a
bottleneck queue sized in time, as routers' buffers are)."""


def frame_budget(model: torch.nn.Module, *, factor: int = 8, floor: int = 1024 * 1024) -> int:
    """A bound for the server's ``Transport(max_frame_bytes=...)``: ``factor`` times the
    float32 bytes of the model's largest parameter, at least ``floor``. Every tensor a
    method sends is at most one parameter's worth (a gradient, a delta, a factor), so this
    refuses nothing legitimate. ``deploy.serve`` builds the model first and binds with it."""
    largest = max((p.numel() for p in model.parameters()), default=0)
    return max(floor, factor * 4 * largest)
