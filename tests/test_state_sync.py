"""State synchronisation of every stateful method under loss, duplication, reordering,
corruption, replays and crashes (the harness lives in tests/statesync.py)."""
import pytest

from algorithms import get_algorithm
from tests.statesync import Harness, state_sync_machine, stateful_methods

# Settings that keep each method's machine small and fast; unknown methods use defaults.
CONFIGS = {
    "qrr": {"rank_fraction": 0.5, "bits": 4},
    "powersgd": {"rank": 2},
    "lqsgd": {"rank": 2, "bits": 6},
    "laq": {"bits": 3},
    "slaq": {"bits": 2},
}
# Methods owned elsewhere: used only while their class declares no ``statesync_config``.
FALLBACK = {"fedlrt": {"rank": 2}, "fedloru": {"rank": 2}}
# Methods whose own protocol must survive replays that the version filter cannot catch.
REPLAY_SAFE = {"laq", "slaq", "qrr", "powersgd", "lqsgd"}

for _name in stateful_methods():
    globals()[f"TestStateSync_{_name}"] = state_sync_machine(
        _name, config=CONFIGS.get(_name, None if hasattr(get_algorithm(_name), "statesync_config")
                                  else FALLBACK.get(_name)), replay=_name in REPLAY_SAFE).TestCase

# QRR's Tucker path (4-D conv gradients) under the same faults.
TestStateSync_qrr_cnn = state_sync_machine("qrr", config={"rank_fraction": 0.5, "bits": 4}, model="cnn",
                                           replay=True, max_examples=8).TestCase


def test_stateful_methods_are_covered():
    assert {"laq", "slaq"} <= set(stateful_methods())
