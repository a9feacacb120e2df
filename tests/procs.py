"""Real processes for deployment tests: ``fedsim`` subcommands with their output watched,
bounded waits on what they print (no fixed sleeps), and reaping on the way out."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fedsim:
    """One ``python -m fedsim.cli ...`` process; its stdout and stderr lines are collected
    by a reader thread and can be awaited with :meth:`wait_for`."""

    def __init__(self, *args: str, prefix: list[str] | None = None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.args = args
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "fedsim.cli", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first line matching ``pattern`` (searched from the start); fails after
        ``timeout`` seconds or when the process ends without printing it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout}s from "
                                         f"fedsim {' '.join(self.args)}:\n{self.output}")
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"fedsim {' '.join(self.args)} still running after {timeout}s:\n{self.output}")
        self._reader.join(5)
        return rc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)
            self._reader.join(5)

    def __enter__(self) -> "Fedsim":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def reap(*procs: Fedsim) -> None:
    for p in procs:
        p.kill()
