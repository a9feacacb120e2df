"""Run orchestration: build data, model, algorithm, network and actors; drive the rounds.

One process runs a server node (ROUTER) and a client node (DEALER) over ``inproc``; the
clock is virtual (deterministic, simulated seconds) or real (the wall clock). The same
roles run across processes and hosts through ``fedsim.deploy``.
"""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zmq

from algorithms.base import Algorithm, params_digest
from network.emulator import Emulator
from network.transport import Transport

from .client import ClientData, ClientRole
from .clock import LoopClock, VirtualTimeLoop, new_loop, wall_time
from .codec import Limits
from .data import Dataset, load_dataset, partition
from .models import build_model, evaluate, work_per_sample
from .node import Node, Stats
from .results import EventLog, RoundMetrics, RunResult
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


class Simulation:
    """Everything one single-process run holds. Built by :func:`build`, driven by :meth:`main`."""

    def __init__(self, scenario: Scenario, loop: asyncio.AbstractEventLoop, dataset: Dataset,
                 parts: list[torch.Tensor], model: torch.nn.Module, algorithm: Algorithm):
        self.scenario, self.loop, self.dataset, self.model, self.algorithm = scenario, loop, dataset, model, algorithm
        run = scenario.run
        n = scenario.data.clients
        self.events = EventLog(loop.time)
        self.stats = Stats()
        self.emulator = Emulator(scenario.network, n, LoopClock(loop), run.seed, self.events)
        self.context = zmq.Context()
        address = f"inproc://fedsim-{uuid.uuid4().hex}"
        limits = Limits()
        self.server_transport = Transport(router=True, address=address, context=self.context,
                                          max_message_bytes=limits.max_message_bytes)
        self.client_transport = Transport(router=False, address=address, identity=b"clients-0", context=self.context,
                                          max_message_bytes=limits.max_message_bytes)
        if isinstance(loop, VirtualTimeLoop):
            loop.transports = [self.server_transport, self.client_transport]
        self.server_node = Node(self.server_transport, log=self.events, stats=self.stats, limits=limits,
                                emulator=self.emulator, seed=run.seed)
        self.server_node.expected_clients = n
        self.client_node = Node(self.client_transport, log=self.events, stats=self.stats, limits=limits, seed=run.seed)
        self.server = ServerRole(self.server_node, algorithm, stats=self.stats, log=self.events, max_wait_s=run.max_wait)
        wps = work_per_sample(model, dataset.input_shape)
        self.clients = [
            ClientRole(i, self.client_node, algorithm, ClientData(dataset.train_x[idx], dataset.train_y[idx]),
                       model=model, seed=run.seed, work_per_sample=wps, compute_time=self.emulator.compute_time,
                       real_time=run.clock == "real", stats=self.stats, log=self.events)
            for i, idx in enumerate(parts)
        ]
        self.emulator.on_runtime_event(self.on_runtime_event)
        self.metrics: list[RoundMetrics] = []

    def on_runtime_event(self, event: dict) -> None:
        """Crash / restart of clients, fired by the scenario's timeline."""
        action = event.get("action")
        for c in event.get("clients", []):
            if action == "crash":
                self.clients[c].crash()
            elif action == "restart":
                self.clients[c].restart()
        self.stats.count(f"fault_{action}", len(event.get("clients", [])))

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.model, self.algorithm.model_params(), self.dataset.test_x, self.dataset.test_y)

    async def main(self, progress: Progress | None) -> None:
        loop, run, stats = self.loop, self.scenario.run, self.stats
        registered = asyncio.Event()
        self.server_node.registered = registered
        self.server_transport.attach(loop, self.server_node.on_message)
        self.client_transport.attach(loop, self.client_node.on_message)
        self.client_node.hello(list(range(len(self.clients))))
        await asyncio.wait_for(registered.wait(), timeout=None if run.clock == "virtual" else 30)
        self.start_time = loop.time()
        for r in range(run.rounds):
            for event in self.emulator.start_round(r) or []:
                self.on_runtime_event(event)
            participants = select_participants(len(self.clients), self.algorithm.config.client_fraction, run.seed, r)
            self.server.begin_round(r, participants, run.round_deadline)
            started = loop.time()
            self.events("round_start", round=r, participants=len(participants))
            await self.algorithm.server_round(self.server)
            now = loop.time()
            last = r == run.rounds - 1
            acc = loss = None
            if (r + 1) % run.eval_every == 0 or last:
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

    def close(self) -> None:
        self.server_transport.close()
        self.client_transport.close()
        self.context.term()


def build(scenario: Scenario, loop: asyncio.AbstractEventLoop) -> Simulation:
    seed = scenario.run.seed
    dataset = load_dataset(scenario.data, seed)
    parts = partition(dataset.train_y, scenario.data, seed)
    model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, seed)
    algorithm = scenario.algorithm_class(scenario.algorithm, model)
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
    scenario, stats, metrics = sim.scenario, sim.stats, sim.metrics
    target = scenario.run.target_accuracy
    evaluated = [m for m in metrics if m.accuracy is not None]
    reached = next((m.sim_time_s for m in evaluated if target is not None and m.accuracy >= target), None)
    last = evaluated[-1] if evaluated else None
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
        "counters": dict(sorted(stats.counters.items())),
        "model_sha256": params_digest(sim.algorithm.model_params()),
        "events_sha256": sim.events.sha256(),
        "events": len(sim.events.rows),
    }
    return RunResult(summary, metrics, sim.events, sim.algorithm.model_params())
