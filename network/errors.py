"""The one error type of the network package: a bad network setting, named precisely."""
from __future__ import annotations

from typing import Any


class NetworkConfigError(ValueError):
    """A bad network setting.

    ``key`` is the dotted scenario key (``"network.uplink"``, ``"events[2].clients"``),
    ``value`` the offending value as written, ``reason`` what is wrong with it. The runtime
    may re-raise it as its own scenario error with the file line added.
    """

    def __init__(self, key: str, value: Any, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key} = {value!r}: {reason}")
