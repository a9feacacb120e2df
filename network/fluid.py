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
import operator
from dataclasses import dataclass
from typing import Hashable, Iterable

Resource = Hashable
FlowId = Hashable


@dataclass(slots=True)
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
    fresh: bool = True      # no completion prediction yet: the next solve must make one
    # While the flow is managed by a _SharedLink (single-bottleneck fast path):
    group: "_SharedLink | None" = None
    limit: float = math.inf  # its own limit u_f: min(cap, capacities of its private links)
    tag: float = 0.0         # bottlenecked: virtual finish tag; limited: absolute finish time
    bottled: bool = False    # True: at the shared level lambda; False: at its own limit
    stamp: int = 0           # bumped on every move (invalidates the group's heap entries)

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


def _live(heap: list, flows: dict, bottled: bool) -> "Flow | None":
    """Head of a lazily-deleted group heap whose entries are (key, order, stamp, fid)."""
    while heap:
        _, _, stamp, fid = heap[0]
        f = flows.get(fid)
        if f is not None and f.stamp == stamp and f.bottled == bottled:
            return f
        heapq.heappop(heap)
    return None


class _SharedLink:
    """Max-min sharing of one finite link by flows whose every other constraint is their
    own (a per-flow cap, links no other flow crosses): the single-bottleneck case, kept
    up to date in O(log F) per event instead of re-solved in O(F log F).

    With ``u_f`` a flow's own limit, the max-min rates are ``x_f = min(u_f, λ)``, ``λ`` the
    level at which ``Σ min(u_f, λ) = C`` (water-filling on one link). Flows with
    ``u_f < λ`` are *limited* and run at ``u_f``; the others are *bottlenecked* and all run
    at ``λ``. Bottlenecked flows are served alike, so one virtual clock ``V(t) = ∫ λ dt``
    serves them all (as in processor sharing): a flow that had ``r`` bits left when ``V``
    was ``v`` finishes when ``V`` reaches its tag ``v + r``. An event (a flow joins or
    leaves, a limit or ``C`` changes) changes ``λ`` and moves the few flows whose ``u_f``
    it crossed between the two sets; no other flow is touched.
    """

    def __init__(self, resource: Resource, capacity: float, now: float):
        self.resource = resource
        self.capacity = capacity
        self.flows: dict[FlowId, Flow] = {}
        self.t0 = now          # V(t) = v0 + lam * (t - t0) while some flow is bottlenecked
        self.v0 = 0.0
        self.lam = math.inf
        self.n_b = 0           # bottlenecked flows
        self.sum_l = 0.0       # sum of the limited flows' rates, bits/s
        self.b_by_limit: list = []   # (u, order, stamp, fid): the smallest u leaves first
        self.b_by_tag: list = []     # (tag, ...): the next bottlenecked completion
        self.l_by_limit: list = []   # (-u, ...): the largest u re-enters first
        self.l_by_time: list = []    # (finish time, ...): the next limited completion

    # --- state of one flow ---------------------------------------------------------
    def virtual(self, t: float) -> float:
        return self.v0 + self.lam * (t - self.t0) if self.n_b and t > self.t0 else self.v0

    def rate(self, f: Flow) -> float:
        return self.lam if f.bottled else f.limit

    def remaining(self, f: Flow, now: float) -> float:
        if f.bottled:
            return max(0.0, f.tag - self.virtual(now))
        if now > f.since and f.limit > 0:
            return max(0.0, f.remaining - f.limit * (now - f.since))
        return f.remaining

    def _anchor(self, now: float) -> None:
        """Restart V's linear piece at ``now`` (before λ changes)."""
        self.v0, self.t0 = self.virtual(now), now

    def _take_out(self, f: Flow, now: float) -> None:
        f.remaining, f.since = self.remaining(f, now), now
        if f.bottled:
            self.n_b -= 1
        else:
            self.sum_l -= f.limit
        f.stamp += 1

    def _put_b(self, f: Flow) -> None:
        f.bottled = True
        f.stamp += 1
        f.tag = self.v0 + f.remaining
        self.n_b += 1
        heapq.heappush(self.b_by_limit, (f.limit, f.order, f.stamp, f.fid))
        heapq.heappush(self.b_by_tag, (f.tag, f.order, f.stamp, f.fid))

    def _put_l(self, f: Flow, now: float) -> None:
        f.bottled = False
        f.stamp += 1
        f.since = now
        f.tag = now + f.remaining / f.limit if f.limit > 0 else math.inf
        self.sum_l += f.limit
        heapq.heappush(self.l_by_limit, (-f.limit, f.order, f.stamp, f.fid))
        heapq.heappush(self.l_by_time, (f.tag, f.order, f.stamp, f.fid))

    def _rebalance(self, now: float) -> None:
        """Restore ``u < λ`` for limited and ``u >= λ`` for bottlenecked flows. Each move
        raises λ, so a flow moves at most twice; usually none or one moves."""
        while True:
            if self.n_b:
                lam = max(0.0, (self.capacity - self.sum_l) / self.n_b)
                f = _live(self.b_by_limit, self.flows, True)
                if f is not None and f.limit < lam:
                    self._take_out(f, now)
                    self._put_l(f, now)
                    continue
            else:
                lam = math.inf if self.sum_l <= self.capacity else -1.0
            f = _live(self.l_by_limit, self.flows, False)
            # (a hair of slack, so rounding cannot bounce a flow between the sets)
            if f is not None and f.limit > lam * (1 + 1e-12):
                self._take_out(f, now)
                self._put_b(f)
                continue
            break
        self.lam = lam
        if self.n_b == 0:
            self.v0 = 0.0  # nobody is served by V: restart it, keeping tags small and exact
        if not self.flows:
            self.sum_l = 0.0  # forget rounding drift once empty
        n = len(self.flows)
        if len(self.b_by_tag) + len(self.l_by_time) > 8 * n + 64:
            self._compact()

    def _compact(self) -> None:
        b = [f for f in self.flows.values() if f.bottled]
        l = [f for f in self.flows.values() if not f.bottled]
        self.b_by_limit = [(f.limit, f.order, f.stamp, f.fid) for f in b]
        self.b_by_tag = [(f.tag, f.order, f.stamp, f.fid) for f in b]
        self.l_by_limit = [(-f.limit, f.order, f.stamp, f.fid) for f in l]
        self.l_by_time = [(f.tag, f.order, f.stamp, f.fid) for f in l]
        for h in (self.b_by_limit, self.b_by_tag, self.l_by_limit, self.l_by_time):
            heapq.heapify(h)

    # --- events --------------------------------------------------------------------
    def add_many(self, flows: list[Flow], now: float) -> None:
        """Flows joining at ``now`` with ``remaining`` and ``limit`` up to date."""
        self._anchor(now)
        for f in flows:
            f.group = self
            self.flows[f.fid] = f
            self._put_b(f)
        self._rebalance(now)

    def remove(self, f: Flow, now: float) -> None:
        self._anchor(now)
        self._take_out(f, now)
        del self.flows[f.fid]
        f.group = None
        self._rebalance(now)

    def set_limit(self, f: Flow, limit: float, now: float) -> None:
        self._anchor(now)
        self._take_out(f, now)
        f.limit = limit
        self._put_b(f)
        self._rebalance(now)

    def grow(self, f: Flow, bits: float, now: float) -> None:
        self._anchor(now)
        self._take_out(f, now)
        f.remaining += bits
        f.total += bits
        self._put_b(f)
        self._rebalance(now)

    def set_capacity(self, capacity: float, now: float) -> None:
        self._anchor(now)
        self.capacity = capacity
        self._rebalance(now)

    def next_time(self) -> float:
        """Absolute time of the next completion (inf if none can finish)."""
        t = math.inf
        f = _live(self.l_by_time, self.flows, False)
        if f is not None:
            t = f.tag
        f = _live(self.b_by_tag, self.flows, True)
        if f is not None and 0 < self.lam < math.inf:
            t = min(t, self.t0 + (f.tag - self.v0) / self.lam)
        return t

    def pop_done(self, tc: float, tol: float) -> list[Flow]:
        """Remove and return the flows finishing by ``tc`` (to ``tol`` seconds)."""
        self._anchor(tc)
        done: list[Flow] = []
        while (f := _live(self.l_by_time, self.flows, False)) is not None and f.tag <= tc + tol:
            heapq.heappop(self.l_by_time)
            done.append(f)
            self.sum_l -= f.limit
            f.stamp += 1
            del self.flows[f.fid]
        if 0 < self.lam < math.inf:
            while (f := _live(self.b_by_tag, self.flows, True)) is not None and \
                    self.t0 + (f.tag - self.v0) / self.lam <= tc + tol:
                heapq.heappop(self.b_by_tag)
                done.append(f)
                self.n_b -= 1
                f.stamp += 1
                del self.flows[f.fid]
        if done:
            for f in done:
                f.group = None
            self._rebalance(tc)
        return done

    def dissolve(self, now: float) -> list[Flow]:
        """Hand the flows back to the general solver, settled at ``now``."""
        out = list(self.flows.values())
        for f in out:
            f.rate = self.rate(f)
            f.remaining, f.since = self.remaining(f, now), now
            f.group = None
            f.fresh = True
            f.stamp += 1
        self.flows.clear()
        return out


_ORDER = operator.attrgetter("order")


class FluidNetwork:
    """Active flows sharing capacities; time moves only through :meth:`advance`.

    Times are absolute seconds on whatever axis the caller uses; sizes in bits, rates in
    bits/s. Mutations (add, remove, set_capacity, set_cap) apply at the current time
    ``self.now``: advance first.

    Work per event is proportional to the flows it can affect: a change re-solves only the
    *connected component* of flows coupled through finite-capacity links (with an unlimited
    server, each client's flows are their own component), flows keep ``remaining`` as of
    their last rate change, and completions come from a heap of predicted times.

    One shape gets a fast path: a finite link shared by at least ``shared_min`` flows whose
    other constraints are their own (the star of a finite server link, each client with
    one message in that direction). Such a link is handed to a :class:`_SharedLink`, which
    keeps the water-filling level up to date in O(log F) per event; the general solver
    would redo O(F log F) work at each of F completions. The fast path is left (the flows
    go back to the general solver) as soon as a flow would couple it to anything else, and
    re-entered when a later solve finds the shape again. ``shared_min = math.inf``
    disables it.
    """

    def __init__(self, now: float = 0.0, shared_min: float = 16):
        self.now = float(now)
        self.capacity: dict[Resource, float] = {}
        self.flows: dict[FlowId, Flow] = {}
        self.shared_min = shared_min
        self._users: dict[Resource, dict[FlowId, Flow]] = {}
        self._groups: dict[Resource, _SharedLink] = {}
        self._dirty_res: set[Resource] = set()
        self._dirty_flows: dict[FlowId, Flow] = {}
        self._heap: list[tuple[float, int, int, FlowId]] = []
        self._order = 0

    def _finite(self, r: Resource) -> bool:
        return math.isfinite(self.capacity.get(r, math.inf))

    # --- mutations -------------------------------------------------------------------
    def set_capacity(self, resource: Resource, bps: float) -> None:
        if bps < 0 or math.isnan(bps):
            raise ValueError(f"capacity of {resource!r} must be >= 0, got {bps}")
        bps = float(bps)
        if self.capacity.get(resource) == bps:
            return
        self.capacity[resource] = bps
        group = self._groups.get(resource)
        if group is not None:
            if math.isfinite(bps):
                group.set_capacity(bps, self.now)
                return
            self._dissolve(group)
        users = self._users.get(resource, {})
        for f in list(users.values()):
            if f.group is None:
                continue
            if len(users) == 1:
                # a private link of a fast-path flow: only its own limit changes
                f.group.set_limit(f, self._own_limit(f), self.now)
                return
            self._dissolve(f.group)
        self._dirty_res.add(resource)

    def add(self, fid: FlowId, bits: float, resources: Iterable[Resource], cap: float = math.inf) -> None:
        if fid in self.flows:
            raise KeyError(f"flow {fid!r} already active")
        self._order += 1
        bits = float(bits)
        f = Flow(fid, bits, bits, tuple(resources), float(cap), 0.0, self.now, 0, self._order)
        self.flows[fid] = f
        all_users = self._users
        for r in f.resources:
            users = all_users.get(r)
            if users is None:
                users = all_users[r] = {}
            users[fid] = f
        if not self._join_group(f):
            self._dirty_flows[fid] = f

    def remove(self, fid: FlowId) -> float:
        """Abort a flow; returns the bits it had left."""
        f = self.flows.pop(fid)
        if f.group is not None:
            group = f.group
            group.remove(f, self.now)
            if not group.flows:
                del self._groups[group.resource]
        else:
            self._settle(f)
        self._detach(f)
        return f.remaining

    def grow(self, fid: FlowId, bits: float) -> None:
        """Give an active flow ``bits`` more to send (a TCP window that opened up: the rest
        of its message joins the chunk in flight); its rate is unchanged."""
        f = self.flows[fid]
        if bits <= 0:
            return
        if f.group is not None:
            f.group.grow(f, float(bits), self.now)
            return
        self._settle(f)
        f.remaining += bits
        f.total += bits
        f.version += 1
        if f.fresh or fid in self._dirty_flows:
            return              # the pending solve predicts its completion
        # Its rate does not change (no other flow's does): only its predicted end moves.
        eta = f.eta()
        if math.isfinite(eta):
            heapq.heappush(self._heap, (f.since + eta, f.order, f.version, f.fid))

    def set_cap(self, fid: FlowId, cap: float) -> None:
        f = self.flows[fid]
        if f.cap != cap:
            f.cap = float(cap)
            if f.group is not None:
                f.group.set_limit(f, self._own_limit(f), self.now)
            else:
                self._dirty_flows[fid] = f

    def _detach(self, f: Flow) -> None:
        f.version += 1
        self._dirty_flows.pop(f.fid, None)
        all_users, capacity = self._users, self.capacity
        for r in f.resources:
            users = all_users.get(r)
            if users is not None:
                users.pop(f.fid, None)
                if not users:
                    del all_users[r]
                    continue  # nobody left on it: no rate depends on it
            # An unlimited link couples nobody, and a fast-path link re-levels itself.
            if math.isfinite(capacity.get(r, math.inf)) and r not in self._groups:
                self._dirty_res.add(r)

    def _settle(self, f: Flow) -> None:
        """Bring ``remaining`` up to ``now`` at the flow's current rate."""
        if self.now > f.since:
            if f.rate == math.inf:
                f.remaining = 0.0
            elif f.rate > 0:
                f.remaining = max(0.0, f.remaining - f.rate * (self.now - f.since))
        f.since = self.now

    # --- the single-bottleneck fast path ---------------------------------------------
    def _own_limit(self, f: Flow) -> float:
        """The flow's limit apart from its group's shared link: its cap and private links."""
        shared = f.group.resource if f.group is not None else None
        return min([f.cap] + [self.capacity.get(r, math.inf) for r in f.resources if r != shared])

    def _join_group(self, f: Flow) -> bool:
        """Put a new flow on the fast path if it crosses a fast-path link and nothing else
        that another flow uses; if it couples a fast-path link to anything else, hand that
        link's flows back to the general solver."""
        if not self._groups:
            return False        # no fast-path link exists: nothing to join or to break
        group: _SharedLink | None = None
        private = True
        touched: list[_SharedLink] = []
        for r in f.resources:
            if not self._finite(r):
                continue
            g = self._groups.get(r)
            if g is not None:
                if group is not None:
                    private = False
                    touched.append(g)
                group = g
                continue
            users = self._users[r]
            if len(users) > 1:
                private = False
                # A fast-path flow's other links are private, so a link with a fast-path
                # user had exactly one user before this flow: look no further than two.
                if len(users) == 2:
                    touched.extend(h.group for h in users.values() if h is not f and h.group is not None)
        if group is not None and private and not touched:
            f.group = group
            f.limit = self._own_limit(f)
            group.add_many([f], self.now)
            return True
        if group is not None:
            touched.append(group)
        for g in touched:
            if g.resource in self._groups:
                self._dissolve(g)
        return False

    def _dissolve(self, group: _SharedLink) -> None:
        del self._groups[group.resource]
        for f in group.dissolve(self.now):
            self._dirty_flows[f.fid] = f

    def _shared_links(self, comp: list[Flow]) -> set[Resource]:
        """Finite links that more than one flow of ``comp`` crosses."""
        cap, users = self.capacity, self._users
        return {r for f in comp for r in f.resources if cap.get(r, math.inf) < math.inf and len(users[r]) > 1}

    def _form_groups(self, comp: list[Flow], shared: set[Resource]) -> list[Flow]:
        """Move the star-shaped parts of a component to the fast path; returns the rest."""
        if len(comp) < self.shared_min:
            return comp
        taken: set[FlowId] = set()
        for r in sorted(shared, key=lambda r: min(f.order for f in self._users[r].values())):
            users = sorted(self._users[r].values(), key=_ORDER)
            if len(users) < self.shared_min:
                continue
            if any(q != r and q in shared for f in users for q in f.resources):
                continue  # some flow here crosses a second shared link: not a star
            group = _SharedLink(r, self.capacity[r], self.now)
            self._groups[r] = group
            for f in users:
                self._settle(f)
                f.version += 1          # its general-heap prediction is void now
                f.group = group
                f.limit = self._own_limit(f)
                f.fresh = False
            group.add_many(users, self.now)
            taken.update(f.fid for f in users)
        return [f for f in comp if f.fid not in taken] if taken else comp

    # --- rates -----------------------------------------------------------------------
    def _component(self) -> list[Flow]:
        """Flows coupled (through finite-capacity links) to anything changed."""
        seen: dict[FlowId, Flow] = dict(self._dirty_flows)
        stack: list[Flow] = list(self._dirty_flows.values())
        for r in self._dirty_res:
            for f in self._users.get(r, {}).values():
                if f.fid not in seen and f.group is None:
                    seen[f.fid] = f
                    stack.append(f)
        visited: set[Resource] = set()
        while stack:
            f = stack.pop()
            for r in f.resources:
                if r in visited or not self.capacity.get(r, math.inf) < math.inf:
                    continue
                visited.add(r)
                for g in self._users.get(r, {}).values():
                    if g.fid not in seen:
                        seen[g.fid] = g
                        stack.append(g)
        self._dirty_flows.clear()
        self._dirty_res.clear()
        return sorted(seen.values(), key=_ORDER)

    def _rates(self) -> None:
        if not self._dirty_flows and not self._dirty_res:
            return
        comp = self._component()
        shared = self._shared_links(comp)
        comp = self._form_groups(comp, shared)
        if not comp:
            return
        # A flow crossing no shared link is alone: its rate is its tightest constraint
        # (the common case with an unlimited server), no water-filling needed.
        cap = self.capacity
        inf = math.inf
        rates = None
        if shared:
            rates = {f.fid: min([f.cap] + [cap.get(r, inf) for r in f.resources])
                     for f in comp if not shared.intersection(f.resources)}
            if len(rates) < len(comp):
                rates.update(max_min_rates([f for f in comp if f.fid not in rates], cap))
        for f in comp:
            if rates is None:
                # the same tightest constraint as above, left to right like min()
                new = f.cap
                for r in f.resources:
                    c = cap.get(r, inf)
                    if c < new:
                        new = c
            else:
                new = rates[f.fid]
            if new != f.rate or f.fresh:
                self._settle(f)
                f.rate = new
                f.version += 1
                f.fresh = False
                eta = f.eta()
                if math.isfinite(eta):
                    heapq.heappush(self._heap, (f.since + eta, f.order, f.version, f.fid))
        if len(self._heap) > 4 * len(self.flows) + 64:
            # Drop stale predictions, or the heap grows with the square of the flows.
            self._heap = [(f.since + f.eta(), f.order, f.version, f.fid) for f in self.flows.values()
                          if f.group is None and math.isfinite(f.eta())]
            heapq.heapify(self._heap)

    def rate(self, fid: FlowId) -> float:
        self._rates()
        f = self.flows[fid]
        return f.group.rate(f) if f.group is not None else f.rate

    def rates(self) -> dict[FlowId, float]:
        self._rates()
        return {fid: f.group.rate(f) if f.group is not None else f.rate for fid, f in self.flows.items()}

    def _head(self) -> tuple[float, int, int, FlowId] | None:
        while self._heap:
            entry = self._heap[0]
            f = self.flows.get(entry[3])
            if f is not None and f.version == entry[2] and f.group is None:
                return entry
            heapq.heappop(self._heap)
        return None

    def _next(self) -> float:
        head = self._head()
        t = math.inf if head is None else head[0]
        for g in self._groups.values():
            t = min(t, g.next_time())
        return t

    def next_completion(self) -> float | None:
        """Absolute time of the next flow completion under current rates, or ``None`` if no
        flow can finish (none active, or all stalled at rate 0)."""
        self._rates()
        t = self._next()
        return None if t == math.inf else max(t, self.now)

    # --- time ------------------------------------------------------------------------
    def advance(self, t: float) -> list[tuple[FlowId, float]]:
        """Move to time ``t``; return the flows that completed, with their exact completion
        times, in completion order (ties in insertion order). Rates are recomputed at
        every completion, so a late call still gives the exact times."""
        done: list[tuple[FlowId, float]] = []
        t = max(t, self.now)  # never run backwards; a caller slightly early is harmless
        while True:
            self._rates()
            tn = self._next()
            if tn > t:
                self.now = t
                return done
            tc = max(tn, self.now)
            self.now = tc
            # Everything finishing at this instant (to rounding) completes together.
            tol = 1e-12 * max(1.0, abs(tc))
            batch: list[Flow] = []
            while (head := self._head()) is not None and head[0] <= tc + tol:
                heapq.heappop(self._heap)
                batch.append(self.flows[head[3]])
            for g in list(self._groups.values()):
                batch.extend(g.pop_done(tc, tol))
            for f in sorted(batch, key=_ORDER):
                del self.flows[f.fid]
                f.remaining, f.since = 0.0, tc
                self._detach(f)
                done.append((f.fid, tc))
            for r in [r for r, g in self._groups.items() if not g.flows]:
                del self._groups[r]
