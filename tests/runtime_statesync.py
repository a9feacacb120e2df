"""State synchronisation through the real runtime: a hypothesis state machine over a
``fedsim.runner.Simulation`` (its ServerSide / ClientSide, Node, codec, Emulator, server and
client roles) on the virtual clock, one round at a time.

Unlike ``tests/statesync.py`` (the algorithm classes driven through a parallel fake), every
message here is encoded by the codec, crosses a ZeroMQ ``inproc`` socket, is modelled by the
emulator and goes through the node's duplicate suppression and the server role's
late / unasked / version filters. Faults are injected **on the wire**, between a socket and
its node (``Transport.on_message``): a data frame (not a node-level control message, which
real TCP never loses) may be dropped, duplicated, held back and delivered later (reordered,
possibly into a later round) or corrupted (one bit flipped, ``codec.corrupt``). Besides:

* a round with the **emulator's own** loss, duplication and corruption on every link
  (applied and undone through its ``set_link`` path);
* a client **process restart**, between rounds or during one: every client actor on the
  client node loses its memory, the node numbers its messages from 1 again in a new session
  and says hello again;
* a **server restart from checkpoint** (``ServerSide.crash``), at a random moment of a round,
  with the server node's message ids starting from 1 again as a new process's would; frames
  the wire was holding back are lost with the dead process's connections (TCP delivers
  nothing of a closed connection: see the note in ``Runtime.run_round``).

Invariants:

* the run never raises (the round loop, and nothing on the event loop's exception handler);
* no fresh message is taken for a duplicate: the ``duplicate`` count never exceeds the
  byte-identical copies the wire and the emulator delivered again (what a restart lockout
  breaks);
* every message the server's socket received has exactly one outcome (``inbound_balance``);
* after ``SETTLE`` clean rounds, every client has contributed in the last one
  (``ServerRole.contributions``) and its digest equals the server's mirror of it
  (``client_digest(state) == server_digest(c)``): no update was applied against a state the
  client does not hold.
"""
from __future__ import annotations

import asyncio
import functools

import numpy as np
import zmq
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from algorithms import algorithm_names, get_algorithm
from algorithms.base import state_digest
from fedsim import codec
from fedsim.clock import new_loop
from fedsim.data import load_dataset, partition
from fedsim.models import build_model
from fedsim.node import NODE, inbound_balance
from fedsim.runner import Simulation, make_algorithm
from fedsim.scenario import load_scenario
from network.config import Event, Loss
from network.transport import UnknownPeer

CLIENTS = 3
EMPTY = state_digest({})
SETTLE = 2
"""Clean rounds after which every client must contribute and be in sync."""
FAULTS = ["ok", "ok", "drop", "dup", "delay", "corrupt"]
ROUND_DEADLINE = "3s"

# Per-method settings keeping a round small: tiny ranks, few local steps.
OVERRIDES = {
    "fedlrt": ["algorithm.local_steps=2", "algorithm.rank=2"],
    "fedloru": ["algorithm.local_steps=2", "algorithm.rank=2"],
    "powersgd": ["algorithm.rank=2"],
    "lqsgd": ["algorithm.rank=2"],
}


def stateful_methods() -> list[str]:
    return [n for n in algorithm_names() if get_algorithm(n).stateful]


@functools.lru_cache(maxsize=None)
def _scenario_and_data(method: str):
    overrides = [f"algorithm.name={method}", f"data.clients={CLIENTS}", "model.kind=mlp", "model.hidden=[8]",
                 "run.rounds=100000", "run.eval_every=100000", f"run.round_deadline={ROUND_DEADLINE}"]
    sc = load_scenario(None, overrides + OVERRIDES.get(method, []))
    dataset = load_dataset(sc.data, sc.run.seed)
    parts = partition(dataset.train_y, sc.data, sc.run.seed)
    return sc, dataset, parts


class Wire:
    """Faults between one transport and its node, consumed one per data message."""

    def __init__(self, loop, deliver, rng: np.random.Generator):
        self.loop, self.deliver, self.rng = loop, deliver, rng
        self.plan: list[str] = []
        self.held: list[tuple[bytes, list]] = []
        self.seen: set[bytes] = set()
        self.copies = 0
        """Data messages delivered whose bytes were delivered before (true duplicates)."""

    def __call__(self, peer: bytes, frames: list) -> None:
        try:
            head = codec.peek_route(frames[0])
            control = head["src"] == NODE or head["dst"] == NODE
        except Exception:
            control = False
        op = "ok" if control or not self.plan else self.plan.pop(0)
        if op == "drop":
            return
        if op == "delay":
            self.held.append((peer, list(frames)))
            return
        if op == "corrupt":
            frames = codec.corrupt(list(frames), self.rng)
        self._hand(peer, frames)
        if op == "dup":
            self._hand(peer, frames)

    def _hand(self, peer: bytes, frames: list) -> None:
        key = b"\x00".join(bytes(f) for f in frames)
        if key in self.seen:
            self.copies += 1
        self.seen.add(key)
        self.deliver(peer, frames)

    def release(self) -> None:
        """Hand over what was held back, from the event loop (as a socket read would)."""
        held, self.held = self.held, []
        for peer, frames in held:
            self.loop.call_soon(self._hand, peer, frames)


class Runtime:
    """A real Simulation driven round by round, with wires that can misbehave."""

    def __init__(self, method: str, seed: int = 0):
        sc, dataset, parts = _scenario_and_data(method)
        self.method = method
        self.loop = new_loop("virtual")
        asyncio.set_event_loop(self.loop)
        self.errors: list[str] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(str(ctx.get("exception") or ctx)))
        model = build_model(sc.model, dataset.input_shape, dataset.num_classes, sc.run.seed)
        self.sim = Simulation(sc, self.loop, dataset, parts, model, make_algorithm(sc, model))
        self.sim.server.checkpoints = True
        self.sim.client_side.keep_ledger()
        rng = np.random.default_rng([seed, 0x5EED])
        # A restarted process connects anew and gets a new routing id; the simulation's one
        # client socket cannot, so the server's socket is seen through per-generation
        # aliases: ``clients-0/<n>`` for the n-th client process, and sends to an older
        # alias fail as sends to a closed connection do.
        self.generation = 0
        transport = self.sim.server_transport
        self._real_peer = self.sim.client_transport.socket.getsockopt(zmq.ROUTING_ID) or b"clients-0"
        real_send, real_report = transport.send, transport.report_rejection

        def send(frames, peer=None):
            return real_send(frames, self._unalias(peer))
        transport.send = send
        # a closed connection's rejections charge no live peer
        transport.report_rejection = lambda peer: peer == self._alias() and real_report(self._real_peer)
        self.up = Wire(self.loop, self.sim.server_node.on_message, rng)
        self.down = Wire(self.loop, self.sim.client_node.on_message, rng)
        # aliased as the socket reads it: a frame held back keeps its connection's alias
        self.sim.server_transport.attach(self.loop, lambda peer, frames: self.up(self._alias(), frames))
        self.sim.client_transport.attach(self.loop, self.down)
        self.sim.client_node.hello(sorted(self.sim.clients))
        # Taps on the real roles (they change nothing): the server's view of each client's
        # shared state when it sends it a message, and the client's after handling it.
        self.sent_view: dict[tuple[int, int, str], bytes] = {}
        self.handled: dict[int, tuple[int, str, bytes]] = {}
        send = self.sim.server_node.send

        def tapped_send(msg, tensors=None):
            if msg.dst >= 0:
                self.sent_view[(msg.dst, msg.round, msg.kind)] = self.sim.algorithm.server_digest(msg.dst)
            return send(msg, tensors)
        self.sim.server_node.send = tapped_send
        taps: dict = {}
        for client in self.sim.clients.values():
            client.handlers = {kind: self._tap(kind, h) for kind, h in client.handlers.items()}
            # one wrapper per (kind, handler): the batcher groups clients by handler, so equal
            # handlers must stay equal for the clients of an instant to be computed together
            client.batch_handlers = {kind: taps.setdefault((kind, h), self._tap_batch(kind, h))
                                     for kind, h in client.batch_handlers.items()}
        self.restarts = 0
        self.rounds = 0
        self.last_contributions: dict[int, int] = {}
        self.gained: set[int] = set()
        self._crash_handle = None

    def _alias(self) -> bytes:
        return self._real_peer + b"/%d" % self.generation

    def _unalias(self, peer):
        if peer is None or peer == self._alias():
            return self._real_peer if peer is not None else None
        raise UnknownPeer(peer)

    def _tap(self, kind: str, handler):
        def tapped(ctx, payload):
            try:
                return handler(ctx, payload)
            finally:
                self.handled[ctx.client_id] = (ctx.round, kind, self.sim.algorithm.client_digest(ctx.state))
        return tapped

    def _tap_batch(self, kind: str, handler):
        """The same record for the clients a batch handler serves (``fedsim.batching``)."""
        def tapped(ctxs, payloads):
            try:
                return handler(ctxs, payloads)
            finally:
                for ctx in ctxs:
                    self.handled[ctx.client_id] = (ctx.round, kind, self.sim.algorithm.client_digest(ctx.state))
        return tapped

    # --- driving ---------------------------------------------------------------------------
    def _stop_after_one(self, metrics, total) -> None:
        self.sim.server.stop_requested = True

    def set_links(self, loss: float, duplicate: float, corrupt: float) -> None:
        """Every client's links, both ways, through the emulator's own ``set_link`` path."""
        fields = {"loss": Loss(p=loss), "duplicate": duplicate, "corrupt": corrupt}
        clients = tuple(sorted(self.sim.clients))
        self.sim.emulator._apply(Event(index=-1, action="set_link", clients=clients, up=fields, down=fields),
                                 self.loop.time())

    def run_round(self, up: list[str] = (), down: list[str] = (), crash_at: float | None = None,
                  restart_at: float | None = None) -> None:
        """One completed round of the real round loop (``ServerSide.run_rounds``)."""
        server = self.sim.server
        self.up.plan, self.down.plan = list(up), list(down)
        if crash_at is not None:
            def crash() -> None:
                server.crash(1.0)
                self.sim.server_node._next_id = 0  # a new process numbers its messages from 1
                # What the wire held back was on the dead process's TCP connections: lost.
                # (Delivering it after the restart finds that the client node keys its
                # duplicate suppression by the server session of its *current* welcome,
                # not the sender's: an old-session frame's id is then charged to the new
                # session, so a fresh message with that id would be dropped. TCP cannot
                # deliver such a frame, so the machine does not either.)
                self.up.held.clear()
                self.down.held.clear()
            self._crash_handle = self.loop.call_later(crash_at, crash)
        restart = None if restart_at is None else self.loop.call_later(restart_at, self.restart_clients, False)
        before = dict(server.role.contributions)
        server.stop_requested = False
        self.loop.run_until_complete(asyncio.wait_for(
            server.run_rounds(self._stop_after_one, self.sim.on_runtime_event, None), timeout=3600))
        if self._crash_handle is not None:
            self._crash_handle.cancel()
            self._crash_handle = None
        if restart is not None:
            restart.cancel()
        self.quiesce()
        self.up.plan, self.down.plan = [], []
        after = server.role.contributions
        self.gained = {c for c in after if after[c] > before.get(c, 0)}
        self.rounds += 1

    def quiesce(self) -> None:
        """Let in-flight messages land (virtual seconds cost nothing)."""
        self.loop.run_until_complete(asyncio.sleep(10.0))

    def restart_clients(self, settle: bool = True) -> None:
        """The client node's process restarts: memory lost, a new connection (routing id),
        message ids from 1, a new session. The server's liveness check (its heartbeat timer
        in a deployment) then finds the old connection gone, and the hello is accepted."""
        node = self.sim.client_node
        for client in self.sim.clients.values():
            client.crash()
            client.restart()
        self.restarts += 1
        self.generation += 1
        node._next_id = 0
        node._seen.clear()
        node.welcome = None
        node.rounds_sent.clear()
        node.session = f"restart-{self.restarts}"
        self.down.held.clear()  # frames on the old connection never reach the new process
        self.sim.server_node.check_liveness(-1.0)
        self.sim.emulator.reset_connections(sorted(self.sim.clients))
        node.hello(sorted(self.sim.clients))
        if settle:
            self.quiesce()

    def out_of_sync(self) -> list[int]:
        """Clients whose state after handling their last message (of the last round) is not
        the non-empty state the server held for them when it sent that message."""
        last = self.sim.server.role.round
        lagging = []
        for c in self.sim.clients:
            r, kind, digest = self.handled.get(c, (-1, "", EMPTY))
            if r != last or digest == EMPTY or digest != self.sent_view.get((c, r, kind)):
                lagging.append(c)
        return lagging

    def close(self) -> None:
        try:
            self.sim.close()
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            asyncio.set_event_loop(None)
            self.loop.close()


def runtime_machine(method: str, *, max_examples: int = 50, steps: int = 6) -> type[RuleBasedStateMachine]:
    faults = st.lists(st.sampled_from(FAULTS), max_size=2 * CLIENTS)

    class RuntimeStateSync(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.rt = Runtime(method)
            self.clean = 0

        @rule(up=faults, down=faults)
        def faulty_round(self, up, down):
            self.rt.run_round(up, down)
            self.clean = 0

        @rule()
        def clean_round(self):
            self.rt.run_round()
            self.clean += 1

        @precondition(lambda self: self.rt.up.held or self.rt.down.held)
        @rule()
        def deliver_late(self):
            self.rt.up.release()
            self.rt.down.release()
            self.rt.quiesce()
            self.clean = 0

        @rule(during=st.none() | st.floats(0.0, 0.15))
        def client_process_restart(self, during):
            """Between rounds, or ``during`` a round (seconds after it starts)."""
            if during is None:
                self.rt.restart_clients()
            else:
                self.rt.run_round(restart_at=during)
            self.clean = 0

        @rule(loss=st.sampled_from([0.0, 0.05, 0.3]), duplicate=st.sampled_from([0.0, 0.5]),
              corrupt=st.sampled_from([0.0, 0.3]))
        def lossy_links_for_a_round(self, loss, duplicate, corrupt):
            """The emulator's own loss, duplication and corruption (a set_link and back)."""
            self.rt.set_links(loss, duplicate, corrupt)
            try:
                self.rt.run_round()
            finally:
                self.rt.set_links(0.0, 0.0, 0.0)
            self.clean = 0

        @rule(at=st.floats(0.0, 0.15))
        def server_restart_from_checkpoint(self, at):
            self.rt.run_round(crash_at=at)
            self.clean = 0

        @invariant()
        def never_raises(self):
            assert not self.rt.errors, self.rt.errors[:3]

        @invariant()
        def no_fresh_message_taken_for_a_duplicate(self):
            dup = self.rt.sim.stats.counters.get("duplicate", 0)
            copies = self.rt.up.copies + self.rt.down.copies + self.rt.sim.stats.inbound.get("network_copies", 0)
            assert dup <= copies, f"{dup} messages suppressed as duplicates, only {copies} were copies"


        @invariant()
        def every_message_the_server_received_has_one_outcome(self):
            came, went = inbound_balance(self.rt.sim.stats.snapshot()[1])
            assert came == went, f"received {came}, outcomes {went}: {self.rt.sim.stats.snapshot()[1]}"

        @invariant()
        def settled_clients_contribute_and_agree(self):
            if self.clean < SETTLE:
                return
            missing = sorted(set(self.rt.sim.clients) - self.rt.gained)
            assert not missing, f"{method}: clients {missing} did not contribute after {self.clean} clean rounds"
            lagging = self.rt.out_of_sync()
            assert not lagging, f"{method}: clients {lagging} out of sync after {self.clean} clean rounds"

        def teardown(self):
            try:
                for _ in range(SETTLE):
                    self.rt.run_round()
                self.clean = SETTLE
                self.settled_clients_contribute_and_agree()
                self.never_raises()
            finally:
                self.rt.close()

    RuntimeStateSync.__name__ = f"RuntimeStateSync_{method}"
    if settings.get_current_profile_name() == "long":
        max_examples = max(max_examples, settings.default.max_examples)
    RuntimeStateSync.TestCase.settings = settings(max_examples=max_examples, stateful_step_count=steps,
                                                  deadline=None)
    return RuntimeStateSync
