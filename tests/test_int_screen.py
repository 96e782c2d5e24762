"""The int8-digit screen (int_screen.py) and the exact engine's pass through it.

The screen's bound is a proof, so the tests hold it against float64 logits on data built to
stress it (wide dynamic range, t near 1, zero vectors); the engine's results through the int8
pass are held against the float64 brute force of conftest."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from conftest import brute_force_velocity, flow_queries, relative_error

import knnflow
import knnflow.closed_form as closed_form
from knnflow import int_screen
from knnflow.engine_settings import engine_settings
from knnflow.int_screen import BASE, IntScreen, data_digits, query_digits


@pytest.fixture(autouse=True)
def int_screen_on(monkeypatch):
    """The int8 pass whatever this machine's timing says (it decides speed, not results)."""
    monkeypatch.setitem(int_screen._RATIOS, "cpu", 0.0)


def exact_screened(x: torch.Tensor, t: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """2st⟨x, p⟩ - st²‖p‖² in float64."""
    x64, p64, t64 = x.double(), points.double(), t.double()
    s = 0.5 / (1 - t64) ** 2
    return (2 * s * t64)[:, None] * (x64 @ p64.T) - (s * t64 * t64)[:, None] * p64.square().sum(1)


def screen(x: torch.Tensor, t: torch.Tensor,
           points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    train = closed_form.as_training_set(points)
    t64 = t.double()
    s = 0.5 / (1 - t64) ** 2
    result = IntScreen(x.double(), t64, s, train.digits(), train.max_norm)
    logits = result(0, train.n, train.sq_norms.to(torch.float32))
    return logits.double(), result.proven


def test_digits_reconstruct_the_values():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(300, 40, generator=gen) * torch.logspace(-3, 2, 40)
    digits = data_digits(points, block=64)
    high, low = digits.high.T.double(), digits.low.T.double()
    assert high.abs().max() <= 127 and low.abs().max() <= 127
    rest = points.double() / digits.scale - high - low / BASE
    assert float(rest.abs().max()) <= 0.5 / BASE * (1 + 1e-9)
    assert float(rest.norm(dim=1).max()) <= digits.rest_norm * (1 + 1e-9)
    queries = query_digits(points[:7].double())
    again = queries.scale[:, None] * (queries.high.double() + queries.low.double() / BASE)
    remainder = points[:7].double() / queries.scale[:, None] - again / queries.scale[:, None]
    # rest_norm bounds the remainder's norm, loose by at most the float32 split's rounding
    true_norm = remainder.norm(dim=1)
    assert bool((true_norm <= queries.rest_norm).all())
    assert float((queries.rest_norm - true_norm).max()) <= math.sqrt(40) * 130 * 2.0**-24


@pytest.mark.parametrize("t", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("kind", ["images", "wide range", "zeros"])
def test_screen_error_stays_within_its_proven_bound(t, kind):
    gen = torch.Generator().manual_seed(1)
    points = torch.rand(500, 96, generator=gen) * 2 - 1
    if kind == "wide range":  # a few huge coordinates next to tiny ones
        points = points * torch.logspace(-4, 3, 96)
    if kind == "zeros":
        points[:, :10] = 0
        points[:5] = 0
    x = flow_queries(points, t, 64, seed=2)
    if kind == "zeros":
        x[0] = 0
    tt = torch.full((64,), t)
    logits, proven = screen(x, tt, points)
    error = (logits - exact_screened(x, tt, points)).abs().amax(dim=1)
    assert bool((error <= proven).all()), float((error / proven).max())
    assert float(error.max()) > 0  # the screen does round: the check has something to hold


def test_the_bound_is_tight_enough_to_prune():
    """The proven bound stays within a small factor of the measured error (images, d = 768),
    so its live sets are not much larger than the float32 screen's."""
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(20, 768, generator=gen) * 2 - 1
    points = (base[torch.randint(20, (2000,), generator=gen)]
              + 0.3 * torch.randn(2000, 768, generator=gen)).clamp(-1, 1)
    tt = torch.full((128,), 0.9)
    x = flow_queries(points, 0.9, 128, seed=4)
    logits, proven = screen(x, tt, points)
    error = (logits - exact_screened(x, tt, points)).abs().amax(dim=1)
    assert float((proven / error).median()) < 30


def images_like(n: int = 3000, dim: int = 768, seed: int = 5) -> torch.Tensor:
    """Points in [-1, 1] clustered around 40 prototypes: more than the one-pass size limit
    (n·d > 2^21), so the streaming engine and its int8 pass run."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(40, dim, generator=gen) * 2 - 1
    points = base[torch.randint(40, (n,), generator=gen)] + 0.4 * torch.randn(n, dim,
                                                                               generator=gen)
    return points.clamp(-1, 1)


def counting_int_pass(monkeypatch) -> dict:
    """Count the rows the int8 pass sees and finishes; every row that the probe chunk keeps
    goes on (no minimum: the minimum is a speed rule for large batches)."""
    settings = dataclasses.replace(engine_settings(torch.device("cpu")), int_min_rows=0)
    monkeypatch.setattr(closed_form, "engine_settings", lambda device: settings)
    seen = {"rows": 0, "done": 0}
    original = closed_form._int_pass

    def counted(x64, *args):
        state, rest = original(x64, *args)
        seen["rows"] += x64.shape[0]
        seen["done"] += int((~rest).sum())
        return state, rest

    monkeypatch.setattr(closed_form, "_int_pass", counted)
    return seen


@pytest.mark.parametrize("t", [0.6, 0.8, 0.9, 0.99])
def test_engine_through_the_int8_pass_matches_float64(t, monkeypatch):
    points = images_like()
    seen = counting_int_pass(monkeypatch)
    x = flow_queries(points, t, 96, seed=6)
    velocity = knnflow.closed_form_velocity(x, t, points, chunk_size=1024)
    errors = relative_error(velocity, brute_force_velocity(x, t, points))
    assert seen["done"] > 0  # the pass finished rows itself
    assert float(errors.median()) <= 1e-5 and float(errors.max()) <= 1e-4


def test_rows_that_leave_the_int8_pass_are_exact_too(monkeypatch):
    """A U[0,1) batch: dense rows leave after the probe chunk, the rest finish there."""
    points = images_like(seed=7)
    seen = counting_int_pass(monkeypatch)
    gen = torch.Generator().manual_seed(8)
    t = torch.rand(128, generator=gen)
    x1 = points[torch.randint(points.shape[0], (128,), generator=gen)]
    x = (1 - t[:, None]) * torch.randn(x1.shape, generator=gen) + t[:, None] * x1
    velocity = knnflow.closed_form_velocity(x, t, points, chunk_size=1024)
    errors = relative_error(velocity, brute_force_velocity(x, t, points))
    assert 0 < seen["done"] < seen["rows"]
    assert float(errors.median()) <= 1e-5 and float(errors.max()) <= 1e-4


def test_same_result_with_and_without_the_int8_pass(monkeypatch):
    points = images_like(seed=9)
    x = flow_queries(points, 0.9, 64, seed=10)
    with_int = knnflow.closed_form_velocity(x, 0.9, points, chunk_size=1024)
    monkeypatch.setitem(int_screen._RATIOS, "cpu", math.inf)
    without = knnflow.closed_form_velocity(x, 0.9, points, chunk_size=1024)
    assert float(relative_error(with_int, without).max()) <= 1e-5


def test_off_where_int32_sums_could_overflow():
    assert not int_screen.int_screen_available(torch.device("cpu"), int_screen.MAX_DIM + 1)
    assert int_screen.MAX_DIM * 2 * 127 * 127 < 2**31


def test_availability_follows_the_amx_flag_else_a_timing(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(int_screen, "_RATIOS", {})
    monkeypatch.setattr(int_screen, "cpu_flags", lambda: {"avx512f", "amx_int8"})
    monkeypatch.setattr(int_screen, "_measured_ratio",
                        lambda device, **shape: pytest.fail("timed despite the flag"))
    assert int_screen.int_screen_available(cpu, 3072)
    assert int_screen.grid_gemms_available(cpu)
    # Without the flag the timing decides, each path by its own threshold.
    monkeypatch.setattr(int_screen, "cpu_flags", lambda: {"avx512f"})
    between = (int_screen.SCREEN_RATIO_MAX + int_screen.GRID_RATIO_MAX) / 2
    for ratio, screen_on, grid_on in [(0.1, True, True), (between, False, True),
                                      (1.5, False, False)]:
        monkeypatch.setattr(int_screen, "_RATIOS", {})
        monkeypatch.setattr(int_screen, "_measured_ratio", lambda device, r=ratio, **shape: r)
        assert int_screen.int_screen_available(cpu, 3072) is screen_on
        assert int_screen.grid_gemms_available(cpu) is grid_on
    assert not int_screen.int_screen_available(torch.device("cuda"), 3072)
    assert not int_screen.grid_gemms_available(torch.device("cuda"))


def test_a_slow_probe_decides_alone_and_a_fast_one_asks_for_the_full_timing(monkeypatch):
    """Where int8 GEMMs are hundreds of times slower the small probe is the answer (the full
    timing would take minutes); elsewhere the engine's shapes are timed."""
    cpu, calls = torch.device("cpu"), []
    monkeypatch.setattr(int_screen, "cpu_flags", lambda: {"avx2"})
    for probe, full, expected in [(190.0, 0.5, 190.0), (0.9, 0.5, 0.5),
                                  (int_screen.PROBE_SLOW, 1.2, 1.2)]:
        calls.clear()
        monkeypatch.setattr(int_screen, "_RATIOS", {})

        def timed(device, p=probe, f=full, **shape):
            calls.append(shape)
            return p if shape else f

        monkeypatch.setattr(int_screen, "_measured_ratio", timed)
        assert int_screen.int8_gemm_ratio(cpu) == expected
        assert calls == [int_screen.PROBE_SHAPE] + ([{}] if probe <= int_screen.PROBE_SLOW
                                                    else [])
        assert int_screen.int8_gemm_ratio(cpu) == expected and len(calls) <= 2  # once


def test_the_timing_measures_a_finite_ratio():
    ratio = int_screen._measured_ratio(torch.device("cpu"), batch=16, dim=64, points=64)
    assert 0 < ratio < math.inf


def test_the_timing_warms_up_past_a_cold_start():
    """A kernel whose first calls are slow (Zen 5's first ~15 int8 GEMMs of a process) is
    timed at its warm speed, so a cold start cannot turn the int8 paths off."""
    calls = []

    def kernel():
        calls.append(None)
        if len(calls) <= 12:  # cold: 4 ms a call
            time.sleep(0.004)

    assert int_screen._fastest_time(kernel) < 0.002
    # A kernel slow on every call is read as slow, and the warm-up stops at its time limit.
    calls.clear()
    assert int_screen._fastest_time(lambda: time.sleep(0.03) or calls.append(None)) >= 0.03
    assert len(calls) <= 10
