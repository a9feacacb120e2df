"""What a run leaves behind: the event log, per-round metrics, and the summary.

``events.jsonl`` holds only simulated quantities (no wall time), so that the same
scenario and seed give byte-identical logs — ``events_sha256`` is their digest.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


def _line_encoder() -> Callable[[dict], str]:
    """Compact, key-sorted JSON for one event. ``json.dumps`` builds an encoder per call
    (~2 us of a ~4.6 us row); CPython's C encoder is built once here instead."""
    plain = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (another Python): the plain encoder
        return plain.encode
    # rows hold flat scalars and short lists, so the circular-reference markers are not needed
    fast = make(None, plain.default, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)
    return lambda row: "".join(fast(row, 0))


_JSON_LINE = _line_encoder()


class EventLog:
    """Append-only log of (simulated time, event, fields). Cheap to append: rows are
    serialised once, when hashed or written."""

    def __init__(self, now: Callable[[], float]):
        self.now = now
        self.rows: list[tuple[float, str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.rows.append((self.now(), event, fields))

    def lines(self):
        for t, event, fields in self.rows:
            yield _JSON_LINE({"t": round(t, 9), "event": event, **fields})

    def sha256(self) -> str:
        h = hashlib.sha256()
        for line in self.lines():
            h.update(line.encode() + b"\n")
        return h.hexdigest()

    def write(self, path: Path) -> None:
        with open(path, "w") as f:
            for line in self.lines():
                f.write(line + "\n")

    def count(self, event: str) -> int:
        return sum(1 for _, e, _ in self.rows if e == event)


@dataclass
class RoundMetrics:
    """One row of metrics.csv. Times in simulated seconds; bytes cumulative since the start."""

    round: int
    sim_time_s: float
    round_time_s: float
    accuracy: float | None
    loss: float | None
    uplink_bytes: int
    downlink_bytes: int
    uplink_payload_bits: int
    downlink_payload_bits: int
    replies: int = 0
    """Client replies the server accepted in this round (all of its gathers)."""
    missed_replies: int = 0
    """Replies a gather of this round stopped waiting for (lost, late, offline, crashed ...)."""


@dataclass
class RunResult:
    summary: dict[str, Any]
    metrics: list[RoundMetrics] = field(default_factory=list)
    events: EventLog | None = None
    final_params: dict | None = None

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.events is not None:
            self.events.write(out_dir / "events.jsonl")
        with open(out_dir / "metrics.csv", "w", newline="") as f:
            names = list(RoundMetrics.__dataclass_fields__)
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for m in self.metrics:
                w.writerow(asdict(m))
        (out_dir / "summary.json").write_text(json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
