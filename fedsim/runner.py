"""Run orchestration: build data, model, algorithm, network and actors; drive the rounds.

One process runs a server node (ROUTER) and a client node (DEALER) over ``inproc``; the
clock is virtual (deterministic, simulated seconds) or real (the wall clock). The same
roles run across processes and hosts through ``fedsim.deploy``.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zmq

from algorithms.base import Algorithm, ConfigError, params_digest
from network.emulator import Emulator
from network.transport import Transport

from .client import ClientData, ClientRole
from .clock import LoopClock, VirtualTimeLoop, new_loop, wall_time
from .codec import Limits
from .data import Dataset, load_dataset, partition
from .models import build_model, evaluate, work_per_sample
from .node import Node, Stats
from .results import EventLog, RoundMetrics, RunResult
from .errors import ScenarioError
from .guard import UPLOAD_QUEUE_S, upload_budget
from .scenario import Scenario
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
    """The server's node, its emulator and role, and the round loop."""

    def __init__(self, scenario: Scenario, loop: asyncio.AbstractEventLoop, transport: Transport, dataset: Dataset,
                 model: torch.nn.Module, algorithm: Algorithm, events: EventLog, stats: Stats, limits: Limits):
        self.scenario, self.loop, self.dataset, self.model, self.algorithm = scenario, loop, dataset, model, algorithm
        self.events, self.stats, self.transport = events, stats, transport
        run = scenario.run
        self.n_clients = scenario.data.clients
        self.emulator = Emulator(scenario.network, self.n_clients, LoopClock(loop), run.seed, events,
                                 max_held_bytes=upload_budget(model), queue_s=UPLOAD_QUEUE_S)
        self.node = Node(transport, log=events, stats=stats, limits=limits, emulator=self.emulator, seed=run.seed)
        self.node.expected_clients = self.n_clients
        self.role = ServerRole(self.node, algorithm, stats=stats, log=events, max_wait_s=run.max_wait)
        self.metrics: list[RoundMetrics] = []
        self.start_time = 0.0

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.model, self.algorithm.model_params(), self.dataset.test_x, self.dataset.test_y)

    async def run_rounds(self, progress: Progress | None, on_fault: Callable[[dict], None],
                         registration_timeout: float | None) -> None:
        loop, run, stats = self.loop, self.scenario.run, self.stats
        registered = asyncio.Event()
        self.node.registered = registered
        self.transport.attach(loop, self.node.on_message)
        await asyncio.wait_for(registered.wait(), timeout=registration_timeout)
        self.start_time = loop.time()
        for r in range(run.rounds):
            for event in self.emulator.start_round(r) or []:
                on_fault(event)
            participants = select_participants(self.n_clients, self.algorithm.config.client_fraction, run.seed, r)
            self.role.begin_round(r, participants, run.round_deadline)
            started = loop.time()
            self.events("round_start", round=r, participants=len(participants))
            await self.algorithm.server_round(self.role)
            now = loop.time()
            acc = loss = None
            if (r + 1) % run.eval_every == 0 or r == run.rounds - 1:
                acc, loss = self.evaluate()
            self.events("round_end", round=r, accuracy=None if acc is None else round(acc, 6),
                        up=stats.uplink_bytes, down=stats.downlink_bytes)
            m = RoundMetrics(r, now - self.start_time, now - started, acc, loss, stats.uplink_bytes, stats.downlink_bytes,
                             stats.uplink_payload_bits, stats.downlink_payload_bits)
            self.metrics.append(m)
            if progress is not None:
                progress(m, run.rounds)
            if run.stop_at_target and acc is not None and run.target_accuracy is not None and acc >= run.target_accuracy:
                break
        self.node.finish()
        self.node.farewell()


class ClientSide:
    """A client node hosting any number of client actors (one socket for all of them)."""

    def __init__(self, scenario: Scenario, loop: asyncio.AbstractEventLoop, transport: Transport, dataset: Dataset,
                 parts: list[torch.Tensor], client_ids: list[int], model: torch.nn.Module, algorithm: Algorithm,
                 events: EventLog, stats: Stats, limits: Limits, compute_time):
        run = scenario.run
        self.loop, self.transport = loop, transport
        self.node = Node(transport, log=events, stats=stats, limits=limits, seed=run.seed)
        wps = work_per_sample(model, dataset.input_shape)
        self.clients = {
            i: ClientRole(i, self.node, algorithm, ClientData(dataset.train_x[parts[i]], dataset.train_y[parts[i]]),
                          model=model, seed=run.seed, work_per_sample=wps, compute_time=compute_time,
                          real_time=run.clock == "real", stats=stats, log=events)
            for i in client_ids
        }

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
        self.scenario, self.loop, self.algorithm = scenario, loop, algorithm
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
        self.emulator = self.server.emulator
        self.server_node = self.server.node
        self.client_side = ClientSide(scenario, loop, self.client_transport, dataset, parts,
                                      list(range(scenario.data.clients)), model, algorithm, self.events, self.stats,
                                      limits, self.emulator.compute_time)
        self.client_node = self.client_side.node
        self.clients = self.client_side.clients
        self.emulator.on_runtime_event(self.on_runtime_event)

    @property
    def metrics(self) -> list[RoundMetrics]:
        return self.server.metrics

    def on_runtime_event(self, event: dict) -> None:
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


@contextlib.contextmanager
def quiet_gc(gen0_threshold: int = 50_000):
    """Keep the cyclic garbage collector out of the hot loop.

    A run makes almost no cyclic garbage per message, but CPython's collector still walks
    every live container (actors, tensors, event rows) on its schedule: measured as ~30% of
    the framework's time per message with 2,000 clients. Freezing what setup built and
    collecting young objects less often removes most of it; the settings are restored after.
    """
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


def build(scenario: Scenario, loop: asyncio.AbstractEventLoop) -> Simulation:
    seed = scenario.run.seed
    dataset = load_dataset(scenario.data, seed)
    parts = partition(dataset.train_y, scenario.data, seed)
    model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, seed)
    algorithm = make_algorithm(scenario, model)
    return Simulation(scenario, loop, dataset, parts, model, algorithm)


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
        if out_dir is not None:  # the event log streams into its file during the run
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            sim.events.stream_to(Path(out_dir) / "events.jsonl")
        with quiet_gc():
            loop.run_until_complete(sim.main(progress))
    finally:
        if sim is not None:
            sim.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        asyncio.set_event_loop(None)
        loop.close()
        torch.set_num_threads(threads)
    result = summarise(sim, wall_time() - wall_start)
    if out_dir is not None:
        result.write(Path(out_dir))
    return result


def summarise(sim: Simulation, wall_s: float) -> RunResult:
    return summarise_parts(sim.scenario, sim.stats, sim.metrics, sim.events, sim.algorithm, wall_s)


def summarise_parts(scenario: Scenario, stats: Stats, metrics: list[RoundMetrics], events: EventLog,
                    algorithm: Algorithm, wall_s: float) -> RunResult:
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
        "model_sha256": params_digest(algorithm.model_params()),
        "events_sha256": events.sha256(),
        "events": events.total,
    }
    return RunResult(summary, metrics, events, algorithm.model_params())
