"""The same actors across processes and hosts: ``fedsim serve`` and ``fedsim join``.

The server process binds a ROUTER (tcp or ipc), runs the network emulator and the server
role on the wall clock; each ``join`` process connects one DEALER and hosts any set of
client actors. Both sides read the same scenario file: data, partition and model derive
from its seed, so a client process loads only what its own clients hold and no data
crosses the wire.

What survives what:

* **Identity** (``fedsim.identity``): with ``--keys DIR`` the socket runs CURVE; the server
  admits only client keys in ``DIR/clients`` and accepts a hello only for the ids
  ``DIR/manifest.json`` binds to the key. A refused hello is answered with the reason; the
  joiner prints it and exits 1. A key the server does not know fails the handshake, which
  the joiner sees on its socket monitor and reports. Without ``--keys`` any peer that
  reaches the port may join as any free ids: use keys on any network you do not control.
* **Sessions**: every ``join`` process opens a new session under a random routing id.
  Duplicate suppression is per (session, client), so a restarted process is never taken
  for a replay; a new session with the same key replaces the old one at once, and without
  keys the ids are free again once the old session is declared dead.
* **Liveness**: the joiner pings every ``run.heartbeat`` seconds and ZeroMQ's own ZMTP
  heartbeats run underneath (the joiner's: the server's ZeroMQ drops a connection silent
  for five of them). A session silent for ``run.peer_timeout`` seconds whose
  connection is gone is declared dead: its clients leave the open gather at once.
* **Checkpoints** (``fedsim.checkpoint``): with ``--out`` the server saves its state after
  every round; ``serve --resume`` continues after the last saved round. Joins that are
  still running notice the new server (it answers their ping with UNKNOWN), say hello
  again and roll their clients back to the resumed round, so the resumed run is the same
  run: its model bytes equal an uninterrupted run's.
* **Real links**: ``run.emulate = false`` (or ``serve --no-emulate``) puts messages on the
  socket as they come, so a real or ``tc``-shaped link is measured as it is.
"""
from __future__ import annotations

import asyncio
import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import zmq
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from network.emulator import Emulator
from network.transport import Transport
from network.units import format_clients

from . import checkpoint, identity
from .clock import LoopClock, wall_time
from .codec import Limits
from .data import load_dataset, partition
from .errors import DeployError
from .guard import frame_budget
from .models import build_model
from .node import Stats
from .results import EventLog, RunResult
from .runner import ClientSide, Progress, ServerSide, make_algorithm, quiet_gc, summarise_parts
from .scenario import Scenario

make_keys = identity.make_keys  # the historical import path


def _bind(context: zmq.Context, bind: str, curve, limits: Limits, max_frame_bytes: int) -> Transport:
    # No ZMTP heartbeat timer of its own (heartbeat_s): with one, libzmq 4.3.5 aborts this
    # process ("Assertion failed: !_io_error") when a peer that filled its receive pipe
    # resets its connection (see network.transport). Silent joins are still dropped: each
    # joiner asks for a heartbeat TTL, which this socket's ZeroMQ enforces.
    try:
        return Transport(router=True, address=bind, context=context, curve=curve,
                         max_message_bytes=limits.max_message_bytes, max_frame_bytes=max_frame_bytes)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise DeployError(f"--bind {bind}: address already in use (another server on that port?)", 1) from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV):
            raise DeployError(f"--bind {bind}: no such local address ({exc.strerror})", 1) from None
        raise DeployError(f"--bind {bind}: not a usable ZeroMQ endpoint ({exc.strerror}); "
                          "expected tcp://HOST:PORT or ipc:///PATH", 2) from None


def _install_interrupt(loop: asyncio.AbstractEventLoop, on_interrupt: Callable[[], None]) -> bool:
    """First Ctrl-C: stop after the current round. A second one interrupts at once."""
    def handler() -> None:
        loop.remove_signal_handler(signal.SIGINT)
        on_interrupt()
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
        return True
    except (ValueError, RuntimeError):  # not the main thread
        return False


def serve(scenario: Scenario, bind: str, *, keys: str | Path | None = None, out_dir: str | Path | None = None,
          progress: Progress | None = None, ready=None, registration_timeout: float = 120.0, resume: bool = False,
          say: Callable[[str], None] | None = None) -> RunResult:
    """Run the server side on the wall clock until the last round; returns a RunResult
    (``summary["interrupted"]`` after Ctrl-C). ``ready(address)`` is called once the
    socket is bound (the bound tcp port, if ``:0``); ``say`` receives status lines (who
    is awaited). Raises :class:`DeployError` for what a user must fix or know."""
    run = scenario.run
    if resume and out_dir is None:
        raise DeployError("--resume needs --out DIR: the directory the interrupted server wrote its checkpoint to", 2)
    state = checkpoint.load(Path(out_dir)) if resume else None
    authorize = None
    if keys is not None:
        server_curve = identity.server_keys(keys)
        authorize = identity.authorizer(identity.load_manifest(keys, scenario.data.clients))
    torch.set_num_threads(run.threads)
    wall_start = wall_time()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    context = zmq.Context()
    auth = transport = None
    say = say or (lambda line: None)
    try:
        if keys is not None:
            auth = ThreadAuthenticator(context)
            auth.start()
            auth.configure_curve(domain="*", location=str(Path(keys) / "clients"))
        limits = Limits()
        seed = run.seed
        dataset = load_dataset(scenario.data, seed)
        model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, seed)
        algorithm = make_algorithm(scenario, model)
        # the model is known before the socket binds, so ZeroMQ itself refuses a frame larger
        # than any tensor this run can send, before buffering it (fedsim.guard.frame_budget)
        transport = _bind(context, bind, server_curve if keys is not None else None, limits, frame_budget(model))
        events, stats = EventLog(loop.time), Stats()
        server = ServerSide(scenario, loop, transport, dataset, model, algorithm, events, stats, limits,
                            emulate=run.emulate, session=os.urandom(8).hex())
        server.node.authorize = authorize
        if keys is not None:
            server.emulator.set_security("curve")  # its handshake costs more round trips
        if out_dir is not None:
            server.checkpoints, server.checkpoint_dir = True, Path(out_dir)
        if state is not None:
            server.restore(state)
            server.restarts += 1
            say(f"resuming after round {state['round'] + 1} of {run.rounds} from {Path(out_dir) / checkpoint.FILENAME}")
        if out_dir is not None:  # the event log streams into its file during the run
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            events.stream_to(Path(out_dir) / "events.jsonl")
        server.role.report_waiting = lambda kind, missing, waited: say(
            f"round {server.role.round + 1}: waiting {waited:.0f}s for {len(missing)} {kind!r} "
            f"repl{'y' if len(missing) == 1 else 'ies'} (clients {format_clients(missing)})")

        def on_join(clients: list[int], rejoin: bool) -> None:
            server.role.joined(clients, rejoin)
            if rejoin:
                server.emulator.reset_connections(clients)  # a new process: a new connection
            say(f"{'rejoined' if rejoin else 'joined'}: clients {format_clients(clients)}")

        def on_dead(clients: list[int]) -> None:
            server.role.forget(clients)
            say(f"no sign of life for {run.peer_timeout:g}s: clients {format_clients(clients)} are gone; "
                "not waiting for them")
        server.node.on_join, server.node.on_dead = on_join, on_dead
        if ready is not None:
            ready(transport.address)
        interrupted = _install_interrupt(loop, lambda: (setattr(server, "stop_requested", True),
                                                        say("interrupted: stopping after this round (Ctrl-C again to abort)")))

        def check_liveness() -> None:
            server.node.check_liveness(run.peer_timeout)
            loop.call_later(run.heartbeat, check_liveness)
        loop.call_later(run.heartbeat, check_liveness)
        failure: DeployError | None = None
        try:
            with quiet_gc():
                loop.run_until_complete(server.run_rounds(progress, lambda event: events("fault_remote", **event),
                                                          registration_timeout))
        except asyncio.TimeoutError:
            missing = sorted(set(range(scenario.data.clients)) - set(server.node.routes))
            failure = DeployError(f"clients {format_clients(missing)} did not join within --wait "
                                  f"{registration_timeout:g}s; results so far written" + (f" to {out_dir}" if out_dir else ""), 1)
        loop.run_until_complete(asyncio.sleep(0.2))  # let the farewell leave the socket
    finally:
        if transport is not None:
            transport.close()
        if auth is not None:
            auth.stop()
        context.destroy(linger=0)
        loop.close()
        asyncio.set_event_loop(None)
    result = summarise_parts(scenario, stats, server.metrics, events, server.algorithm, wall_time() - wall_start)
    result.summary["interrupted"] = server.stop_requested and server.next_round < run.rounds
    result.summary["restarts"] = server.restarts
    result.summary["contributions"] = {str(c): n for c, n in sorted(server.role.contributions.items())}
    result.summary["rejoin_lag_rounds"] = server.role.rejoin_lags
    if out_dir is not None:
        result.write(Path(out_dir))
    if failure is not None:
        raise failure
    del interrupted
    return result


@dataclass
class JoinResult:
    stats: Stats
    rounds_contributed: int
    rollbacks: dict[str, int] = field(default_factory=dict)


class _Monitor:
    """Watches a DEALER's handshakes: CURVE failures end the join with a clear reason.

    With a key the server does not know, libzmq 4.3 reports HANDSHAKE_FAILED_NO_DETAIL on
    the client (the server's ZAP handler refuses and drops the connection); the joiner
    gives up after a few such refusals in a row with no handshake succeeding in between.
    """

    FAILED = (getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0x0800),
              getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0x2000),
              getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0x4000))
    SUCCEEDED = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", 0x1000)
    REFUSALS = 3

    def __init__(self, socket: zmq.Socket, loop: asyncio.AbstractEventLoop):
        self.failure: str | None = None
        self.refusals = 0
        self.socket = socket.get_monitor_socket(sum(self.FAILED) | self.SUCCEEDED)
        self.loop = loop
        loop.add_reader(self.socket.getsockopt(zmq.FD), self._read)
        loop.call_soon(self._read)

    def _read(self) -> None:
        while self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            event = zmq.utils.monitor.recv_monitor_message(self.socket, zmq.NOBLOCK)["event"]
            if event == self.SUCCEEDED:
                self.refusals = 0
            elif event in self.FAILED:
                self.refusals += 1
                if self.refusals >= self.REFUSALS:
                    self.failure = ("authentication failed: the server refuses this key's CURVE handshake "
                                    "(not in its keys directory, or this is not the server.key it expects)")

    def close(self) -> None:
        self.loop.remove_reader(self.socket.getsockopt(zmq.FD))
        self.socket.close(linger=0)


def join(scenario: Scenario, connect: str, client_ids: list[int], *, keys: str | Path | None = None,
         key_name: str = "client-0", wait: float = 60.0, say: Callable[[str], None] | None = None) -> JoinResult:
    """Host ``client_ids`` in this process until the server announces the end of the run.

    Says hello (again, with backoff) until welcomed; pings every ``run.heartbeat`` seconds;
    after ``run.peer_timeout`` seconds without a word from the server, says hello again (a
    restarted server resumes with this process's clients rolled back to its checkpoint).
    Raises :class:`DeployError` when refused, when the key is rejected, or when no server
    answers for ``wait`` seconds."""
    run = scenario.run
    say = say or (lambda line: None)
    curve = identity.client_keys(keys, key_name) if keys is not None else None
    seed = run.seed
    dataset = load_dataset(scenario.data, seed)
    parts = partition(dataset.train_y, scenario.data, seed)
    bad = [c for c in client_ids if not 0 <= c < len(parts)]
    if bad:
        raise DeployError(f"--clients: ids {bad[:5]} outside 0..{len(parts) - 1}", 2)
    model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, seed)
    algorithm = make_algorithm(scenario, model)
    torch.set_num_threads(run.threads)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    context = zmq.Context()
    limits = Limits()
    session = os.urandom(8).hex()
    transport = monitor = None
    try:
        try:
            transport = Transport(router=False, address=connect, identity=f"join-{session}".encode(), context=context,
                                  curve=curve, max_message_bytes=limits.max_message_bytes, heartbeat_s=run.heartbeat)
        except zmq.ZMQError as exc:
            raise DeployError(f"--connect {connect}: not a usable ZeroMQ endpoint ({exc.strerror}); "
                              "expected tcp://HOST:PORT or ipc:///PATH", 2) from None
        if curve is not None:
            monitor = _Monitor(transport.socket, loop)
        events, stats = EventLog(loop.time), Stats()
        # This process's own copy of the compute model (device speeds derive from the seed).
        compute = Emulator(scenario.network, scenario.data.clients, LoopClock(loop), seed, lambda *a, **k: None)
        side = ClientSide(scenario, loop, transport, dataset, parts, client_ids, model, algorithm, events, stats, limits,
                          compute.compute_time)
        side.node.session = session
        side.keep_ledger()
        node = side.node
        node.on_unknown = lambda: say("the server does not know this session (it restarted): saying hello again")

        async def main() -> None:
            say(f"connecting to {connect} as clients {format_clients(client_ids)} (session {session})")
            side.start()
            start = last_contact = loop.time()
            next_hello, backoff, was_welcomed = start + run.heartbeat, run.heartbeat, False
            while not node.done.is_set():
                try:
                    await asyncio.wait_for(node.done.wait(), timeout=run.heartbeat)
                    break
                except asyncio.TimeoutError:
                    pass
                now = loop.time()
                if monitor is not None and monitor.failure:
                    raise DeployError(f"{monitor.failure} (key {key_name}, server {connect})", 1)
                refusal = node.refusal
                if refusal is not None and not refusal.get("retry"):
                    raise DeployError(f"the server refused clients {format_clients(client_ids)}: {refusal.get('reason')}", 1)
                if node.last_heard > last_contact:
                    last_contact = node.last_heard
                if node.welcome is not None and now - last_contact > run.peer_timeout:
                    say(f"no word from the server for {now - last_contact:.0f}s: saying hello again")
                    node.welcome = None
                if node.welcome is None:
                    if node.refusal is None and now - last_contact > wait:
                        raise DeployError(f"no answer from a server at {connect} within --wait {wait:g}s", 1)
                    if refusal is not None and now - start > wait:
                        raise DeployError(f"the server kept refusing: {refusal.get('reason')}", 1)
                    if now >= next_hello:
                        node.hello(sorted(side.clients))
                        next_hello, backoff = now + backoff, min(backoff * 2, run.peer_timeout, 8.0)
                else:
                    if not was_welcomed:
                        say(f"joined as clients {format_clients(client_ids)}")
                    was_welcomed, backoff = True, run.heartbeat
                    node.ping()

        with quiet_gc():
            loop.run_until_complete(main())
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        if monitor is not None:
            monitor.close()
        if transport is not None:
            transport.close()
        context.destroy(linger=0)
        loop.close()
        asyncio.set_event_loop(None)
    return JoinResult(stats, len(node.rounds_sent), dict(side.rollbacks))
