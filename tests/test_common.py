"""The shared validation and training helpers of algorithms/common.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from algorithms.base import Payload, ProtocolError
from algorithms.common import all_finite, bind_params, check_like, local_sgd
from fedsim.models import ModelConfig, build_model


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64]), hnp.array_shapes(min_dims=0, max_dims=3),
                  elements=st.floats(allow_nan=True, allow_infinity=True, width=16)))
def test_all_finite_agrees_with_isfinite(values):
    """The numpy path (and torch's, for bfloat16) agree with the plain definition."""
    assert all_finite(torch.from_numpy(values)) == bool(np.isfinite(values).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_on_huge_finite_values_and_each_kind_of_bad_value(dtype):
    big = torch.full((5,), torch.finfo(dtype).max, dtype=dtype)  # squares overflow, values do not
    assert all_finite(big)
    for bad in (math.nan, math.inf, -math.inf):
        t = big.clone()
        t[3] = bad
        assert not all_finite(t)
    assert all_finite(torch.empty(0, dtype=dtype))
    assert all_finite(torch.tensor([1, 2, 3]))  # integers are always finite


def test_check_like_names_the_offending_tensor():
    ref = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    check_like(Payload(tensors={"b": torch.ones(3), "w": torch.ones(2, 3)}), ref, "x")  # order does not matter
    with pytest.raises(ProtocolError, match="do not match"):
        check_like(Payload(tensors={"w": torch.ones(2, 3)}), ref, "x")
    with pytest.raises(ProtocolError, match="'w' is torch.float32\\(3, 2\\)"):
        check_like(Payload(tensors={"w": torch.ones(3, 2), "b": torch.ones(3)}), ref, "x")
    with pytest.raises(ProtocolError, match="'b' holds NaN"):
        check_like(Payload(tensors={"w": torch.ones(2, 3), "b": torch.tensor([0.0, math.nan, 0.0])}), ref, "x")


def test_local_sgd_leaves_its_input_alone_and_matches_a_plain_optimizer():
    model = build_model(ModelConfig(kind="mlp", hidden=[8]), (4,), 3, seed=0)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    frozen = {k: v.clone() for k, v in start.items()}
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    trained, seen = local_sgd(model, start, x, y, lr=0.1, epochs=2, batch_size=4, generator=torch.Generator().manual_seed(1))
    assert seen == 20
    assert all(torch.equal(start[k], frozen[k]) for k in start)

    reference = build_model(ModelConfig(kind="mlp", hidden=[8]), (4,), 3, seed=0)
    reference.load_state_dict(frozen)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        order = torch.randperm(10, generator=g)
        for i in range(0, 10, 4):
            idx = order[i:i + 4]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(x[idx]), y[idx]).backward()
            opt.step()
    for k, v in reference.named_parameters():
        torch.testing.assert_close(trained[k], v.detach())
    bind_params(model, frozen)  # the template can be rebound afterwards
