"""Error types of the runtime. Each names what was wrong so a user can fix it."""
from __future__ import annotations

from typing import Any


class ScenarioError(ValueError):
    """A bad scenario: names the dotted key, the value, and (when known) the file line."""

    def __init__(self, key: str, value: Any, reason: str, line: int | None = None, source: str | None = None):
        self.key, self.value, self.reason, self.line, self.source = key, value, reason, line, source
        where = ""
        if source:
            where = f"{source}:{line}: " if line else f"{source}: "
        super().__init__(f"{where}{key} = {value!r}: {reason}")


class DataError(RuntimeError):
    """A data set that cannot be loaded (missing files, with how to get them)."""


class DeployError(RuntimeError):
    """A deployment that cannot go on: a missing key, an address in use, a refused hello,
    a server that never answers. The message is one line for the user; ``exit_code`` is 2
    for a usage mistake (bad argument or file) and 1 for a failure at run time."""

    def __init__(self, message: str, exit_code: int = 1):
        self.exit_code = exit_code
        super().__init__(message)
