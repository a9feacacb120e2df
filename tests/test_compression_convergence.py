"""Every compression method learns the digits task through the in-memory runtime, and the
compressed ones upload far fewer bits than SGD."""
import pytest

from tests.statesync import train

ROUNDS = 60
CONFIGS = {
    "sgd": {"lr": 0.5},
    "laq": {"lr": 0.5, "bits": 4},
    "slaq": {"lr": 0.5, "bits": 3},
    "qrr": {"lr": 0.5, "bits": 8, "rank_fraction": 0.3},
    "powersgd": {"lr": 0.5, "rank": 2},
    "lqsgd": {"lr": 0.5, "rank": 2, "bits": 8},
}
# Upload budget relative to SGD (bits): what each method's formula promises on this model.
MAX_RATIO = {"laq": 0.15, "slaq": 0.15, "qrr": 0.15, "powersgd": 0.2, "lqsgd": 0.06}


@pytest.fixture(scope="module")
def sgd_run():
    return train("sgd", CONFIGS["sgd"], ROUNDS)


@pytest.mark.parametrize("method", ["laq", "slaq", "qrr", "powersgd", "lqsgd"])
def test_learns_with_fewer_bits(method, sgd_run):
    before, after, bits, comm, _ = train(method, CONFIGS[method], ROUNDS)
    _, sgd_after, sgd_bits, _, _ = sgd_run
    assert before < 0.2
    assert after > 0.75, f"{method}: accuracy {after:.3f} after {ROUNDS} rounds (sgd {sgd_after:.3f})"
    assert after > sgd_after - 0.1
    assert bits < MAX_RATIO[method] * sgd_bits, f"{method}: {bits / sgd_bits:.3f} of sgd's uplink bits"
    assert comm.counters.get("rejected", 0) == 0 and comm.counters.get("stale_rejected", 0) == 0
