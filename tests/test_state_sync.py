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


# ---- the harness has teeth: a server that skips the base check is caught ----------------------------

from algorithms.laq import LAQ  # noqa: E402
from tests.statesync import Harness  # noqa: E402


class CarelessLAQ(LAQ):
    """LAQ whose server applies every innovation to whatever mirror it holds (no base or
    integrity check): what a versionless differential scheme does."""

    def _apply(self, comm, client, payload, r):
        meta = payload.meta
        if "skip" in meta:
            return
        base = self._zeros() if meta["reset"] or client not in self.mirror else self.mirror[client]
        from algorithms import quantizers as qz
        new = {n: qz.laq_dequantize(base[n], payload.tensors["radii"][i], payload.tensors[n], self.config.bits)
               for i, n in enumerate(self.layout)}
        self.mirror[client], self.tags[client] = new, meta["tag"]
        self.estimate[client], self.heard[client] = new, r


def _replay_scenario(method):
    # lazy off: every round uploads an innovation, so the replayed one is a real upload
    h = Harness(method, config={"bits": 3, "lazy": False}, replay=True)
    for _ in range(3):
        h.run_round()
    h.run_round(up=["replay"])      # client 0's round-2 innovation arrives again, re-stamped
    h.run_round()
    return h


def test_replayed_innovation_is_never_applied_to_the_wrong_base():
    h = _replay_scenario("laq")
    assert h.comm.violations == []
    assert h.comm.counters.get("stale_rejected", 0) >= 1
    assert h.settle() == []


def test_harness_catches_a_server_without_base_checks():
    h = _replay_scenario(CarelessLAQ)
    assert h.comm.violations, "the careless server should have diverged from client 0"
    assert {v.client for v in h.comm.violations} == {0}


def test_crashed_client_resynchronises_with_a_reset():
    h = Harness("laq", config={"bits": 4})
    h.run_round()
    h.run_round()
    h.crash(1)
    h.run_round()
    assert h.comm.counters.get("resets", 0) == 3 + 1   # three first contacts, one after the crash
    assert h.settle() == []
    assert h.comm.violations == []
