"""State synchronisation of every stateful method through the real runtime (Simulation,
Node, codec, emulator, roles) under wire faults and process restarts; the harness lives in
tests/runtime_statesync.py. The fast algorithm-level machines stay in test_state_sync.py."""
import pytest
from hypothesis import HealthCheck, Phase, settings

from fedsim.node import Node
from tests.runtime_statesync import SETTLE, Runtime, runtime_machine, stateful_methods

for _name in stateful_methods():
    globals()[f"TestRuntimeStateSync_{_name}"] = runtime_machine(_name).TestCase


def test_every_stateful_method_is_covered():
    assert {"laq", "slaq", "powersgd", "lqsgd", "qrr", "topk", "fedlrt", "fedloru"} <= set(stateful_methods())


def _suppression_keyed_by_client_alone(monkeypatch):
    """Duplicate suppression keyed by client alone (not by the sender's connection and
    session): a restarted process's ids, from 1 again, are taken for replays of its
    predecessor's."""
    deliver = Node._deliver

    def by_client(self, peer, *args, **kwargs):
        return deliver(self, b"any" if self.is_server else peer, *args, **kwargs)
    monkeypatch.setattr(Node, "_deliver", by_client)


def test_restart_lockout_is_caught_by_the_machine(monkeypatch):
    """With suppression keyed by client alone, the machine fails: the server throws away
    the restarted clients' fresh replies as duplicates."""
    _suppression_keyed_by_client_alone(monkeypatch)
    machine = runtime_machine("laq", max_examples=30)
    machine.TestCase.settings = settings(machine.TestCase.settings, max_examples=30, print_blob=False,
                                         phases=[Phase.generate], derandomize=True, database=None,
                                         suppress_health_check=list(HealthCheck))
    with pytest.raises(Exception) as info:
        machine.TestCase().runTest()
    messages = _messages(info.value)
    assert any("duplicate" in m or "did not contribute" in m or "out of sync" in m for m in messages), messages


def _messages(exc: BaseException) -> list[str]:
    inner = getattr(exc, "exceptions", None)  # hypothesis reports distinct failures as a group
    return [m for e in inner for m in _messages(e)] if inner else [f"{type(exc).__name__}: {exc}"]


def test_restart_lockout_scripted(monkeypatch):
    """The same failure, scripted: two rounds, a client process restart, two clean rounds.
    Correct suppression: no duplicate, everyone contributes at once and is in sync after
    SETTLE rounds. Keyed by client alone: the restarted clients' first replies are thrown
    away as duplicates and their state never agrees with the server's again."""
    def script():
        rt = Runtime("laq")
        try:
            rt.run_round()
            rt.run_round()
            rt.restart_clients()
            rt.run_round()
            first = sorted(rt.gained)
            for _ in range(SETTLE - 1):
                rt.run_round()
            return rt.sim.stats.counters.get("duplicate", 0), first, rt.out_of_sync()
        finally:
            rt.close()
    assert script() == (0, [0, 1, 2], [])
    _suppression_keyed_by_client_alone(monkeypatch)
    duplicates, first, lagging = script()
    assert duplicates > 0 and first == [] and lagging == [0, 1, 2]
