"""TopKVelocity: the top-k truncation, against float64 brute force over the same neighbours."""

from __future__ import annotations

import pytest
import torch
from conftest import brute_force_velocity, flow_queries, relative_error

import knnflow


@pytest.fixture(scope="module")
def digits_index():
    return knnflow.Index.build(knnflow.load_dataset("digits"))


def test_top_k_is_the_softmax_over_the_k_nearest_and_flagged_uncertified(digits, digits_index):
    estimator = knnflow.TopKVelocity(digits_index, k=16)
    x = flow_queries(digits, 0.5, 16)
    out = estimator(x, 0.5)
    assert not out.certified and out.error_bound is None
    assert (out.evaluated == 16).all()
    # it is the softmax over the 16 nearest neighbours of x/t
    q = (x / 0.5).to(torch.float64)
    ids = torch.cdist(q, digits.to(torch.float64)).topk(16, largest=False).indices
    reference = torch.stack([brute_force_velocity(x[i:i + 1], 0.5, digits[ids[i]])[0]
                             for i in range(16)])
    assert torch.allclose(out.velocity.to(torch.float64), reference, rtol=1e-5, atol=1e-5)


def test_top_k_clamps_k_with_a_note(digits_index):
    with pytest.warns(UserWarning, match="larger than"):
        estimator = knnflow.TopKVelocity(digits_index, k=10**6)
    assert estimator.k == digits_index.n


def test_top_k_below_the_index_floor_is_the_exact_velocity(digits, digits_index):
    # t = 0: x/t is undefined and the softmax flat; the exact engine answers, flagged.
    x = flow_queries(digits, 0.0, 8)
    out = knnflow.TopKVelocity(digits_index, k=4)(x, 0.0)
    assert out.fallback.all() and (out.evaluated == digits_index.n).all()
    assert relative_error(out.velocity, brute_force_velocity(x, 0.0, digits)).max() < 1e-5


def test_top_k_refuses_what_is_not_an_index(digits):
    with pytest.raises(knnflow.InputError, match="needs a knnflow.Index"):
        knnflow.TopKVelocity(digits)
    with pytest.raises(knnflow.InputError, match="k must be at least 1"):
        knnflow.TopKVelocity(knnflow.Index.build(digits[:10]), k=0)
