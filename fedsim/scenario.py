"""Scenario files (TOML) and ``--set`` overrides, validated before anything runs.

A scenario has the sections ``run``, ``data``, ``model``, ``algorithm`` (owned here and by
the algorithm's own ``Config``) and ``network``, ``stragglers``, ``availability``,
``events`` (owned by ``network.config``). Every mistake — unknown key, wrong type, bad
unit — is a :class:`ScenarioError` naming the dotted key, the value and, when the key came
from a file, its line.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from algorithms import ConfigError, get_algorithm
from algorithms.base import Algorithm
from network.config import NetworkConfig, parse_network
from network.errors import NetworkConfigError
from network.units import parse_duration

from .data import DataConfig
from .eavesdrop import EavesdropperConfig, parse_eavesdropper
from .errors import ScenarioError
from .models import ModelConfig

NETWORK_SECTIONS = ("network", "stragglers", "availability", "events")
RUNTIME_SECTIONS = ("run", "data", "model", "algorithm")
OPTIONAL_SECTIONS = ("eavesdropper",)
REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIO_DIR = REPO_ROOT / "scenarios"


@dataclass
class RunConfig:
    """``[run]``. Durations accept units ("90s", "2min"); they are stored in seconds."""

    seed: int = 1
    rounds: int = 40
    clock: str = "virtual"
    """``virtual`` (deterministic, simulated seconds) or ``real`` (wall clock)."""
    target_accuracy: float | None = 0.9
    """Accuracy whose first crossing gives ``time_to_target_s``."""
    stop_at_target: bool = False
    round_deadline: float | None = None
    """Seconds a server waits for replies in each gather (None: wait for all, up to max_wait)."""
    max_wait: float = 3600.0
    """Seconds after which any gather gives up on missing replies (a safety net)."""
    eval_every: int = 1
    """Evaluate the global model every this many rounds (and after the last)."""
    emulate: bool = True
    """Real time only: false puts messages on the socket as they come, with no modelled delay,
    loss or sharing, so that a real (or ``tc``-shaped) link is measured as it is."""
    heartbeat: float = 1.0
    """Seconds between a client node's pings to the server (deployments across processes)."""
    peer_timeout: float = 5.0
    """Seconds of silence (and a closed connection) after which the server declares a client
    node dead and stops waiting for its clients; a join says hello again after as long."""
    threads: int = 1
    """torch intra-op threads. Federated models are small: one thread per process avoids
    threads spinning against each other (0.7 ms vs 89 ms per MLP step measured on 2 busy cores).
    Clients computed together (``batch_clients``) run large products, which a second thread
    does speed up on an otherwise idle machine (``bench/vectorised.py --threads 1 2``)."""
    vectorise: bool = True
    """Fast client compute (``algorithms.fastpath``): client steps on the shipped models skip
    autograd. ``false`` keeps the plain autograd path (the reference); results agree to float
    rounding, messages, bytes and modelled compute time are the same."""
    batch_clients: bool = True
    """With ``vectorise`` in virtual time: the clients that receive a message at the same
    instant are computed together where the method offers it (``fedsim.batching``: FedAvg's
    local SGD stacked for small dense models, and for the clients of one broadcast with a
    large first layer in kernel form, ``algorithms.shared_start``; SGD's and the compressing
    methods' gradient step stacked, or in one pass through the weights the clients share, their
    compression per client; FeDLRT's and FedLoRU's
    local steps stacked). ``false`` computes them one at a time."""

    def __post_init__(self) -> None:
        _expect(isinstance(self.seed, int) and not isinstance(self.seed, bool), "run.seed", self.seed, "must be an integer")
        _expect(isinstance(self.rounds, int) and self.rounds >= 1, "run.rounds", self.rounds, "must be an integer >= 1")
        _expect(self.clock in ("virtual", "real"), "run.clock", self.clock, "must be 'virtual' or 'real'")
        if self.target_accuracy is not None:
            _expect(isinstance(self.target_accuracy, (int, float)) and 0 < self.target_accuracy <= 1,
                    "run.target_accuracy", self.target_accuracy, "must be in (0, 1]")
        _expect(isinstance(self.stop_at_target, bool), "run.stop_at_target", self.stop_at_target, "must be true or false")
        self.round_deadline = None if self.round_deadline is None else _duration("run.round_deadline", self.round_deadline)
        self.max_wait = _duration("run.max_wait", self.max_wait)
        _expect(isinstance(self.eval_every, int) and self.eval_every >= 1, "run.eval_every", self.eval_every, "must be an integer >= 1")
        _expect(isinstance(self.emulate, bool), "run.emulate", self.emulate, "must be true or false")
        self.heartbeat = _duration("run.heartbeat", self.heartbeat)
        self.peer_timeout = _duration("run.peer_timeout", self.peer_timeout)
        _expect(self.heartbeat > 0, "run.heartbeat", self.heartbeat, "must be > 0")
        _expect(self.peer_timeout >= 2 * self.heartbeat, "run.peer_timeout", self.peer_timeout,
                f"must be at least twice run.heartbeat ({self.heartbeat:g}s)")
        _expect(isinstance(self.threads, int) and self.threads >= 1, "run.threads", self.threads, "must be an integer >= 1")
        _expect(isinstance(self.vectorise, bool), "run.vectorise", self.vectorise, "must be true or false")
        _expect(isinstance(self.batch_clients, bool), "run.batch_clients", self.batch_clients, "must be true or false")


@dataclass
class Scenario:
    run: RunConfig
    data: DataConfig
    model: ModelConfig
    algorithm_name: str
    algorithm: Algorithm.Config
    network: NetworkConfig
    raw: dict[str, Any] = field(repr=False)
    source: str = "<default>"
    eavesdropper: EavesdropperConfig | None = None
    """``[eavesdropper]``: a passive tap on one client's link (``fedsim.eavesdrop``)."""
    notes: list[str] = field(default_factory=list)
    """One-line hints about settings that are valid but probably not what the user wants."""

    @property
    def algorithm_class(self) -> type[Algorithm]:
        return get_algorithm(self.algorithm_name)


def _expect(ok: bool, key: str, value: Any, reason: str) -> None:
    if not ok:
        raise ScenarioError(key, value, reason)


def _duration(key: str, value: Any) -> float:
    try:
        return parse_duration(value, key)
    except NetworkConfigError as exc:
        raise ScenarioError(key, value, exc.reason) from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (``1``, ``0.5``, ``[64, 32]``, ``true``, ``"x"``), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (dotted keys, any depth) to the raw scenario tables."""
    if "=" not in assignment:
        raise ScenarioError(assignment, None, "an override must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    set_value(raw, dotted, parse_value(text.strip()))


def set_value(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key (``"algorithm.qrr.bits"``) to a Python value in the raw tables."""
    text = value
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ScenarioError(dotted, text, "an override key must be dotted, like network.uplink")
    table = raw
    for i, part in enumerate(parts[:-1]):
        nxt = table.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ScenarioError(".".join(parts[:i + 1]), nxt, "is not a table, cannot set a key inside it")
        table = nxt
    table[parts[-1]] = value


def _line_of(text: str | None, section: str, key: str) -> int | None:
    """Best-effort line number of ``key`` inside ``[section]`` of a TOML text."""
    if not text:
        return None
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        head = re.match(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?", line)
        if head:
            current = head.group(1)
            continue
        if current == section and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return None


def _build(cls, section: str, values: Any, text: str | None, source: str):
    if not isinstance(values, dict):
        raise ScenarioError(section, values, "must be a table", source=source)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise ScenarioError(f"{section}.{key}", value, f"unknown key (known: {', '.join(sorted(names))})",
                                _line_of(text, section, key), source)
    check_types(cls, section, values, text, source, section)
    try:
        return cls(**values)
    except ScenarioError as exc:
        key = exc.key.split(".", 1)[-1]
        raise ScenarioError(exc.key, exc.value, exc.reason, _line_of(text, section, key), source) from None
    except (TypeError, ValueError) as exc:
        raise ScenarioError(section, values, str(exc), source=source) from None


def load_scenario(path: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] | Mapping[str, Any] = ()) -> Scenario:
    """Read a scenario (``None``: the embedded default), apply overrides, validate all of it.

    ``overrides``: ``"section.key=value"`` strings (values parse as TOML, as ``--set``), or a
    mapping of dotted keys to Python values (``{"algorithm.name": "qrr", "run.rounds": 5}``).
    """
    text, source, base_dir = None, "<default>", SCENARIO_DIR
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ScenarioError("scenario", str(path), "no such file")
        text, source, base_dir = p.read_text(), str(p), p.parent
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError("scenario", str(path), f"not valid TOML: {exc}", source=source) from None
    raw = copy.deepcopy(raw)
    if isinstance(overrides, Mapping):
        for dotted, value in overrides.items():
            set_value(raw, dotted, value)
        overridden = {k.strip() for k in overrides}
    else:
        for assignment in overrides:
            apply_override(raw, assignment)
        overridden = {a.split("=", 1)[0].strip() for a in overrides}
    try:
        return from_dict(raw, text=text, source=source, base_dir=base_dir)
    except ScenarioError as exc:
        if exc.key in overridden:  # the value came from an override, not from the file's line
            raise ScenarioError(exc.key, exc.value, exc.reason, source="--set") from None
        raise


def from_dict(raw: dict[str, Any], *, text: str | None = None, source: str = "<dict>", base_dir: Path = SCENARIO_DIR) -> Scenario:
    for section in raw:
        if section not in RUNTIME_SECTIONS + NETWORK_SECTIONS + OPTIONAL_SECTIONS:
            known = RUNTIME_SECTIONS + NETWORK_SECTIONS + OPTIONAL_SECTIONS
            raise ScenarioError(section, raw[section], f"unknown section (known: {', '.join(known)})",
                                _section_line(text, section), source)
    run = _build(RunConfig, "run", raw.get("run", {}), text, source)
    data = _build(DataConfig, "data", raw.get("data", {}), text, source)
    model = _build(ModelConfig, "model", raw.get("model", {}), text, source)
    name, algo = resolve_algorithm(raw.get("algorithm", {}), text, source)
    sections = {k: raw[k] for k in NETWORK_SECTIONS if k in raw}
    try:
        network = parse_network(sections, data.clients, base_dir)
    except NetworkConfigError as exc:
        parts = exc.key.split(".")
        # [network.tcp] / [network.server] keys sit in their own table; others in [network]
        line = (_line_of(text, ".".join(parts[:-1]), parts[-1]) or _line_of(text, parts[0], parts[-1])
                if len(parts) > 1 else None)
        raise ScenarioError(exc.key, exc.value, exc.reason, line, source) from None
    try:
        eavesdropper = parse_eavesdropper(raw["eavesdropper"], data.clients) if "eavesdropper" in raw else None
    except ScenarioError as exc:
        raise ScenarioError(exc.key, exc.value, exc.reason, _line_of(text, "eavesdropper", exc.key.split(".")[-1]),
                            source) from None
    scenario = Scenario(run, data, model, name, algo, network, raw, source, eavesdropper)
    scenario.notes = notes_for(scenario)
    return scenario


def _section_line(text: str | None, section: str) -> int | None:
    if not text:
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\[\[?\s*{re.escape(section)}\s*[\].]", line):
            return number
    return None


# ----------------------------------------------------------------------------- types
# Fields whose annotation says float but which also take a unit string ("90s").
_UNIT_FIELDS = {("run", "round_deadline"), ("run", "max_wait"), ("run", "heartbeat"), ("run", "peer_timeout")}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "None": "unset", "list": "a list"}


def _allowed(annotation: Any) -> set[str] | None:
    """Base type names an annotation admits (``"float | None"`` -> {float, None}); None when
    the annotation is something this check does not understand (then it is not checked)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = set()
    for part in text.split("|"):
        part = part.strip()
        base = part.split("[", 1)[0].strip()
        if base in ("int", "float", "str", "bool", "None"):
            names.add(base)
        elif base in ("list", "tuple"):
            names.add("list")
        else:
            return None
    return names


def _value_ok(value: Any, allowed: set[str]) -> bool:
    if isinstance(value, bool):
        return "bool" in allowed
    if isinstance(value, int):
        return bool({"int", "float"} & allowed)
    if isinstance(value, float):
        return "float" in allowed
    if isinstance(value, str):
        return "str" in allowed
    if isinstance(value, list):
        return "list" in allowed
    return False


def check_types(cls, section: str, values: Mapping[str, Any], text: str | None, source: str,
                line_section: str | None = None, prefix: str | None = None) -> None:
    """Refuse a value whose type the dataclass field cannot take, naming key and value
    (so ``lr = "abc"`` is an error about ``algorithm.lr``, not a failed comparison)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = section if prefix is None else prefix
    for key, value in values.items():
        f = fields.get(key)
        if f is None:
            continue
        allowed = _allowed(f.type)
        if allowed is None:
            continue
        if (section, key) in _UNIT_FIELDS and isinstance(value, str):
            continue
        if not _value_ok(value, allowed):
            want = " or ".join(_TYPE_WORDS[a] for a in sorted(allowed) if a != "None")
            raise ScenarioError(f"{prefix}.{key}", value, f"expected {want}",
                                _line_of(text, line_section or section, key), source)


# ----------------------------------------------------------------------------- algorithm tables
def resolve_algorithm(table: Any, text: str | None = None, source: str = "<dict>") -> tuple[str, Algorithm.Config]:
    """The ``[algorithm]`` section: ``name``, keys for whichever method runs, and one table
    per method (``[algorithm.fedavg] local_epochs = 2``) applied only when that method runs.

    A key directly under ``[algorithm]`` (what ``--set algorithm.lr=0.1`` sets) applies to
    the running method and wins over its table; it must be one of that method's keys. The
    tables of other methods are validated as tables of known methods, then ignored, so a
    scenario switches to any method with ``--set algorithm.name=X``.
    """
    from algorithms import algorithm_names

    if not isinstance(table, dict):
        raise ScenarioError("algorithm", table, "must be a table", source=source)
    values = dict(table)
    name = values.pop("name", "fedavg")
    if not isinstance(name, str):
        raise ScenarioError("algorithm.name", name, "expected a method name (a string)", _line_of(text, "algorithm", "name"),
                            source)
    known = algorithm_names()
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    for k, v in tables.items():
        if k not in known:
            raise ScenarioError(f"algorithm.{k}", v, f"a table for an unknown method (known: {', '.join(known)})",
                                _section_line(text, f"algorithm.{k}"), source)
    for k, v in values.items():
        if k in known and k not in tables:
            raise ScenarioError(f"algorithm.{k}", v, f"the settings of method '{k}' must be a table "
                                f"([algorithm.{k}], or --set algorithm.{k}.KEY=VALUE)", _line_of(text, "algorithm", k),
                                source)
    top = {k: v for k, v in values.items() if k not in tables}
    try:
        cls = get_algorithm(name)
    except ConfigError as exc:
        raise ScenarioError("algorithm.name", name, exc.reason, _line_of(text, "algorithm", "name"), source) from None
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for key, value in top.items():
        if key not in fields:
            owners = [n for n in known if key in {f.name for f in dataclasses.fields(get_algorithm(n).Config)}]
            reason = (f"not a key of '{name}' (it is one of {', '.join(owners)}); put it in a method's own table, "
                      f"e.g. algorithm.{owners[0]}.{key}, to keep it when switching methods" if owners else
                      f"unknown key for algorithm '{name}' (known: {', '.join(sorted(fields))})")
            raise ScenarioError(f"algorithm.{key}", value, reason, _line_of(text, "algorithm", key), source)
    own = tables.get(name, {})
    for key, value in own.items():
        if key not in fields:
            raise ScenarioError(f"algorithm.{name}.{key}", value,
                                f"unknown key for algorithm '{name}' (known: {', '.join(sorted(fields))})",
                                _line_of(text, f"algorithm.{name}", key), source)
    check_types(cls.Config, "algorithm", top, text, source)
    check_types(cls.Config, name, own, text, source, f"algorithm.{name}", f"algorithm.{name}")
    merged = {**own, **top}
    try:
        return name, cls.make_config(merged)
    except ConfigError as exc:
        key = f"algorithm.{exc.key}" if exc.key in top or exc.key not in own else f"algorithm.{name}.{exc.key}"
        section = "algorithm" if key.count(".") == 1 else f"algorithm.{name}"
        raise ScenarioError(key, exc.value, exc.reason, _line_of(text, section, exc.key), source) from None
    except (TypeError, ValueError) as exc:
        raise ScenarioError("algorithm", merged, f"{type(exc).__name__}: {exc}", source=source) from None


def one_step_per_round(cls: type[Algorithm]) -> bool:
    """True for methods whose clients send one gradient per round (no local training):
    their Config has neither ``local_epochs`` nor ``local_steps``."""
    names = {f.name for f in dataclasses.fields(cls.Config)}
    return not names & {"local_epochs", "local_steps"}


GRADIENT_ROUNDS_HINT = 200
"""Below this many rounds a one-gradient-per-round method gets a hint (the README's
results train them for 300 rounds at lr 0.5 to reach FedAvg's accuracy on digits)."""


def notes_for(scenario: Scenario) -> list[str]:
    """Hints for settings that run but probably disappoint. Shown by ``check`` and ``run``."""
    notes = []
    if one_step_per_round(scenario.algorithm_class) and scenario.run.rounds < GRADIENT_ROUNDS_HINT:
        lr = scenario.algorithm.lr
        notes.append(f"{scenario.algorithm_name} takes one gradient step per round: {scenario.run.rounds} rounds at "
                     f"lr {lr} is far too few to train (the README's results use 300 rounds at lr 0.5): try "
                     f"--set run.rounds=300" + (" --set algorithm.lr=0.5" if lr < 0.5 else ""))
    cfg = dataclasses.asdict(scenario.algorithm)
    per_client = _train_samples(scenario.data) / scenario.data.clients if _train_samples(scenario.data) else None
    if "local_steps" in cfg and per_client:
        passes = cfg["local_steps"] * (cfg.get("batch_size") or per_client) / per_client
        if passes > LOCAL_PASSES_HINT:
            steps = max(1, round(2 * per_client / (cfg.get("batch_size") or per_client)))
            notes.append(f"{scenario.algorithm_name}: local_steps = {cfg['local_steps']} is ~{passes:.0f} passes over a "
                         f"client's ~{per_client:.0f} samples each round, slow to simulate; for two passes: "
                         f"--set algorithm.{scenario.algorithm_name}.local_steps={steps}")
    if scenario.run.round_deadline is None and can_lose_replies(scenario.network):
        notes.append("replies can be lost on this network and run.round_deadline is unset: each gather stops "
                     "waiting at a deadline derived from the network and compute model (see `fedsim check`, "
                     "summary.json round_deadline_s); set run.round_deadline to choose it")
    return notes


LOCAL_PASSES_HINT = 20
"""Above this many passes over a client's data per round a local-steps method gets a hint
(FeDLRT's and FedLoRU's defaults are one epoch of a 6,000-sample Fashion-MNIST client)."""


def _train_samples(data: DataConfig) -> int | None:
    """Training samples of the data set before partitioning, where known without loading it."""
    if data.dataset == "digits":
        return round(1797 * (1 - data.test_fraction))  # scikit-learn's digits: 1,797 images
    if data.dataset == "fashion-mnist":
        return 60_000
    if data.dataset == "synthetic":
        return round(data.synthetic_samples * (1 - data.test_fraction))
    return None


def can_lose_replies(net: NetworkConfig) -> bool:
    """Whether a reply can fail to arrive at all (TCP retransmits lost packets; a datagram
    with a lost packet, a corrupted message, an offline, crashed or partitioned client is
    gone for good). Such scenarios need a round deadline, else a gather waits max_wait."""
    links = (*net.uplinks, *net.downlinks)
    if net.transport == "datagram" and any(l.loss.rate > 0 for l in links):
        return True
    if any(l.corrupt > 0 for l in links) or net.availability.model != "always":
        return True
    return any(e.action in ("partition", "crash") or (e.action == "loss_burst" and net.transport == "datagram")
               for e in net.events)


# ----------------------------------------------------------------------------- field docs
@dataclass
class FieldDoc:
    name: str
    type: str
    default: Any
    doc: str


def field_docs(cls) -> list[FieldDoc]:
    """A dataclass's fields with their defaults and the docstring written under each
    (read from the source of the class and its bases, nearest first)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs.setdefault(a.target.id, " ".join(b.value.value.split()))
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append(FieldDoc(f.name, f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)),
                            default, docs.get(f.name, "")))
    return out


# ----------------------------------------------------------------------------- resolved TOML
def resolved(scenario: Scenario) -> dict[str, Any]:
    """Every value the scenario runs with, defaults included, as TOML-ready tables.

    Unset optional values (TOML has no null) are left out; ``to_toml`` notes them. The
    network sections are the scenario's own, with the defaults of the keys it left out
    filled in only where that provably parses to the same network (else as written).
    """
    def plain(obj) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(obj).items()}

    out: dict[str, Any] = {"run": plain(scenario.run), "data": plain(scenario.data), "model": plain(scenario.model)}
    algo: dict[str, Any] = {"name": scenario.algorithm_name, scenario.algorithm_name: plain(scenario.algorithm)}
    for k, v in (scenario.raw.get("algorithm") or {}).items():
        if isinstance(v, dict) and k != scenario.algorithm_name:
            algo[k] = copy.deepcopy(v)
    out["algorithm"] = algo
    out.update(_network_resolved(scenario))
    return out


def _human(x: float, units: list[tuple[str, float]]) -> Any:
    if x == float("inf"):
        return "unlimited"
    for unit, factor in units:
        if x >= factor or factor == units[-1][1]:
            v = x / factor
            if v * factor == x:
                return f"{v:g}{unit}" if float(f"{v:g}") == v else f"{v!r}{unit}"
    return x


def _network_resolved(scenario: Scenario) -> dict[str, Any]:
    from network.config import DEFAULT_DOWNLINK_BPS, DEFAULT_LATENCY_S, DEFAULT_MTU_BYTES, DEFAULT_SPEED_FLOPS, Tcp

    raw = {k: copy.deepcopy(scenario.raw[k]) for k in NETWORK_SECTIONS if k in scenario.raw}
    bps = [("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3), ("bps", 1.0)]
    sec = [("s", 1.0), ("ms", 1e-3), ("us", 1e-6)]
    from network.config import DEFAULT_UPLINK_BPS
    defaults = {
        "network": {"uplink": _human(DEFAULT_UPLINK_BPS, bps), "downlink": _human(DEFAULT_DOWNLINK_BPS, bps),
                    "latency": _human(DEFAULT_LATENCY_S, sec), "jitter": "0ms", "loss": 0.0, "duplicate": 0.0,
                    "corrupt": 0.0, "transport": "tcp", "mtu": f"{DEFAULT_MTU_BYTES}B",
                    "server": {"uplink": "unlimited", "downlink": "unlimited"},
                    "tcp": {"min_rto": _human(Tcp().min_rto, sec), "delayed_ack": False}},
        "stragglers": {"distribution": "none", "speed": DEFAULT_SPEED_FLOPS, "sigma": 0.5, "alpha": 2.0, "noise": 0.0},
        "availability": {"model": "always"},
    }
    filled = copy.deepcopy(raw)
    for section, table in defaults.items():
        if section == "availability" and section in filled:
            continue
        mine = filled.setdefault(section, {})
        if not isinstance(mine, dict):
            return raw
        for k, v in table.items():
            if isinstance(v, dict):
                sub = mine.setdefault(k, {})
                if isinstance(sub, dict):
                    for kk, vv in v.items():
                        sub.setdefault(kk, vv)
            else:
                mine.setdefault(k, v)
    try:
        same = parse_network(filled, scenario.data.clients, Path(scenario.source).parent
                             if scenario.source not in ("<default>", "<dict>") else SCENARIO_DIR) == scenario.network
    except (NetworkConfigError, ValueError, TypeError):
        same = False
    return filled if same else raw


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else '"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(v: Any) -> str:
    import json
    import math
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(tables: Mapping[str, Any], header: str = "") -> str:
    """Write nested tables as TOML (tables, sub-tables, arrays of tables); ``None`` values
    are written as comments (TOML has no null)."""
    lines: list[str] = [f"# {l}" if l else "#" for l in header.splitlines()]

    def emit(path: list[str], table: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in table.items()
                   if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
        if path:
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars.items():
            if v is None:
                lines.append(f"# {_toml_key(k)} is unset")
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                emit([*path, k], v)
        for k, v in table.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for item in v:
                    lines.append("")
                    lines.append("[[" + ".".join(_toml_key(p) for p in [*path, k]) + "]]")
                    for kk, vv in item.items():
                        if isinstance(vv, dict):
                            lines.append(f"{_toml_key(kk)} = {_toml_value(vv)}")
                        elif vv is not None:
                            lines.append(f"{_toml_key(kk)} = {_toml_value(vv)}")

    emit([], tables)
    return "\n".join(lines) + "\n"
