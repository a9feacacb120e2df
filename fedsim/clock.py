"""Clocks: an asyncio loop whose time is virtual, and adapters the network model uses.

Virtual time follows SimPy's idea with asyncio's own machinery: the loop's ``time()`` is
a number we own, and when the loop would block in ``select`` — nothing runnable — it jumps
to the next timer instead of waiting. Two things forbid a jump: a ready callback, and a
message in flight in a socket (sent but not yet received). ZeroMQ inproc delivery is
synchronous into the peer's pipe, so "in flight" is exactly the sent-minus-received count
of the process's transports, and the loop drains them instead of jumping.

Same program + same seed => the same sequence of callbacks => the same event log.
"""
from __future__ import annotations

import asyncio
import functools
import selectors
import time
from typing import Callable, Protocol


class Drainable(Protocol):
    sent: int
    received: int
    pending: int

    def drain(self) -> int: ...


class VirtualClockStalled(RuntimeError):
    """Nothing runnable, nothing scheduled, nothing in flight: the run can never progress."""


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    def __init__(self, loop: "VirtualTimeLoop"):
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None):
        events = super().select(0)
        if events or timeout == 0:
            return events
        loop = self._loop
        if loop.in_flight() > 0:
            loop.drain_transports()
            return []
        if loop.run_instant_end():
            return []
        if timeout is None:
            raise VirtualClockStalled(f"virtual clock stalled at t={loop.time():.6f}s: nothing scheduled and no message in flight")
        loop.advance_to_next_timer()
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps. ``time()`` is simulated seconds from 0."""

    def __init__(self) -> None:
        self._now = 0.0
        self.transports: list[Drainable] = []
        self._instant_end: list[Callable[[], None]] = []
        super().__init__(_VirtualSelector(self))
        # The clock is read ~10 times per client and round (nodes, event log, emulator,
        # timers): a C-level getattr instead of a Python frame each time.
        self.time = functools.partial(getattr, self, "_now")  # type: ignore[method-assign]

    def time(self) -> float:  # (shadowed per instance by the partial above; same value)
        return self._now

    def at_instant_end(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the current instant has nothing else to do (no ready
        callback, no timer due, no message in flight), before the clock moves on. Work
        that many actors start at one instant (a broadcast's arrival) is collected this
        way and done together (``fedsim.batching``)."""
        self._instant_end.append(callback)

    def run_instant_end(self) -> bool:
        """Queue the instant-end callbacks as ready ones; False when there were none."""
        if not self._instant_end:
            return False
        callbacks, self._instant_end = self._instant_end, []
        for callback in callbacks:
            self.call_soon(callback)
        return True

    def in_flight(self) -> int:
        """Messages sent by a transport of this process but not yet received (or queued)."""
        return sum(t.sent for t in self.transports) - sum(t.received for t in self.transports) \
            + sum(t.pending for t in self.transports)

    def drain_transports(self) -> None:
        for t in self.transports:
            t.drain()

    def advance_to_next_timer(self) -> None:
        # asyncio's _run_once pops cancelled handles off the head of its timer heap before
        # it selects, so the head is the next live timer.
        if self._scheduled and self._scheduled[0]._when > self._now:
            self._now = self._scheduled[0]._when


class LoopClock:
    """The ``network.emulator.Clock`` of the current loop (virtual or real)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def now(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Callable[[], None]):
        return self.loop.call_at(when, callback)


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """``"virtual"`` or ``"real"``."""
    if kind == "virtual":
        return VirtualTimeLoop()
    if kind == "real":
        return asyncio.new_event_loop()
    raise ValueError(f"unknown clock {kind!r} (virtual | real)")


def wall_time() -> float:
    """Seconds on a monotonic wall clock (for measuring, never for simulated time)."""
    return time.perf_counter()
