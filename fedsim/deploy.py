"""The same actors across processes and hosts: ``fedsim serve`` and ``fedsim join``.

The server process binds a ROUTER (tcp or ipc), runs the network emulator and the server
role on the wall clock; each ``join`` process connects one DEALER and hosts any set of
client actors. Both sides read the same scenario file: data, partition and model derive
from its seed, so a client process loads only what its own clients hold and no data
crosses the wire. With ``--keys DIR`` (made by ``fedsim keys DIR``) the socket runs
CURVE: traffic is encrypted and the server admits only client keys found in
``DIR/clients``.

Known limit: scripted crash/restart events act on clients hosted in the server's own
process only; a remote client process models compute (stragglers, slowdowns) from its
own copy of the scenario.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import torch
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from network.emulator import Emulator
from network.transport import CurveKeys, Transport

from .clock import LoopClock, wall_time
from .codec import Limits
from .data import load_dataset, partition
from .models import build_model
from .node import Stats
from .results import EventLog
from .runner import ClientSide, Progress, ServerSide, make_algorithm, quiet_gc, summarise_parts
from .scenario import Scenario


def make_keys(directory: str | Path, clients: int = 1) -> Path:
    """Create CURVE certificates: ``server.key(_secret)`` and ``clients/client-i.key(_secret)``."""
    d = Path(directory)
    (d / "clients").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(d, "server")
    for i in range(clients):
        zmq.auth.create_certificates(d / "clients", f"client-{i}")
    return d


def _server_keys(directory: Path) -> CurveKeys:
    public, secret = zmq.auth.load_certificate(directory / "server.key_secret")
    return CurveKeys(public, secret)


def _client_keys(directory: Path, name: str) -> CurveKeys:
    public, secret = zmq.auth.load_certificate(directory / "clients" / f"{name}.key_secret")
    server_public, _ = zmq.auth.load_certificate(directory / "server.key")
    return CurveKeys(public, secret, server_public)


def serve(scenario: Scenario, bind: str, *, keys: str | Path | None = None, out_dir: str | Path | None = None,
          progress: Progress | None = None, ready=None, registration_timeout: float = 120.0):
    """Run the server side on the wall clock until the last round; returns a RunResult.
    ``ready(address)`` is called once the socket is bound (the bound tcp port, if ``:0``)."""
    torch.set_num_threads(scenario.run.threads)
    wall_start = wall_time()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    context = zmq.Context()
    auth = None
    curve = None
    if keys is not None:
        kd = Path(keys)
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(kd / "clients"))
        curve = _server_keys(kd)
    limits = Limits()
    transport = Transport(router=True, address=bind, context=context, curve=curve,
                          max_message_bytes=limits.max_message_bytes)
    if ready is not None:
        ready(transport.address)
    seed = scenario.run.seed
    dataset = load_dataset(scenario.data, seed)
    model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, seed)
    algorithm = make_algorithm(scenario, model)
    events, stats = EventLog(loop.time), Stats()
    server = ServerSide(scenario, loop, transport, dataset, model, algorithm, events, stats, limits)
    try:
        with quiet_gc():
            loop.run_until_complete(server.run_rounds(progress, lambda event: events("fault_remote", **event),
                                                      registration_timeout))
        loop.run_until_complete(asyncio.sleep(0.2))  # let the farewell leave the socket
    finally:
        transport.close()
        if auth is not None:
            auth.stop()
        context.term()
        loop.close()
        asyncio.set_event_loop(None)
    result = summarise_parts(scenario, stats, server.metrics, events, algorithm, wall_time() - wall_start)
    if out_dir is not None:
        result.write(Path(out_dir))
    return result


def join(scenario: Scenario, connect: str, client_ids: list[int], *, keys: str | Path | None = None,
         key_name: str = "client-0", timeout: float | None = None) -> Stats:
    """Host ``client_ids`` in this process until the server announces the end of the run."""
    torch.set_num_threads(scenario.run.threads)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    context = zmq.Context()
    curve = _client_keys(Path(keys), key_name) if keys is not None else None
    limits = Limits()
    identity = f"clients-{min(client_ids)}-{max(client_ids)}".encode()
    transport = Transport(router=False, address=connect, identity=identity, context=context, curve=curve,
                          max_message_bytes=limits.max_message_bytes)
    seed = scenario.run.seed
    dataset = load_dataset(scenario.data, seed)
    parts = partition(dataset.train_y, scenario.data, seed)
    bad = [c for c in client_ids if not 0 <= c < len(parts)]
    if bad:
        raise ValueError(f"client ids {bad[:5]} outside 0..{len(parts) - 1}")
    model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, seed)
    algorithm = make_algorithm(scenario, model)
    events, stats = EventLog(loop.time), Stats()
    # This process's own copy of the compute model (device speeds derive from the seed).
    compute = Emulator(scenario.network, scenario.data.clients, LoopClock(loop), seed, lambda *a, **k: None)
    side = ClientSide(scenario, loop, transport, dataset, parts, client_ids, model, algorithm, events, stats, limits,
                      compute.compute_time)

    async def main():
        side.start()
        await asyncio.wait_for(side.node.done.wait(), timeout)

    try:
        with quiet_gc():
            loop.run_until_complete(main())
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        transport.close()
        context.term()
        loop.close()
        asyncio.set_event_loop(None)
    return stats
