"""Training points on an 8-bit grid (grid_digits.py) and the exact engine's int8 GEMMs over them.

The grid is checked by round trip against the points; the screen's bound and the sums' rounding
measure are proofs, held against float64; the engine through both int8 GEMMs is held against
the float64 brute force of conftest on uint8 images (the kind the grid exists for)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import brute_force_velocity, flow_queries, relative_error

import knnflow
import knnflow.closed_form as closed_form
from knnflow import int_screen
from knnflow.grid_digits import GridScreen, grid_of, grid_sums


@pytest.fixture(autouse=True)
def int8_on(monkeypatch):
    """The int8 paths whatever this machine's timing says (it decides speed, not results)."""
    monkeypatch.setitem(int_screen._RATIOS, "cpu", 0.0)


def uint8_images(n: int = 3000, dim: int = 768, seed: int = 3) -> torch.Tensor:
    """uint8 images around 40 prototypes, mapped to [-1, 1] as the loaders do (p/127.5 - 1
    in float32): more than the one-pass size limit, so the streaming engine runs."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(40, dim, generator=gen) * 255
    pixels = base[torch.randint(40, (n,), generator=gen)] + 40 * torch.randn(n, dim,
                                                                              generator=gen)
    return pixels.round().clamp(0, 255).to(torch.uint8).to(torch.float32) / 127.5 - 1.0


def test_a_uint8_grid_is_found_and_reproduces_the_points():
    points = uint8_images(500, 64)
    grid = grid_of(points)
    assert grid is not None
    assert grid.step == pytest.approx(2 / 255, rel=1e-6)
    assert int(grid.codes.min()) >= -128 and int(grid.codes.max()) <= 127
    rebuilt = grid.center + grid.step * grid.codes.double()
    rest = points.double() - rebuilt
    assert float(rest.abs().max()) <= 1e-6
    assert float(rest.norm(dim=1).max()) <= grid.rest_norm + 1e-15
    assert float(grid.codes.double().norm(dim=1).max()) == pytest.approx(grid.code_norm)


def test_a_grid_of_fewer_levels_is_found():
    # The digits' 17 levels (v/8 - 1): the step is 1/8, not 2/255.
    gen = torch.Generator().manual_seed(1)
    points = torch.randint(0, 17, (300, 64), generator=gen).to(torch.float32) / 8 - 1
    grid = grid_of(points)
    assert grid is not None and grid.step == pytest.approx(1 / 8)
    rebuilt = grid.center + grid.step * grid.codes.double()
    assert float((points.double() - rebuilt).abs().max()) == 0.0


@pytest.mark.parametrize("case", ["noise", "float16", "constant", "one off-grid value",
                                  "too many levels"])
def test_points_off_any_grid_have_none(case):
    points = uint8_images(400, 64)
    if case == "noise":
        points = torch.rand(400, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    elif case == "float16":
        points = points.half()
    elif case == "constant":
        points = torch.full((400, 64), 0.25)
    elif case == "one off-grid value":
        points[399, 5] += 1e-3
    else:  # 1,021 levels: a 10-bit grid
        points = torch.randint(0, 1021, (400, 64),
                               generator=torch.Generator().manual_seed(4)) / 510.0 - 1
    assert grid_of(points) is None


def exact_screened(x: torch.Tensor, t: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """2st⟨x, p⟩ - st²‖p‖² in float64."""
    x64, p64, t64 = x.double(), points.double(), t.double()
    s = 0.5 / (1 - t64) ** 2
    return (2 * s * t64)[:, None] * (x64 @ p64.T) - (s * t64 * t64)[:, None] * p64.square().sum(1)


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("t", [0.05, 0.3, 0.6, 0.9, 0.99, 0.9999])
def test_the_screen_errs_within_its_proven_bound(t, count):
    points = uint8_images(1200, 256)
    grid = grid_of(points)
    tt = torch.full((48,), t, dtype=torch.float64)
    x = flow_queries(points, t, 48, seed=int(t * 100)).double()
    x[0] = 0.0  # a zero query: its digits and scale must still work
    x[1] *= 40.0  # far outside the data's range
    x[2] = points[7].double() * t  # on a training point
    s = 0.5 / (1 - tt) ** 2
    screen = GridScreen(x, tt, s, grid, float(points.double().norm(dim=1).max()), count=count)
    sq = points.double().square().sum(1).to(torch.float32)
    logits = screen(0, points.shape[0], sq).double()
    error = (logits - exact_screened(x, tt, points)).abs().amax(dim=1)
    assert bool((error <= screen.proven).all())
    # A subset of rows screens the same as all of them.
    rows = torch.tensor([3, 0, 17])
    assert torch.equal(screen(100, 600, sq[100:600], rows), logits[rows, 100:600].float())
    # Three digits are as accurate as the float32 screen: the typical size is not exceeded
    # by the root-mean-square error of the ordinary rows.
    if count == 3:
        usual = error[3:] / screen.typical[3:]
        assert float(usual.median()) <= 10


def test_the_sums_rounding_measure_bounds_their_error():
    points = uint8_images(2048, 128)
    grid = grid_of(points)
    gen = torch.Generator().manual_seed(6)
    # Weights over many orders of magnitude, with zeros and a row of one weight.
    weights = torch.exp(-30 * torch.rand(16, 1000, generator=gen))
    weights[1] = 0.0
    weights[2, 10] = 1e-30
    weights[3, :900] = 0.0
    lattice = (grid.center + grid.step * grid.codes[500:1500].double())
    exact_s = weights.double() @ lattice
    exact_z = weights.double().sum(dim=1)
    sums, z, rounded_sq = grid_sums(weights.clone(), grid, 500, 1500)
    # Cauchy-Schwarz on Σ_j δ_j·x̃_j and Σ_j δ_j with Σ_j δ_j² ≤ rounded_sq.
    scale = rounded_sq.sqrt()
    assert bool(((sums - exact_s).norm(dim=1) <= scale * lattice.square().sum().sqrt()).all())
    assert bool(((z - exact_z).abs() <= scale * math.sqrt(1000)).all())
    assert float(z[1]) == 0.0 and float(sums[1].abs().max()) == 0.0
    nonzero = exact_z > 0
    assert float(((z - exact_z).abs() / exact_z)[nonzero].max()) <= 1e-6
    # Against the data points themselves (not their grid values): the remainders are tiny.
    assert float(((sums - weights.double() @ points[500:1500].double()).norm(dim=1)
                  / exact_s.norm(dim=1).clamp(min=1e-300))[nonzero].max()) <= 1e-6


def counting_grid(monkeypatch) -> dict:
    """Count the chunks whose dense rows the grid's int8 sums take."""
    seen = {"sums": 0}
    original = closed_form.grid_sums

    def counted(*args):
        seen["sums"] += 1
        return original(*args)

    monkeypatch.setattr(closed_form, "grid_sums", counted)
    return seen


@pytest.mark.parametrize("t", [0.05, 0.2, 0.35, 0.5, 0.7, 0.9, "uniform"])
def test_engine_over_a_grid_matches_float64(t, monkeypatch):
    points = uint8_images()
    seen = counting_grid(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    tt = torch.rand(128, generator=gen) if t == "uniform" else torch.full((128,), t)
    x1 = points[torch.randint(points.shape[0], (128,), generator=gen)]
    x = (1 - tt[:, None]) * torch.randn(x1.shape, generator=gen) + tt[:, None] * x1
    velocity = knnflow.closed_form_velocity(x, tt, points, chunk_size=1024)
    errors = relative_error(velocity, brute_force_velocity(x, tt, points))
    assert float(errors.median()) <= 1e-5 and float(errors.max()) <= 1e-4
    if t == "uniform" or t <= 0.35:  # later, these rows have few live weights: no dense sums
        assert seen["sums"] > 0


@pytest.mark.parametrize("t", [0.06, 0.1, 0.16])
def test_engine_over_a_grid_on_training_images(t, monkeypatch):
    # Training images as queries: the audit's hard case for the float32 sums.
    points = uint8_images()
    x = points[:64] * 1.0
    velocity = knnflow.closed_form_velocity(x, t, points, chunk_size=1024)
    errors = relative_error(velocity, brute_force_velocity(x, t, points))
    assert float(errors.median()) <= 1e-5 and float(errors.max()) <= 1e-4


def test_same_result_with_and_without_the_grid(monkeypatch):
    points = uint8_images(seed=8)
    x = flow_queries(points, 0.2, 64, seed=9)
    seen = counting_grid(monkeypatch)
    with_grid = knnflow.closed_form_velocity(x, 0.2, points, chunk_size=1024)
    assert seen["sums"] > 0
    used = seen["sums"]
    monkeypatch.setitem(int_screen._RATIOS, "cpu", math.inf)
    without = knnflow.closed_form_velocity(x, 0.2, points, chunk_size=1024)
    assert seen["sums"] == used  # the float32 GEMMs this time
    assert float(relative_error(with_grid, without).max()) <= 1e-5
