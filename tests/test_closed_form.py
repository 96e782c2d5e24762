"""The exact engine against float64 brute force, known cases, and its numerical traps."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import brute_force_denoiser, brute_force_velocity, flow_queries, relative_error

import knnflow
from knnflow.closed_form import (
    TrainingSet,
    closed_form_state,
    closed_form_velocity,
    denoiser_from_score,
    denoiser_from_velocity,
    largest_logits,
    score_from_denoiser,
    score_from_velocity,
    velocity_from_denoiser,
    velocity_from_score,
)
from knnflow.softmax import SoftmaxState

TS = (0.0, 0.1, 0.5, 0.7, 0.9, 0.99, 0.999)


@pytest.mark.parametrize("dataset", ["random_points", "digits"])
@pytest.mark.parametrize("t", TS)
def test_matches_float64_brute_force(dataset, t, request):
    points = request.getfixturevalue(dataset)
    x = flow_queries(points, t, 256, seed=int(t * 1000))
    err = relative_error(closed_form_velocity(x, t, points), brute_force_velocity(x, t, points))
    assert err.median() <= 1e-5
    assert err.max() <= 1e-4


@pytest.mark.parametrize("per_query_t", [False, True])
def test_kept_logits_buffer_changes_nothing(digits, per_query_t, monkeypatch):
    """Small sets' one pass writes its logits into a buffer kept per thread on CPUs
    (closed_form._logits_buffer). Results are bit-identical to fresh outputs (the buffer
    off), for one t and for one t per query; a call on another batch size does not change a
    result already returned; and threads calling at once each get what they get alone."""
    import threading

    from knnflow import closed_form

    gen = torch.Generator().manual_seed(3)
    batches = []
    for count in (256, 96):
        t = (torch.rand(count, generator=gen, dtype=torch.float64) if per_query_t
             else torch.full((count,), 0.6, dtype=torch.float64))
        batches.append((flow_queries(digits, t, count, seed=count), t))
    kept = [closed_form_velocity(x, t, digits) for x, t in batches]
    first = kept[0].clone()
    closed_form_velocity(*batches[1], digits)
    assert torch.equal(kept[0], first)
    results: dict[int, list] = {}

    def worker(i: int) -> None:
        results[i] = [closed_form_velocity(x, t, digits) for _ in range(5) for x, t in batches]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(3):
        for j, v in enumerate(results[i]):
            assert torch.equal(v, kept[j % 2])
    monkeypatch.setattr(closed_form, "WORKSPACE_MAX_BYTES", 0)
    for (x, t), v in zip(batches, kept, strict=True):
        assert torch.equal(closed_form_velocity(x, t, digits), v)


def test_float64_mode_is_float64_accurate(digits):
    x = flow_queries(digits, 0.7, 64).to(torch.float64)
    v = closed_form_velocity(x, 0.7, digits, compute_dtype=torch.float64)
    assert relative_error(v, brute_force_velocity(x, 0.7, digits)).max() < 1e-12


def test_t_zero_gives_mean_minus_x(random_points):
    x = torch.randn(16, random_points.shape[1])
    v = closed_form_velocity(x, 0.0, random_points).to(torch.float64)
    expected = random_points.to(torch.float64).mean(0) - x.to(torch.float64)
    assert torch.allclose(v, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9, 0.999999])
def test_one_point_gives_straight_line(t):
    point = torch.rand(1, 10) * 2 - 1
    x = torch.randn(8, 10)
    v = closed_form_velocity(x, t, point).to(torch.float64)
    expected = (point.to(torch.float64) - x.to(torch.float64)) / (1 - t)
    assert torch.allclose(v, expected, rtol=1e-6)


def test_permuting_the_data_changes_nothing(digits):
    x = flow_queries(digits, 0.5, 64)
    perm = torch.randperm(digits.shape[0], generator=torch.Generator().manual_seed(3))
    a = closed_form_velocity(x, 0.5, digits)
    b = closed_form_velocity(x, 0.5, digits[perm])
    assert relative_error(a, b).max() < 1e-6


@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_chunk_size_does_not_change_the_result(digits, t):
    """Chunks change which weights take the float32 path, so results agree to float32 rounding."""
    x = flow_queries(digits, t, 64)
    full = closed_form_velocity(x, t, digits, chunk_size=digits.shape[0])
    reference = brute_force_velocity(x, t, digits)
    for chunk in (1, 7, 100, 333):
        chunked = closed_form_velocity(x, t, digits, chunk_size=chunk)
        assert relative_error(chunked, full).max() < 1e-5
        assert relative_error(chunked, reference).max() < 1e-5


@pytest.mark.parametrize("t", [0.1, 0.6, 0.99])
def test_merging_two_halves_equals_the_whole(digits, t):
    """In float64 the merge is exact to rounding; in float32 it stays within float32 rounding."""
    x = flow_queries(digits, t, 32)
    half = digits.shape[0] // 2
    reference = brute_force_denoiser(x, t, digits)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        first = closed_form_state(x, t, digits[:half], compute_dtype=dtype)
        second = closed_form_state(x, t, digits[half:], compute_dtype=dtype)
        merged = first.merge(second).denoiser()
        whole = closed_form_state(x, t, digits, compute_dtype=dtype).denoiser()
        assert torch.allclose(merged, whole, rtol=tol, atol=tol)
        assert torch.allclose(merged, reference, rtol=tol, atol=tol)


def test_merge_with_an_empty_state_is_identity(digits):
    x = flow_queries(digits, 0.4, 8)
    state = closed_form_state(x, 0.4, digits)
    merged = SoftmaxState.empty(8, 64).merge(state)
    assert torch.equal(merged.denoiser(), state.denoiser())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_velocity_in_place_equals_velocity_from_the_denoiser(digits, dtype):
    """SoftmaxState.velocity_ overwrites S with (D - x)/(1 - t): bit-identical to
    velocity_from_denoiser on D and the float64 queries, for queries of any float dtype."""
    gen = torch.Generator().manual_seed(7)
    t = torch.rand(32, generator=gen, dtype=torch.float64)
    x = flow_queries(digits, t, 32).to(dtype)
    state = closed_form_state(x, t, digits)
    expected = velocity_from_denoiser(state.denoiser(), x.to(torch.float64), t)
    assert torch.equal(state.velocity_(x, t), expected)


def test_cancellation_trap_two_close_points():
    """Two training points 1e-3 apart at t = 0.999: the GEMM form loses their weights entirely."""
    gen = torch.Generator().manual_seed(0)
    d = 784
    a = torch.rand(d, generator=gen) * 2 - 1
    direction = torch.randn(d, generator=gen)
    b = a + 1e-3 * direction / direction.norm()
    others = torch.rand(500, d, generator=gen) * 2 - 1
    points = torch.cat([a[None], b[None], others])
    t = 0.999
    frac = torch.linspace(0.2, 0.8, 16, dtype=torch.float64)[:, None]
    x = (t * ((1 - frac) * a.double() + frac * b.double())).to(torch.float32)
    state = closed_form_state(x, t, points)
    # Recover the weights of a and b from D = λ_a·a + λ_b·b (+ nothing else): project on b - a.
    diff = (b - a).double()
    lam_b = ((state.denoiser() - a.double()) @ diff) / diff.dot(diff)
    x64, p64 = x.double(), points.double()
    logits = -(x64[:, None, :] - t * p64[None]).square().sum(-1) / (2 * (1 - t) ** 2)
    exact = torch.softmax(logits, dim=1)
    assert (lam_b - exact[:, 1]).abs().max() < 1e-3
    assert exact[:, 1].min() > 0.01 and exact[:, 0].min() > 0.01  # both really compete


@pytest.mark.parametrize("t", [0.5, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("offset,spread", [(100.0, 0.05), (100.0, 0.5), (30.0, 0.05)])
def test_data_far_from_the_origin_matches_float64(offset, spread, t):
    """Points offset + spread·U(-1, 1)^256: their norms dwarf their distances, so float32
    screening is off by up to ~80 nats. The dense float32 sums once cancelled there (relative
    errors up to 0.4, inf and NaN at t = 0.8-0.95); such rows must take exact weights, or
    correct enough of their screened ones to stay an order under the contract's 1e-4."""
    gen = torch.Generator().manual_seed(1)
    points = (torch.rand(3000, 256, generator=gen) * 2 - 1) * spread + offset
    x = flow_queries(points, t, 32, seed=int(t * 100), jitter=0.0)
    v = closed_form_velocity(x, t, points)
    assert torch.isfinite(v).all()
    assert relative_error(v, brute_force_velocity(x, t, points)).max() <= 1e-5


@pytest.mark.parametrize("t", [0.0, 0.5, 0.999, 1 - 1e-6])
@pytest.mark.parametrize("norm", [1e-3, 1.0, 1e2, 1e4])
def test_output_is_finite_for_extreme_t_and_norms(digits, t, norm):
    x = torch.randn(8, 64)
    x = x / x.norm(dim=1, keepdim=True) * norm
    v = closed_form_velocity(x, t, digits)
    assert torch.isfinite(v).all()


def test_batched_t_matches_per_query_t(digits):
    t = torch.tensor([0.0, 0.05, 0.3, 0.6, 0.9, 0.99, 0.999, 0.5])
    x = torch.cat([flow_queries(digits, float(ti), 1, seed=i) for i, ti in enumerate(t)])
    batched = closed_form_velocity(x, t, digits)
    err = relative_error(batched, brute_force_velocity(x, t, digits))
    assert err.max() < 1e-5
    singles = torch.cat([closed_form_velocity(x[i:i + 1], float(t[i]), digits) for i in range(8)])
    assert relative_error(batched, singles).max() < 1e-5


def test_image_shaped_queries_keep_their_shape(digits):
    images = digits.reshape(-1, 1, 8, 8)
    x = flow_queries(digits, 0.5, 4).reshape(4, 1, 8, 8)
    v = closed_form_velocity(x, 0.5, images)
    assert v.shape == (4, 1, 8, 8) and v.dtype == torch.float32


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan])
def test_t_outside_unit_interval_is_a_value_error(digits, bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        closed_form_velocity(torch.zeros(2, 64), bad, digits)


def test_batched_t_of_wrong_length_is_rejected(digits):
    with pytest.raises(ValueError, match="shape"):
        closed_form_velocity(torch.zeros(3, 64), torch.tensor([0.1, 0.2]), digits)


def test_dimension_mismatch_names_both_shapes(digits):
    with pytest.raises(knnflow.InputError, match=r"\(2, 10\).*d=64"):
        closed_form_velocity(torch.zeros(2, 10), 0.5, digits)


def test_nan_queries_are_rejected(digits):
    x = torch.zeros(2, 64)
    x[1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        closed_form_velocity(x, 0.5, digits)


def test_prepared_training_set_matches_raw_tensor(digits):
    x = flow_queries(digits, 0.8, 16)
    prepared = TrainingSet.from_points(digits)
    assert torch.equal(closed_form_velocity(x, 0.8, prepared), closed_form_velocity(x, 0.8, digits))


def test_float16_storage_is_exact_for_its_values(digits):
    half = digits.to(torch.float16)
    x = flow_queries(digits, 0.9, 64)
    err = relative_error(closed_form_velocity(x, 0.9, half), brute_force_velocity(x, 0.9, half))
    assert err.max() < 1e-5


def test_conversions_round_trip(digits):
    x = flow_queries(digits, 0.6, 16).to(torch.float64)
    t = torch.full((16,), 0.6, dtype=torch.float64)
    denoiser = brute_force_denoiser(x, t, digits)
    velocity = velocity_from_denoiser(denoiser, x, t)
    score = score_from_denoiser(denoiser, x, t)
    assert torch.allclose(denoiser_from_velocity(velocity, x, t), denoiser)
    assert torch.allclose(denoiser_from_score(score, x, t), denoiser)
    assert torch.allclose(velocity_from_score(score, x, t), velocity)
    assert torch.allclose(score_from_velocity(velocity, x, t), score)


def test_score_matches_autograd_of_log_density(digits):
    """∇ log Σ_j N(x; t·x_j, (1-t)² I) by autograd equals the closed-form score."""
    t = 0.4
    x = flow_queries(digits, t, 4).to(torch.float64).requires_grad_(True)
    p64 = digits.to(torch.float64)
    log_p = torch.logsumexp(-(x[:, None] - t * p64[None]).square().sum(-1) / (2 * (1 - t) ** 2),
                            dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    score = score_from_denoiser(brute_force_denoiser(x.detach(), t, digits), x.detach(),
                                torch.tensor(t, dtype=torch.float64))
    assert torch.allclose(grad, score, rtol=1e-8, atol=1e-8)


def test_peak_memory_is_bounded_by_the_chunk_not_by_n():
    """A B×n float32 matrix here would be 400 MB; the streaming engine needs a few MB."""
    from knnflow.bench.measure import peak_extra_bytes

    points = torch.rand(400_000, 4) * 2 - 1
    train = TrainingSet.from_points(points)
    x = flow_queries(points, 0.2, 256)
    peak = peak_extra_bytes(lambda: closed_form_state(x, 0.2, train, chunk_size=1024),
                            torch.device("cpu"))
    if peak is None:
        pytest.skip("no /proc/self/statm to sample memory on this platform")
    assert peak < 256 * 400_000 * 4 / 8


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.97])
def test_gpu_settings_match_float64(t, monkeypatch):
    """The GPU's engine settings (16384-point chunks, row limits and flush scaled with them)
    on the CPU: the same accuracy against float64 brute force as the CPU's."""
    from knnflow import closed_form
    from knnflow.engine_settings import CPU_SETTINGS, CUDA_SETTINGS
    from knnflow.synthetic import synthetic_images

    points = synthetic_images(20_000, (3, 4, 4), seed=2).reshape(20_000, -1)
    x = flow_queries(points, t, 24, seed=4)
    reference = brute_force_velocity(x, t, points)
    for settings in (CPU_SETTINGS, CUDA_SETTINGS):
        monkeypatch.setattr(closed_form, "engine_settings", lambda device, chosen=settings: chosen)
        assert relative_error(closed_form_velocity(x, t, points), reference).max() < 1e-5


def test_matmul_input_roundoff_reads_old_and_new_torch_settings():
    """The bounds widen for TF32/bf16 whichever torch API set them; after the newer one is
    used, the older flags raise when read, which must not break the engine."""
    from knnflow.rounding import BF16_ROUNDOFF, TF32_ROUNDOFF, matmul_input_roundoff

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert matmul_input_roundoff(torch.float64, cpu) == 0.0
    assert matmul_input_roundoff(torch.float32, cpu) == 0.0
    try:
        torch.set_float32_matmul_precision("medium")
        assert matmul_input_roundoff(torch.float32, cpu) == BF16_ROUNDOFF
        torch.set_float32_matmul_precision("high")
        assert matmul_input_roundoff(torch.float32, cpu) == TF32_ROUNDOFF
    finally:
        torch.set_float32_matmul_precision("highest")
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert matmul_input_roundoff(torch.float32, cuda) == TF32_ROUNDOFF
        assert matmul_input_roundoff(torch.float32, cpu) == 0.0  # the CPU's own setting
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert matmul_input_roundoff(torch.float32, cuda) == 0.0
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert matmul_input_roundoff(torch.float32, cuda) == 0.0


def test_a_raw_tensor_is_prepared_once_and_again_after_an_in_place_change(digits):
    """closed_form_velocity reuses a tensor's prepared TrainingSet while the tensor is
    unchanged, and prepares it again after an in-place change (its version counter moves)."""
    from knnflow import closed_form

    data = digits.clone()
    x = flow_queries(digits, 0.5, 16)
    first = closed_form.as_training_set(data)
    assert closed_form.as_training_set(data) is first
    before = closed_form_velocity(x, 0.5, data)
    data[:100] = -data[:100]
    assert closed_form.as_training_set(data) is not first
    after = closed_form_velocity(x, 0.5, data)
    assert relative_error(after, brute_force_velocity(x, 0.5, data)).max() < 1e-5
    assert relative_error(before, brute_force_velocity(x, 0.5, digits)).max() < 1e-5
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 0.95, 0.999])
def test_largest_logits_are_the_float64_maximum(t):
    """largest_logits over two chunks of 8,192 points equals the float64 brute-force maximum
    of -‖x - t·x_j‖² / (2(1-t)²), queries near training points and far from them."""
    from knnflow.synthetic import synthetic_images

    points = synthetic_images(10_000, (3, 8, 8), seed=3).reshape(10_000, -1)
    gen = torch.Generator().manual_seed(1)
    near = points[torch.randint(10_000, (16,), generator=gen)].double() * t
    x = torch.cat([near + 1e-3 * torch.randn(near.shape, generator=gen, dtype=torch.float64),
                   torch.randn(16, points.shape[1], generator=gen, dtype=torch.float64)])
    p64 = points.double()
    expected = (-(x[:, None, :] - t * p64[None]).square().sum(-1) / (2 * (1 - t) ** 2)).amax(1)
    got = largest_logits(x, t, points)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
