"""The eavesdropper on the wire: the attack works, and the tap sees only what the wire carries."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedsim import codec
from fedsim.data import load_dataset, partition
from fedsim.eavesdrop import EavesdropperConfig, WireTap, make_decoder
from fedsim.errors import ScenarioError
from fedsim.inversion import Target, cosine_distance, identity, infer_labels, total_variation
from fedsim.privacy import eavesdrop, match, psnr, run_tapped, ssim, ssim_table
from fedsim.scenario import from_dict

METHODS = ["sgd", "fedavg", "laq", "slaq", "qrr", "powersgd", "lqsgd", "fedlrt", "fedloru", "topk"]
VARIANTS = [("laq", {"lazy": False, "l2": 1.0}), ("powersgd", {"start_round": 1}),
            ("fedlrt", {"variance_correction": "simplified"}), ("fedlrt", {"variance_correction": "none"}),
            ("fedloru", {"local_step": "preconditioned", "init": "subspace"}), ("fedloru", {"alpha": 8.0, "merge_every": 1})]
"""Non-default settings whose wire semantics differ (each a public setting the decoder reads)."""
EXACT = {"sgd", "fedlrt", "fedloru", "topk"}
"""Methods whose observation is, at one local step, exactly a map of the gradient (no
quantization, no private error memory): the decoder must match its magnitude too (scale
s = α/r, clipping, weight decay), which a cosine cannot see."""
LAZY = {"laq", "slaq"}
"""Methods whose clients may skip an upload (LAQ's lazy rule, on by default)."""


def scenario(method: str = "sgd", batch: int = 1, rounds: int = 1, network: dict | None = None,
             events: list | None = None, algorithm: dict | None = None, **eaves):
    algo = {"name": method, "batch_size": batch}
    if method in ("fedlrt", "fedloru"):
        algo.update(local_steps=1, rank=4)
    algo.update(algorithm or {})
    raw = {"run": {"seed": 1, "rounds": rounds, "eval_every": 1000, "round_deadline": "5s"},
           "data": {"dataset": "digits", "clients": 3, "partition": "iid"},
           "model": {"kind": "mlp", "hidden": [32]}, "algorithm": algo,
           "eavesdropper": {"client": 0, "rounds": [0, rounds], "iters": 30, "ig_iters": 150, **eaves}}
    if network:
        raw["network"] = network
    if events:
        raw["events"] = events
    return from_dict(raw)


@pytest.fixture(scope="module")
def digits():
    sc = scenario()
    ds = load_dataset(sc.data, 1)
    ds.test_x, ds.test_y = ds.test_x[:32], ds.test_y[:32]
    return ds


def tapped(sc, ds, batch: int = 1):
    parts = partition(ds.train_y, sc.data, 1)
    parts[0] = parts[0][:batch]  # client 0's batch is all it holds: the referee knows the truth
    parts[1:] = [p[:16] for p in parts[1:]]  # the others' local work is not under test
    _, tap, _, _ = run_tapped(sc, ds, parts)
    return tap, parts


def test_sgd_batch_one_mlp_is_reconstructed(digits):
    """The attack works: SGD's gradient of one digit on the MLP gives the digit back."""
    sc = scenario("sgd", attacks=["dlg", "idlg", "ig"])
    tap, parts = tapped(sc, digits)
    report = eavesdrop(sc, tap, digits, parts)
    assert report.counters["targets"] == 1
    by_attack = {r["attack"]: r for r in report.rows}
    assert set(by_attack) == {"dlg", "idlg", "ig"}
    for name, row in by_attack.items():
        assert row["ssim"] >= 0.6, (name, row)
        assert row["labels_ok"] == 1.0


def test_tap_is_handed_only_bytes_and_decodes_them_itself(digits):
    """Every call gives the tap a list of bytes; its captured messages decode (CRC checked)
    to the model the server broadcast and the client's gradient of its one image."""
    sc = scenario("sgd")
    seen_types = set()

    class Spy(WireTap):
        def __call__(self, direction, client, frames):
            seen_types.update(type(f) for f in frames)
            assert isinstance(frames, list) and direction in ("up", "down")
            super().__call__(direction, client, frames)

    parts = partition(digits.train_y, sc.data, 1)
    parts = [parts[0][:1]] + [p[:16] for p in parts[1:]]
    import fedsim.privacy as privacy
    original = privacy.WireTap
    privacy.WireTap = Spy
    try:
        _, tap, _, _ = run_tapped(sc, digits, parts)
    finally:
        privacy.WireTap = original
    assert seen_types <= {bytes, memoryview}
    msgs = tap.messages()
    assert [(d, m.kind, m.src, m.dst) for d, m in msgs] == [("down", "model", codec.SERVER, 0),
                                                           ("up", "model", 0, codec.SERVER)]
    down, up = msgs[0][1].payload.tensors, msgs[1][1].payload.tensors
    model = make_decoder(sc, digits.input_shape, digits.num_classes).model
    params = {k: v.clone().requires_grad_(True) for k, v in down.items()}
    x, y = digits.train_x[parts[0]], digits.train_y[parts[0]]
    grads = torch.autograd.grad(F.cross_entropy(functional_call(model, params, (x,)), y), list(params.values()))
    for (name, g) in zip(params, grads):
        torch.testing.assert_close(up[name], g)


def test_wire_faults_change_what_the_tap_sees(digits):
    """Duplication shows two copies; corruption reaches the tap as corrupted bytes, which
    fail the CRC, so it has nothing to attack (the client refuses the corrupted model too,
    so no upload follows it)."""
    clean, _ = tapped(scenario("sgd"), digits)
    assert clean.counters["frames_seen"] == 2
    dup, _ = tapped(scenario("sgd", network={"duplicate": 1.0}), digits)
    assert dup.counters["frames_seen"] == 4
    corrupt_sc = scenario("sgd", network={"corrupt": 1.0})
    bad, parts = tapped(corrupt_sc, digits)
    assert bad.counters["frames_seen"] == 1
    assert len(bad.captured[0].frames) == len(clean.captured[0].frames)
    assert bad.captured[0].frames != clean.captured[0].frames
    assert bad.messages() == [] and bad.counters["undecodable"] == 1
    report = eavesdrop(corrupt_sc, bad, digits, parts)
    assert report.counters["targets"] == 0 and report.rows == []


def test_a_message_dropped_before_the_wire_is_never_seen(digits):
    """A partitioned client: the model drops its messages before they reach the link."""
    sc = scenario("sgd", events=[{"action": "partition", "at_round": 0, "clients": "0"}])
    tap, _ = tapped(sc, digits)
    assert tap.counters["frames_seen"] == 0 and tap.captured == []


def test_the_tap_listens_only_to_its_client_direction_and_window(digits):
    tap, _ = tapped(scenario("sgd", rounds=3), digits)
    assert {m.round for _, m in tap.messages()} == {0, 1, 2}
    sc = scenario("sgd", rounds=3)
    sc.eavesdropper.rounds = [1, 2]
    sc.eavesdropper.direction = "up"
    tap, _ = tapped(sc, digits)
    assert [(d, m.round, m.src) for d, m in tap.messages()] == [("up", 1, 0)]


@pytest.mark.parametrize("method,settings", [(m, {}) for m in METHODS] + VARIANTS,
                         ids=[*METHODS, *(f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for m, kw in VARIANTS)])
def test_every_method_decodes_into_a_target(digits, method, settings):
    """The wire formats of every method (default settings and the variants whose messages
    differ) decode into a target at the broadcast model, in every round heard."""
    sc = scenario(method, rounds=2, algorithm=settings)
    tap, parts = tapped(sc, digits)
    decoder = make_decoder(sc, digits.input_shape, digits.num_classes)
    targets = decoder.targets(tap.messages())
    rounds = [r for r, _ in targets]
    if method in LAZY and settings.get("lazy", True):
        # a lazy skip is a reply without tensors: that round has nothing to attack, and is counted
        assert rounds[:1] == [0] and len(rounds) + decoder.counters.get("skipped_upload", 0) == 2, decoder.counters
    else:
        assert rounds == [0, 1], decoder.counters
    x, y = digits.train_x[parts[0]], digits.train_y[parts[0]]
    for r, t in targets:
        assert t.batch == 1
        # the observation map is that of the wire: at the true image it explains the upload
        params = {k: v.clone().requires_grad_(True) for k, v in t.params.items()}
        grads = dict(zip(params, torch.autograd.grad(F.cross_entropy(functional_call(t.model, params, (x,)), y),
                                                     list(params.values()))))
        predicted = t.predict(grads)
        assert float(cosine_distance(predicted, t.observed)) < 0.05, r
        if method in EXACT:
            err = sum(((predicted[k] - o) ** 2).sum() for k, o in t.observed.items()).sqrt()
            assert float(err / sum((o ** 2).sum() for o in t.observed.values()).sqrt()) < 1e-4, r
        assert infer_labels(t).tolist() == y.tolist(), r


def test_a_lazy_laq_skip_is_counted_not_attacked(digits):
    """LAQ as published skips uploads whose innovation is small: the tap hears a reply with
    no tensors, which the decoder counts (the server reuses the client's last Q, which is
    not a gradient at that round's model)."""
    sc = scenario("laq", rounds=3)
    tap, _ = tapped(sc, digits)
    ups = [m for d, m in tap.messages() if d == "up"]
    skips = [m for m in ups if "skip" in m.payload.meta]
    assert skips and all(not m.payload.tensors for m in skips)
    decoder = make_decoder(sc, digits.input_shape, digits.num_classes)
    targets = decoder.targets(tap.messages())
    assert decoder.counters["skipped_upload"] == len(skips)
    assert len(targets) == len(ups) - len(skips)


@pytest.mark.parametrize("method,settings", [("laq", {"lazy": False}), ("topk", {})])
def test_laq_needs_the_accumulator_it_heard(method, settings):
    """A tap that starts listening late holds no mirror of LAQ's accumulator (top-k's EF21
    estimate): no target. (LAQ non-lazy, so the client uploads an innovation every round:
    with the lazy rule on it skips rounds 1 and 2 here and there is no innovation to miss.)"""
    sc = scenario(method, rounds=3, algorithm=settings)
    ds = load_dataset(sc.data, 1)
    ds.test_x, ds.test_y = ds.test_x[:32], ds.test_y[:32]
    sc.eavesdropper.rounds = [1, 3]
    tap, _ = tapped(sc, ds)
    decoder = make_decoder(sc, ds.input_shape, ds.num_classes)
    assert decoder.targets(tap.messages()) == []
    assert decoder.counters["no_base"] == 2


def test_metrics_and_matching():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand((3, 1, 8, 8), generator=g)
    order = [2, 0, 1]
    got = match(truth[order], truth)
    assert [j for j, _, _ in got] == order
    assert all(s == pytest.approx(1.0) and p == 100.0 for _, s, p in got)
    noisy = np.clip(truth[0, 0].numpy() + 0.1, 0, 1)
    assert ssim(truth[0, 0].double().numpy(), noisy) < 1.0
    assert 10 < psnr(truth[0, 0].double().numpy(), noisy) < 30
    assert float(total_variation(torch.ones(1, 1, 4, 4))) == 0.0


@pytest.mark.parametrize("side", [8, 28])
def test_ssim_table_is_ssim_of_every_pair(side):
    """The all-pairs table (one product per block of reconstructions) is scikit-image's SSIM
    of each pair, clipping included, whatever the block size."""
    rng = np.random.default_rng(side)
    truth = [rng.random((side, side)) for _ in range(5)]
    recon = [rng.random((side, side)) * 1.6 - 0.3 for _ in range(7)]  # out of [0, 1]: clipped
    recon[2] = truth[4].copy()
    reference = np.array([[ssim(t, r) for t in truth] for r in recon])
    for block in (1, 3, 32):
        table = ssim_table(recon, truth, rows_per_block=block)
        assert table.shape == (7, 5)
        assert np.abs(table - reference).max() < 1e-12
    assert table[2, 4] == pytest.approx(1.0)


def test_label_inference_counts_a_batch():
    """iDLG's rule on the head's bias gradient, extended to a batch by counts."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    params = {k: v.detach() for k, v in model.named_parameters()}
    y = torch.tensor([1, 1, 3, 4])
    x = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) * 0.01
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = dict(zip(p, torch.autograd.grad(F.cross_entropy(functional_call(model, p, (x,)), y), list(p.values()))))
    t = Target(model, params, grads, identity, grads, 4, (16,), 5)
    assert infer_labels(t).tolist() == [1, 1, 3, 4]


def test_bad_eavesdropper_settings_are_named():
    with pytest.raises(ScenarioError, match="eavesdropper.direction"):
        scenario(direction="sideways")
    with pytest.raises(ScenarioError, match="eavesdropper.client"):
        from_dict({"data": {"clients": 2}, "eavesdropper": {"client": 5}})
    with pytest.raises(ScenarioError, match="eavesdropper.rounds"):
        from_dict({"eavesdropper": {"rounds": [3, 1]}})
    with pytest.raises(ScenarioError, match="eavesdropper.colour"):
        from_dict({"eavesdropper": {"colour": 1}})
    assert from_dict({"eavesdropper": {}}).eavesdropper == EavesdropperConfig()
