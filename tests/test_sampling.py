"""Sampling: the solvers against a flow with a known solution, closed-form samples against the
training images they must reach, and shared noises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knnflow.data import load_dataset
from knnflow.index import Index
from knnflow.memorization_report import run_memorization
from knnflow.sampling import integrate, sample_closed_form


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "dopri5"])
def test_solvers_follow_a_known_flow(solver):
    # dx/dt = -x + t from x0 at t = 0: x(t) = t - 1 + (x0 + 1)·e^-t, so x(1) = (x0 + 1)/e.
    x0 = torch.randn(5, 3, dtype=torch.float64)
    exact = (x0 + 1) * math.exp(-1.0)
    got = integrate(lambda x, t: -x + t[:, None], x0, solver=solver, steps=200, atol=1e-9,
                    rtol=1e-9)
    tolerance = {"euler": 5e-3, "heun": 1e-5, "rk4": 1e-9, "dopri5": 1e-7}[solver]
    assert (got - exact).abs().max() < tolerance


def test_closed_form_samples_land_on_training_images(tmp_path):
    images = load_dataset("digits")[:300]
    index = Index.build(images)
    samples = sample_closed_form(index, 24, seed=0, steps=50)
    np.save(tmp_path / "s.npy", samples.numpy())
    summary, _ = run_memorization(tmp_path / "s.npy", index, out=tmp_path / "m")
    assert summary["memorized"]["fraction"] == 1.0
    assert summary["d1"]["max"] < 1e-3 * summary["reference"]["mean"]


def test_closed_form_and_network_sampling_share_noises():
    """With one seed, `sample --closed-form` starts from the noises `sample RUN` uses (the
    integrator is watched to see the starting points)."""
    from knnflow import sampling as sample_module

    seen = []
    real = sample_module.integrate

    def spy(velocity, x0, *args, **kwargs):
        seen.append(x0.to(torch.float32).clone())
        return real(velocity, x0, *args, **kwargs)

    from knnflow.index import Index

    images = torch.rand(40, 1, 4, 4) * 2 - 1
    sample_module.integrate = spy
    try:
        sample_module.sample_closed_form(Index.build(images), 5, seed=7, steps=2)
        zero = torch.nn.Bilinear(1, 1, 1)  # any module taking (x, t); only x0 is looked at
        zero.forward = lambda x, t: torch.zeros_like(x)
        sample_module.sample_model(zero, 5, (1, 4, 4), seed=7, steps=2)
    finally:
        sample_module.integrate = real
    assert torch.equal(seen[0].reshape(5, 1, 4, 4), seen[1])
