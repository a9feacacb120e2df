"""A hostile peer, for tests and benchmarks: floods and fuzz traffic against a live server.

Run as its own process so that its sending does not share the server's interpreter::

    python -m fedsim.hostile flood --connect tcp://127.0.0.1:5555 --count 200000
    python -m fedsim.hostile fuzz --connect tcp://127.0.0.1:5555 --count 100000 --seed 3

It builds wire messages with msgpack directly (the schema of ``fedsim.codec``) and imports
neither torch nor the rest of fedsim, so it starts in a fraction of a second. Every mode is
bounded in message count and in seconds, and prints one JSON line of what it sent.
Only point it at a server you run yourself (tests and benches use 127.0.0.1).
"""
from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from pathlib import Path
from typing import Iterator

import msgpack
import zmq

from . import codec

_CRC = struct.Struct(">I")
SERVER, NODE = -1, -2
KINDS = ("model", "grad", "p", "q", "basis", "augment", "correction", "train", "_hello", "_done", "")


def envelope(*, src: int = 0, dst: int = SERVER, round: int = 0, kind: str = "model", version: int = 0,
             msg_id: int = 1, meta: dict | None = None, tensors: list[tuple[str, str, list[int], bytes]] = (),
             raw: dict | None = None) -> list[bytes]:
    """A well-formed message (CRC right) with the given fields; ``raw`` replaces envelope
    fields by their wire names (any type) after the fact, still with a correct CRC."""
    head = {"v": 1, "id": msg_id, "src": src, "dst": dst, "r": round, "k": kind, "ver": version, "t": 0.0,
            "bits": 0, "meta": meta or {}, "tn": [[n, d, list(s)] for n, d, s, _ in tensors]}
    head.update(raw or {})
    env = msgpack.packb(head, use_bin_type=True)
    crc = 0
    frames = [b for *_, b in tensors]
    for f in frames:
        crc = codec.checksum(f, crc)
    return [_CRC.pack(codec.checksum(env, crc)) + env, *frames]


def flood_messages(mode: str) -> list[list[bytes]]:
    """A small cycle of messages an unregistered (``stranger``) or registered
    (``registered:<client>:<bytes>``) peer sends in a flood."""
    if mode == "stranger":
        return [
            envelope(src=3, kind="model", tensors=[("w", "float32", [4], b"\0" * 16)]),  # unknown sender
            [b"\x00" * 3],                                                                 # short header
            [random.Random(1).randbytes(64)],                                              # garbage
            envelope(src=NODE, kind="_hello", meta={"clients": []}),                      # empty hello
        ]
    if mode.startswith("big:"):
        # one message of <frames> frames of <bytes> each (the same buffer, not copied)
        _, frames, size = mode.split(":")
        blob = bytes(int(size))
        return [[*envelope(src=3, kind="model"), *([blob] * int(frames))]]
    if mode.startswith("registered:"):
        _, client, size = mode.split(":")
        n = int(size) // 4
        # a kind no gather asks for, from a client this node hosts: held by the network
        # model up to the client's budget, then refused by the server role
        return [envelope(src=int(client), kind="flood", msg_id=10**9 + i,
                         tensors=[("w", "float32", [n], bytes(4 * n))]) for i in range(4)]
    raise ValueError(f"unknown flood mode {mode!r} (stranger | big:<frames>:<bytes> | registered:<client>:<bytes>)")


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    out = list(frames)
    op = rng.randrange(9)
    if op == 0 and out:  # flip bits
        i = rng.randrange(len(out))
        if out[i]:
            b = bytearray(out[i])
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            out[i] = bytes(b)
    elif op == 1 and out:  # truncate a frame
        i = rng.randrange(len(out))
        out[i] = out[i][:rng.randrange(len(out[i]) + 1)]
    elif op == 2:  # drop, duplicate or swap frames
        if len(out) > 1 and rng.random() < 0.5:
            del out[rng.randrange(len(out))]
        elif out:
            out.insert(rng.randrange(len(out) + 1), out[rng.randrange(len(out))])
    elif op == 3:  # extra random frames
        out += [rng.randbytes(rng.randrange(64)) for _ in range(rng.randint(1, 4))]
    elif op == 4:  # an envelope field of the wrong type or value
        field = rng.choice(["v", "id", "src", "dst", "r", "k", "ver", "t", "bits", "meta", "tn"])
        value = rng.choice([None, True, -1, 2**63 - 1, 4.0, "x" * rng.randrange(200), [], {}, [1, [2]], b"\xff"])
        out = envelope(src=rng.randrange(-3, 30), kind=rng.choice(KINDS), raw={field: value})
    elif op == 5:  # a tensor declaration that lies
        shape = rng.choice([[4.0], [True, 4], [-1], [2**40], [1] * 12, [4, "4"], [0], [2, 2]])
        dtype = rng.choice(["float32", "float64", "object", "int4", "bool", ""])
        nbytes = rng.choice([0, 4, 16, 17, 64])
        out = envelope(src=rng.randrange(-3, 30), kind=rng.choice(KINDS),
                       tensors=[("w", dtype, shape, rng.randbytes(nbytes))])
    elif op == 6:  # hellos of every shape
        clients = rng.choice([[], [0, 1], [-5], [10**9], [True], ["0"], list(range(1000)), None, [1.5]])
        out = envelope(src=NODE, kind="_hello", meta={"clients": clients})
    elif op == 7:  # a long kind string
        out = envelope(src=rng.randrange(0, 30), kind="k" * rng.choice([65, 1000, 100_000]))
    else:  # pure noise
        out = [rng.randbytes(rng.randrange(1, 200)) for _ in range(rng.randint(1, 5))]
    return out or [b""]


def fuzz_messages(seed: int, count: int) -> Iterator[list[bytes]]:
    """``count`` mutated and random multipart messages, deterministic in ``seed``."""
    rng = random.Random(seed)
    base = [
        envelope(src=0, kind="model", tensors=[("w", "float32", [4], b"\0" * 16), ("b", "int8", [2, 2], b"\1" * 4)]),
        envelope(src=NODE, kind="_hello", meta={"clients": [0, 1]}),
        envelope(src=5, kind="grad", round=3, version=3, meta={"p_tag": 7}),
    ]
    for _ in range(count):
        frames = rng.choice(base)
        for _ in range(rng.randint(1, 3)):
            frames = _mutate(rng, frames)
        yield frames


def _socket(context: zmq.Context, connect: str, keys: str | None, key_name: str,
            identity: bytes | None, sndhwm: int = 10_000) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if keys is not None:
        from zmq.auth import load_certificate
        d = Path(keys)
        sock.curve_publickey, sock.curve_secretkey = load_certificate(d / "clients" / f"{key_name}.key_secret")
        sock.curve_serverkey, _ = load_certificate(d / "server.key")
    sock.connect(connect)
    return sock


def send_all(sock: zmq.Socket, messages: Iterator[list[bytes]], count: int, seconds: float) -> dict:
    """Send up to ``count`` messages within ``seconds``; a full pipe waits (never drops)."""
    t0 = time.perf_counter()
    end = t0 + seconds
    sent = frames_sent = nbytes = 0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLOUT)
    for frames in messages:
        if sent >= count:
            break
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=max(map(len, frames)) < 65536)
                break
            except zmq.Again:
                if time.perf_counter() > end:
                    break
                poller.poll(50)
        else:  # pragma: no cover
            pass
        if time.perf_counter() > end:
            break
        sent += 1
        frames_sent += len(frames)
        nbytes += sum(map(len, frames))
    dt = time.perf_counter() - t0
    return {"sent": sent, "frames": frames_sent, "bytes": nbytes, "seconds": round(dt, 3),
            "per_s": round(sent / dt, 1) if dt > 0 else None}


def registered_flood(sock: zmq.Socket, clients: list[int], count: int, size: int, seconds: float,
                     start_round: int = 1) -> dict:
    """Act as a registered node hosting ``clients``: say hello, answer every request with a
    zero update of the right shape (fedavg/sgd-style: the request's tensors, zeroed, and
    ``samples = 1``), and between answers send ``count`` messages of ``size`` bytes from
    those clients (a kind no gather asks for) as fast as the socket takes them, once a
    request of round ``start_round`` or later has come. Stops at the server's ``_done`` or
    after ``seconds``."""
    msg_id = 0

    def next_id() -> int:
        nonlocal msg_id
        msg_id += 1
        return msg_id

    sock.send_multipart(envelope(src=NODE, kind="_hello", msg_id=next_id(), meta={"clients": clients}))
    n = size // 4
    blob = bytes(4 * n)
    t0 = time.perf_counter()
    end = t0 + seconds
    sent = answered = 0
    current_round = 0
    done = False
    while not done and time.perf_counter() < end:
        while True:  # answer what has arrived
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            head = msgpack.unpackb(frames[0][4:], raw=False)
            if head["k"] == "_done":
                done = True
                break
            current_round = head["r"]
            tensors = [(name, dtype, shape, bytes(len(f))) for (name, dtype, shape), f in zip(head["tn"], frames[1:])]
            sock.send_multipart(envelope(src=head["dst"], kind=head["k"], round=head["r"], version=head["ver"],
                                         msg_id=next_id(), meta={"samples": 1}, tensors=tensors))
            answered += 1
        if sent < count and current_round >= start_round:
            for _ in range(min(20, count - sent)):
                try:
                    sock.send_multipart(envelope(src=clients[sent % len(clients)], kind="flood", round=current_round,
                                                 msg_id=next_id(), tensors=[("w", "float32", [n], blob)]),
                                        zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                sent += 1
        else:
            sock.poll(20, zmq.POLLIN)
    dt = time.perf_counter() - t0
    return {"sent": sent, "answered": answered, "bytes": sent * 4 * n, "seconds": round(dt, 3), "done": done}


def _cycle(msgs: list[list[bytes]]) -> Iterator[list[bytes]]:
    while True:
        yield from msgs


# ----------------------------------------------------------------------------- live runs
def rss_mb() -> float:
    """This process's resident set now, MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _spawn(module: str, *args: str) -> "subprocess.Popen":
    import os
    import subprocess
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", module, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root)


def attacker(address: str, mode: str, *args: str, go_file: str | None = None) -> "subprocess.Popen":
    """Start ``python -m fedsim.hostile MODE --connect ADDRESS ARGS`` (its own process);
    with ``go_file`` it starts up at once but sends only once that file exists."""
    extra = ["--go-file", go_file] if go_file else []
    return _spawn("fedsim.hostile", mode, "--connect", address, *args, *extra)


def live_run(overrides: list[str], joins: list[str], *, keys: str | Path | None = None, attack=None,
             attack_at_round: int = 0, registration_timeout: float = 60.0, sample_s: float = 0.02,
             join_processes: bool = False) -> dict:
    """Run ``fedsim serve`` in this process on tcp://127.0.0.1 with ``joins`` (client-id
    ranges) hosted by ``deploy.join`` in threads (or ``fedsim join`` processes with
    ``join_processes``, so that this process's RSS is the server's alone); ``attack(address)`` (returning a Popen)
    is started as soon as the socket is bound (so that its start-up does not compete with
    the rounds) and sends from when round ``attack_at_round`` ends (None: at once, for a
    peer that must register), then reaped at the end. ``attack(address, go_file)``. Returns the
    summary, round times (s), the attack's window and report, the server transport's
    longest single read, and this process's RSS (MB) when the attack started, at its
    peak during the run after that, and at the end."""
    import threading

    from . import deploy
    from .scenario import load_scenario

    scenario = load_scenario(None, overrides)
    transports = []

    class Recording(deploy.Transport):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            transports.append(self)

    threads, procs = [], []
    state: dict = {"rss_start": None, "peak": 0.0, "t_attack": None, "t_attack_end": None}
    sampling = threading.Event()

    def sampler():
        while not sampling.is_set():
            if state["rss_start"] is not None:
                state["peak"] = max(state["peak"], rss_mb())
            sampling.wait(sample_s)

    def ready(address):
        state["address"] = address
        if attack is not None:
            if attack_at_round is None:
                Path(go_file).touch()
            procs.append(attack(address, go_file))
        if join_processes:
            for ids in joins:
                args = ["join", "--connect", address, "--clients", ids]
                for o in overrides:
                    args += ["--set", o]
                if keys is not None:
                    args += ["--keys", str(keys)]
                procs.insert(0, _spawn("fedsim.cli", *args))
            return
        for ids in joins:
            lo, _, hi = ids.partition("-")
            client_ids = list(range(int(lo), int(hi or lo) + 1))
            t = threading.Thread(target=deploy.join, args=(scenario, address, client_ids),
                                 kwargs={"keys": keys, "key_name": "client-0", "wait": 300}, daemon=True)
            t.start()
            threads.append(t)

    round_ends = []
    import tempfile
    go_file = str(Path(tempfile.mkdtemp(prefix="fedsim-hostile-")) / "go")

    def progress(m, total):
        round_ends.append(time.time())
        if attack is not None and m.round == (0 if attack_at_round is None else attack_at_round):
            state["rss_start"] = rss_mb()
            state["t_attack"] = time.time()
            Path(go_file).touch()

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    original = deploy.Transport
    deploy.Transport = Recording
    try:
        result = deploy.serve(scenario, "tcp://127.0.0.1:0", keys=keys, ready=ready, progress=progress,
                              registration_timeout=registration_timeout)
    finally:
        deploy.Transport = original
        reports = []
        attackers = procs[len(joins):] if join_processes else procs
        for p in procs:
            try:
                out, _ = p.communicate(timeout=120)
            except Exception:
                p.kill()
                out, _ = p.communicate()
            if p in attackers:
                reports.append(out)
        for t in threads:
            t.join(timeout=60)
        sampling.set()
        watcher.join()
    server = next(t for t in transports if t.router)
    attack_report = None
    for out in reports:
        for line in (out or "").splitlines():
            if line.startswith("{"):
                attack_report = json.loads(line)
    if attack_report is None and reports:
        attack_report = {"output": (reports[0] or "")[-2000:]}
    if state["t_attack"] is not None and attack_report and "seconds" in attack_report:
        state["t_attack"] = max(state["t_attack"], attack_report.get("started_at", 0.0))
        state["t_attack_end"] = state["t_attack"] + attack_report["seconds"]
    during = []
    if state["t_attack"] is not None:
        end = state["t_attack_end"] or float("inf")
        # rounds that overlap the attack window (a round ends at round_ends[i])
        for i, m in enumerate(result.metrics):
            t_end = round_ends[i]
            if t_end > state["t_attack"] and t_end - m.round_time_s < end:
                during.append(m.round)
    return {
        "summary": result.summary,
        "round_times": [m.round_time_s for m in result.metrics],
        "rounds_during_attack": during,
        "attack": attack_report,
        "longest_read_s": server.longest_read_s,
        "longest_read_cpu_s": server.longest_read_cpu_s,
        "reads": server.reads,
        "received": server.received,
        "discarded": dict(server.discarded),
        "rss_start_mb": state["rss_start"],
        "rss_peak_mb": state["peak"] or None,
        "rss_end_mb": rss_mb(),
        "result": result,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedsim.hostile", description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["flood", "fuzz", "registered"])
    ap.add_argument("--connect", required=True)
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=60.0, help="stop sending after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", default="stranger", help="flood: stranger | big:<frames>:<bytes>")
    ap.add_argument("--keys", default=None, help="CURVE key directory (fedsim keys)")
    ap.add_argument("--key-name", default="client-0")
    ap.add_argument("--identity", default=None)
    ap.add_argument("--clients", default="", help="registered: comma-separated client ids to host")
    ap.add_argument("--size", type=int, default=100_000, help="registered: bytes per flood message")
    ap.add_argument("--start-round", type=int, default=1, help="registered: flood from this round on")
    ap.add_argument("--go-file", default=None, help="flood/fuzz: start sending once this file exists")
    ap.add_argument("--linger", type=float, default=1.0, help="seconds to keep the socket open after sending")
    a = ap.parse_args(argv)
    if not a.connect.startswith(("tcp://127.0.0.1:", "ipc://", "inproc://")):
        print("fedsim.hostile: --connect must be a local endpoint (tcp://127.0.0.1:PORT or ipc://)", file=sys.stderr)
        return 2
    context = zmq.Context()
    # a registered node keeps its own send queue short, so that its replies are not stuck
    # behind its own flood (that would be the node's doing, not the server's)
    sock = _socket(context, a.connect, a.keys, a.key_name, a.identity.encode() if a.identity else None,
                   sndhwm=50 if a.mode == "registered" else 10_000)
    try:
        if a.go_file and a.mode != "registered":
            import os
            give_up = time.time() + a.seconds + 120
            while not os.path.exists(a.go_file) and time.time() < give_up:
                time.sleep(0.005)
        started_at = time.time()
        if a.mode == "registered":
            report = registered_flood(sock, [int(c) for c in a.clients.split(",") if c], a.count, a.size, a.seconds,
                                      a.start_round)
        else:
            msgs = _cycle(flood_messages(a.kind)) if a.mode == "flood" else fuzz_messages(a.seed, a.count)
            report = send_all(sock, msgs, a.count, a.seconds)
    finally:
        sock.close(linger=int(a.linger * 1000))
        context.term()
    print(json.dumps({"mode": a.mode, "started_at": started_at, **report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
