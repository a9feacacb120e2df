"""Flow-level bandwidth sharing: max-min fair rates over shared links (pure, clock-free).

A *flow* is one message in transmission: ``bits`` left to send, the *resources* (links)
it crosses, and an optional per-flow rate *cap* (TCP's loss-limited throughput). Each
resource has a capacity in bits/s; ``math.inf`` means "not a constraint". Rates are the
max-min fair allocation (progressive filling / water-filling): raise every flow's rate
together; a flow stops rising when one of its resources is full or it reaches its cap.
Rates are recomputed whenever the set of flows or a capacity changes, and are constant in
between, so a flow's completion time is exact: ``now + remaining / rate``. This is the
fluid model SimGrid uses for TCP flows (without its RTT-weighted variant).

The class never reads a clock: the caller moves it forward with :meth:`advance`.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Hashable, Iterable

Resource = Hashable
FlowId = Hashable


@dataclass
class Flow:
    """One flow. ``remaining`` and ``total`` in bits, ``rate`` and ``cap`` in bits/s."""

    fid: FlowId
    total: float
    remaining: float
    resources: tuple[Resource, ...]
    cap: float = math.inf
    rate: float = 0.0
    since: float = 0.0      # time at which ``remaining`` was last brought up to date
    version: int = 0        # bumped when the rate changes (invalidates heap entries)
    order: int = 0          # insertion order, to break ties between equal completion times

    def eta(self) -> float:
        """Seconds from ``since`` to completion at the current rate (inf if stalled)."""
        if self.remaining <= 0 or self.rate == math.inf:
            return 0.0
        return math.inf if self.rate <= 0 else self.remaining / self.rate


def max_min_rates(flows: Iterable[Flow], capacity: dict[Resource, float]) -> dict[FlowId, float]:
    """Max-min fair rates (bits/s) of ``flows`` over resources of ``capacity`` (bits/s).

    Progressive filling with a heap of candidate levels: the next level is the smallest of
    every resource's fair share ``remaining capacity / unfrozen flows`` and every flow's cap.
    Freezing flows at that level only raises the shares of the other resources, so the heap
    order stays valid. O((F + R) log(F + R)). A flow with no finite constraint gets ``inf``.
    """
    flows = list(flows)
    users: dict[Resource, list[Flow]] = {}
    for f in flows:
        for r in f.resources:
            if math.isfinite(capacity.get(r, math.inf)):
                users.setdefault(r, []).append(f)
    left = {r: float(capacity[r]) for r in users}
    count = {r: len(u) for r, u in users.items()}
    version = {r: 0 for r in users}
    rate: dict[FlowId, float] = {}
    heap: list[tuple[float, int, int, object]] = []
    # Tie-break (level, kind, order): caps before shares at equal levels; insertion order.
    order = {r: i for i, r in enumerate(users)}
    for r in users:
        heap.append((left[r] / count[r], 1, order[r], (r, 0)))
    for i, f in enumerate(flows):
        if math.isfinite(f.cap):
            heap.append((max(f.cap, 0.0), 0, i, f))
    heapq.heapify(heap)

    def freeze(f: Flow, x: float) -> None:
        rate[f.fid] = x
        for r in f.resources:
            if r in users:
                left[r] = max(0.0, left[r] - x)
                count[r] -= 1
                version[r] += 1
                if count[r] > 0:
                    heapq.heappush(heap, (left[r] / count[r], 1, order[r], (r, version[r])))

    while heap:
        level, kind, _, item = heapq.heappop(heap)
        if kind == 0:
            if item.fid not in rate:
                freeze(item, level)
            continue
        r, ver = item
        if ver != version[r] or count[r] == 0:
            continue
        for f in users[r]:
            if f.fid not in rate:
                freeze(f, level)
    for f in flows:
        rate.setdefault(f.fid, math.inf)
    return rate


class FluidNetwork:
    """Active flows sharing capacities; time moves only through :meth:`advance`.

    Times are absolute seconds on whatever axis the caller uses; sizes in bits, rates in
    bits/s. Mutations (add, remove, set_capacity, set_cap) apply at the current time
    ``self.now``: advance first.

    Work per event is proportional to the flows it can affect: a change re-solves only the
    *connected component* of flows coupled through finite-capacity links (with an unlimited
    server, each client's flows are their own component), flows keep ``remaining`` as of
    their last rate change, and completions come from a heap of predicted times.
    """

    def __init__(self, now: float = 0.0):
        self.now = float(now)
        self.capacity: dict[Resource, float] = {}
        self.flows: dict[FlowId, Flow] = {}
        self._users: dict[Resource, dict[FlowId, Flow]] = {}
        self._dirty_res: set[Resource] = set()
        self._dirty_flows: dict[FlowId, Flow] = {}
        self._heap: list[tuple[float, int, int, FlowId]] = []
        self._order = 0

    # --- mutations -------------------------------------------------------------------
    def set_capacity(self, resource: Resource, bps: float) -> None:
        if bps < 0 or math.isnan(bps):
            raise ValueError(f"capacity of {resource!r} must be >= 0, got {bps}")
        if self.capacity.get(resource) != bps:
            self.capacity[resource] = float(bps)
            self._dirty_res.add(resource)

    def add(self, fid: FlowId, bits: float, resources: Iterable[Resource], cap: float = math.inf) -> None:
        if fid in self.flows:
            raise KeyError(f"flow {fid!r} already active")
        self._order += 1
        bits = float(bits)
        f = Flow(fid, bits, bits, tuple(resources), float(cap), 0.0, self.now, 0, self._order)
        self.flows[fid] = f
        for r in f.resources:
            self._users.setdefault(r, {})[fid] = f
        self._dirty_flows[fid] = f

    def remove(self, fid: FlowId) -> float:
        """Abort a flow; returns the bits it had left."""
        f = self.flows.pop(fid)
        self._settle(f)
        self._detach(f)
        return f.remaining

    def set_cap(self, fid: FlowId, cap: float) -> None:
        f = self.flows[fid]
        if f.cap != cap:
            f.cap = float(cap)
            self._dirty_flows[fid] = f

    def _detach(self, f: Flow) -> None:
        f.version += 1
        self._dirty_flows.pop(f.fid, None)
        for r in f.resources:
            users = self._users.get(r)
            if users is not None:
                users.pop(f.fid, None)
                if not users:
                    del self._users[r]
            if math.isfinite(self.capacity.get(r, math.inf)):
                self._dirty_res.add(r)  # an unlimited link couples nobody: nothing to redo

    def _settle(self, f: Flow) -> None:
        """Bring ``remaining`` up to ``now`` at the flow's current rate."""
        if self.now > f.since:
            if f.rate == math.inf:
                f.remaining = 0.0
            elif f.rate > 0:
                f.remaining = max(0.0, f.remaining - f.rate * (self.now - f.since))
        f.since = self.now

    # --- rates -----------------------------------------------------------------------
    def _component(self) -> list[Flow]:
        """Flows coupled (through finite-capacity links) to anything changed."""
        seen: dict[FlowId, Flow] = dict(self._dirty_flows)
        stack: list[Flow] = list(self._dirty_flows.values())
        for r in self._dirty_res:
            for f in self._users.get(r, {}).values():
                if f.fid not in seen:
                    seen[f.fid] = f
                    stack.append(f)
        visited: set[Resource] = set()
        while stack:
            f = stack.pop()
            for r in f.resources:
                if r in visited or not math.isfinite(self.capacity.get(r, math.inf)):
                    continue
                visited.add(r)
                for g in self._users.get(r, {}).values():
                    if g.fid not in seen:
                        seen[g.fid] = g
                        stack.append(g)
        self._dirty_flows.clear()
        self._dirty_res.clear()
        return sorted(seen.values(), key=lambda f: f.order)

    def _rates(self) -> None:
        if not self._dirty_flows and not self._dirty_res:
            return
        comp = self._component()
        if not comp:
            return
        rates = max_min_rates(comp, self.capacity)
        for f in comp:
            new = rates[f.fid]
            if new != f.rate or f.since == self.now and f.version == 0:
                self._settle(f)
                f.rate = new
                f.version += 1
                eta = f.eta()
                if math.isfinite(eta):
                    heapq.heappush(self._heap, (f.since + eta, f.order, f.version, f.fid))
        if len(self._heap) > 4 * len(self.flows) + 64:
            # Drop stale predictions, or the heap grows with the square of the flows.
            self._heap = [(f.since + f.eta(), f.order, f.version, f.fid) for f in self.flows.values()
                          if math.isfinite(f.eta())]
            heapq.heapify(self._heap)

    def rate(self, fid: FlowId) -> float:
        self._rates()
        return self.flows[fid].rate

    def rates(self) -> dict[FlowId, float]:
        self._rates()
        return {fid: f.rate for fid, f in self.flows.items()}

    def _head(self) -> tuple[float, int, int, FlowId] | None:
        while self._heap:
            entry = self._heap[0]
            f = self.flows.get(entry[3])
            if f is not None and f.version == entry[2]:
                return entry
            heapq.heappop(self._heap)
        return None

    def next_completion(self) -> float | None:
        """Absolute time of the next flow completion under current rates, or ``None`` if no
        flow can finish (none active, or all stalled at rate 0)."""
        self._rates()
        head = self._head()
        return None if head is None else max(head[0], self.now)

    # --- time ------------------------------------------------------------------------
    def advance(self, t: float) -> list[tuple[FlowId, float]]:
        """Move to time ``t``; return the flows that completed, with their exact completion
        times, in completion order (ties in insertion order). Rates are recomputed at
        every completion, so a late call still gives the exact times."""
        done: list[tuple[FlowId, float]] = []
        t = max(t, self.now)  # never run backwards; a caller slightly early is harmless
        while True:
            self._rates()
            head = self._head()
            if head is None or head[0] > t:
                self.now = t
                return done
            tc = max(head[0], self.now)
            self.now = tc
            # Everything finishing at this instant (to rounding) completes together.
            tol = 1e-12 * max(1.0, abs(tc))
            batch: list[Flow] = []
            while (head := self._head()) is not None and head[0] <= tc + tol:
                heapq.heappop(self._heap)
                batch.append(self.flows[head[3]])
            for f in sorted(batch, key=lambda f: f.order):
                del self.flows[f.fid]
                f.remaining, f.since = 0.0, tc
                self._detach(f)
                done.append((f.fid, tc))
