"""The unit parser of the project: bandwidths, durations, sizes and client sets.

Every quantity a scenario writes by hand goes through here, so ``"1Mbps"`` means the same
thing to the runtime and to the network model. Prefixes of rates and of ``kB``/``MB`` are
SI (decimal: k = 1e3); ``KiB``/``MiB``/``GiB`` are binary (Ki = 1024). A bare number is
taken in the base unit: bits per second, seconds, bytes.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

from .errors import NetworkConfigError

_NUMBER = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_QUANTITY = re.compile(r"^\s*" + _NUMBER + r"\s*([A-Za-zµ/]*)\s*$")

# Rates: bits per second. Case of the prefix is forgiven ("mbps" means Mbps: nobody
# writes millibits per second), but bytes per second must be spelled "Bps" / "B/s".
_BIT_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_DURATION = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0,
    "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0,
}
_SIZE = {
    "b": 1, "byte": 1, "bytes": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_UNLIMITED = {"unlimited", "inf", "infinite", "none"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _split(value: Any, key: str, what: str) -> tuple[float, str]:
    if _is_number(value):
        return float(value), ""
    if not isinstance(value, str):
        raise NetworkConfigError(key, value, f"expected a {what} (a number or a string with a unit)")
    m = _QUANTITY.match(value)
    if not m:
        raise NetworkConfigError(key, value, f"not a {what}: expected a number followed by a unit")
    return float(m.group(1)), m.group(2)


def _check_finite_nonneg(x: float, value: Any, key: str, what: str) -> None:
    if math.isnan(x) or math.isinf(x):
        raise NetworkConfigError(key, value, f"{what} must be finite")
    if x < 0:
        raise NetworkConfigError(key, value, f"{what} must not be negative")


def parse_bandwidth(value: Any, key: str, *, allow_unlimited: bool = False) -> float:
    """A bandwidth in **bits per second**.

    ``"1Mbps"``, ``"100kbps"``, ``"1.5Gbps"``, ``"800bps"``, ``"1Mbit/s"``, ``"2MBps"``
    (bytes per second, x8), or a number (already bits/s). With ``allow_unlimited``,
    ``"unlimited"`` gives ``math.inf``.
    """
    if allow_unlimited and isinstance(value, str) and value.strip().lower() in _UNLIMITED:
        return math.inf
    x, unit = _split(value, key, "bandwidth")
    if unit:
        m = re.fullmatch(r"([kKmMgGtT]?)(bps|bit/s|bits/s|b/s|Bps|B/s)", unit)
        if not m:
            raise NetworkConfigError(key, value, f"unknown bandwidth unit {unit!r} "
                                     "(use bps, kbps, Mbps, Gbps, or Bps/MBps for bytes per second)")
        x *= _BIT_PREFIX[m.group(1).lower()]
        if m.group(2) in ("Bps", "B/s"):
            x *= 8.0
    _check_finite_nonneg(x, value, key, "bandwidth")
    return x


def parse_duration(value: Any, key: str) -> float:
    """A duration in **seconds**: ``"50ms"``, ``"2s"``, ``"1.5min"``, ``"1h"``, ``"250us"``,
    or a number (already seconds). Negative durations are refused."""
    x, unit = _split(value, key, "duration")
    if unit:
        if unit not in _DURATION:
            raise NetworkConfigError(key, value, f"unknown duration unit {unit!r} "
                                     "(use us, ms, s, min, h)")
        x *= _DURATION[unit]
    _check_finite_nonneg(x, value, key, "duration")
    return x


def parse_size(value: Any, key: str) -> int:
    """A size in **bytes**: ``"1500B"``, ``"64KiB"``, ``"10MB"`` (SI, 1e7), ``"1GiB"``, or an
    integer number of bytes. Fractions of a byte are refused."""
    x, unit = _split(value, key, "size")
    if unit:
        factor = _SIZE.get(unit.lower())
        if factor is None or unit.endswith("b"):
            # lower-case b would mean bits: refuse rather than guess.
            raise NetworkConfigError(key, value, f"unknown size unit {unit!r} "
                                     "(use B, kB, MB, GB, KiB, MiB, GiB)")
        x *= factor
    _check_finite_nonneg(x, value, key, "size")
    if abs(x - round(x)) > 1e-9 * max(1.0, x):
        raise NetworkConfigError(key, value, "a size must be a whole number of bytes")
    return int(round(x))


def parse_clients(spec: Any, n_clients: int, key: str) -> list[int]:
    """A set of client ids, sorted and without repeats.

    ``"all"``; an int ``3``; a list ``[1, 2]``; or a string of ids and inclusive ranges
    ``"0-4,7"``. An id ``>= n_clients`` (or negative) is an error naming that id.
    """
    ids: list[int] = []
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return list(range(n_clients))
    if isinstance(spec, bool):
        raise NetworkConfigError(key, spec, "expected client ids like \"0-4,7\", a list of ints, or \"all\"")
    if isinstance(spec, int):
        ids = [spec]
    elif isinstance(spec, (list, tuple)):
        for item in spec:
            if not isinstance(item, int) or isinstance(item, bool):
                raise NetworkConfigError(key, spec, f"client id {item!r} is not an integer")
            ids.append(item)
    elif isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
            if not m:
                raise NetworkConfigError(key, spec, f"cannot read {part!r}: expected ids and ranges like \"0-4,7\"")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise NetworkConfigError(key, spec, f"range {part!r} runs backwards")
            if hi >= n_clients:
                bad = lo if lo >= n_clients else n_clients
                raise NetworkConfigError(key, spec, f"client {bad} does not exist (there are {n_clients} clients: 0-{n_clients - 1})")
            ids.extend(range(lo, hi + 1))
    else:
        raise NetworkConfigError(key, spec, "expected client ids like \"0-4,7\", a list of ints, or \"all\"")
    for c in ids:
        if c < 0 or c >= n_clients:
            raise NetworkConfigError(key, spec, f"client {c} does not exist (there are {n_clients} clients: 0-{n_clients - 1})")
    return sorted(set(ids))


def format_clients(ids: Iterable[int]) -> str:
    """The compact form of a client set, ``[0,1,2,3,4,7] -> "0-4,7"`` (for logs)."""
    ids = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)
