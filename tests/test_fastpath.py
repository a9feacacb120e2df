"""The lean client path (algorithms.fastpath, run.vectorise) against the autograd reference.

Unit level: gradients and local SGD of every model kind fedsim ships, and the low-rank
methods' factor gradients, agree with autograd to float rounding. Run level, one test per
method: a run with ``run.vectorise = true`` sends the same messages with the same bytes,
payload bits and counters at the same simulated times as with ``false``, and ends on the
same model to float tolerance.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from algorithms import algorithm_names, fastpath, shared_start
from algorithms.common import local_sgd, loss_and_grad
from algorithms.lowrank import loss_and_grads
from fedsim.models import ModelConfig, build_model
from fedsim.runner import run
from fedsim.scenario import load_scenario

MODELS = [
    ("logistic", ModelConfig(kind="logistic"), (20,)),
    ("mlp", ModelConfig(kind="mlp", hidden=[16, 8]), (1, 8, 8)),
    ("cnn", ModelConfig(kind="cnn", channels=[3, 4]), (1, 8, 8)),
]


def _both(model, fn):
    """fn() on the autograd path, then on the lean path."""
    out = []
    for on in (False, True):
        fastpath.set_enabled(model, on)
        out.append(fn())
    fastpath.set_enabled(model, True)
    return out


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("kind,cfg,shape", MODELS, ids=[m[0] for m in MODELS])
def test_lean_matches_autograd(kind, cfg, shape, monkeypatch):
    monkeypatch.setattr(fastpath, "CONV_ENABLED", True)  # off by default (slower here), still exact
    model = build_model(cfg, shape, 5, seed=3)
    assert fastpath.plan(model) is not None, f"{kind} is not covered by the lean path"
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(37, *shape, generator=g), torch.randint(0, 5, (37,), generator=g)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    (loss_a, grad_a), (loss_b, grad_b) = _both(model, lambda: loss_and_grad(model, params, x[:16], y[:16]))
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    _close(grad_a, grad_b)
    before = {k: v.clone() for k, v in params.items()}
    (w_a, seen_a), (w_b, seen_b) = _both(model, lambda: local_sgd(
        model, params, x, y, lr=0.3, epochs=2, batch_size=8, generator=torch.Generator().manual_seed(5)))
    assert seen_a == seen_b == 74
    _close(w_a, w_b)
    _close(params, before, tol=0)  # the caller's tensors are never touched


def test_lowrank_factor_gradients_match_autograd():
    model = build_model(ModelConfig(kind="mlp", hidden=[12]), (10,), 4, seed=1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 10, generator=g), torch.randint(0, 4, (9,), generator=g)
    p = dict(model.named_parameters())
    leaves = {"1.U": torch.randn(12, 3, generator=g), "1.S": torch.randn(3, 3, generator=g),
              "1.V": torch.randn(10, 3, generator=g), "1.bias": p["1.bias"].detach(),
              "3.weight": p["3.weight"].detach(), "3.bias": p["3.bias"].detach()}

    def build(t):
        return {"1.weight": t["1.U"] @ t["1.S"] @ t["1.V"].T, "1.bias": t["1.bias"],
                "3.weight": t["3.weight"], "3.bias": t["3.bias"] * 1.0}

    (la, ga), (lb, gb) = _both(model, lambda: loss_and_grads(model, build, leaves, x, y, "cross_entropy"))
    assert lb == pytest.approx(la, rel=1e-6)
    _close(ga, gb)


def test_uncovered_models_fall_back_to_autograd():
    odd = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    no_bias = nn.Sequential(nn.Linear(4, 2, bias=False))
    assert fastpath.plan(odd) is None and fastpath.plan(no_bias) is None
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    params = {k: v.detach().clone() for k, v in odd.named_parameters()}
    loss, grads = loss_and_grad(odd, params, x, y)
    assert set(grads) == set(params) and loss > 0


def test_disabled_model_takes_autograd():
    model = build_model(ModelConfig(kind="logistic"), (6,), 3, seed=1)
    fastpath.set_enabled(model, False)
    assert fastpath.plan(model) is None
    fastpath.set_enabled(model, True)
    assert isinstance(fastpath.plan(model), fastpath.DensePlan)


def _scenario(method: str, vectorise: bool):
    overrides = ["data.clients=4", "data.dataset=synthetic", "data.features=40", "data.samples=400",
                 "model.kind=mlp", "model.hidden=[32]", f"algorithm.name={method}", "run.rounds=3",
                 "run.target_accuracy=0.5", f"run.vectorise={str(vectorise).lower()}"]
    if method in ("fedlrt", "fedloru"):  # their default 188 local steps a round: fewer keep the test quick
        overrides += ["algorithm.local_steps=20"]
    return load_scenario(None, overrides)


def _observable(result):
    s = dict(result.summary)
    for key in ("wall_time_s", "model_sha256", "events_sha256", "final_accuracy", "final_loss", "time_to_target_s"):
        s.pop(key)
    events = [(t, e, {k: v for k, v in f.items() if k not in ("accuracy",)}) for t, e, f in result.events.rows]
    return s, events


@pytest.mark.parametrize("method", algorithm_names())
def test_run_is_unchanged_but_for_speed(method):
    plain = run(_scenario(method, False))
    lean = run(_scenario(method, True))
    assert _observable(lean) == _observable(plain)
    assert lean.summary["final_accuracy"] == pytest.approx(plain.summary["final_accuracy"], abs=0.01)
    # FeDLRT truncates by an SVD of the augmented coefficients each round, which turns rounding
    # in the last bits into slightly rotated bases: agreement there is to 1e-3, not 1e-4.
    _close(lean.final_params, plain.final_params, tol=1e-3 if method == "fedlrt" else 1e-4)
    again = run(_scenario(method, True))  # deterministic: same seed, same bytes
    assert again.summary["model_sha256"] == lean.summary["model_sha256"]
    assert again.summary["events_sha256"] == lean.summary["events_sha256"]


def test_vectorise_must_be_a_bool():
    from fedsim.errors import ScenarioError
    with pytest.raises(ScenarioError, match="run.vectorise"):
        load_scenario(None, ["run.vectorise=3"])


def test_truncated_svds_of_a_low_rank_gradient():
    from algorithms.common import exact_truncated_svd, randomized_svd
    g = torch.Generator().manual_seed(4)
    low = torch.randn(60, 8, generator=g) @ torch.randn(8, 90, generator=g)  # rank 8, like a batch-8 gradient
    full = torch.randn(60, 90, generator=g)
    for a in (low, full):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        rank = int((s > 1e-5 * s[0]).sum())
        for k in (5, 12):
            ue, se, vhe = exact_truncated_svd(a, k)
            torch.testing.assert_close(se, s[:k], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close((ue * se) @ vhe, (u[:, :k] * s[:k]) @ vh[:k], rtol=1e-4, atol=1e-4)
            # orthonormal singular vectors up to A's rank; beyond it (k = 12 > 8) they may be
            # zeros with zero singular values (the sketch's path, common._range_svd)
            j = min(k, rank)
            torch.testing.assert_close(ue[:, :j].T @ ue[:, :j], torch.eye(j), rtol=0, atol=1e-4)
            torch.testing.assert_close(vhe[:j] @ vhe[:j].T, torch.eye(j), rtol=0, atol=1e-4)
            for extra in range(j, k):
                norms = (float(ue[:, extra].norm()), float(vhe[extra].norm()))
                assert float(se[extra]) < 1e-4 and all(abs(x - 1) < 1e-4 or x == 0 for x in norms)
    # randomized: exact on a captured range, and the generator is drawn from the same either way
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ur, sr, vhr = randomized_svd(low, 10, g1)
    torch.testing.assert_close((ur * sr) @ vhr, low, rtol=1e-4, atol=1e-4)
    randomized_svd(full, 10, g2)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))


# --------------------------------------------------------------------------- many clients at once

@pytest.mark.parametrize("kind,cfg,shape", MODELS[:2], ids=[m[0] for m in MODELS[:2]])
def test_stacked_sgd_matches_one_client_at_a_time(kind, cfg, shape):
    """sgd_stacked = sgd_steps per client: same shuffles (from each client's generator), same
    steps, each client from its own start, to float rounding; an uneven last batch included."""
    torch.manual_seed(0)
    model = build_model(cfg, shape, 3, seed=1)
    plan = fastpath.plan(model)
    clients, n = 5, 23  # 23 samples, batch 8: steps of 8, 8, 7
    starts = [{k: v.detach() + 0.01 * i for k, v in model.named_parameters()} for i in range(clients)]
    xs = [torch.randn(n, *shape) for _ in range(clients)]
    ys = [torch.randint(0, 3, (n,)) for _ in range(clients)]
    stacked = fastpath.sgd_stacked(plan, starts, xs, ys, [torch.Generator().manual_seed(i) for i in range(clients)],
                                   epochs=2, batch_size=8, lr=0.1)
    for i in range(clients):
        one, seen = local_sgd(model, starts[i], xs[i], ys[i], lr=0.1, epochs=2, batch_size=8,
                              generator=torch.Generator().manual_seed(i))
        assert seen == 2 * n
        _close({k: stacked[i][k] for k in one}, one)


@pytest.mark.parametrize("hidden,epochs", [([], 2), ([16], 1), ([16, 8], 3)], ids=["logistic", "mlp", "mlp-3-epochs"])
@pytest.mark.parametrize("change", [False, True], ids=["trained", "change"])
def test_shared_start_sgd_matches_one_client_at_a_time(hidden, epochs, change):
    """The kernel form (the first layer never formed until the end) = local_sgd per client
    from the one start: same shuffles, steps and uneven last batch, to float rounding; with
    ``change`` the result is trained minus start."""
    torch.manual_seed(0)
    config = ModelConfig(kind="mlp", hidden=hidden) if hidden else ModelConfig(kind="logistic")
    model = build_model(config, (1, 8, 8), 3, seed=1)
    plan = fastpath.plan(model)
    clients, n = 5, 23  # batch 8: steps of 8, 8, 7 per epoch
    start = {k: v.detach() for k, v in model.named_parameters()}
    xs = [torch.randn(n, 1, 8, 8) for _ in range(clients)]
    ys = [torch.randint(0, 3, (n,)) for _ in range(clients)]
    kernel = shared_start.sgd(plan, start, xs, ys, [torch.Generator().manual_seed(i) for i in range(clients)],
                              epochs=epochs, batch_size=8, lr=0.1, change=change)
    for i in range(clients):
        one, _ = local_sgd(model, start, xs[i], ys[i], lr=0.1, epochs=epochs, batch_size=8,
                           generator=torch.Generator().manual_seed(i))
        if change:
            one = {k: v - start[k] for k, v in one.items()}
        assert float(max((one[k] - start[k]).abs().max() for k in one)) > 1e-3  # it trained
        _close({k: kernel[i][k] for k in one}, one)


def test_kernel_form_pays_for_large_first_layers_and_few_rows():
    wide = build_model(ModelConfig(kind="mlp", hidden=[200]), (784,), 10, seed=1)
    plan, params = fastpath.plan(wide), dict(wide.named_parameters())
    assert shared_start.pays(plan, params, rows=100, epochs=1, clients=100)  # the usual benchmark
    assert not shared_start.pays(plan, params, rows=100, epochs=1, clients=2)  # two copies stay in the cache
    assert not shared_start.pays(plan, params, rows=400, epochs=1, clients=100)  # the Gram blocks cost more
    assert not shared_start.pays(plan, params, rows=100, epochs=4, clients=100)
    assert not shared_start.pays(plan, params, rows=0, epochs=1, clients=100)


def test_clients_of_one_broadcast_train_in_kernel_form_and_change_nothing_observable(monkeypatch):
    """FedAvg clients that received the same model at one instant train with their first
    layer in kernel form (the cache budgets lowered so this small model qualifies and trains
    in chunks): the same messages, bytes, times and events as one at a time, the same model
    to float tolerance."""
    monkeypatch.setattr(shared_start, "STACK_MAX_FLOATS", 10_000)
    monkeypatch.setattr(shared_start, "CHUNK_MAX_FLOATS", 8 * 36 * 64)  # chunks of about 8 of the 40 clients
    groups: list[int] = []
    original = shared_start.sgd
    scenario = ["data.clients=40", "data.dataset=digits", "data.partition=iid", "model.kind=mlp",
                "model.hidden=[128]", "algorithm.name=fedavg", "algorithm.fedavg.local_epochs=2", "run.rounds=3"]
    monkeypatch.setattr(shared_start, "sgd", lambda plan, start, xs, *a, **k: (groups.append(len(xs)),
                                                                                original(plan, start, xs, *a, **k))[1])
    together = run(load_scenario(None, scenario + ["run.batch_clients=true"]))
    monkeypatch.setattr(shared_start, "sgd", original)
    alone = run(load_scenario(None, scenario + ["run.batch_clients=false"]))
    assert groups and max(groups) > 1 and len(groups) > 3  # several chunks a round
    assert _observable(together) == _observable(alone)
    _close(together.final_params, alone.final_params, tol=1e-4)


def test_shared_start_gradients_match_one_client_at_a_time():
    model = build_model(ModelConfig(kind="mlp", hidden=[16, 8]), (1, 8, 8), 3, seed=1)
    plan = fastpath.plan(model)
    start = {k: v.detach() for k, v in model.named_parameters()}
    xs = [torch.randn(6, 1, 8, 8) for _ in range(4)]
    ys = [torch.randint(0, 3, (6,)) for _ in range(4)]
    shared = shared_start.grads(plan, start, xs, ys)
    for i in range(4):
        _, one = loss_and_grad(model, start, xs[i], ys[i])
        _close({k: shared[i][k] for k in one}, one)
    first = plan.layers[0][0]
    assert not torch.allclose(shared[0][first], shared[1][first])  # each client's own


@pytest.mark.parametrize("method", ["sgd", "qrr", "powersgd"])
def test_gradient_steps_from_one_broadcast_share_a_pass_and_change_nothing_observable(method, monkeypatch):
    """The gradient step of clients that hold the same model (the cache budget lowered so this
    small model qualifies): one forward and backward pass through the shared weights, the
    same messages, bytes, times and events as one at a time, the same model to float tolerance."""
    monkeypatch.setattr(shared_start, "STACK_MAX_FLOATS", 10_000)
    groups: list[int] = []
    original = shared_start.grads
    monkeypatch.setattr(shared_start, "grads", lambda plan, start, xs, ys: (groups.append(len(xs)),
                                                                             original(plan, start, xs, ys))[1])
    scenario = ["data.clients=12", "data.dataset=digits", "data.partition=iid", "model.kind=mlp", "model.hidden=[16]",
                f"algorithm.name={method}", "run.rounds=4"]
    together = run(load_scenario(None, scenario + ["run.batch_clients=true"]))
    monkeypatch.setattr(shared_start, "grads", original)
    alone = run(load_scenario(None, scenario + ["run.batch_clients=false"]))
    assert groups and max(groups) > 1
    assert _observable(together) == _observable(alone)
    _close(together.final_params, alone.final_params, tol=1e-4)


def test_stackable_is_for_small_dense_models_only():
    small = build_model(ModelConfig(kind="mlp", hidden=[16]), (1, 8, 8), 10, seed=1)
    wide = build_model(ModelConfig(kind="mlp", hidden=[1000]), (784,), 10, seed=1)  # 795k weights
    assert fastpath.stackable(fastpath.plan(small), dict(small.named_parameters()))
    assert not fastpath.stackable(fastpath.plan(wide), dict(wide.named_parameters()))
    assert not fastpath.stackable(None, dict(small.named_parameters()))


def _batching_scenario(batch: bool, *extra: str):
    return load_scenario(None, ["data.clients=12", "data.dataset=digits",
                                "model.kind=mlp", "model.hidden=[16]", "algorithm.name=fedavg", "run.rounds=3",
                                "algorithm.fedavg.local_epochs=2", f"run.batch_clients={str(batch).lower()}", *extra])


@pytest.mark.parametrize("extra", [("data.partition=iid",),
                                   ("data.partition=dirichlet", "network.uplink=1Mbps", "network.downlink=5Mbps")],
                         ids=["iid", "dirichlet-slow-links"])
def test_clients_of_an_instant_computed_together_change_nothing_observable(extra, monkeypatch):
    """Clients trained together at the broadcast's instant (equal sizes: stacked; unequal
    sizes, Dirichlet: grouped by size): the same messages, bytes, times and events as one at
    a time; the same model to float tolerance; and the batch path really ran."""
    import fedsim.batching as batching
    flushed, stacked = [], []
    flush, sgd_stacked = batching.ComputeBatcher.flush, fastpath.sgd_stacked
    monkeypatch.setattr(batching.ComputeBatcher, "flush", lambda self: (flushed.append(len(self.jobs)), flush(self)))
    monkeypatch.setattr(fastpath, "sgd_stacked", lambda plan, starts, *a, **k: (stacked.append(len(starts)),
                                                                              sgd_stacked(plan, starts, *a, **k))[1])
    together = run(_batching_scenario(True, *extra))
    monkeypatch.undo()
    alone = run(_batching_scenario(False, *extra))
    assert flushed and max(flushed) > 1
    if "data.partition=iid" in extra:  # Dirichlet sizes all differ here: one client per size group
        assert stacked and max(stacked) > 1
    assert _observable(together) == _observable(alone)
    _close(together.final_params, alone.final_params, tol=1e-4)
    again = run(_batching_scenario(True, *extra))
    assert again.summary["model_sha256"] == together.summary["model_sha256"]


def _stacked_run_matches_alone(scenario: list[str], monkeypatch, module, name: str) -> list[int]:
    """Run ``scenario`` with the clients of an instant computed together, counting the group
    sizes that reach ``module.name`` (its first argument after the plan), then one at a time:
    the same messages, bytes, times and events, the same model to float tolerance. Returns
    the group sizes seen."""
    stacked: list[int] = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda plan, group, *a, **k: (stacked.append(len(group)),
                                                                    original(plan, group, *a, **k))[1])
    together = run(load_scenario(None, scenario + ["run.batch_clients=true"]))
    monkeypatch.undo()
    alone = run(load_scenario(None, scenario + ["run.batch_clients=false"]))
    assert _observable(together) == _observable(alone)
    _close(together.final_params, alone.final_params, tol=1e-4)
    return stacked


@pytest.mark.parametrize("method", ["sgd", "laq", "slaq", "qrr", "powersgd", "lqsgd", "topk"])
def test_gradient_steps_of_an_instant_stacked_change_nothing_observable(method, monkeypatch):
    """The compressing methods' gradient step (``common.many_gradients``), done for the
    clients of an instant together: the same messages, bytes, times and events as one at a
    time, the same model to float tolerance, and the stacked path really ran."""
    scenario = ["data.clients=12", "data.dataset=digits", "data.partition=iid", "model.kind=mlp", "model.hidden=[16]",
                f"algorithm.name={method}", "run.rounds=4"]
    stacked = _stacked_run_matches_alone(scenario, monkeypatch, fastpath, "grads_stacked")
    assert stacked and max(stacked) > 1


def test_batch_clients_must_be_a_bool():
    from fedsim.errors import ScenarioError
    with pytest.raises(ScenarioError, match="run.batch_clients"):
        load_scenario(None, ["run.batch_clients=yes"])


def test_stacked_gradients_match_one_client_at_a_time():
    model = build_model(ModelConfig(kind="mlp", hidden=[16, 8]), (1, 8, 8), 3, seed=1)
    plan = fastpath.plan(model)
    starts = [{k: v.detach() + 0.01 * i for k, v in model.named_parameters()} for i in range(4)]
    xs = [torch.randn(6, 1, 8, 8) for _ in range(4)]
    ys = [torch.randint(0, 3, (6,)) for _ in range(4)]
    stacked = fastpath.grads_stacked(plan, starts, xs, ys)
    for i in range(4):
        _, one = loss_and_grad(model, starts[i], xs[i], ys[i])
        _close({k: stacked[i][k] for k in one}, one)


def test_sgd_clients_of_an_instant_computed_together(monkeypatch):
    """sgd's batch handler: the minibatch of each client drawn from its own generator, the
    gradients stacked; observably the same run as one client at a time."""
    stacked = []
    grads_stacked = fastpath.grads_stacked
    monkeypatch.setattr(fastpath, "grads_stacked", lambda plan, starts, *a: (stacked.append(len(starts)),
                                                                           grads_stacked(plan, starts, *a))[1])
    over = ["algorithm.name=sgd", "algorithm.batch_size=16", "algorithm.l2=0.01", "data.partition=dirichlet"]
    together = run(_batching_scenario(True, *over))
    monkeypatch.undo()
    alone = run(_batching_scenario(False, *over))
    assert stacked and max(stacked) > 1
    assert _observable(together) == _observable(alone)
    _close(together.final_params, alone.final_params, tol=1e-4)


@pytest.mark.parametrize("extra", [("algorithm.name=fedlrt", "algorithm.variance_correction=full"),
                                   ("algorithm.name=fedlrt", "algorithm.variance_correction=simplified"),
                                   ("algorithm.name=fedloru", "algorithm.local_step=preconditioned"),
                                   ("algorithm.name=fedloru", "algorithm.local_step=official",
                                    "algorithm.max_grad_norm=0.05"),
                                   ("algorithm.name=fedloru", "algorithm.personal_rank=2")],
                         ids=["fedlrt-full", "fedlrt-simplified", "fedloru-scaled", "fedloru-official-clipped",
                              "fedloru-personal"])
def test_low_rank_local_steps_of_an_instant_stacked_change_nothing_observable(extra, monkeypatch):
    """FeDLRT's and FedLoRU's local steps (``local_training.many_trainings``), the clients of
    an instant trained stacked: the same messages, bytes, times and events as one at a time,
    the same model to float tolerance, and the stacked path really ran (FedLoRU's personal
    modules, each client's own, stacked beside its trained modules)."""
    from algorithms import local_training
    scenario = ["data.clients=12", "data.dataset=digits", "data.partition=iid", "model.kind=mlp",
                "model.hidden=[16]", "algorithm.rank=4", "algorithm.local_steps=3", "algorithm.batch_size=8",
                "algorithm.keep_last_dense=false", "run.rounds=3", *extra]
    if "algorithm.name=fedloru" in extra:
        scenario.append("algorithm.merge_every=2")
    stacked = _stacked_run_matches_alone(scenario, monkeypatch, local_training, "_stacked")
    assert stacked and max(stacked) > 1


def test_stacked_low_rank_steps_match_one_client_at_a_time():
    """``local_training.train_together`` on requests that differ in leaves, data, generators
    and correction but share the basis: each client's result as :func:`lowrank.local_steps`
    alone, to float tolerance; a request with another basis trains on its own."""
    from functools import partial

    from algorithms import local_training
    from algorithms.lowrank import local_steps
    model = build_model(ModelConfig(kind="mlp", hidden=[16]), (1, 8, 8), 3, seed=1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    basis = {"1.weight.U": torch.linalg.qr(torch.randn(16, 4, generator=g)).Q,
             "1.weight.V": torch.linalg.qr(torch.randn(64, 4, generator=g)).Q}
    other = {k: v.flip(0) for k, v in basis.items()}

    def compose(shared, leaves):
        out = {k: leaves[k] for k in params if k != "1.weight"}
        out["1.weight"] = shared["1.weight.U"] @ leaves["S"] @ shared["1.weight.V"].T
        return out

    requests = []
    for i in range(5):
        leaves = {"S": torch.randn(4, 4, generator=g), **{k: v + 0.01 * i for k, v in params.items() if k != "1.weight"}}
        requests.append(local_training.LocalSteps(
            model, compose, other if i == 4 else basis, leaves, torch.randn(10, 1, 8, 8, generator=g),
            torch.randint(0, 3, (10,), generator=g), torch.Generator().manual_seed(i),
            {"S": 0.01 * torch.randn(4, 4, generator=g)},
            {"loss": "cross_entropy", "lr": 0.1, "steps": 4, "batch_size": 4, "momentum": 0.5}))
    together = local_training.train_together(requests)
    for i, r in enumerate(requests):
        alone, seen = local_steps(model, partial(compose, r.shared), r.leaves, r.x, r.y, loss="cross_entropy",
                                  lr=0.1, steps=4, batch_size=4, generator=torch.Generator().manual_seed(i),
                                  correction=r.correction, momentum=0.5)
        assert together[i][1] == seen == 16
        _close(together[i][0], alone)
