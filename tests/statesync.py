"""Shared property-test harness for stateful methods (``Algorithm.stateful = True``).

Any registered method with ``stateful = True`` gets these tests for free from
``tests/test_state_sync.py``; a new method needs no harness code, only honest digests.

The contract a method must meet (what the harness asserts)
-----------------------------------------------------------
* ``client_digest(state)`` digests the state the client believes it shares with the server,
  and returns ``EMPTY`` (= ``state_digest({})``) while it holds none (fresh, crashed,
  resynchronising).
* ``server_digest(client)`` digests the server's mirror of that shared state.
* **In sync whenever both believe so.** Right after a client handler returns, the client's
  digest is one of: ``EMPTY`` (it dropped its shared state to resynchronise); the server's
  digest *as it was when the server sent the message just handled* (snapshotted at send
  time, so a delayed message is judged against the view it carried); or, for a stale
  message (older version than one the client already handled), its digest from before the
  message (it ignored it). Anything else means a party applied an update against the wrong
  base, or adopted a state the other side never had.
* **Liveness.** After faults stop, within ``SETTLE_ROUNDS`` clean rounds every client handles
  a message while in sync (non-empty digest equal to the server's view in that message).
* **Robustness.** ``server_round`` never raises, whatever the network or a client sends, and
  the model's parameters stay finite. Malformed replies are stopped by ``check_reply`` or
  ignored by the server (counted), never applied.

Faults the harness injects, per message, drawn by hypothesis (so failures shrink):
``drop``, ``dup`` (delivered twice), ``delay`` (held back, delivered at a later ``release``
with its original version, i.e. reordered), and on the uplink also ``malform`` (a corrupted
copy: a tensor removed, retyped, truncated, NaN-filled, or an unknown meta field) and, with
``replay=True``, ``replay`` (the client's previous reply of that kind re-stamped with the
current version: a stale message the version filter cannot catch, so the method's own
base checks must). Crashes empty a client's ``state``; the client restarts at once.

Usage:  ``TestX = state_sync_machine("laq").TestCase`` (see tests/test_state_sync.py).
The tiny default model is an MLP 8-6-3 (``model="cnn"`` adds a 4-D conv weight); a method
whose defaults do not fit it may declare a class attribute ``statesync_config = {...}``
(algorithm.* values) that the harness uses when the test passes no ``config``.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import algorithms
from algorithms.base import Algorithm, Payload, ProtocolError, Reply, get_algorithm, state_digest
from tests.fakes import FakeClientContext, accept_replies

EMPTY = state_digest({})
SETTLE_ROUNDS = 3
DOWN_FAULTS = ["ok", "ok", "ok", "drop", "dup", "delay"]
UP_FAULTS = ["ok", "ok", "ok", "drop", "dup", "delay", "malform"]


def stateful_methods() -> list[str]:
    """Every registered method that declares mirrored client/server state."""
    return [n for n in algorithms.algorithm_names() if get_algorithm(n).stateful]


# ---- tiny problems ------------------------------------------------------------------------------

class TinyCNN(torch.nn.Module):
    """conv(1->4, 3x3) on 6x6 inputs, then a linear head: a 4-D, a 2-D and two vector params."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def tiny_model(kind: str = "mlp", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "cnn":
        return TinyCNN()
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def tiny_data(kind: str, clients: int, per_client: int = 24, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable synthetic task: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 6, 6) if kind == "cnn" else (8,)
    dim = math.prod(shape)
    teacher = torch.randn(dim, 3, generator=g)
    out = []
    for _ in range(clients):
        x = torch.randn(per_client, dim, generator=g)
        out.append((x.reshape(per_client, *shape), (x @ teacher).argmax(1)))
    return out


# ---- a ServerComm with a faulty network -------------------------------------------------------------

@dataclass
class Violation:
    what: str
    client: int
    detail: dict[str, Any] = field(default_factory=dict)


class FaultyComm:
    """ServerComm whose network drops, duplicates, delays and corrupts messages on command.

    ``down_plan`` / ``up_plan`` are fault names consumed one per message (then "ok")."""

    def __init__(self, algorithm: Algorithm, contexts: dict[int, FakeClientContext], replay: bool = False):
        self.algorithm = algorithm
        self.contexts = contexts
        self.round = 0
        self.participants = sorted(contexts)
        self.replay = replay
        self.down_plan: list[str] = []
        self.up_plan: list[str] = []
        self.counters: dict[str, int] = {}
        self.events: list[tuple[str, dict]] = []
        self.violations: list[Violation] = []
        self._inbox: list[tuple[str, int, Payload, int]] = []
        self._held_down: list[tuple[str, int, Payload, int, bytes]] = []
        self._held_up: list[tuple[str, int, Payload, int]] = []
        self._last_reply: dict[tuple[str, int], Payload] = {}
        self._malformed = 0
        self._newest: dict[int, int] = {}
        self.in_sync: dict[int, bool] = {}
        """Per client: was it in sync (non-empty, equal) when it handled its latest message?"""

    # fault plans
    def _next(self, plan: list[str]) -> str:
        return plan.pop(0) if plan else "ok"

    async def broadcast(self, kind, payload, *, version, to=None):
        for client in (to if to is not None else self.participants):
            msg = payload(client) if callable(payload) else payload
            v = version if msg.version is None else msg.version
            snapshot = self.algorithm.server_digest(client)
            fault = self._next(self.down_plan)
            if fault == "drop":
                continue
            if fault == "delay":
                self._held_down.append((kind, client, _copy(msg), v, snapshot))
                continue
            for _ in range(2 if fault == "dup" else 1):
                self._deliver(kind, client, _copy(msg), v, snapshot)

    async def send(self, client, kind, payload, *, version):
        await self.broadcast(kind, payload, version=version, to=[client])

    def _deliver(self, kind: str, client: int, msg: Payload, version: int, snapshot: bytes) -> None:
        ctx = self.contexts[client]
        ctx.round = self.round
        stale = version < self._newest.get(client, version)
        self._newest[client] = max(version, self._newest.get(client, version))
        handler = self.algorithm.client_handlers()[kind]
        before = self.algorithm.client_digest(ctx.state)
        reply = handler(ctx, Payload(msg.tensors, msg.meta, msg.payload_bits, version))
        digest = self.algorithm.client_digest(ctx.state)
        if not stale:
            self.in_sync[client] = digest != EMPTY and digest == snapshot
        if digest not in (EMPTY, snapshot) and not (stale and digest == before):
            self.violations.append(Violation("client state differs from the server's view it acted on", client,
                                             {"kind": kind, "round": self.round, "version": version, "stale": stale}))
        if reply is None:
            return
        rv = version if reply.version is None else reply.version
        fault = self._next(self.up_plan)
        if fault == "malform":
            self._malformed += 1
            self._inbox.append((kind, client, malformed(reply, self._malformed), rv))
            return
        if fault == "replay":
            # a stale reply re-stamped with the current version, ahead of the fresh one: the
            # version filter cannot catch it, only the method's own base checks can
            old = self._last_reply.get((kind, client))
            if old is not None:
                self._inbox.append((kind, client, _copy(old), rv))
        self._last_reply[(kind, client)] = _copy(reply)
        if fault == "drop":
            return
        if fault == "delay":
            self._held_up.append((kind, client, reply, rv))
            return
        for _ in range(2 if fault == "dup" else 1):
            self._inbox.append((kind, client, _copy(reply), rv))

    def release(self) -> None:
        """Deliver everything held back (late: reordered behind newer messages)."""
        held_down, self._held_down = self._held_down, []
        for kind, client, msg, v, snapshot in held_down:
            self._deliver(kind, client, msg, v, snapshot)
        held_up, self._held_up = self._held_up, []
        self._inbox.extend(held_up)

    def discard_held(self) -> None:
        self._held_down.clear()
        self._held_up.clear()

    async def gather(self, kind, *, version=None, clients=None, deadline_s=None):
        mine = [(client, payload, v) for k, client, payload, v in self._inbox if k == kind]
        self._inbox = [item for item in self._inbox if item[0] != kind]
        return accept_replies(self, kind, mine, version, clients)

    def count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def log(self, event, **fields):
        self.events.append((event, fields))


def _copy(p: Payload) -> Payload:
    return Payload({k: v.clone() for k, v in p.tensors.items()}, dict(p.meta), p.payload_bits, p.version)


def malformed(p: Payload, turn: int) -> Payload:
    """A corrupted copy of a reply; ``turn`` picks one of five ways a message can be wrong."""
    q = _copy(p)
    names = sorted(q.tensors)
    way = turn % 5
    if not names or way == 0:
        q.meta["unexpected_field"] = 1
    elif way == 1:
        q.tensors.pop(names[0])
    elif way == 2:
        t = q.tensors[names[-1]]
        q.tensors[names[-1]] = t.to(torch.float64) if t.dtype != torch.float64 else t.to(torch.float32)
    elif way == 3:
        t = q.tensors[names[0]]
        q.tensors[names[0]] = t.reshape(-1)[:-1] if t.numel() else torch.zeros(1)
    else:
        for n in names:
            if q.tensors[n].is_floating_point():
                q.tensors[n] = torch.full_like(q.tensors[n], float("nan"))
                break
        else:
            q.meta["unexpected_field"] = 1
    return q


# ---- a harness and the state machine ---------------------------------------------------------------

class Harness:
    """One algorithm instance, its clients and a FaultyComm."""

    def __init__(self, method: str | type[Algorithm], *, config: dict[str, Any] | None = None, model: str = "mlp",
                 clients: int = 3, seed: int = 0, replay: bool = False):
        cls = get_algorithm(method) if isinstance(method, str) else method
        self.net = tiny_model(model, seed)
        if config is None:
            config = getattr(cls, "statesync_config", {})
        self.algorithm = cls(cls.make_config({"lr": 0.05, **config}), self.net)
        data = tiny_data(model, clients, seed=seed)
        self.contexts = {i: FakeClientContext(i, self.net, x, y, seed=seed) for i, (x, y) in enumerate(data)}
        self.comm = FaultyComm(self.algorithm, self.contexts, replay=replay)
        self.rounds = 0

    def run_round(self, down: list[str] | None = None, up: list[str] | None = None) -> None:
        self.comm.round = self.rounds
        self.comm.down_plan = list(down or [])
        self.comm.up_plan = list(up or [])
        asyncio.run(self.algorithm.server_round(self.comm))
        self.rounds += 1

    def crash(self, client: int) -> None:
        self.contexts[client].state.clear()

    def settle(self, rounds: int = SETTLE_ROUNDS) -> list[int]:
        """Run clean rounds; return the clients not in sync when handling their last message."""
        self.comm.discard_held()
        self.comm.in_sync.clear()
        for _ in range(rounds):
            self.run_round()
        return [c for c in self.contexts if not self.comm.in_sync.get(c, False)]

    def params_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.algorithm.model_params().values())


def state_sync_machine(method: str, *, config: dict[str, Any] | None = None, model: str = "mlp",
                       clients: int = 3, replay: bool = False, max_examples: int = 20,
                       steps: int = 12) -> type[RuleBasedStateMachine]:
    """A RuleBasedStateMachine class driving ``method`` through faults (see module doc)."""
    up_faults = UP_FAULTS + (["replay"] if replay else [])

    class StateSync(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.h = Harness(method, config=config, model=model, clients=clients, replay=replay)

        @rule(down=st.lists(st.sampled_from(DOWN_FAULTS), max_size=2 * clients),
              up=st.lists(st.sampled_from(up_faults), max_size=2 * clients))
        def faulty_round(self, down, up):
            self.h.run_round(down, up)

        @rule()
        def clean_round(self):
            self.h.run_round()

        @rule(client=st.integers(0, clients - 1))
        def crash_and_restart(self, client):
            self.h.crash(client)

        @precondition(lambda self: self.h.comm._held_down or self.h.comm._held_up)
        @rule()
        def deliver_late(self):
            self.h.comm.release()

        @invariant()
        def never_out_of_sync_while_believing_in_sync(self):
            assert not self.h.comm.violations, self.h.comm.violations[:3]

        @invariant()
        def model_stays_finite(self):
            assert self.h.params_finite()

        def teardown(self):
            # Liveness: once the network heals, everyone resynchronises.
            lagging = self.h.settle()
            assert not self.h.comm.violations, self.h.comm.violations[:3]
            assert lagging == [], f"{method}: clients {lagging} never resynchronised"

    StateSync.__name__ = f"StateSync_{method}"
    StateSync.TestCase.settings = settings(max_examples=max_examples, stateful_step_count=steps, deadline=None)
    return StateSync


# ---- a small real problem for convergence and bit-count tests -------------------------------------

def digits_problem(clients: int = 5, hidden: int = 32, seed: int = 0):
    """scikit-learn's bundled 8x8 digits, standardised, split IID over ``clients``; an MLP
    64-hidden-10. Returns (model, [(x, y) per client], (x_test, y_test))."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    test = (x[:360], y[:360])
    x, y = x[360:], y[360:]
    parts = [(x[i::clients], y[i::clients]) for i in range(clients)]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    return model, parts, test


def accuracy(model: torch.nn.Module, params, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (x,))
    return float((logits.argmax(1) == y).float().mean())


def train(method: str, config: dict[str, Any], rounds: int, clients: int = 5, seed: int = 0):
    """Run ``method`` on the digits problem through tests/fakes' LocalComm (no faults).
    Returns (initial accuracy, final accuracy, uplink bits, comm, algorithm)."""
    from tests.fakes import LocalComm, run_rounds

    model, parts, (xt, yt) = digits_problem(clients, seed=seed)
    cls = get_algorithm(method)
    alg = cls(cls.make_config(config), model)
    contexts = {i: FakeClientContext(i, model, x, y, seed=seed) for i, (x, y) in enumerate(parts)}
    comm = LocalComm(alg, contexts)
    before = accuracy(model, alg.model_params(), xt, yt)
    run_rounds(alg, comm, rounds)
    return before, accuracy(model, alg.model_params(), xt, yt), comm.uplink_bits, comm, alg
