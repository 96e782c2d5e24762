"""knnflow.efm: EFM's self-normalised estimate (unbiased for û*, variance falling with M, the
dense and pairwise draws equal) and the knn-efm target (within its tolerance, its fallback)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import brute_force_velocity, relative_error
from test_targets import flow_batch

from knnflow.efm import EFMTarget
from knnflow.images import with_flips
from knnflow.index import Index
from knnflow.target_base import interpolate
from knnflow.targets import make_target


def test_efm_with_one_candidate_is_cfm(digits):
    x0, x1, t = flow_batch(digits, 64, 1)
    out = make_target("efm", data=digits, m=1)(x0, x1, t)
    assert torch.allclose(out.target, x1 - x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["independent", "shared"])
def test_efm_with_the_whole_data_set_as_pool_tends_to_exact(digits, pool):
    # With many candidates the estimate concentrates on û*: at t = 0.9 the posterior is one
    # point, which the candidate x1 always is.
    x0, x1, t = flow_batch(digits, 32, 2, torch.full((32,), 0.9))
    out = make_target("efm", data=digits, m=256, pool=pool)(x0, x1, t)
    exact = brute_force_velocity(out.x_t, t, digits)
    assert relative_error(out.target, exact).max() < 1e-4


def _posterior_draws(points, x_t, t, count, gen):
    logits = -((x_t - t * points.double()).square().sum(1)) / (2 * (1 - t) ** 2)
    ids = torch.multinomial(torch.softmax(logits, 0), count, replacement=True, generator=gen)
    return points[ids]


@pytest.mark.parametrize("pool,m", [("independent", 3), ("independent", 8), ("shared", 3)])
def test_efm_is_unbiased_for_the_exact_velocity(pool, m):
    """Monte Carlo: for a fixed x_t, x1 ~ p(x1 | x_t) and fresh candidates, the mean of the
    EFM target is û*(x_t) within 5 standard errors; the same estimator fed a uniform x1
    (not the one that made x_t) is biased, which shows the test can fail. m = 8 takes the
    dense path (7 draws per row ≥ 30 points / 8)."""
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(30, 2, generator=gen)
    t, draws = 0.6, 20000
    x_t = torch.tensor([0.3, -0.2], dtype=torch.float64)
    exact = brute_force_velocity(x_t[None], t, points)[0]
    target = EFMTarget(points, m=m, pool=pool)

    def mean_and_error(x1_all):
        tt = torch.full((draws,), t)
        if pool == "independent":
            x0 = ((x_t.float() - t * x1_all) / (1 - t))
            values = target(x0, x1_all, tt, generator=gen).target.double()
        else:
            # One row per batch is the fixed x_t; the other rows are ordinary training pairs,
            # whose x1s are uniform draws from this row's point of view.
            values = []
            for i in range(draws // 4):
                others = points[torch.randint(30, (3,), generator=gen)]
                x1 = torch.cat([x1_all[i:i + 1], others])
                x0 = torch.randn(4, 2, generator=gen)
                x0[0] = (x_t.float() - t * x1[0]) / (1 - t)
                values.append(target(x0, x1, torch.full((4,), t), generator=gen).target[0])
            values = torch.stack(values).double()
        return values.mean(0), values.std(0) / math.sqrt(len(values))

    mean, se = mean_and_error(_posterior_draws(points, x_t, t, draws, gen))
    assert ((mean - exact).abs() / se).max() < 5
    uniform = points[torch.randint(30, (draws,), generator=gen)]
    biased, se_b = mean_and_error(uniform)
    assert ((biased - exact).abs() / se_b).max() > 5


def test_efm_variance_falls_with_m(digits):
    x0, x1, t = flow_batch(digits, 256, 3, torch.full((256,), 0.3))
    exact = brute_force_velocity(interpolate(x0, x1, t), t, digits)
    errors = []
    for m in (1, 16, 256):
        out = make_target("efm", data=digits, m=m)(x0, x1, t, torch.Generator().manual_seed(0))
        errors.append(float((out.target.double() - exact).square().sum(1).mean()))
    assert errors[0] > errors[1] > errors[2]


@pytest.fixture(scope="module")
def digits_index(digits):
    return Index.build(digits)


def test_knn_efm_target_is_within_its_tolerance(digits, digits_index):
    x0, x1, t = flow_batch(digits, 128, 5)
    target = make_target("knn-efm", index=digits_index, data=digits, tol=1e-4)
    out = target(x0, x1, t)
    exact = brute_force_velocity(out.x_t, t, digits)
    assert relative_error(out.target, exact).max() < 2e-4
    assert 0 <= out.fallback <= 1


def test_knn_efm_reports_its_routed_share(digits, digits_index):
    """With the floors pinned at (0.3, 0.6): rows below 0.3 fall back, rows in [0.3, 0.6) go to
    the exact engine as routed, rows above certify (64 of them, enough not to join the exact
    engine's call); the batch reports each share, and the routed rows' targets are û*."""
    t = torch.cat([torch.full((32,), 0.1), torch.full((32,), 0.45), torch.full((64,), 0.9)])
    x0, x1, t = flow_batch(digits, 128, 7, t)
    target = make_target("knn-efm", index=digits_index, data=digits, route="faster")
    target.restore({"knn_floors": [0.3, 0.6]})
    out = target(x0, x1, t)
    assert out.fallback == 0.25 and out.routed == 0.25
    exact = brute_force_velocity(out.x_t, t, digits)
    assert relative_error(out.target[32:64], exact[32:64]).max() < 1e-4
    assert make_target("efm", data=digits)(x0, x1, t).routed is None


def test_knn_efm_falls_back_to_efm_and_reports_it(digits, digits_index):
    x0, x1, t = flow_batch(digits, 64, 6, torch.full((64,), 0.05))  # nothing certifies here
    target = make_target("knn-efm", index=digits_index, data=digits, fallback="efm", m=1)
    out = target(x0, x1, t)
    assert out.fallback == 1.0
    # The efm fallback with m = 1 is cfm: x1 - x0.
    assert torch.allclose(out.target, x1 - x0, rtol=1e-5, atol=1e-5)


def test_flip_draws_flipped_candidates():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    doubled = with_flips(images)
    assert torch.equal(doubled[2], images[0].flip(-1))
    target = EFMTarget(images.reshape(2, -1), m=4, flip=True, image_shape=(1, 2, 3))
    ids, flips = target._draw_ids(1000, torch.Generator().manual_seed(0))
    assert 0.4 < flips.double().mean() < 0.6
    drawn = target._points(ids[:8], flips[:8])
    for row, i, f in zip(drawn, ids[:8], flips[:8], strict=True):
        expected = images[i].flip(-1) if f else images[i]
        assert torch.equal(row, expected.reshape(-1))


def test_dense_draws_equal_pairwise_draws(digits, monkeypatch):
    """Independent pools with many draws per row take one dense GEMM with multiplicities; the
    same draws through the pairwise path give the same targets (rows near t = 1 keep the
    pairwise path inside the dense call)."""
    import knnflow.efm as efm

    gen = torch.Generator().manual_seed(4)
    x1 = digits[torch.randint(len(digits), (24,), generator=gen)]
    x0 = torch.randn(x1.shape, generator=gen)
    t = torch.cat([torch.rand(20, generator=gen), torch.tensor([0.995, 0.999, 0.9999, 0.5])])
    target = EFMTarget(digits, m=400)  # 399 draws per row ≥ 1498 / 8
    dense = target(x0, x1, t, generator=torch.Generator().manual_seed(1)).target
    monkeypatch.setattr(efm, "DENSE_DRAW_RATIO", 1e-9)
    pairwise = target(x0, x1, t, generator=torch.Generator().manual_seed(1)).target
    assert relative_error(dense, pairwise).max() < 1e-10
