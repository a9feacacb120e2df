"""The network sections of a scenario, parsed and validated into SI units.

``parse_network(sections, n_clients, base_dir)`` reads the raw TOML tables ``network``
(with its sub-tables ``server``, ``tcp`` and the array ``group``), ``stragglers``,
``availability`` and ``events``. Every value ends up in bits/s, seconds, bytes or a plain
probability; every mistake raises :class:`NetworkConfigError` naming the dotted key and
the value, before anything runs. The accepted keys are listed in ``docs/network-model.md``.
"""
from __future__ import annotations

import bisect
import csv
import dataclasses
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import NetworkConfigError
from .units import parse_bandwidth, parse_clients, parse_duration, parse_size

TRANSPORTS = ("tcp", "datagram")
JITTER_DISTRIBUTIONS = ("none", "normal", "lognormal", "pareto")
LOSS_MODELS = ("bernoulli", "gilbert_elliott")
STRAGGLER_DISTRIBUTIONS = ("none", "lognormal", "pareto", "trace")
AVAILABILITY_MODELS = ("always", "exponential")
ACTIONS = ("set_link", "partition", "heal", "crash", "restart", "slowdown", "loss_burst", "server_crash")
DIRECTIONS = ("up", "down", "both")

DEFAULT_UPLINK_BPS = 10e6
DEFAULT_DOWNLINK_BPS = 50e6
DEFAULT_LATENCY_S = 0.020
DEFAULT_MTU_BYTES = 1500
TCP_IP_HEADER_BYTES = 40          # IPv4 + TCP without options: MSS = MTU - 40 (datagram packets)
# What Linux puts in front of every TCP segment: 20 B IPv4 + 20 B TCP + 12 B timestamp option
# (on by default), so a 1500-byte MTU carries 1448 payload bytes per segment.
TCP_SEGMENT_HEADER_BYTES = 52
CONGESTION_CONTROLS = ("cubic", "reno")
DEFAULT_INITIAL_WINDOW = 10       # segments (Linux, RFC 6928)
DEFAULT_SPEED_FLOPS = 1e9         # a modest device: 1 GFLOP/s sustained in training


# ----------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class Trace:
    """A piecewise-constant bandwidth: ``bps[i]`` holds from ``times[i]`` (seconds since the
    start of the run) until ``times[i+1]``; before ``times[0]`` the first value holds, after
    the last time the last value holds."""

    times: tuple[float, ...]
    bps: tuple[float, ...]
    source: str = ""

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.times, t) - 1
        return self.bps[max(i, 0)]

    def next_change(self, t: float) -> float | None:
        """The first breakpoint strictly after ``t``, or None."""
        i = bisect.bisect_right(self.times, t)
        return self.times[i] if i < len(self.times) else None


@dataclass(frozen=True)
class Jitter:
    """Extra one-way delay added to the propagation latency, seconds.

    ``normal``: N(0, scale²) (scale = standard deviation; total delay clipped at 0);
    ``lognormal``: mean ``scale``, log-standard-deviation ``shape`` (sigma);
    ``pareto``: Lomax (Pareto II, support from 0) with mean ``scale`` and tail index
    ``shape`` (alpha > 1)."""

    distribution: str = "none"
    scale: float = 0.0
    shape: float = 0.0

    @property
    def std(self) -> float:
        """Standard deviation of the extra delay (seconds; inf for a Pareto alpha <= 2)."""
        if self.distribution == "normal":
            return self.scale
        if self.distribution == "lognormal":
            return self.scale * math.sqrt(math.expm1(self.shape ** 2))
        if self.distribution == "pareto":
            a = self.shape
            return math.inf if a <= 2 else self.scale * math.sqrt(a / (a - 2))
        return 0.0


@dataclass(frozen=True)
class Loss:
    """Packet loss. ``bernoulli``: each packet lost with probability ``p``.
    ``gilbert_elliott``: a two-state Markov chain per packet, Good -> Bad with probability
    ``p``, Bad -> Good with ``r``; a packet survives with probability ``k`` in Good and ``h``
    in Bad (simple Gilbert: k = 1, h = 0)."""

    model: str = "bernoulli"
    p: float = 0.0
    r: float = 1.0
    h: float = 0.0
    k: float = 1.0

    @property
    def rate(self) -> float:
        """Long-run fraction of packets lost."""
        if self.model == "bernoulli":
            return self.p
        if self.p + self.r == 0:
            return 1.0 - self.k
        pi_bad = self.p / (self.p + self.r)
        return (1 - pi_bad) * (1.0 - self.k) + pi_bad * (1.0 - self.h)


@dataclass(frozen=True)
class Link:
    """One direction of one client's access link. ``bandwidth`` in bits/s (or a Trace),
    ``latency`` one-way in seconds, ``duplicate``/``corrupt`` per-message probabilities."""

    bandwidth: float | Trace
    latency: float = DEFAULT_LATENCY_S
    jitter: Jitter = Jitter()
    loss: Loss = Loss()
    duplicate: float = 0.0
    corrupt: float = 0.0

    def bandwidth_at(self, t: float) -> float:
        return self.bandwidth.at(t) if isinstance(self.bandwidth, Trace) else self.bandwidth


@dataclass(frozen=True)
class Tcp:
    """Parameters of the TCP model. ``min_rto`` seconds; ``max_window`` bytes (receive
    window; inf = none); ``b`` packets acknowledged per ACK (2 with delayed ACKs); ``mss``
    payload bytes per segment; ``initial_window`` segments; ``slow_start_after_idle``: the
    window restarts (halved per RTO of idleness, down to the initial window) after an idle
    period longer than the RTO, as Linux's ``net.ipv4.tcp_slow_start_after_idle = 1``;
    ``congestion``: ``"cubic"`` (Linux's default) or ``"reno"``; ``header``: TCP/IP bytes
    per segment on the wire (not counted in the bytes a run reports)."""

    min_rto: float = 0.2
    max_window: float = math.inf
    b: int = 1
    mss: int = DEFAULT_MTU_BYTES - TCP_SEGMENT_HEADER_BYTES
    initial_window: int = DEFAULT_INITIAL_WINDOW
    slow_start_after_idle: bool = True
    congestion: str = "cubic"
    header: int = TCP_SEGMENT_HEADER_BYTES


@dataclass(frozen=True)
class Stragglers:
    """Device speeds in FLOP/s. ``speed`` is the median (lognormal) or the fastest
    (pareto: speed / X, X ~ Pareto(alpha) >= 1) device; ``speeds`` from a trace file are used
    as given, client i taking ``speeds[i % len]``. ``noise``: per-round log-normal factor
    exp(noise * Z) on each client's speed."""

    distribution: str = "none"
    speed: float = DEFAULT_SPEED_FLOPS
    sigma: float = 0.5
    alpha: float = 2.0
    speeds: tuple[float, ...] = ()
    noise: float = 0.0


@dataclass(frozen=True)
class Availability:
    """Alternating on/off periods, exponential with the given means (seconds), for
    ``clients``. ``start``: "online" (all start online) or "stationary" (online with
    probability mean_online / (mean_online + mean_offline))."""

    model: str = "always"
    mean_online: float = math.inf
    mean_offline: float = 0.0
    clients: tuple[int, ...] = ()
    start: str = "online"


@dataclass(frozen=True)
class Event:
    """One scripted event. Exactly one of ``at`` (seconds since the start) and ``at_round``.
    ``up``/``down`` hold the Link fields a set_link changes (or the loss of a loss_burst)."""

    index: int
    action: str
    clients: tuple[int, ...]
    at: float | None = None
    at_round: int | None = None
    up: Mapping[str, Any] = field(default_factory=dict)
    down: Mapping[str, Any] = field(default_factory=dict)
    duration: float | None = None      # partition, slowdown, loss_burst
    restart_after: float | None = None  # crash, server_crash
    factor: float = 1.0                 # slowdown: compute time x factor
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkConfig:
    """Everything the emulator needs, per client, in SI units."""

    n_clients: int
    uplinks: tuple[Link, ...]
    downlinks: tuple[Link, ...]
    server_uplink: float = math.inf     # bits/s, what the server sends (broadcasts)
    server_downlink: float = math.inf   # bits/s, what the server receives (uploads)
    transport: str = "tcp"
    mtu: int = DEFAULT_MTU_BYTES
    tcp: Tcp = Tcp()
    stragglers: Stragglers = Stragglers()
    availability: Availability = Availability()
    events: tuple[Event, ...] = ()

    @property
    def mss(self) -> int:
        """Payload bytes per packet: ``tcp.mss`` under TCP (MTU - 52 by default), MTU - 40
        for datagrams."""
        return self.tcp.mss if self.transport == "tcp" else self.mtu - TCP_IP_HEADER_BYTES

    def link(self, client: int, direction: str) -> Link:
        return self.uplinks[client] if direction == "up" else self.downlinks[client]


def default_config(n_clients: int) -> NetworkConfig:
    """The modest network of the default scenario."""
    return parse_network({}, n_clients, pathlib.Path("."))


# ----------------------------------------------------------------------------- helpers
def _table(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise NetworkConfigError(key, value, "expected a table")
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for k in table:
        if k not in allowed:
            raise NetworkConfigError(f"{prefix}.{k}", table[k],
                                     f"unknown key (known: {', '.join(sorted(allowed))})")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NetworkConfigError(key, value, "expected a number")
    if math.isnan(value):
        raise NetworkConfigError(key, value, "must be a number, not NaN")
    return float(value)


def _probability(value: Any, key: str) -> float:
    x = _number(value, key)
    if not 0.0 <= x <= 1.0:
        raise NetworkConfigError(key, value, "a probability must lie in [0, 1]")
    return x


def _positive(value: Any, key: str, *, strict: bool = True) -> float:
    x = _number(value, key)
    if not math.isfinite(x) or x < 0 or (strict and x == 0):
        raise NetworkConfigError(key, value, "must be a positive finite number" if strict else "must be >= 0")
    return x


def _choice(value: Any, key: str, options: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    if not isinstance(value, str):
        raise NetworkConfigError(key, value, f"expected one of {', '.join(options)}")
    v = value.strip().lower()
    v = (aliases or {}).get(v, v)
    if v not in options:
        raise NetworkConfigError(key, value, f"unknown value; expected one of {', '.join(options)}")
    return v


def load_trace(path_value: Any, key: str, base_dir: pathlib.Path) -> Trace:
    """A CSV of ``time,bandwidth`` rows (optional header). Times are durations (``"2s"`` or
    seconds), strictly increasing from >= 0; bandwidths are ``"1Mbps"`` or bits/s, >= 0."""
    if not isinstance(path_value, str) or not path_value:
        raise NetworkConfigError(key, path_value, "expected the path of a CSV trace file")
    path = pathlib.Path(path_value)
    if not path.is_absolute():
        path = base_dir / path
    try:
        text = path.read_text()
    except OSError as exc:
        raise NetworkConfigError(key, path_value, f"cannot read trace file {str(path)!r}: {exc.strerror or exc}") from None
    times: list[float] = []
    values: list[float] = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if len(cells) < 2:
            raise NetworkConfigError(key, path_value, f"line {lineno}: expected 'time,bandwidth', got {','.join(row)!r}")
        try:
            t = parse_duration(_maybe_number(cells[0]), f"{key}:line{lineno}")
            bps = parse_bandwidth(_maybe_number(cells[1]), f"{key}:line{lineno}")
        except NetworkConfigError as exc:
            if not times and lineno == 1 and not _looks_numeric(cells[0]):
                continue  # a header line
            raise NetworkConfigError(key, path_value, f"line {lineno}: {exc.reason} ({exc.value!r})") from None
        if times and t <= times[-1]:
            raise NetworkConfigError(key, path_value, f"line {lineno}: time {cells[0]} is not after the previous "
                                     f"time ({times[-1]} s); the time column must increase strictly")
        times.append(t)
        values.append(bps)
    if not times:
        raise NetworkConfigError(key, path_value, "trace file has no rows")
    return Trace(tuple(times), tuple(values), str(path))


def _maybe_number(cell: str) -> Any:
    try:
        return float(cell)
    except ValueError:
        return cell


def _looks_numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "+-.")


# ----------------------------------------------------------------------------- links
LINK_KEYS = {"uplink", "downlink", "latency", "jitter", "loss", "duplicate", "corrupt"}


def _bandwidth(value: Any, key: str, base_dir: pathlib.Path) -> float | Trace:
    if isinstance(value, Mapping):
        _check_keys(value, {"trace"}, key)
        if "trace" not in value:
            raise NetworkConfigError(key, value, "a bandwidth table needs 'trace = \"file.csv\"'")
        return load_trace(value["trace"], f"{key}.trace", base_dir)
    if isinstance(value, str) and value.strip().lower().endswith(".csv"):
        return load_trace(value.strip(), key, base_dir)
    bps = parse_bandwidth(value, key)
    if bps <= 0:
        raise NetworkConfigError(key, value, "bandwidth must be positive (cut a link with a partition event)")
    return bps


def parse_jitter(value: Any, key: str) -> Jitter:
    """``"10ms"`` (normal, std 10 ms) or ``{distribution, scale, sigma | alpha}``."""
    if isinstance(value, Mapping):
        _check_keys(value, {"distribution", "scale", "sigma", "alpha"}, key)
        dist = _choice(value.get("distribution", "normal"), f"{key}.distribution", JITTER_DISTRIBUTIONS)
        if dist == "none":
            return Jitter()
        scale = parse_duration(value.get("scale", 0.0), f"{key}.scale")
        if dist == "lognormal":
            return Jitter(dist, scale, _positive(value.get("sigma", 0.5), f"{key}.sigma"))
        if dist == "pareto":
            alpha = _positive(value.get("alpha", 2.5), f"{key}.alpha")
            if alpha <= 1:
                raise NetworkConfigError(f"{key}.alpha", value.get("alpha"), "must be > 1 (the mean must exist)")
            return Jitter(dist, scale, alpha)
        for k in ("sigma", "alpha"):
            if k in value:
                raise NetworkConfigError(f"{key}.{k}", value[k], "only for lognormal (sigma) or pareto (alpha)")
        return Jitter(dist, scale)
    scale = parse_duration(value, key)
    return Jitter("normal", scale) if scale > 0 else Jitter()


def parse_loss(value: Any, key: str) -> Loss:
    """A per-packet probability (Bernoulli) or ``{model = "gilbert_elliott", p, r, h, k}``."""
    if isinstance(value, Mapping):
        model = _choice(value.get("model", "bernoulli"), f"{key}.model", LOSS_MODELS,
                        {"gilbert-elliott": "gilbert_elliott", "ge": "gilbert_elliott", "gilbert": "gilbert_elliott"})
        if model == "bernoulli":
            _check_keys(value, {"model", "p"}, key)
            return Loss("bernoulli", _probability(value.get("p", 0.0), f"{key}.p"))
        _check_keys(value, {"model", "p", "r", "h", "k"}, key)
        for need in ("p", "r"):
            if need not in value:
                raise NetworkConfigError(f"{key}.{need}", None, "Gilbert-Elliott needs p (good->bad) and r (bad->good)")
        return Loss("gilbert_elliott", *(_probability(value.get(n, d), f"{key}.{n}")
                                         for n, d in (("p", 0.0), ("r", 1.0), ("h", 0.0), ("k", 1.0))))
    return Loss("bernoulli", _probability(value, key))


def _link_fields(table: Mapping[str, Any], prefix: str, base_dir: pathlib.Path) -> tuple[dict, dict]:
    """Link fields named in ``table`` (keys LINK_KEYS plus ``direction``), split by direction."""
    up: dict[str, Any] = {}
    down: dict[str, Any] = {}
    direction = _choice(table.get("direction", "both"), f"{prefix}.direction", DIRECTIONS)
    # uplink/downlink name their own direction; ``direction`` scopes the other keys.
    shared: dict[str, Any] = {}
    if "latency" in table:
        shared["latency"] = parse_duration(table["latency"], f"{prefix}.latency")
    if "jitter" in table:
        shared["jitter"] = parse_jitter(table["jitter"], f"{prefix}.jitter")
    if "loss" in table:
        shared["loss"] = parse_loss(table["loss"], f"{prefix}.loss")
    for k in ("duplicate", "corrupt"):
        if k in table:
            shared[k] = _probability(table[k], f"{prefix}.{k}")
    if direction in ("up", "both"):
        up.update(shared)
    if direction in ("down", "both"):
        down.update(shared)
    if "uplink" in table:
        up["bandwidth"] = _bandwidth(table["uplink"], f"{prefix}.uplink", base_dir)
    if "downlink" in table:
        down["bandwidth"] = _bandwidth(table["downlink"], f"{prefix}.downlink", base_dir)
    return up, down


# ----------------------------------------------------------------------------- sections
def _parse_stragglers(t: Mapping[str, Any], base_dir: pathlib.Path, n_clients: int) -> Stragglers:
    p = "stragglers"
    _check_keys(t, {"distribution", "speed", "sigma", "alpha", "file", "noise"}, p)
    dist = _choice(t.get("distribution", "none"), f"{p}.distribution", STRAGGLER_DISTRIBUTIONS)
    speed = _positive(t.get("speed", DEFAULT_SPEED_FLOPS), f"{p}.speed")
    sigma = _positive(t.get("sigma", 0.5), f"{p}.sigma", strict=False)
    alpha = _positive(t.get("alpha", 2.0), f"{p}.alpha")
    noise = _positive(t.get("noise", 0.0), f"{p}.noise", strict=False)
    speeds: tuple[float, ...] = ()
    if dist == "trace":
        if "file" not in t:
            raise NetworkConfigError(f"{p}.file", None, "distribution = \"trace\" needs file = \"speeds.csv\"")
        speeds = _load_speeds(t["file"], f"{p}.file", base_dir)
    elif "file" in t:
        raise NetworkConfigError(f"{p}.file", t["file"], "a speed file needs distribution = \"trace\"")
    return Stragglers(dist, speed, sigma, alpha, speeds, noise)


def _load_speeds(value: Any, key: str, base_dir: pathlib.Path) -> tuple[float, ...]:
    """One speed (FLOP/s) per line, or ``client,speed`` rows; an optional header."""
    if not isinstance(value, str):
        raise NetworkConfigError(key, value, "expected the path of a speeds file")
    path = pathlib.Path(value) if pathlib.Path(value).is_absolute() else base_dir / value
    try:
        text = path.read_text()
    except OSError as exc:
        raise NetworkConfigError(key, value, f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    speeds: list[float] = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row if c.strip()]
        if not cells or cells[0].startswith("#"):
            continue
        try:
            s = float(cells[-1])
        except ValueError:
            if lineno == 1 and not speeds:
                continue
            raise NetworkConfigError(key, value, f"line {lineno}: {cells[-1]!r} is not a speed in FLOP/s") from None
        if not math.isfinite(s) or s <= 0:
            raise NetworkConfigError(key, value, f"line {lineno}: speed must be positive, got {s}")
        speeds.append(s)
    if not speeds:
        raise NetworkConfigError(key, value, "speeds file has no rows")
    return tuple(speeds)


def _parse_availability(t: Mapping[str, Any], n_clients: int) -> Availability:
    p = "availability"
    _check_keys(t, {"model", "mean_online", "mean_offline", "clients", "start"}, p)
    default_model = "exponential" if t else "always"
    model = _choice(t.get("model", default_model), f"{p}.model", AVAILABILITY_MODELS)
    clients = tuple(parse_clients(t.get("clients", "all"), n_clients, f"{p}.clients"))
    start = _choice(t.get("start", "online"), f"{p}.start", ("online", "stationary"))
    if model == "always":
        return Availability("always", clients=clients)
    for need in ("mean_online", "mean_offline"):
        if need not in t:
            raise NetworkConfigError(f"{p}.{need}", None, "exponential availability needs mean_online and mean_offline")
    on = parse_duration(t["mean_online"], f"{p}.mean_online")
    off = parse_duration(t["mean_offline"], f"{p}.mean_offline")
    if on <= 0:
        raise NetworkConfigError(f"{p}.mean_online", t["mean_online"], "must be positive")
    return Availability("exponential", on, off, clients, start)


_EVENT_KEYS = {
    "set_link": LINK_KEYS | {"direction"},
    "partition": {"duration"},
    "heal": set(),
    "crash": {"restart_after"},
    "restart": set(),
    "slowdown": {"factor", "duration"},
    "loss_burst": {"loss", "duration", "direction"},
    "server_crash": {"restart_after"},
}


def _parse_event(i: int, t: Any, n_clients: int, base_dir: pathlib.Path) -> Event:
    p = f"events[{i}]"
    t = _table(t, p)
    if "action" not in t:
        raise NetworkConfigError(f"{p}.action", None, f"every event needs an action ({', '.join(ACTIONS)})")
    action = _choice(t["action"], f"{p}.action", ACTIONS)
    _check_keys(t, {"action", "at", "at_round", "clients"} | _EVENT_KEYS[action], p)
    if ("at" in t) == ("at_round" in t):
        raise NetworkConfigError(p, dict(t), "give exactly one of at = \"120s\" (simulated time) or at_round = 10")
    at = parse_duration(t["at"], f"{p}.at") if "at" in t else None
    at_round = None
    if "at_round" in t:
        v = t["at_round"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise NetworkConfigError(f"{p}.at_round", v, "expected a round number >= 0")
        at_round = v
    if action == "server_crash" and "clients" in t:
        raise NetworkConfigError(f"{p}.clients", t["clients"], "server_crash takes no clients: the server restarts "
                                 "from its last checkpoint after restart_after")
    clients = () if action == "server_crash" else tuple(parse_clients(t.get("clients", "all"), n_clients, f"{p}.clients"))
    kw: dict[str, Any] = {}
    if action == "set_link":
        up, down = _link_fields(t, p, base_dir)
        if not up and not down:
            raise NetworkConfigError(p, dict(t), f"set_link changes nothing (give any of {', '.join(sorted(LINK_KEYS))})")
        kw.update(up=up, down=down)
    elif action == "loss_burst":
        if "loss" not in t or "duration" not in t:
            raise NetworkConfigError(p, dict(t), "loss_burst needs loss and duration")
        up, down = _link_fields({k: t[k] for k in ("loss", "direction") if k in t}, p, base_dir)
        kw.update(up=up, down=down)
    if "duration" in t:
        kw["duration"] = parse_duration(t["duration"], f"{p}.duration")
    if "restart_after" in t:
        kw["restart_after"] = parse_duration(t["restart_after"], f"{p}.restart_after")
    if action == "slowdown":
        if "factor" not in t:
            raise NetworkConfigError(f"{p}.factor", None, "slowdown needs factor (compute time is multiplied by it)")
        kw["factor"] = _positive(t["factor"], f"{p}.factor")
    return Event(i, action, clients, at=at, at_round=at_round, raw=dict(t), **kw)


def _parse_tcp(t: Mapping[str, Any], mtu: int, transport: str) -> Tcp:
    p = "network.tcp"
    _check_keys(t, {"min_rto", "max_window", "delayed_ack", "mss", "initial_window", "slow_start_after_idle",
                    "congestion"}, p)
    flags = {}
    for k, default in (("delayed_ack", False), ("slow_start_after_idle", True)):
        v = t.get(k, default)
        if not isinstance(v, bool):
            raise NetworkConfigError(f"{p}.{k}", v, "expected true or false")
        flags[k] = v
    room = mtu - TCP_SEGMENT_HEADER_BYTES
    if room < 1 and transport == "tcp":
        raise NetworkConfigError("network.mtu", mtu, f"must exceed the {TCP_SEGMENT_HEADER_BYTES}-byte TCP/IP "
                                 "header (with timestamps) under transport = \"tcp\"")
    mss = max(1, room)
    if "mss" in t:
        mss = parse_size(t["mss"], f"{p}.mss")
        if mss < 1:
            raise NetworkConfigError(f"{p}.mss", t["mss"], "must be at least 1 byte")
        if mss > max(1, room):
            raise NetworkConfigError(f"{p}.mss", t["mss"], f"exceeds network.mtu - {TCP_SEGMENT_HEADER_BYTES} "
                                     f"= {room} bytes (the TCP/IP header with timestamps takes "
                                     f"{TCP_SEGMENT_HEADER_BYTES})")
    iw = t.get("initial_window", DEFAULT_INITIAL_WINDOW)
    if isinstance(iw, bool) or not isinstance(iw, int) or not 1 <= iw <= 1000:
        raise NetworkConfigError(f"{p}.initial_window", iw, "expected a whole number of segments in 1..1000")
    congestion = _choice(t.get("congestion", "cubic"), f"{p}.congestion", CONGESTION_CONTROLS,
                         {"newreno": "reno"})
    max_window = math.inf
    if "max_window" in t:
        max_window = float(parse_size(t["max_window"], f"{p}.max_window"))
        if max_window < mss:
            raise NetworkConfigError(f"{p}.max_window", t["max_window"], f"must hold at least one segment ({mss} B)")
    return Tcp(parse_duration(t.get("min_rto", 0.2), f"{p}.min_rto"), max_window, 2 if flags["delayed_ack"] else 1,
               int(mss), iw, flags["slow_start_after_idle"], congestion)


def parse_network(sections: Mapping[str, Any], n_clients: int, base_dir: pathlib.Path) -> NetworkConfig:
    """Parse the ``network``, ``stragglers``, ``availability`` and ``events`` sections.

    Absent sections take the defaults: every client on a 10 Mbps uplink, 50 Mbps downlink,
    20 ms one-way latency, no jitter, loss, duplication or corruption; an unlimited server;
    TCP; identical 1 GFLOP/s devices always online; no events.
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise NetworkConfigError("data.clients", n_clients, "need at least one client")
    base_dir = pathlib.Path(base_dir)
    _check_keys(sections, {"network", "stragglers", "availability", "events"}, "scenario")
    net = _table(sections.get("network"), "network")
    _check_keys(net, LINK_KEYS | {"server", "tcp", "group", "transport", "mtu"}, "network")

    up_fields, down_fields = _link_fields(net, "network", base_dir)
    base_up = dataclasses.replace(Link(DEFAULT_UPLINK_BPS), **up_fields)
    base_down = dataclasses.replace(Link(DEFAULT_DOWNLINK_BPS), **down_fields)
    uplinks = [base_up] * n_clients
    downlinks = [base_down] * n_clients

    groups = net.get("group", [])
    if not isinstance(groups, list):
        raise NetworkConfigError("network.group", groups, "expected an array of tables ([[network.group]])")
    for gi, g in enumerate(groups):
        gp = f"network.group[{gi}]"
        g = _table(g, gp)
        _check_keys(g, LINK_KEYS | {"clients", "direction"}, gp)
        if "clients" not in g:
            raise NetworkConfigError(f"{gp}.clients", None, "a group needs clients = \"0-4,7\"")
        ids = parse_clients(g["clients"], n_clients, f"{gp}.clients")
        gu, gd = _link_fields(g, gp, base_dir)
        for c in ids:
            if gu:
                uplinks[c] = dataclasses.replace(uplinks[c], **gu)
            if gd:
                downlinks[c] = dataclasses.replace(downlinks[c], **gd)

    server = _table(net.get("server"), "network.server")
    _check_keys(server, {"uplink", "downlink"}, "network.server")
    s_up = parse_bandwidth(server.get("uplink", "unlimited"), "network.server.uplink", allow_unlimited=True)
    s_down = parse_bandwidth(server.get("downlink", "unlimited"), "network.server.downlink", allow_unlimited=True)
    for k, v in (("uplink", s_up), ("downlink", s_down)):
        if v <= 0:
            raise NetworkConfigError(f"network.server.{k}", server.get(k), "bandwidth must be positive")

    transport = _choice(net.get("transport", "tcp"), "network.transport", TRANSPORTS, {"udp": "datagram"})
    mtu = parse_size(net.get("mtu", DEFAULT_MTU_BYTES), "network.mtu")
    if mtu <= TCP_IP_HEADER_BYTES:
        raise NetworkConfigError("network.mtu", net.get("mtu"), f"must exceed the {TCP_IP_HEADER_BYTES}-byte TCP/IP header")

    tcp = _parse_tcp(_table(net.get("tcp"), "network.tcp"), mtu, transport)

    stragglers = _parse_stragglers(_table(sections.get("stragglers"), "stragglers"), base_dir, n_clients)
    availability = _parse_availability(_table(sections.get("availability"), "availability"), n_clients)

    raw_events = sections.get("events", [])
    if raw_events is None:
        raw_events = []
    if not isinstance(raw_events, list):
        raise NetworkConfigError("events", raw_events, "expected an array of tables ([[events]])")
    events = tuple(_parse_event(i, e, n_clients, base_dir) for i, e in enumerate(raw_events))

    return NetworkConfig(n_clients, tuple(uplinks), tuple(downlinks), s_up, s_down, transport, mtu, tcp,
                         stragglers, availability, events)
