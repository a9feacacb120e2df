"""What a run leaves behind: the event log, per-round metrics, and the summary.

``events.jsonl`` holds only simulated quantities (no wall time), so that the same
scenario and seed give byte-identical logs — ``events_sha256`` is their digest. The log
streams to disk during the run; memory holds one buffer of rows.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator


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
    """Append-only log of (simulated time, event, fields), streamed to disk as the run goes.

    Rows are buffered ``flush_rows`` at a time, then serialised once, hashed (the digest is
    of the same bytes ``events.jsonl`` holds) and appended to a file: ``events.jsonl``
    itself once :meth:`stream_to` names it, an anonymous temporary file until then. Memory
    stays at one buffer however long the run or however many rows a flood causes."""

    def __init__(self, now: Callable[[], float], *, flush_rows: int = 4096):
        self.now = now
        self.flush_rows = flush_rows
        self._buf: list[tuple[float, str, dict[str, Any]]] = []
        self._hash = hashlib.sha256()
        self._counts: collections.Counter[str] = collections.Counter()
        self._written = 0
        self._file: IO[bytes] = tempfile.TemporaryFile()
        self.path: Path | None = None

    def __call__(self, event: str, **fields: Any) -> None:
        buf = self._buf
        buf.append((self.now(), event, fields))
        if len(buf) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Serialise, hash and write the buffered rows."""
        buf, self._buf = self._buf, []
        if not buf:
            return
        data = "".join([_JSON_LINE({"t": round(t, 9), "event": event, **fields}) + "\n"
                        for t, event, fields in buf]).encode()
        self._hash.update(data)
        self._file.write(data)
        self._counts.update(event for _, event, _ in buf)
        self._written += len(buf)

    def sync(self) -> None:
        """Everything logged so far on disk (before a checkpoint names how many rows there are)."""
        self.flush()
        self._file.flush()
        os.fsync(self._file.fileno())

    def replay(self, lines: list[str]) -> None:
        """Log rows as they were written by another log (a resumed server's first rows)."""
        for line in lines:
            row = json.loads(line)
            self._buf.append((row.pop("t"), row.pop("event"), row))
        self.flush()

    def stream_to(self, path: str | Path) -> None:
        """Write the log to ``path`` from now on (what was logged so far is copied there)."""
        self.flush()
        path = Path(path)
        f = open(path, "w+b")
        self._file.seek(0)
        shutil.copyfileobj(self._file, f)
        self._file.close()
        self._file, self.path = f, path

    @property
    def total(self) -> int:
        """Rows logged so far."""
        return self._written + len(self._buf)

    def lines(self) -> Iterator[str]:
        self.flush()
        self._file.flush()
        with open(self._file.fileno(), "rb", closefd=False) as f:
            f.seek(0)
            for line in f:
                yield line.decode().rstrip("\n")

    @property
    def rows(self) -> Iterator[tuple[float, str, dict[str, Any]]]:
        """The rows, read back from disk (times rounded to 1 ns, as written)."""
        for line in self.lines():
            row = json.loads(line)
            yield row.pop("t"), row.pop("event"), row

    def sha256(self) -> str:
        self.flush()
        return self._hash.hexdigest()

    def write(self, path: Path) -> None:
        self.flush()
        self._file.flush()
        if self.path is not None and self.path.resolve() == Path(path).resolve():
            return
        with open(path, "wb") as out, open(self._file.fileno(), "rb", closefd=False) as f:
            f.seek(0)
            shutil.copyfileobj(f, out)

    def count(self, event: str) -> int:
        self.flush()
        return self._counts[event]

    def close(self) -> None:
        self.flush()
        self._file.close()


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
