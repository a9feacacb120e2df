"""Models: shapes, seeded initialisation, compute cost, evaluation, config errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.models import MODEL_KINDS, ModelConfig, build_model, evaluate, work_per_sample

DIGITS, FASHION = (1, 8, 8), (1, 28, 28)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("shape", [DIGITS, FASHION])
def test_output_shapes(kind, shape):
    model = build_model(ModelConfig(kind=kind), shape, 10, seed=0)
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, 10) and out.dtype == torch.float32


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_flat_inputs(kind):
    model = build_model(ModelConfig(kind=kind, hidden=[32, 16]), (20,), 4, seed=0)
    assert model(torch.rand(3, 20)).shape == (3, 4)


def test_parameter_names_and_shapes():
    mlp = build_model(ModelConfig(kind="mlp", hidden=[200]), (1, 28, 28), 10, seed=0)
    assert {k: tuple(v.shape) for k, v in mlp.named_parameters()} == {
        "1.weight": (200, 784), "1.bias": (200,), "3.weight": (10, 200), "3.bias": (10,)}  # QRR's 784-200-10
    cnn = build_model(ModelConfig(kind="cnn", channels=[4, 6]), DIGITS, 10, seed=0)
    shapes = {k: tuple(v.shape) for k, v in cnn.named_parameters()}
    assert shapes == {"0.weight": (4, 1, 3, 3), "0.bias": (4,), "3.weight": (6, 4, 3, 3), "3.bias": (6,),
                      "7.weight": (10, 6 * 2 * 2), "7.bias": (10,)}
    logistic = build_model(ModelConfig(kind="logistic"), DIGITS, 10, seed=0)
    assert [k for k, _ in logistic.named_parameters()] == ["1.weight", "1.bias"]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_init_is_seeded_and_leaves_global_rng_alone(kind):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model(ModelConfig(kind=kind), DIGITS, 10, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model(ModelConfig(kind=kind), DIGITS, 10, seed=7)
    c = build_model(ModelConfig(kind=kind), DIGITS, 10, seed=8)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_work_per_sample_counts_flop():
    # logistic on digits: 64 * 10 MACs -> x2 FLOP/MAC x3 (forward + backward)
    assert work_per_sample(build_model(ModelConfig(kind="logistic"), DIGITS, 10, 0), DIGITS) == 6 * 640
    mlp = build_model(ModelConfig(kind="mlp", hidden=[200]), FASHION, 10, 0)
    assert work_per_sample(mlp, FASHION) == 6 * (784 * 200 + 200 * 10)
    # cnn on digits, channels [8, 16]: conv1 8x8x8 outputs x 9 MACs, conv2 16x4x4 x 72, linear 64x10
    cnn = build_model(ModelConfig(kind="cnn"), DIGITS, 10, 0)
    assert work_per_sample(cnn, DIGITS) == 6 * (8 * 64 * 9 + 16 * 16 * 72 + 64 * 10)


def test_work_per_sample_grows_with_model():
    def work(cfg, shape):
        return work_per_sample(build_model(cfg, shape, 10, 0), shape)

    sizes = [work(ModelConfig(kind="logistic"), FASHION), work(ModelConfig(hidden=[64]), FASHION),
             work(ModelConfig(hidden=[200]), FASHION), work(ModelConfig(hidden=[200, 200]), FASHION)]
    assert all(s > 0 for s in sizes) and sizes == sorted(sizes) and len(set(sizes)) == 4
    assert work(ModelConfig(kind="cnn", channels=[16, 32]), FASHION) > work(ModelConfig(kind="cnn"), FASHION)
    assert work(ModelConfig(kind="cnn"), FASHION) > work(ModelConfig(kind="cnn"), DIGITS)


def test_evaluate_matches_direct_computation():
    model = build_model(ModelConfig(kind="mlp", hidden=[16]), (6,), 3, seed=0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(103, 6, generator=gen), torch.randint(0, 3, (103,), generator=gen)
    with torch.no_grad():
        logits = model(x)
    acc, loss = evaluate(model, params, x, y, batch_size=10)  # uneven last batch
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    # It uses the params given, not the module's own.
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    assert evaluate(model, zero, x, y)[1] == pytest.approx(math.log(3), rel=1e-6)


def test_evaluate_builds_no_graph():
    model = build_model(ModelConfig(kind="logistic"), (4,), 2, seed=0)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    acc, loss = evaluate(model, params, torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    assert isinstance(acc, float) and isinstance(loss, float) and 0.0 <= acc <= 1.0


@pytest.mark.parametrize("key,value", [
    ("kind", "resnet"), ("hidden", []), ("hidden", [0]), ("hidden", [64, -1]), ("hidden", 64),
    ("hidden", [1.5]), ("hidden", [True]), ("channels", []), ("channels", [8, 0]), ("channels", "8"),
])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ScenarioError) as e:
        ModelConfig(**{key: value})
    assert e.value.key == f"model.{key}" and f"model.{key}" in str(e.value)


def test_cnn_rejects_inputs_it_cannot_take():
    with pytest.raises(ScenarioError) as e:
        build_model(ModelConfig(kind="cnn"), (20,), 10, seed=0)
    assert e.value.key == "model.kind"
    with pytest.raises(ScenarioError) as e:
        build_model(ModelConfig(kind="cnn", channels=[4, 4, 4, 4]), DIGITS, 10, seed=0)  # 8 -> 4 -> 2 -> 1 -> 0
    assert e.value.key == "model.channels"
    assert build_model(ModelConfig(kind="cnn", channels=[4, 4, 4]), DIGITS, 10, seed=0)(torch.rand(2, *DIGITS)).shape == (2, 10)


def test_models_are_plain_sequential_without_state():
    for kind in MODEL_KINDS:
        model = build_model(ModelConfig(kind=kind), DIGITS, 10, seed=0)
        assert isinstance(model, nn.Sequential) and not list(model.buffers())
        conv = [p for k, p in model.named_parameters() if p.dim() == 4]
        assert bool(conv) == (kind in ("cnn", "qrr_cnn"))


def test_qrr_paper_cnn_layers():
    """The QRR paper's CNN (Kritsos/QRR-code utils.py): conv16, conv32, pool, fc64, fc10 on 28x28."""
    model = build_model(ModelConfig(kind="qrr_cnn"), (1, 28, 28), 10, seed=0)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 32 * 14 * 14), (64,), (10, 64), (10,)]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
