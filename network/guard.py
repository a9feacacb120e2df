"""Per-peer rejection budgets: a peer whose messages keep being rejected is ignored a while.

A node reports each message it rejects *before* the network model sees it (unparsable,
from an unregistered sender, wrongly addressed, a bad hello) with :meth:`PeerGuard.reject`.
Each peer has a token bucket of ``burst`` rejections refilled at ``rate`` per second; a
peer that empties it is banned for ``ban_s`` seconds: the transport then discards its
messages as it reads them (one dict lookup each), without parsing, logging or emulating
them. A legitimate node never sends such messages (the network model's corruption is
applied after this point), so only a broken or hostile peer ever reaches the limit.

The tables are bounded: at most ``max_peers`` buckets are kept (the oldest is forgotten
first), so a stranger who reconnects under a new routing id for every message costs one
bucket each, not an unbounded map. Pure bookkeeping: the clock is passed in, no I/O.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class GuardConfig:
    """Rejections per second a peer may cause on average (``rate``), how many in a burst
    (``burst``), and seconds its traffic is then ignored (``ban_s``)."""

    rate: float = 20.0
    burst: float = 200.0
    ban_s: float = 30.0
    max_peers: int = 4096

    def __post_init__(self) -> None:
        for name in ("rate", "burst", "ban_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"guard.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_peers < 1:
            raise ValueError(f"guard.max_peers must be >= 1, got {self.max_peers!r}")


DEFAULT = GuardConfig()
"""What a ROUTER transport built without a guard uses (tests may swap it)."""


class PeerGuard:
    """Token buckets of rejections per peer, and the bans they lead to (``until`` times on
    the caller's clock, seconds)."""

    def __init__(self, config: GuardConfig = GuardConfig()):
        self.config = config
        self._buckets: collections.OrderedDict[bytes, list[float]] = collections.OrderedDict()
        self.banned: dict[bytes, float] = {}
        """peer -> time (s) its ban ends; read by the transport for every message."""
        self.bans = 0
        """Bans imposed so far (a peer banned twice counts twice)."""

    def reject(self, peer: bytes, now: float) -> bool:
        """Count one rejection of ``peer`` at ``now``; True when it starts a ban."""
        cfg = self.config
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= cfg.max_peers:
                self._buckets.popitem(last=False)
            b = self._buckets[peer] = [cfg.burst, now]
        else:
            self._buckets.move_to_end(peer)
            b[0] = min(cfg.burst, b[0] + (now - b[1]) * cfg.rate)
            b[1] = now
        b[0] -= 1.0
        if b[0] >= 0:
            return False
        self._ban(peer, now)
        return True

    def _ban(self, peer: bytes, now: float) -> None:
        if len(self.banned) >= self.config.max_peers:
            # forget expired bans first; if none, the earliest-ending one
            for p in [p for p, until in self.banned.items() if until <= now] or [min(self.banned, key=self.banned.get)]:
                del self.banned[p]
        self.banned[peer] = now + self.config.ban_s
        self._buckets.pop(peer, None)  # a fresh bucket after the ban
        self.bans += 1

    def is_banned(self, peer: bytes, now: float) -> bool:
        until = self.banned.get(peer)
        if until is None:
            return False
        if now >= until:
            del self.banned[peer]
            return False
        return True
