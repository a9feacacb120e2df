"""FeDLRT: convergence and rank adaptation, loss descent, accuracy and bits, state sync, config."""
from __future__ import annotations

import asyncio

import pytest
import torch

from algorithms import ConfigError, get_algorithm
from algorithms.fedlrt import FeDLRT
from tests.fakes import LocalComm
from tests.lowrank_fixtures import (RecordingComm, contexts, digits, drive, fedavg_digits, regression,
                                    run_digits)



def _regression_run(partition: str, rank: int, rounds: int, *, lr_scale: float = 1.0,
                    correction: str = "full", steps: int = 5):
    data = regression(partition)
    model = data.model()
    lr = lr_scale / (data.smoothness() * steps)
    cfg = FeDLRT.Config(lr=lr, rank=rank, tolerance=0.01, local_steps=steps, variance_correction=correction,
                        batch_size=0, loss="mse", keep_last_dense=False)
    alg = FeDLRT(cfg, model)
    comm = RecordingComm(alg, contexts(model, data.x, data.y, data.parts))
    losses = [data.loss(model, alg.model_params())]
    ranks = []

    def after(_):
        losses.append(data.loss(model, alg.model_params()))
        ranks.append(alg.ranks["0.weight"])
    drive(alg, comm, rounds, after)
    return alg, comm, losses, ranks


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
@pytest.mark.parametrize("initial_rank", [2, 8])
def test_regression_converges_and_rank_settles_at_true_rank(partition, initial_rank):
    # W* has rank 4; from rank 2 the rank must grow, from rank 8 it must shrink.
    _, comm, losses, ranks = _regression_run(partition, initial_rank, rounds=60)
    assert losses[-1] / losses[0] < 1e-3
    assert ranks[-10:] == [4] * 10
    assert comm.counters == {}


def test_global_loss_never_increases_with_variance_correction():
    # Skewed clients, full variance correction, step λ = 1/(12 L s) with L the largest
    # client smoothness constant. The constant 12 is the project's own choice: the paper's
    # descent theorem has a step bound of the form λ ≲ 1/(L s), but its exact statement
    # could not be read from here (see algorithms/fedlrt.py), so this bound is not quoted
    # from it.
    _, _, losses, _ = _regression_run("dirichlet", 2, rounds=100, lr_scale=1 / 12)
    increases = [(t, a, b) for t, (a, b) in enumerate(zip(losses, losses[1:])) if b > a]
    assert increases == []
    assert losses[-1] / losses[0] < 0.2


def test_default_is_variance_corrected_and_reduces_loss_on_dirichlet_clients():
    """Dirichlet(0.1) clients (the fixture's skew), 10 local steps at λ s = 5 / L (beyond the
    descent bound, where client drift shows): the default correction ends at a lower global
    loss than ``none`` after the same rounds (measured, 5 rounds: 3.1e-3 of the initial loss
    with ``full``, 4.0e-3 with ``simplified``, 4.9e-3 with ``none``)."""
    default = FeDLRT.Config().variance_correction
    assert default != "none"
    _, _, corrected, _ = _regression_run("dirichlet", 4, rounds=5, lr_scale=5.0, correction=default, steps=10)
    _, _, plain, _ = _regression_run("dirichlet", 4, rounds=5, lr_scale=5.0, correction="none", steps=10)
    assert corrected[-1] < 0.8 * plain[-1]


@pytest.mark.parametrize("correction", ["simplified", "none"])
def test_other_variance_corrections_converge(correction):
    _, _, losses, ranks = _regression_run("iid", 2, rounds=40, correction=correction)
    assert losses[-1] / losses[0] < 1e-3
    assert ranks[-1] == 4


# --------------------------------------------------------------------------- digits vs FedAvg

ROUNDS, LR = 60, 0.5


def test_digits_adaptive_rank_matches_fedavg_with_fewer_upload_bits():
    fedavg_acc, fedavg_bits = fedavg_digits(ROUNDS, LR)
    acc, bits, alg = run_digits(FeDLRT, ROUNDS, lr=LR, rank=8, tolerance=0.1, local_steps=5,
                                variance_correction="none", keep_last_dense=False)
    print(f"fedavg {fedavg_acc:.3f} {fedavg_bits} bits; fedlrt {acc:.3f} {bits} bits ranks {alg.ranks}: "
          f"gap {fedavg_acc - acc:+.3f}, upload ratio {fedavg_bits / bits:.2f}")
    assert fedavg_acc > 0.95
    assert fedavg_acc - acc <= 0.02
    # 64x64 and 10x64 layers: basis gradients alone cost 2·64·r per layer and round, so the
    # upload ratio at the ranks this accuracy needs is about 2, not 5 (see the report).
    assert fedavg_bits / bits >= 1.8


def test_digits_rank_capped_at_4_uploads_5x_less_than_fedavg():
    fedavg_acc, fedavg_bits = fedavg_digits(ROUNDS, LR)
    acc, bits, alg = run_digits(FeDLRT, ROUNDS, lr=LR, rank=4, max_rank=4, tolerance=0.1, local_steps=5,
                                variance_correction="none", keep_last_dense=False)
    print(f"fedavg {fedavg_acc:.3f}; fedlrt rank<=4 {acc:.3f}: gap {fedavg_acc - acc:+.3f}, "
          f"upload ratio {fedavg_bits / bits:.2f}")
    assert alg.ranks == {"1.weight": 4, "3.weight": 4}
    assert fedavg_bits / bits >= 4.7
    assert acc >= 0.8  # it learns, but the rank-4 cap costs accuracy on this small MLP


# --------------------------------------------------------------------------- bits formula

def _formula(alg: FeDLRT, ranks: dict[str, int], correction: str) -> dict[tuple[str, str], int]:
    """The module docstring's bits per client, from layer sizes and the round's start ranks."""
    D = sum(alg.params[k].numel() for k in alg.dense_names)
    basis = grads = aug = coef = r2 = 0
    for k, r in ranks.items():
        n, m = alg.params[k].shape
        kU, kV = min(r, n - r), min(r, m - r)
        basis += n * r + r * r + m * r
        grads += n * r + m * r
        aug += n * kU + m * kV
        coef += (r + kU) * (r + kV)
        r2 += r * r
    out = {("down", "basis"): 32 * (basis + D), ("up", "basis"): 32 * grads, ("down", "augment"): 32 * aug}
    if correction == "simplified":
        out[("up", "basis")] += 32 * (r2 + D)
        out[("down", "augment")] += 32 * (r2 + D)
    if correction == "full":
        out[("up", "augment")] = 32 * (coef + D)       # coefficient gradients
        out[("down", "correction")] = 32 * (coef + D)
        out[("up", "correction")] = 32 * (coef + D)    # coefficients
    else:
        out[("up", "augment")] = 32 * (coef + D)       # coefficients
    return out


@pytest.mark.parametrize("correction", ["full", "simplified", "none"])
def test_bits_per_round_and_direction_match_docstring_formula(correction):
    data = digits()
    model = data.model()
    alg = FeDLRT(FeDLRT.Config(lr=0.5, rank=3, tolerance=0.05, local_steps=2, variance_correction=correction,
                                keep_last_dense=False), model)
    comm = RecordingComm(alg, contexts(model, data.x_train, data.y_train, data.parts[:3]))
    ranks_at_start = {}

    async def go():
        for r in range(4):
            comm.round = r
            ranks_at_start[r] = dict(alg.ranks)
            await alg.server_round(comm)
    asyncio.run(go())
    assert len({tuple(v.values()) for v in ranks_at_start.values()}) > 1, "ranks should change across rounds"
    for r in range(4):
        expected = _formula(alg, ranks_at_start[r], correction)
        seen = {}
        for s in comm.sent:
            if s.round != r:
                continue
            # Every value on the wire is a float32: the formula is the payload's real size.
            assert s.payload.payload_bits == 8 * s.payload.tensor_bytes
            assert all(t.dtype == torch.float32 for t in s.payload.tensors.values())
            seen.setdefault((s.direction, s.kind), set()).add(s.payload.payload_bits)
        assert seen == {key: {bits} for key, bits in expected.items()}, f"round {r}"


# --------------------------------------------------------------------------- state sync

def _small(correction="full", clients=3, **kw):
    kw.setdefault("keep_last_dense", False)
    data = digits()
    model = data.model()
    alg = FeDLRT(FeDLRT.Config(lr=0.5, rank=3, tolerance=0.05, local_steps=2, variance_correction=correction, **kw),
                 model)
    return alg, contexts(model, data.x_train, data.y_train, data.parts[:clients])


class _Spy:
    """Wraps client handlers: records (basis version held, message version) whenever a client
    returns coefficients or coefficient gradients, i.e. whenever it trained or differentiated."""

    def __init__(self, alg: FeDLRT):
        self.trained: list[tuple[int, int, int]] = []
        original = alg.client_handlers

        def handlers():
            table = dict(original())
            for kind in ("augment", "correction"):
                table[kind] = self._wrap(table[kind])
            return table
        alg.client_handlers = handlers

    def _wrap(self, handler):
        def wrapped(ctx, payload):
            reply = handler(ctx, payload)
            if reply is not None and reply.tensors:
                self.trained.append((ctx.client_id, ctx.state["shared"]["version"], payload.version))
            return reply
        return wrapped


@pytest.mark.parametrize("correction", ["full", "simplified", "none"])
def test_stale_reply_from_previous_round_is_rejected_counted_and_ignored(correction):
    # Run A: client 1's coefficient reply of round r is also delivered again in round r+1
    # (a late duplicate). Run B: no fault. The server must reject it and end up identical.
    final_kind = "correction" if correction == "full" else "augment"
    saved = {}

    def late(kind, client, payload):
        out = [payload]
        if client == 1 and kind == final_kind:
            if "reply" in saved:
                out.append(saved["reply"])
            saved["reply"] = payload
        return out

    results = []
    for fault in (late, None):
        alg, ctxs = _small(correction)
        comm = LocalComm(alg, ctxs, fault=fault)
        drive(alg, comm, 3)
        results.append((alg.model_params(), comm.counters))
    (faulty, counters), (clean, clean_counters) = results
    assert counters.get("stale_rejected") == 2 and clean_counters == {}
    assert all(torch.equal(faulty[k], clean[k]) for k in clean)


def test_client_never_trains_on_another_basis_version():
    alg, ctxs = _small("full", clients=4)
    spy = _Spy(alg)

    def crash_and_rewind(kind, client, payload):
        # Client 2 crashes after its basis gradients (state lost); client 3's state is
        # rewound to an older basis. Neither may train this round.
        if kind == "basis" and client == 2:
            ctxs[2].state.clear()
        if kind == "basis" and client == 3 and "old" in stash:
            ctxs[3].state["shared"] = stash["old"]
        if kind == "basis" and client == 3:
            stash.setdefault("old", dict(ctxs[3].state["shared"]))
        return [payload]
    stash = {}
    comm = LocalComm(alg, ctxs, fault=crash_and_rewind)
    drive(alg, comm, 3)
    assert spy.trained, "clients trained"
    assert all(held == sent for _, held, sent in spy.trained)
    trained_by = {c for c, _, _ in spy.trained}
    assert 2 not in trained_by and 0 in trained_by
    assert [c for c, _, v in spy.trained if c == 3 and v > 1] == []
    # Each refusal came back tagged with another version: rejected and counted, never applied.
    assert comm.counters["stale_rejected"] == 3 + 2


def test_digests_agree_after_every_round_and_differ_after_a_crash():
    alg, ctxs = _small("simplified", clients=3)
    comm = LocalComm(alg, ctxs)

    def check(_):
        for c, ctx in ctxs.items():
            assert alg.client_digest(ctx.state) == alg.server_digest(c)
    drive(alg, comm, 3, check)
    ctxs[0].state.clear()
    assert alg.client_digest(ctxs[0].state) != alg.server_digest(0)
    drive(alg, comm, 1, check)  # the next broadcast resynchronises it


def test_model_params_are_dense_and_low_rank():
    alg, _ = _small("none")
    params = alg.model_params()
    assert list(params) == [k for k, _ in alg.model.named_parameters()]
    assert all(params[k].shape == p.shape for k, p in alg.model.named_parameters())
    assert int(torch.linalg.matrix_rank(params["1.weight"])) == 3


def test_keep_last_dense_sends_the_head_as_deltas():
    data = digits()
    model = data.model()
    alg = FeDLRT(FeDLRT.Config(rank=3, keep_last_dense=True, local_steps=2), model)
    assert alg.factorised == ["1.weight"] and "3.weight" in alg.dense_names
    comm = LocalComm(alg, contexts(model, data.x_train, data.y_train, data.parts[:2]))
    before = alg.model_params()["3.weight"].clone()
    drive(alg, comm, 1)
    assert not torch.equal(alg.model_params()["3.weight"], before)


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("values, key", [
    ({"rank": 0}, "rank"),
    ({"rank": 65}, "rank"),          # hidden layer is 64x64
    ({"rank": 11, "keep_last_dense": False}, "rank"),  # head is 10x64: checked when the model is known
    ({"tolerance": 0.0}, "tolerance"),
    ({"tolerance": 1.0}, "tolerance"),
    ({"tolerance": -0.1}, "tolerance"),
    ({"local_steps": 0}, "local_steps"),
    ({"variance_correction": "partial"}, "variance_correction"),
    ({"max_rank": 2, "rank": 4}, "max_rank"),
    ({"loss": "hinge"}, "loss"),
    ({"batch_size": -1}, "batch_size"),
    ({"ranks": 3}, "ranks"),         # unknown key
])
def test_bad_configuration_is_a_clear_config_error(values, key):
    cls = get_algorithm("fedlrt")
    with pytest.raises(ConfigError) as err:
        cls(cls.make_config(values), digits().model())
    assert err.value.key == key
    assert f"algorithm.{key}" in str(err.value)


def test_rank_eleven_is_fine_when_the_head_stays_dense():
    alg = FeDLRT(FeDLRT.Config(rank=11, keep_last_dense=True), digits().model())
    assert alg.ranks == {"1.weight": 11}
