"""Who may host which clients: CURVE keys bound to client ids.

``fedsim keys DIR --clients N`` writes the server's certificate, one certificate per
client node (``clients/client-i.key`` and ``.key_secret``) and ``manifest.json``, which binds
each client key to the client ids it may host::

    {"format": 1, "keys": {"client-0": {"public_key": "<Z85>", "clients": "0-9"}, ...}}

The server admits a connection only if its key is in ``clients/`` (the CURVE handshake,
checked by ZeroMQ's ZAP handler), then accepts a hello only for ids the manifest binds to
the key that connection authenticated with (the ZAP User-Id). Editing the manifest is how
ids move between keys; a key with no entry hosts nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import zmq
import zmq.auth

from network.errors import NetworkConfigError
from network.transport import CurveKeys
from network.units import format_clients, parse_clients

from .errors import DeployError

MANIFEST = "manifest.json"


def even_split(n_clients: int, n_keys: int) -> list[list[int]]:
    """Client ids 0..n_clients-1 in ``n_keys`` contiguous, nearly equal blocks."""
    if n_keys < 1:
        raise DeployError(f"--clients {n_keys}: need at least one client key", 2)
    if n_keys > n_clients:
        raise DeployError(f"--clients {n_keys}: more keys than the {n_clients} clients of the scenario", 2)
    base, extra = divmod(n_clients, n_keys)
    blocks, start = [], 0
    for i in range(n_keys):
        size = base + (1 if i < extra else 0)
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks


def parse_id_blocks(spec: str, n_clients: int) -> list[list[int]]:
    """``--ids "0-9,10-19"``: one block per key, separated by commas; ``;`` separates the
    blocks when one key hosts several ranges (``"0-4,9;5-8"``)."""
    groups = spec.split(";") if ";" in spec else spec.split(",")
    blocks = []
    for group in groups:
        try:
            blocks.append(parse_clients(group.strip(), n_clients, "--ids"))
        except NetworkConfigError as exc:
            raise DeployError(f"--ids {spec!r}: {exc.reason}", 2) from None
    seen: set[int] = set()
    for block in blocks:
        twice = seen & set(block)
        if twice:
            raise DeployError(f"--ids {spec!r}: client {min(twice)} is bound to two keys", 2)
        seen.update(block)
    return blocks


def make_keys(directory: str | Path, clients: int = 1, blocks: list[list[int]] | None = None,
              n_clients: int | None = None) -> Path:
    """Create the certificates and the manifest. ``blocks[i]`` are the ids key ``client-i``
    may host (default: an even split of ``n_clients``, or nothing bound when that is None)."""
    d = Path(directory)
    if blocks is None and n_clients is not None:
        blocks = even_split(n_clients, clients)
    if blocks is not None and len(blocks) != clients:
        raise DeployError(f"--ids gives {len(blocks)} blocks of ids for {clients} keys (--clients)", 2)
    try:
        (d / "clients").mkdir(parents=True, exist_ok=True)
        zmq.auth.create_certificates(d, "server")
        entries = {}
        for i in range(clients):
            name = f"client-{i}"
            public_file, _ = zmq.auth.create_certificates(d / "clients", name)
            public, _ = zmq.auth.load_certificate(public_file)
            entries[name] = {"public_key": public.decode(),
                             "clients": format_clients(blocks[i]) if blocks is not None else ""}
        (d / MANIFEST).write_text(json.dumps({"format": 1, "keys": entries}, indent=2) + "\n")
    except OSError as exc:
        raise DeployError(f"cannot write keys to {d}: {exc.strerror or exc}", 2) from None
    return d


def _certificate(path: Path, what: str) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise DeployError(f"{what}: {path} not found (create keys with `fedsim keys DIR`)", 2)
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError, KeyError) as exc:
        raise DeployError(f"{what}: {path} is not a ZeroMQ certificate ({exc})", 2) from None


def _keys_dir(directory: str | Path) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise DeployError(f"--keys {d}: no such directory (create one with `fedsim keys {d}`)", 2)
    return d


def server_keys(directory: str | Path) -> CurveKeys:
    d = _keys_dir(directory)
    public, secret = _certificate(d / "server.key_secret", "--keys")
    if secret is None:
        raise DeployError(f"--keys: {d / 'server.key_secret'} holds no secret key", 2)
    return CurveKeys(public, secret)


def client_keys(directory: str | Path, name: str) -> CurveKeys:
    d = _keys_dir(directory)
    public, secret = _certificate(d / "clients" / f"{name}.key_secret", f"--key-name {name}")
    if secret is None:
        raise DeployError(f"--key-name {name}: {d / 'clients' / (name + '.key_secret')} holds no secret key", 2)
    server_public, _ = _certificate(d / "server.key", "--keys")
    return CurveKeys(public, secret, server_public)


def load_manifest(directory: str | Path, n_clients: int) -> dict[str, set[int]]:
    """Public key (Z85) -> the client ids it may host."""
    path = _keys_dir(directory) / MANIFEST
    if not path.exists():
        raise DeployError(f"--keys: {path} not found: keys made by an older fedsim bind no ids; "
                          f"run `fedsim keys DIR --clients N` again", 2)
    try:
        doc = json.loads(path.read_text())
        bound: dict[str, set[int]] = {}
        for name, entry in doc["keys"].items():
            spec = entry["clients"]
            bound[entry["public_key"]] = set(parse_clients(spec, n_clients, f"{MANIFEST}: {name}.clients")) if spec else set()
    except NetworkConfigError as exc:
        raise DeployError(f"{path}: {exc}", 2) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DeployError(f"{path}: not a fedsim key manifest ({type(exc).__name__}: {exc})", 2) from None
    return bound


def authorizer(bound: dict[str, set[int]]) -> Callable[[str | None, list[int]], str | None]:
    """The server's check of a hello: every id must be bound to the presenting key."""
    def authorize(key: str | None, clients: list[int]) -> str | None:
        if key is None:
            return "this server binds ids to CURVE keys and the connection presented none"
        allowed = bound.get(key)
        if allowed is None:
            return "this key is not in the server's manifest"
        foreign = sorted(set(clients) - allowed)
        if foreign:
            return (f"clients {format_clients(foreign)} are not bound to this key "
                    f"(it may host {format_clients(allowed) or 'none'})")
        return None
    return authorize
