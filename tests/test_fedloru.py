"""FedLoRU: accuracy and bits against FedAvg, the bits formula, merges and state sync, pFedLoRU, config."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algorithms import ConfigError, get_algorithm
from algorithms.fedloru import FedLoRU
from tests.fakes import LocalComm
from tests.lowrank_fixtures import RecordingComm, contexts, digits, drive, fedavg_digits, run_digits


ROUNDS, LR = 60, 0.5


def test_digits_accuracy_near_fedavg_with_4x_fewer_upload_bits():
    fedavg_acc, fedavg_bits = fedavg_digits(ROUNDS, LR)
    # FedAvg's own step: the fresh modules take full steps along their random subspace
    # (init_modules), so FedLoRU's lr means what FedAvg's does (1.0 diverges for both).
    # The project's variant (subspace init, preconditioned steps): the official one is below.
    acc, bits, alg = run_digits(FedLoRU, ROUNDS, lr=LR, rank=5, merge_every=2, local_steps=10,
                                keep_last_dense=False, init="subspace", local_step="preconditioned")
    print(f"fedavg {fedavg_acc:.3f} {fedavg_bits} bits; fedloru {acc:.3f} {bits} bits: "
          f"gap {fedavg_acc - acc:+.3f}, upload ratio {fedavg_bits / bits:.2f}")
    assert alg.base_version == ROUNDS // 2
    # Per client and round: 32·[5·(64+64) + 5·(10+64) + 74] bits against FedAvg's 32·4810.
    assert fedavg_bits / bits >= 4.4
    assert fedavg_acc - acc <= 0.02  # measured 0.010 (0.035 at lr 1.0 with LoRA's initialisation)


# --------------------------------------------------------------------------- bits formula

def _module_values(alg: FedLoRU) -> int:
    return sum(alg.config.rank * (n + m) for n, m in alg.shapes.values())


def test_bits_per_round_and_direction_match_docstring_formula():
    data = digits()
    model = data.model()
    alg = FedLoRU(FedLoRU.Config(lr=0.5, rank=3, merge_every=2, local_steps=2), model)
    ctxs = contexts(model, data.x_train, data.y_train, data.parts[:3])
    comm = RecordingComm(alg, ctxs)
    D = sum(alg.params[k].numel() for k in alg.dense_names)
    modules = _module_values(alg)
    full_base = sum(n * m for n, m in alg.shapes.values())

    def crash(r):
        if r == 2:
            ctxs[1].state.clear()  # lost its base: resync with a full base in round 3
    drive(alg, comm, 5, crash)
    # round: client -> extra downlink values beyond modules and dense parameters
    extra = {0: {0: full_base, 1: full_base, 2: full_base},       # nobody holds a base yet
             1: {0: 0, 1: 0, 2: 0},
             2: {0: modules, 1: modules, 2: modules},             # merged after round 1: factors
             3: {0: 0, 2: 0},                                       # client 1: below
             4: {0: modules, 1: modules, 2: modules}}             # merged after round 3
    for s in comm.sent:
        assert s.payload.payload_bits == 8 * s.payload.tensor_bytes
        if s.direction == "up":  # a resync reply carries nothing
            resync = s.payload.meta.get("resync", False)
            assert s.payload.payload_bits == (0 if resync else 32 * (modules + D))
    down = [(s.round, s.client, s.payload.payload_bits) for s in comm.sent if s.direction == "down"]
    for r, clients in extra.items():
        for c, values in clients.items():
            assert (r, c, 32 * (modules + D + values)) in down, (r, c)
    # Client 1 in round 3: the plain message (it is believed current), then the full base.
    assert [b for r, c, b in down if (r, c) == (3, 1)] == [32 * (modules + D), 32 * (modules + D + full_base)]
    assert comm.counters == {"fedloru_resync": 1}
    assert len([s for s in comm.sent if s.direction == "up" and not s.payload.meta.get("resync")]) == 15


# --------------------------------------------------------------------------- merges and state sync

def _assert_invariants(alg: FedLoRU, initial: dict, merged: dict, ctxs, trained: set[int]):
    # The server's base is the initial weights plus the sum of merged updates, in order.
    for k in alg.factorised:
        assert torch.equal(alg.base[k], merged[k]), k
    model = alg.model_params()
    for k in alg.factorised:
        assert torch.equal(model[k], alg.base[k] + alg.B[k] @ alg.A[k])
    for c in trained:
        assert alg.client_digest(ctxs[c].state) == alg.server_digest(c), c


@settings(max_examples=25, deadline=None)
@given(tau=st.integers(1, 4),
       plan=st.lists(st.tuples(st.sets(st.integers(0, 3), min_size=1),      # participants
                               st.sets(st.integers(0, 3)),                    # replies dropped
                               st.sets(st.integers(0, 3)),                    # replies duplicated
                               st.sets(st.integers(0, 3))),                   # crashed before the round
                     min_size=1, max_size=8))
def test_server_base_is_initial_plus_merged_updates_under_faults(tau, plan):
    data = digits()
    model = data.model()
    alg = FedLoRU(FedLoRU.Config(lr=0.5, rank=2, merge_every=tau, local_steps=1, batch_size=16), model)
    ctxs = contexts(model, data.x_train, data.y_train, data.parts[:4])
    initial = {k: alg.base[k].clone() for k in alg.factorised}
    merged = dict(initial)
    state = {}

    def fault(kind, client, payload):
        if client in state["drop"]:
            return []
        return [payload, payload] if client in state["dup"] else [payload]

    comm = LocalComm(alg, ctxs, fault=fault)
    for r, (participants, drop, dup, crash) in enumerate(plan):
        state.update(drop=drop, dup=dup)
        for c in crash:
            ctxs[c].state.clear()
        comm.round, comm.participants = r, sorted(participants)
        before = alg.base_version
        drive_one(alg, comm)
        if alg.base_version != before:
            B_A = alg.last_merge
            merged = {k: merged[k] + B_A[k][0] @ B_A[k][1] for k in alg.factorised}
        # Every participant received a message naming the current base and synced to it
        # (a crashed one through the in-round full resend), whether its reply arrived or not.
        synced = {c for c in participants if ctxs[c].state.get("shared", {}).get("base_version") is not None}
        _assert_invariants(alg, initial, merged, ctxs, synced)
        assert alg.base_version == (r + 1) // tau
    assert comm.counters.get("fedloru_resync", 0) <= sum(len(p[3]) for p in plan)


def drive_one(alg, comm):
    import asyncio
    asyncio.run(alg.server_round(comm))


def test_client_with_an_unknown_base_never_trains_on_it():
    # A client whose base is older than the server believes (e.g. a lost downlink) replies
    # resync without training; the server resends the full base in the same round.
    data = digits()
    model = data.model()
    alg = FedLoRU(FedLoRU.Config(lr=0.5, rank=2, merge_every=1, local_steps=1), model)
    ctxs = contexts(model, data.x_train, data.y_train, data.parts[:2])
    comm = LocalComm(alg, ctxs)
    drive(alg, comm, 2)
    old = dict(ctxs[1].state["shared"])
    drive(alg, comm, 2)
    ctxs[1].state["shared"] = old            # two merges behind, server thinks it is current
    charged = ctxs[1].charged
    comm.round = 4
    drive_one(alg, comm)
    assert comm.counters["fedloru_resync"] == 1
    assert ctxs[1].state["shared"]["base_version"] == alg.base_version - 1  # this round merged after training
    assert ctxs[1].charged - charged == alg.config.local_steps * alg.config.batch_size  # trained once, on the resent base
    assert alg.client_digest(ctxs[1].state) == alg.server_digest(1)


def test_stale_reply_is_rejected_and_counted():
    data = digits()
    model = data.model()
    saved = {}

    def late(kind, client, payload):
        out = [payload] + ([saved["reply"]] if client == 0 and "reply" in saved else [])
        if client == 0:
            saved["reply"] = payload
        return out
    results = []
    for fault in (late, None):
        alg = FedLoRU(FedLoRU.Config(lr=0.5, rank=2, merge_every=2, local_steps=2), data.model())
        comm = LocalComm(alg, contexts(model, data.x_train, data.y_train, data.parts[:2]), fault=fault)
        drive(alg, comm, 3)
        results.append((alg.model_params(), comm.counters))
    (faulty, counters), (clean, _) = results
    assert counters == {"stale_rejected": 2}
    assert all(torch.equal(faulty[k], clean[k]) for k in clean)


# --------------------------------------------------------------------------- pFedLoRU

def test_personalised_modules_fit_skewed_clients_better_and_stay_local():
    data = digits(clients=6, partition="dirichlet", alpha=0.1)
    model = data.model()
    alg = FedLoRU(FedLoRU.Config(lr=0.2, rank=4, merge_every=2, local_steps=5, personal_rank=4,
                                 init="subspace", local_step="preconditioned"), model)
    ctxs = contexts(model, data.x_train, data.y_train, data.parts)
    comm = RecordingComm(alg, ctxs)
    drive(alg, comm, 12)
    from torch.func import functional_call

    def local_acc(params, ctx):
        with torch.no_grad():
            return float((functional_call(model, params, (ctx.x,)).argmax(1) == ctx.y).float().mean())
    glob = sum(local_acc(alg.model_params(), ctx) for ctx in ctxs.values()) / len(ctxs)
    pers = sum(local_acc(alg.personal_params(ctx.state), ctx) for ctx in ctxs.values()) / len(ctxs)
    print(f"pFedLoRU mean local accuracy: global model {glob:.3f}, personalised {pers:.3f}")
    assert pers >= 0.6 and pers > glob + 0.3  # measured: 0.78 against 0.13
    assert comm.counters == {}
    # Personal modules never travel.
    assert not any(name.endswith((".Ap", ".Bp")) for s in comm.sent for name in s.payload.tensors)


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("values, key", [
    ({"rank": 0}, "rank"),
    ({"rank": 65}, "rank"),
    ({"rank": 11, "keep_last_dense": False}, "rank"),  # the 10x64 head: checked when the model is known
    ({"merge_every": 0}, "merge_every"),
    ({"merge_every": -3}, "merge_every"),
    ({"local_steps": 0}, "local_steps"),
    ({"personal_rank": -1}, "personal_rank"),
    ({"personal_rank": 12, "rank": 4, "keep_last_dense": False}, "personal_rank"),
    ({"loss": "hinge"}, "loss"),
    ({"tolerance": 0.1}, "tolerance"),  # FeDLRT's key: unknown here
    ({"damping": -0.1}, "damping"),
])
def test_bad_configuration_is_a_clear_config_error(values, key):
    cls = get_algorithm("fedloru")
    with pytest.raises(ConfigError) as err:
        cls(cls.make_config(values), digits().model())
    assert err.value.key == key
    assert f"algorithm.{key}" in str(err.value)


# --------------------------------------------------------------------------- modules

@pytest.mark.parametrize("n, m", [(4, 9), (9, 4), (5, 5)])
def test_fresh_modules_put_the_random_subspace_on_the_smaller_side(n, m):
    from algorithms.fedloru import init_modules
    A, B = init_modules({"w": (n, m)}, 3, torch.Generator().manual_seed(0))
    a, b = A["w"], B["w"]
    assert a.shape == (3, m) and b.shape == (n, 3)
    assert torch.equal(b @ a, torch.zeros(n, m))       # a restart leaves W unchanged
    random, zero = (b.T, a) if n <= m else (a, b)       # random: 3 orthonormal vectors of length min(n, m)
    assert random.shape == (3, min(n, m)) and not zero.any()
    assert torch.allclose(random @ random.T, torch.eye(3), atol=1e-6)


def test_defaults_keep_the_head_dense_and_scale_the_factor_steps():
    cfg = FedLoRU.Config()
    assert cfg.keep_last_dense and cfg.damping > 0
    alg = FedLoRU(cfg, digits().model())
    assert alg.factorised == ["1.weight"]


# --------------------------------------------------------------------------- official semantics

def test_official_init_zero_base_kaiming_factors_and_merge_reinit():
    cfg = FedLoRU.Config(rank=4, alpha=8, merge_every=1, local_steps=2, lr=0.1)
    assert (cfg.init, cfg.local_step, cfg.momentum, cfg.weight_decay, cfg.max_grad_norm) == (
        "official", "official", 0.9, 1e-4, 0.1)
    data = digits()
    model = data.model()
    alg = FedLoRU(cfg, model)
    assert alg.scale == 2.0
    k = alg.factorised[0]
    n, m = alg.shapes[k]
    assert not alg.base[k].any() and not alg.dense[k.replace("weight", "bias")].any()  # zeroed from scratch
    # both factors Kaiming-uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)), fan_in m for A (down), r for B (up)
    assert alg.A[k].abs().max() <= m ** -0.5 and alg.B[k].abs().max() <= 4 ** -0.5
    assert alg.A[k].std() > 0.4 * m ** -0.5 and alg.B[k].std() > 0.4 * 4 ** -0.5
    assert torch.allclose(alg.model_params()[k], 2.0 * alg.B[k] @ alg.A[k])
    drive(alg, RecordingComm(alg, contexts(model, data.x_train, data.y_train, data.parts[:2])), 1)
    # merged and re-initialised: up (B) zero, down (A) Kaiming again, W = the merged base
    assert alg.base_version == 1 and not alg.B[k].any() and alg.A[k].abs().max() <= m ** -0.5
    assert torch.equal(alg.model_params()[k], alg.base[k]) and alg.base[k].any()


def test_conv_layers_are_wrapped_as_down_kxk_and_up_1x1():
    from torch import nn
    from algorithms.fedloru import merge
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    alg = FedLoRU(FedLoRU.Config(rank=4), model)
    assert alg.factorised == ["0.weight"] and alg.shapes["0.weight"] == (16, 27)
    A, B = alg.A["0.weight"], alg.B["0.weight"]
    base = torch.randn(16, 3, 3, 3)
    x = torch.randn(2, 3, 4, 4)
    composed = torch.nn.functional.conv2d(x, merge(base, B, A, 0.5), padding=1)
    down = torch.nn.functional.conv2d(x, A.reshape(4, 3, 3, 3), padding=1)       # k x k conv in -> r
    up = torch.nn.functional.conv2d(down, B.reshape(16, 4, 1, 1))                 # 1 x 1 conv r -> out
    assert torch.allclose(composed, torch.nn.functional.conv2d(x, base, padding=1) + 0.5 * up, atol=1e-5)


def test_official_local_optimizer_trains_digits():
    # The clipping at norm 0.1 bounds every step: a larger lr than the official CLI's 0.1
    # trains these few rounds (measured: 0.38 at lr 0.1, 0.93 at lr 0.5 after 30 rounds).
    acc, _, alg = run_digits(FedLoRU, 30, lr=0.5, rank=5, merge_every=2, local_steps=10, keep_last_dense=False)
    assert alg.config.local_step == "official" and alg.base_version == 15
    assert acc > 0.85
