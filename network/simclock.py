"""A minimal discrete-event clock: a heap of (time, sequence, callback) run to completion.

It satisfies the emulator's ``Clock`` protocol without asyncio, for tests and for driving
the network model alone (e.g. to tabulate transfer times). Ties run in scheduling order.
"""
from __future__ import annotations

import heapq
from typing import Callable


class _Handle:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class HeapClock:
    """Virtual time in seconds, starting at ``start``."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)
        self._heap: list[tuple[float, int, _Handle, Callable[[], None]]] = []
        self._seq = 0

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Handle:
        self._seq += 1
        h = _Handle()
        heapq.heappush(self._heap, (max(float(when), self._now), self._seq, h, callback))
        return h

    def run(self, until: float | None = None, max_steps: int = 10_000_000) -> None:
        """Run callbacks in time order until none is left (or the next is after ``until``,
        where the clock then stops at ``until``)."""
        steps = 0
        while self._heap:
            when, _, h, cb = self._heap[0]
            if until is not None and when > until:
                break
            heapq.heappop(self._heap)
            if h.cancelled:
                continue
            self._now = when
            cb()
            steps += 1
            if steps >= max_steps:
                raise RuntimeError("HeapClock.run: too many steps (an endless timer chain?)")
        if until is not None and until > self._now:
            self._now = until
