"""ExactVelocity follows the estimator interface and agrees with float64 brute force."""

from __future__ import annotations

import pytest
import torch

import knnflow
from tests.conftest import brute_force_velocity, flow_queries, relative_error


@pytest.mark.parametrize("source", ["tensor", "index"])
def test_exact_velocity_output(digits, source):
    data = digits if source == "tensor" else knnflow.Index.build(digits)
    estimator = knnflow.ExactVelocity(data)
    x = flow_queries(digits, 0.7, 32).reshape(32, 1, 8, 8)
    out = estimator(x, 0.7)
    assert isinstance(out, knnflow.VelocityOutput)
    assert out.velocity.shape == x.shape and out.velocity.dtype == x.dtype
    assert torch.equal(out.error_bound, torch.zeros(32, dtype=torch.float64))
    assert torch.equal(out.evaluated, torch.full((32,), digits.shape[0]))
    assert relative_error(out.velocity, brute_force_velocity(x, 0.7, digits)).max() < 1e-5


def test_exact_velocity_with_batched_t(digits):
    t = torch.linspace(0, 0.99, 16)
    x = torch.cat([flow_queries(digits, float(ti), 1, seed=i) for i, ti in enumerate(t)])
    out = knnflow.ExactVelocity(digits)(x, t)
    assert relative_error(out.velocity, brute_force_velocity(x, t, digits)).max() < 1e-5


def test_exact_velocity_denoiser_is_the_posterior_mean(digits):
    x = flow_queries(digits, 0.95, 8)
    estimator = knnflow.ExactVelocity(digits)
    velocity = estimator(x, 0.95).velocity.to(torch.float64)
    denoiser = estimator.denoiser(x, 0.95)
    t = torch.full((8,), 0.95, dtype=torch.float64)
    assert torch.allclose(knnflow.velocity_from_denoiser(denoiser, x.to(torch.float64), t),
                          velocity, rtol=1e-6)


def test_exact_velocity_rejects_bad_t_and_shape(digits):
    estimator = knnflow.ExactVelocity(digits)
    with pytest.raises(ValueError):
        estimator(torch.zeros(2, 64), 1.0)
    with pytest.raises(knnflow.InputError, match="d=64"):
        estimator(torch.zeros(2, 3, 8, 8), 0.5)
