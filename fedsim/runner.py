"""Run orchestration: build data, model, algorithm, network and actors; drive the rounds.

One process runs a server node (ROUTER) and a client node (DEALER) over ``inproc``; the
clock is virtual (deterministic, simulated seconds) or real (the wall clock). The same
roles run across processes and hosts through ``fedsim.deploy``.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import signal
import sys
import math
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zmq

from algorithms import fastpath
from algorithms.base import Algorithm, ConfigError, params_digest
from network.emulator import Emulator
from network.transport import Transport

from . import checkpoint
from .batching import ComputeBatcher
from .client import ClientData, ClientRole
from .codec import SERVER as SERVER_ID
from .clock import LoopClock, VirtualTimeLoop, new_loop, wall_time
from .codec import Limits
from .data import Dataset, load_dataset, partition
from .models import build_model, evaluate, work_per_sample
from .node import Node, Stats
from .results import EventLog, RoundMetrics, RunResult
from .errors import ScenarioError
from .memory import keep_freed_memory
from .guard import UPLOAD_QUEUE_S, upload_budget
from .scenario import Scenario, can_lose_replies
from .server import ServerRole

Progress = Callable[[RoundMetrics, int], None]


def select_participants(n_clients: int, fraction: float, seed: int, round: int) -> list[int]:
    """Clients taking part in a round: all, or a seeded sample of ``fraction`` of them."""
    if fraction >= 1.0:
        return list(range(n_clients))
    k = max(1, int(round_half_up(fraction * n_clients)))
    rng = np.random.default_rng([seed, round, 0x5E1EC7])
    return sorted(rng.choice(n_clients, size=k, replace=False).tolist())


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


class ServerSide:
    """The server's node, its emulator and role, and the round loop.

    With ``checkpoints`` on, the state the run must not lose is saved after every completed
    round (``fedsim.checkpoint``): to ``checkpoint_dir`` when given, else kept in memory for
    a scripted ``server_crash``. :meth:`crash` drops everything the process held;
    :meth:`restore` rebuilds the server from the last checkpoint, as a new process would.
    """

    def __init__(self, scenario: Scenario, loop: asyncio.AbstractEventLoop, transport: Transport, dataset: Dataset,
                 model: torch.nn.Module, algorithm: Algorithm, events: EventLog, stats: Stats, limits: Limits, *,
                 emulate: bool = True, session: str = "server-0"):
        self.scenario, self.loop, self.dataset, self.model, self.algorithm = scenario, loop, dataset, model, algorithm
        self.events, self.stats, self.transport = events, stats, transport
        run = scenario.run
        self.n_clients = scenario.data.clients
        self.drops: collections.Counter[str] = collections.Counter()
        """Messages the network model dropped, by reason (loss, partition, offline, crashed)."""

        def net_log(event: str, **fields) -> None:
            if event == "drop":
                self.drops[fields.get("reason", "?")] += 1
            events(event, **fields)

        self.emulator = Emulator(scenario.network, self.n_clients, LoopClock(loop), run.seed, net_log,
                                 max_held_bytes=upload_budget(model), queue_s=UPLOAD_QUEUE_S)
        self.node = Node(transport, log=events, stats=stats, limits=limits, emulator=self.emulator, seed=run.seed)
        self.node.emulate = emulate
        self.node.session = session
        self.node.expected_clients = self.n_clients
        self.role = ServerRole(self.node, algorithm, stats=stats, log=events, max_wait_s=run.max_wait)
        self.node.on_dead = self.role.forget
        self.metrics: list[RoundMetrics] = []
        self.start_time = 0.0
        self.next_round = 0
        self.checkpoints = False
        self.checkpoint_dir: Path | None = None
        self._checkpoint: bytes | None = None
        self.stop_requested = False
        """Set by Ctrl-C: stop after the current round."""
        self.down = False
        self.restarts = 0
        self._round_task: asyncio.Future | None = None
        self._restarted: asyncio.Event | None = None
        self.round_deadline: float | None = run.round_deadline
        """Seconds each gather waits: run.round_deadline, or a derived default (see
        :func:`derived_round_deadline`) where replies can be lost and none was set."""
        self.deadline_derived = False

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.model, self.algorithm.model_params(), self.dataset.test_x, self.dataset.test_y)

    async def wait_registered(self, registration_timeout: float | None) -> None:
        registered = asyncio.Event()
        self.node.registered = registered
        if len(self.node.routes) < self.n_clients:
            await asyncio.wait_for(registered.wait(), timeout=registration_timeout)

    async def run_rounds(self, progress: Progress | None, on_fault: Callable[[dict], None],
                         registration_timeout: float | None) -> None:
        loop, run, stats = self.loop, self.scenario.run, self.stats
        if self.transport.on_message is None:
            self.transport.attach(loop, self.node.on_message)
        await self.wait_registered(registration_timeout)
        self.start_time = loop.time() - (self.metrics[-1].sim_time_s if self.metrics else 0.0)
        while self.next_round < run.rounds and not self.stop_requested:
            r = self.next_round
            for event in self.emulator.start_round(r) or []:
                on_fault(event)
            if self.down:  # a server_crash fired at the start of this round
                await self._restarted.wait()
                continue
            participants = select_participants(self.n_clients, self.algorithm.config.client_fraction, run.seed, r)
            self.role.begin_round(r, participants, self.round_deadline)
            received, missed = self.role.replies_received, self.role.replies_missed
            started = loop.time()
            self.events("round_start", round=r, participants=len(participants))
            self._round_task = asyncio.ensure_future(self.algorithm.server_round(self.role))
            try:
                await self._round_task
            except asyncio.CancelledError:
                if not self.down:
                    raise
                await self._restarted.wait()  # crashed mid-round: the round runs again
                continue
            finally:
                self._round_task = None
            now = loop.time()
            acc = loss = None
            if (r + 1) % run.eval_every == 0 or r == run.rounds - 1:
                acc, loss = self.evaluate()
            self.events("round_end", round=r, accuracy=None if acc is None else round(acc, 6),
                        up=stats.uplink_bytes, down=stats.downlink_bytes)
            m = RoundMetrics(r, now - self.start_time, now - started, acc, loss, stats.uplink_bytes, stats.downlink_bytes,
                             stats.uplink_payload_bits, stats.downlink_payload_bits,
                             self.role.replies_received - received, self.role.replies_missed - missed)
            self.metrics.append(m)
            self.next_round = r + 1
            if self.checkpoints:
                self.save_checkpoint()
            if progress is not None:
                progress(m, run.rounds)
            if run.stop_at_target and acc is not None and run.target_accuracy is not None and acc >= run.target_accuracy:
                break
        self.node.finish()
        self.node.farewell()

    # --- checkpoints ---------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {
            "round": self.next_round - 1,
            "algorithm_name": self.scenario.algorithm_name,
            "seed": self.scenario.run.seed,
            "algorithm": checkpoint.algorithm_state(self.algorithm),
            "metrics": [dataclasses.asdict(m) for m in self.metrics],
            "stats": {"uplink_bytes": self.stats.uplink_bytes, "downlink_bytes": self.stats.downlink_bytes,
                      "uplink_payload_bits": self.stats.uplink_payload_bits,
                      "downlink_payload_bits": self.stats.downlink_payload_bits,
                      "messages_up": self.stats.messages_up, "messages_down": self.stats.messages_down,
                      "counters": dict(self.stats.counters)},
            "contributions": dict(self.role.contributions),
            "emulator_rngs": dict(self.emulator._rngs),
            "events_rows": self.events.total,
            "restarts": self.restarts,
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is not None:
            self.events.sync()  # the rows the checkpoint counts are on disk before it is
        data = checkpoint.dumps(self.checkpoint_state())
        if self.checkpoint_dir is not None:
            checkpoint.write_atomic(self.checkpoint_dir / checkpoint.FILENAME, data)
        self._checkpoint = data

    def restore(self, state: dict, *, traffic: bool = True) -> None:
        """Rebuild the server from a checkpoint, as a freshly started process would.
        ``traffic``: also restore the byte and message counters (a new process; in a
        simulated crash the traffic before it was real and stays counted)."""
        if state["algorithm_name"] != self.scenario.algorithm_name or state["seed"] != self.scenario.run.seed:
            raise checkpoint.CheckpointError(
                f"the checkpoint is of algorithm {state['algorithm_name']!r} seed {state['seed']}, the scenario of "
                f"{self.scenario.algorithm_name!r} seed {self.scenario.run.seed}")
        algorithm = make_algorithm(self.scenario, self.model)
        checkpoint.restore_algorithm(algorithm, state["algorithm"])
        self.algorithm = self.role.algorithm = algorithm
        self.metrics = [RoundMetrics(**m) for m in state["metrics"]]
        self.next_round = state["round"] + 1
        self.role.contributions = {int(k): v for k, v in state["contributions"].items()}
        self.restarts = state.get("restarts", 0)
        if traffic:
            st = state["stats"]
            for k in ("uplink_bytes", "downlink_bytes", "uplink_payload_bits", "downlink_payload_bits",
                      "messages_up", "messages_down"):
                setattr(self.stats, k, st[k])
            self.stats.counters.clear()
            self.stats.counters.update(st["counters"])
            self._replay_events(state["events_rows"])
            self.emulator._rngs.update(state["emulator_rngs"])
        self.node.resumed = state["round"]

    def _replay_events(self, rows: int) -> None:
        """A resumed run's event log starts with the first ``rows`` rows of the log the
        killed process streamed (the rows of its last completed round and before)."""
        path = self.checkpoint_dir / "events.jsonl" if self.checkpoint_dir is not None else None
        if path is None or not path.exists():
            return
        with open(path) as f:
            lines = [line for _, line in zip(range(rows), f)]
        if len(lines) < rows:
            raise checkpoint.CheckpointError(f"{path} holds {len(lines)} events, the checkpoint expects {rows}")
        self.events.replay(lines)

    def crash(self, restart_after: float | None) -> None:
        """A scripted server crash: in-flight work and in-memory state are lost; after
        ``restart_after`` seconds the server restarts from its last checkpoint."""
        if self.down:
            return
        self.down = True
        self.stats.count("server_crash")
        self._restarted = asyncio.Event()
        self.role.begin_round(-1, [], None)
        self.role._gather = None
        self.node.actors.pop(SERVER_ID, None)
        if self._round_task is not None:
            self._round_task.cancel()
        self.loop.call_later(restart_after or 0.0, self._restart)

    def _restart(self) -> None:
        restarts = self.restarts + 1
        if self._checkpoint is not None:
            self.restore(checkpoint.loads(self._checkpoint), traffic=False)
        else:  # crashed before the first round completed: start over
            self.algorithm = self.role.algorithm = make_algorithm(self.scenario, self.model)
            self.metrics, self.next_round, self.node.resumed = [], 0, -1
        self.restarts = restarts
        self.emulator.reset_connections()  # every client reconnects to the new process
        self.node.actors[SERVER_ID] = self.role
        self.node.session = f"server-{self.restarts}"
        self.events("server_restart", resumed=self.node.resumed)
        self.down = False
        self.node.welcome_all()
        self._restarted.set()


class ClientSide:
    """A client node hosting any number of client actors (one socket for all of them)."""

    def __init__(self, scenario: Scenario, loop: asyncio.AbstractEventLoop, transport: Transport, dataset: Dataset,
                 parts: list[torch.Tensor], client_ids: list[int], model: torch.nn.Module, algorithm: Algorithm,
                 events: EventLog, stats: Stats, limits: Limits, compute_time):
        run = scenario.run
        self.loop, self.transport = loop, transport
        self.node = Node(transport, log=events, stats=stats, limits=limits, seed=run.seed)
        wps = work_per_sample(model, dataset.input_shape)
        fastpath.set_enabled(model, run.vectorise)  # lean client steps, or the autograd reference
        self.clients = {
            i: ClientRole(i, self.node, algorithm, ClientData(dataset.train_x[parts[i]], dataset.train_y[parts[i]]),
                          model=model, seed=run.seed, work_per_sample=wps, compute_time=compute_time,
                          real_time=run.clock == "real", stats=stats, log=events)
            for i in client_ids
        }
        if run.vectorise and run.batch_clients and isinstance(loop, VirtualTimeLoop):
            batcher = ComputeBatcher(loop)
            for client in self.clients.values():
                client.batcher = batcher
        self.rollbacks: collections.Counter[str] = collections.Counter()
        self.node.on_welcome = self.on_welcome

    def keep_ledger(self) -> None:
        """Let a server resumed from a checkpoint roll these clients back (see ClientRole.rollback)."""
        for client in self.clients.values():
            client.keep_ledger = True

    def on_welcome(self, welcome: dict) -> None:
        resumed = welcome.get("resumed", -1)
        if isinstance(resumed, int) and resumed >= -1 and any(c._ledger or c.data.state for c in self.clients.values()):
            for client in self.clients.values():
                self.rollbacks[client.rollback(resumed)] += 1

    def start(self) -> None:
        self.transport.attach(self.loop, self.node.on_message)
        self.node.hello(sorted(self.clients))

    def on_fault(self, event: dict) -> None:
        """Crash / restart of clients hosted here, fired by the scenario's timeline."""
        action = event.get("action")
        for c in event.get("clients", []):
            client = self.clients.get(c)
            if client is None:
                continue
            if action == "crash":
                client.crash()
            elif action == "restart":
                client.restart()


class Simulation:
    """A single-process run: a server side and a client side over ``inproc``."""

    def __init__(self, scenario: Scenario, loop: asyncio.AbstractEventLoop, dataset: Dataset,
                 parts: list[torch.Tensor], model: torch.nn.Module, algorithm: Algorithm):
        self.scenario, self.loop = scenario, loop
        self.events = EventLog(loop.time)
        self.stats = Stats()
        self.context = zmq.Context()
        address = f"inproc://fedsim-{uuid.uuid4().hex}"
        limits = Limits()
        self.server_transport = Transport(router=True, address=address, context=self.context,
                                          max_message_bytes=limits.max_message_bytes)
        self.client_transport = Transport(router=False, address=address, identity=b"clients-0", context=self.context,
                                          max_message_bytes=limits.max_message_bytes)
        if isinstance(loop, VirtualTimeLoop):
            loop.transports = [self.server_transport, self.client_transport]
        self.server = ServerSide(scenario, loop, self.server_transport, dataset, model, algorithm, self.events,
                                 self.stats, limits)
        if any(ev.action == "server_crash" for ev in scenario.network.events):
            self.server.checkpoints = True
        self.emulator = self.server.emulator
        self.server_node = self.server.node
        self.client_side = ClientSide(scenario, loop, self.client_transport, dataset, parts,
                                      list(range(scenario.data.clients)), model, algorithm, self.events, self.stats,
                                      limits, self.emulator.compute_time)
        self.client_node = self.client_side.node
        self.clients = self.client_side.clients
        if self.server.checkpoints:
            self.client_side.keep_ledger()
        if scenario.run.round_deadline is None and can_lose_replies(scenario.network):
            self.server.round_deadline = derived_round_deadline(scenario, model, algorithm, dataset, parts, self.emulator)
            self.server.deadline_derived = True
        self.emulator.on_runtime_event(self.on_runtime_event)

    @property
    def metrics(self) -> list[RoundMetrics]:
        return self.server.metrics

    @property
    def algorithm(self) -> Algorithm:
        """The server's instance (a restart from a checkpoint replaces it)."""
        return self.server.algorithm

    def on_runtime_event(self, event: dict) -> None:
        if event.get("action") == "server_crash":
            self.events("server_crash", restart_after=event.get("restart_after"))
            self.server.crash(event.get("restart_after"))
            return
        self.client_side.on_fault(event)
        self.stats.count(f"fault_{event.get('action')}", len(event.get("clients", [])))

    async def main(self, progress: Progress | None) -> None:
        self.client_side.start()
        await self.server.run_rounds(progress, self.on_runtime_event,
                                     None if self.scenario.run.clock == "virtual" else 30)

    def close(self) -> None:
        self.server_transport.close()
        self.client_transport.close()
        self.context.term()


DEADLINE_MARGIN = 1.5
"""The derived round deadline is this many times the slowest client's loss-free exchange."""


def derived_round_deadline(scenario: Scenario, model: torch.nn.Module, algorithm: Algorithm, dataset: Dataset,
                           parts: list[torch.Tensor], emulator: Emulator) -> float:
    """A default ``run.round_deadline`` (seconds) for scenarios that can lose replies.

    Without one, a gather waiting for a lost reply waits ``run.max_wait`` (an hour). The
    default is ``DEADLINE_MARGIN`` x the longest loss-free exchange of one gather at the
    start of the run, over clients c:

        latency_down + 4 jitter_sd + B / rate_down + compute_c + latency_up + 4 jitter_sd + B / rate_up

    plus, where the server's links are finite, n B / server_uplink + n B / server_downlink
    (a broadcast and the uploads of all n clients sharing them). B is the dense model in
    bytes (32-bit values: an upper bound on every method's messages); rates are the links'
    bandwidths at time 0, capped by TCP's throughput model; compute_c is the compute model's
    time for the samples one message costs client c: ``local_epochs`` passes over its data,
    or ``local_steps`` batches, or one batch (``batch_size``; 0: all its data).
    """
    numel = sum(p.numel() for p in model.parameters())
    bits = 8 * (4 * numel + 1024)
    wps = work_per_sample(model, dataset.input_shape)
    cfg = dataclasses.asdict(algorithm.config)
    n = scenario.data.clients
    worst = 0.0
    for c in range(n):
        size = len(parts[c])
        batch = cfg.get("batch_size", 0) or size
        if "local_epochs" in cfg:
            samples = cfg["local_epochs"] * size
        elif "local_steps" in cfg:
            samples = cfg["local_steps"] * batch
        else:
            samples = min(batch, size)
        t = wps * samples / emulator.speed(c)
        for direction in ("down", "up"):
            link = emulator.link(c, direction)
            rate = max(min(link.bandwidth_at(0.0), emulator.tcp_cap(direction, c)), 1.0)  # a trace may start at 0
            t += link.latency + 4 * link.jitter.std + bits / rate
        worst = max(worst, t)
    net = scenario.network
    shared = sum(n * bits / b for b in (net.server_uplink, net.server_downlink) if math.isfinite(b))
    return DEADLINE_MARGIN * (worst + shared)


@contextlib.contextmanager
def quiet_gc(gen0_threshold: int = 1_000_000):
    """Keep memory management out of the hot loop.

    A run makes almost no cyclic garbage per message, but CPython's collector still walks
    every live container (actors, tensors, event rows) on its schedule: measured as ~30% of
    the framework's time per message with 2,000 clients. Freezing what setup built and
    collecting young objects less often removes most of it; the settings are restored after.
    The young generation holds up to a million objects: a round of 20,000 clients leaves
    ~1.4 million new containers alive along the way (28 collections at a threshold of
    50,000, 0.55-0.64 s of the round's ~7 s), one collection at a million (0.11-0.17 s).
    The collector finds no cyclic garbage in such a round, so nothing waits longer to be
    freed.
    Freed large blocks stay in the process for reuse (:func:`fedsim.memory.keep_freed_memory`,
    process-wide, left in place).
    """
    keep_freed_memory()
    saved = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(gen0_threshold, saved[1], saved[2])
    try:
        yield
    finally:
        gc.set_threshold(*saved)
        gc.unfreeze()


def make_algorithm(scenario: Scenario, model: torch.nn.Module) -> Algorithm:
    """The scenario's algorithm on this model; a setting the model cannot take (a rank
    above a layer's size) is a ScenarioError naming the key, like any other."""
    try:
        return scenario.algorithm_class(scenario.algorithm, model)
    except ConfigError as exc:
        raise ScenarioError(f"algorithm.{exc.key}", exc.value, exc.reason, source=scenario.source) from None


def close_simulation(loop: asyncio.AbstractEventLoop, sim: "Simulation | None", threads: int) -> None:
    """Tear down a single-process run: its sockets, leftover tasks, the loop, and the torch
    thread count it changed."""
    if sim is not None:
        sim.close()
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    asyncio.set_event_loop(None)
    loop.close()
    torch.set_num_threads(threads)


def _stop_on_interrupt(loop: asyncio.AbstractEventLoop, server: ServerSide) -> None:
    """First Ctrl-C: finish the current round, then stop and write what there is. A
    second one interrupts at once (the default handler is back)."""
    def handler() -> None:
        loop.remove_signal_handler(signal.SIGINT)
        server.stop_requested = True
        print("interrupted: stopping after this round (Ctrl-C again to abort)", file=sys.stderr, flush=True)
    with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: no handler
        loop.add_signal_handler(signal.SIGINT, handler)


def build(scenario: Scenario, loop: asyncio.AbstractEventLoop) -> Simulation:
    seed = scenario.run.seed
    dataset = load_dataset(scenario.data, seed)
    parts = partition(dataset.train_y, scenario.data, seed)
    model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, seed)
    algorithm = make_algorithm(scenario, model)
    sim = Simulation(scenario, loop, dataset, parts, model, algorithm)
    if scenario.eavesdropper is not None:  # a passive tap on one client's link (fedsim.eavesdrop)
        from .eavesdrop import WireTap
        sim.tap = sim.server_node.tap = WireTap(scenario.eavesdropper)
    return sim


def run(scenario: Scenario, out_dir: str | Path | None = None, progress: Progress | None = None) -> RunResult:
    """Run a scenario to the end; write ``events.jsonl``, ``metrics.csv``, ``summary.json``
    to ``out_dir`` when given. Returns the result either way."""
    wall_start = wall_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(scenario.run.threads)
    loop = new_loop(scenario.run.clock)
    asyncio.set_event_loop(loop)
    sim = None
    try:
        sim = build(scenario, loop)
        _stop_on_interrupt(loop, sim.server)
        if out_dir is not None:  # the event log streams into its file during the run
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            sim.events.stream_to(Path(out_dir) / "events.jsonl")
        with quiet_gc():
            loop.run_until_complete(sim.main(progress))
    finally:
        with contextlib.suppress(ValueError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        close_simulation(loop, sim, threads)
    result = summarise(sim, wall_time() - wall_start)
    result.summary["interrupted"] = sim.server.stop_requested and sim.server.next_round < scenario.run.rounds
    result.summary["restarts"] = sim.server.restarts
    if out_dir is not None:
        result.write(Path(out_dir))
        if getattr(sim, "tap", None) is not None:  # the eavesdropper's attacks: privacy.csv, privacy.png
            from .privacy import eavesdrop, write_report
            write_report(eavesdrop(scenario, sim.tap), Path(out_dir))
    return result


def summarise(sim: Simulation, wall_s: float) -> RunResult:
    return summarise_parts(sim.scenario, sim.stats, sim.metrics, sim.events, sim.algorithm, wall_s, sim.server)


DROP_REASONS = ("loss", "partition", "offline", "crashed", "deadline")


def summarise_parts(scenario: Scenario, stats: Stats, metrics: list[RoundMetrics], events: EventLog,
                    algorithm: Algorithm, wall_s: float, server: "ServerSide | None" = None) -> RunResult:
    target = scenario.run.target_accuracy
    evaluated = [m for m in metrics if m.accuracy is not None]
    reached = next((m.sim_time_s for m in evaluated if target is not None and m.accuracy >= target), None)
    last = evaluated[-1] if evaluated else None
    counters, inbound = stats.snapshot()
    summary = {
        "scenario": scenario.source,
        "algorithm": scenario.algorithm_name,
        "dataset": scenario.data.dataset,
        "clients": scenario.data.clients,
        "seed": scenario.run.seed,
        "clock": scenario.run.clock,
        "rounds": len(metrics),
        "final_accuracy": None if last is None else last.accuracy,
        "final_loss": None if last is None else last.loss,
        "target_accuracy": target,
        "time_to_target_s": reached,
        "sim_time_s": metrics[-1].sim_time_s if metrics else 0.0,
        "wall_time_s": wall_s,
        "uplink_bytes": stats.uplink_bytes,
        "downlink_bytes": stats.downlink_bytes,
        "uplink_payload_bits": stats.uplink_payload_bits,
        "downlink_payload_bits": stats.downlink_payload_bits,
        "payload_bits": stats.uplink_payload_bits + stats.downlink_payload_bits,
        "messages_up": stats.messages_up,
        "messages_down": stats.messages_down,
        "counters": counters,
        "inbound": inbound,
        # The network model's drops by reason; "deadline": replies that arrived after their
        # gather had stopped waiting (counted "late").
        "drops": {**{r: 0 for r in DROP_REASONS}, **(dict(server.drops) if server is not None else {}),
                  "deadline": stats.counters.get("late", 0)},
        "replies": {"received": sum(m.replies for m in metrics), "missed": sum(m.missed_replies for m in metrics)},
        "round_deadline_s": server.round_deadline if server is not None else scenario.run.round_deadline,
        "round_deadline_derived": server.deadline_derived if server is not None else False,
        "model_sha256": params_digest(algorithm.model_params()),
        "events_sha256": events.sha256(),
        "events": events.total,
    }
    return RunResult(summary, metrics, events, algorithm.model_params())
