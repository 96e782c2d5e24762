"""The exact engine's contract against an independent float64 reference, case by case.

Contract: over a batch, the relative error ‖v - û*‖/‖û*‖ has median ≤ 1e-5 and maximum ≤ 1e-4,
for every class of query: held-out x_t over t in [0, 1), training images used as queries,
points near the data mean and points near fixed points of the denoiser. The cases below come
from an independent audit; each test says what it checks and why.

The reference is written here, not taken from the library or from conftest: float64 throughout,
logits from the explicit differences x - t·x_j (never the dot form, which cancels as t → 1),
a max-shifted softmax over all n points, and the velocity summed as Σ_j λ_j (x_j - x)/(1-t)
(never (D - x)/(1-t), which cancels where D ≈ x), in blocks of queries so memory stays small.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

import knnflow
import knnflow.closed_form
from knnflow.errors import InputError

MEDIAN_LIMIT, MAX_LIMIT = 1e-5, 1e-4
# float64 values of width d per reference block: two (rows, n, d) tensors of 16 MB each.
REFERENCE_BLOCK = 1 << 21


# --------------------------------------------------------------------------- reference


def reference(x: Tensor, t: float | Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """(denoiser, velocity) in float64, (B, d) each, by brute force over every point."""
    x64 = x.reshape(x.shape[0], -1).to(torch.float64)
    p64 = points.reshape(points.shape[0], -1).to(torch.float64)
    t64 = torch.as_tensor(t, dtype=torch.float64).expand(x64.shape[0])
    n, d = p64.shape
    rows = max(1, REFERENCE_BLOCK // (n * d))
    denoiser, velocity = torch.empty_like(x64), torch.empty_like(x64)
    for start in range(0, x64.shape[0], rows):
        xb, tb = x64[start:start + rows], t64[start:start + rows, None]
        diff = xb[:, None, :] - tb[:, :, None] * p64[None]
        logits = -diff.square().sum(dim=2) / (2 * (1 - tb) ** 2)
        weights = torch.softmax(logits, dim=1)  # exp(ℓ - max ℓ) / Σ exp(ℓ - max ℓ)
        denoiser[start:start + rows] = weights @ p64
        towards = p64[None] - xb[:, None, :]  # x_j - x, explicitly
        velocity[start:start + rows] = torch.bmm(weights[:, None, :], towards).squeeze(1) / (
            1 - tb)
    return denoiser, velocity


def relative_errors(estimate: Tensor, exact: Tensor) -> Tensor:
    estimate = estimate.reshape(estimate.shape[0], -1).to(torch.float64)
    exact = exact.reshape(exact.shape[0], -1)
    return (estimate - exact).norm(dim=1) / exact.norm(dim=1)


def assert_contract(estimate: Tensor, exact: Tensor) -> None:
    """Finite, and relative errors with median ≤ 1e-5 and maximum ≤ 1e-4."""
    assert bool(torch.isfinite(estimate).all()), (
        f"{int((~torch.isfinite(estimate)).any(dim=-1).sum())} rows are not finite")
    errors = relative_errors(estimate, exact)
    median, worst = float(errors.median()), float(errors.max())
    assert median <= MEDIAN_LIMIT and worst <= MAX_LIMIT, (
        f"relative error median {median:.2e} (limit {MEDIAN_LIMIT:.0e}), "
        f"max {worst:.2e} (limit {MAX_LIMIT:.0e})")


# --------------------------------------------------------------------------- data and APIs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on the shared 2-core machine a second thread waits
    for a core that another process holds (docs/architecture.md: up to 10× slower; here 70 s
    against 10 s for this file), and with one thread the summation order, hence every error
    measured, is the same from run to run. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def digits(split: str = "train") -> Tensor:
    """The embedded digits, (N, 64) float32 in [-1, 1]: 1498 train, 299 test."""
    return knnflow.load_dataset("digits", split=split).reshape(-1, 64)


@functools.cache
def digits_index() -> knnflow.Index:
    return knnflow.Index.build(digits(), dataset={"name": "digits", "split": "train"})


@functools.cache
def uniform_points() -> Tensor:
    """100 points of U(-1, 1)^16, the audit's small data set for dtype and range cases."""
    return torch.rand(100, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1


def through_closed_form(x: Tensor, t, data: Tensor) -> Tensor:
    return knnflow.closed_form_velocity(x, t, data)


def through_exact_velocity(x: Tensor, t, data: Tensor) -> Tensor:
    return knnflow.ExactVelocity(data)(x, t).velocity


def through_streaming(x: Tensor, t, data: Tensor) -> Tensor:
    """The streaming engine: chunks smaller than the data set (small sets otherwise take the
    one-pass path, closed_form._one_pass)."""
    return knnflow.closed_form_velocity(x, t, data, chunk_size=min(512, (data.shape[0] + 1) // 2))


VELOCITY_APIS = {"closed_form_velocity": through_closed_form,
                 "ExactVelocity": through_exact_velocity,
                 "streaming": through_streaming}
api_param = pytest.mark.parametrize("api", list(VELOCITY_APIS))


# --------------------------------------------------------------------------- 1. the data mean


@api_param
@pytest.mark.parametrize("scale", [1e-2, 1e-3])
@pytest.mark.parametrize("t", [0.0, 1e-3, 1e-2])
def test_queries_near_the_data_mean(api, t, scale):
    """Queries mean + scale·N(0, I) at t = 0 and just above it, on digits.

    Next to the mean û* is small beside x (‖û*‖/‖x‖ ≈ 1.5e-2 for scale 1e-2, 1.5e-3 to 3.4e-3
    for scale 1e-3) while D ≈ mean, so a denoiser accurate only to float32 rounding
    (~1e-7·‖x‖) misses the contract by a factor ‖x‖/‖û*‖. The audit reported 2.0e-4 at t = 0
    with scale 1e-2. At exactly t = 0 every weight is 1 and the digits (multiples of 1/8) sum
    exactly even in float32, so the error shows from t > 0 on, and more so with scale 1e-3.
    """
    data = digits()
    gen = torch.Generator().manual_seed(11)
    mean = data.to(torch.float64).mean(dim=0)
    x = (mean + scale * torch.randn(64, 64, generator=gen, dtype=torch.float64)).to(
        torch.float32)
    _, exact = reference(x, t, data)
    assert_contract(VELOCITY_APIS[api](x, t, data), exact)


# --------------------------------------------------------------------------- 2. fixed points


@functools.cache
def denoiser_fixed_points(t: float) -> Tensor:
    """x* with D(x*, t) = x* (float64), by iterating x ← D(x, t) from 4 seeded noise draws."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for _ in range(2000):
        denoised, _ = reference(x, t, digits())
        residual = float(((denoised - x).norm(dim=1) / denoised.norm(dim=1)).max())
        x = denoised
        if residual <= 1e-12:
            return x
    raise AssertionError(f"x ← D(x, {t}) did not converge (relative residual {residual:.1e})")


@api_param
@pytest.mark.parametrize("eps", [1e-2, 1e-3])
@pytest.mark.parametrize("t", [0.05, 0.2, 0.4])
def test_queries_near_fixed_points_of_the_denoiser(api, t, eps):
    """Float64 queries x* + eps·N(0, I) next to fixed points x* = D(x*, t) on digits.

    At x* the velocity vanishes, so next to it ‖û*‖ is small: ‖û*‖/‖x‖ ≈ 1.6e-2 for
    eps = 1e-2 and ≈ 1.6e-3 for eps = 1e-3 (2e-2 and 2e-3 at t = 0.4; asserted below), i.e.
    ‖û*‖ ≈ 8e-3 against ‖x‖ ≈ 5-7: about 13 orders of magnitude above float64 rounding of x,
    so the contract applies, but a denoiser accurate only to float32 rounding of x misses it.
    The audit measured 2.5e-4 at t = 0.05. At t = 0.05 and 0.2 every start converges to one
    point near the data mean; at t = 0.4 the four starts find different fixed points.
    """
    data = digits()
    fixed = denoiser_fixed_points(t)
    gen = torch.Generator().manual_seed(int(1000 * t) + int(1 / eps))
    x = fixed.repeat(16, 1) + eps * torch.randn(64, 64, generator=gen, dtype=torch.float64)
    _, exact = reference(x, t, data)
    ratio = float((exact.norm(dim=1) / x.norm(dim=1)).median())
    assert eps <= ratio <= 3 * eps  # the regime the docstring describes
    assert_contract(VELOCITY_APIS[api](x, t, data), exact)


# --------------------------------------------------------------------------- 3. training images


@functools.cache
def training_image_case(t: float) -> tuple[Tensor, Tensor]:
    ids = torch.randperm(1498, generator=torch.Generator().manual_seed(6))[:160]
    x = digits()[ids]
    return x, reference(x, t, digits())[1]


@api_param
@pytest.mark.parametrize("t", [0.06, 0.1, 0.16, 0.3, 0.5, 0.7])
def test_training_images_as_queries(api, t):
    """160 training images x = x_j used as queries at time t, on digits.

    The audit reported medians 1.3e-5 / 1.8e-5 / 4.5e-5 at t = 0.06 / 0.1 / 0.16. For larger t,
    D(x_j) approaches x_j and ‖û*‖ falls fast (at t ≥ 0.9 some û* underflow to 0 in float64).
    Rows with ‖û*‖ < 1e-8·‖x‖ are left out: there (D - x)/(1-t) cancels to ~1e-16·‖x‖/‖û*‖
    relative even from a float64 D. The rows kept at t = 0.7 reach ‖û*‖/‖x‖ ≈ 1e-8, where D
    must be accurate far below float32 rounding of x.
    """
    x, exact = training_image_case(t)
    keep = exact.norm(dim=1) >= 1e-8 * x.to(torch.float64).norm(dim=1)
    assert int(keep.sum()) >= 64
    velocity = VELOCITY_APIS[api](x, t, digits())
    assert_contract(velocity[keep], exact[keep])


# --------------------------------------------------------------------------- 4. half precision


HALF_TYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@api_param
@pytest.mark.parametrize("t", [0.5, 0.99999])
@pytest.mark.parametrize("half", list(HALF_TYPES))
def test_half_precision_queries_get_float32_velocities(api, half, t):
    """float16 / bfloat16 queries: the velocity comes back in float32, finite and exact.

    Rounding û* to float16 (2^-11 relative) or bfloat16 (2^-8) alone breaks the contract, and
    at t = 0.99999 (‖û*‖ up to ~5e5) float16 overflows to inf; the estimators already return
    float32 for half queries (estimators.output_dtype). The reference is evaluated at the
    same half-rounded x. Data: U(-1, 1)^16, n = 100.
    """
    data = uniform_points()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7)).to(HALF_TYPES[half])
    velocity = VELOCITY_APIS[api](x, t, data)
    _, exact = reference(x, t, data)
    errors = relative_errors(velocity, exact)
    assert velocity.dtype == torch.float32 and velocity.shape == x.shape, (
        f"velocity {velocity.dtype} {tuple(velocity.shape)}, finite: "
        f"{bool(torch.isfinite(velocity).all())}, relative error median "
        f"{float(errors.median()):.2e}, max {float(errors.max()):.2e}")
    assert_contract(velocity, exact)


@pytest.mark.parametrize("t", [0.5, 0.99999])
@pytest.mark.parametrize("half", list(HALF_TYPES))
def test_half_precision_queries_get_float32_denoisers(half, t):
    """closed_form_denoiser on half queries: float32, within the contract of the reference D.

    The same loss as for the velocity: rounding D to float16 or bfloat16 is 2^-11 or 2^-8
    relative, above the contract's 1e-4 (this goes one step past the audit, which named the
    velocity; the two functions are documented alike, "shaped and typed like x").
    """
    data = uniform_points()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(8)).to(HALF_TYPES[half])
    denoiser = knnflow.closed_form_denoiser(x, t, data)
    exact, _ = reference(x, t, data)
    errors = relative_errors(denoiser, exact)
    assert denoiser.dtype == torch.float32, (
        f"denoiser {denoiser.dtype}, relative error median {float(errors.median()):.2e}, "
        f"max {float(errors.max()):.2e}")
    assert_contract(denoiser, exact)


# --------------------------------------------------------------------------- 5. huge queries


@api_param
@pytest.mark.parametrize("scale, t", [(1e20, 0.9), (1e40, 0.0), (1e37, 0.9), (1e40, 0.5),
                                      (1e100, 0.99)])
def test_huge_float64_queries_stay_finite_and_exact(api, scale, t):
    """Finite float64 queries far outside float32 range: û* ≈ -x/(1-t), finite.

    The float32 screen takes x·t/(1-t)², which overflows float32 above ~3e38: the audit found
    NaN without an error, e.g. for randn(2, 16)·1e40 at t = 0.5. The velocity is -x/(1-t) up
    to the data's scale, and the float64 reference gets it to ~‖x_j‖/‖x‖ relative whatever its
    weights (its logits cannot separate the points at this scale, and need not). 1e20 at
    t = 0.9 and 1e40 at t = 0 keep the screen inside float32 range (regression rows).
    """
    data = uniform_points()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, generator=gen, dtype=torch.float64) * scale
    velocity = VELOCITY_APIS[api](x, t, data)
    assert velocity.dtype == torch.float64
    _, exact = reference(x, t, data)
    assert bool(torch.isfinite(exact).all())
    assert_contract(velocity, exact)


# --------------------------------------------------------------------------- 6. non-finite search


@pytest.mark.parametrize("method", ["auto", "faiss", "sketch"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_search_rejects_non_finite_queries(method, bad):
    """Index.search on a query holding NaN or ±inf raises InputError with a one-line message.

    The audit found ids [0, 0] and inf distances returned for that row without an error: a
    caller cannot tell them from an answer (the estimators already refuse such queries).
    """
    queries = digits()[:3].clone()
    queries[1, 5] = bad
    with pytest.raises(InputError) as raised:
        digits_index().search(queries, 2, method=method)
    assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------- 7. empty batches


EMPTY_SHAPES = [(0, 64), (0, 1, 8, 8)]
EMPTY_TIMES = {"float": 0.5, "(0,) tensor": torch.zeros(0, dtype=torch.float64)}


@pytest.mark.parametrize("times", list(EMPTY_TIMES))
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_batch_closed_form(shape, times):
    """closed_form_velocity and closed_form_denoiser on B = 0: empty outputs shaped like x
    (the audit found a raw RuntimeError from reshape(0, -1)), as the estimators give."""
    x, t = torch.zeros(shape), EMPTY_TIMES[times]
    velocity = knnflow.closed_form_velocity(x, t, digits())
    denoiser = knnflow.closed_form_denoiser(x, t, digits())
    for out in (velocity, denoiser):
        assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.parametrize("estimator", ["ExactVelocity", "KNNVelocity"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_batch_estimators(estimator, shape):
    """The estimators on B = 0: velocity shaped like x, (0,) bound and evaluated counts."""
    est = (knnflow.ExactVelocity(digits()) if estimator == "ExactVelocity"
           else knnflow.KNNVelocity(digits_index(), tol=1e-4))
    out = est(torch.zeros(shape), 0.5)
    assert out.velocity.shape == shape and out.velocity.dtype == torch.float32
    assert out.error_bound.shape == (0,) and out.evaluated.shape == (0,)


@pytest.mark.parametrize("method", ["auto", "faiss", "sketch"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_batch_search(shape, method):
    """Index.search on B = 0: (0, k) float64 distances and (0, k) int64 ids on every route
    (the audit found a raw RuntimeError from reshape(0, -1))."""
    result = digits_index().search(torch.zeros(shape), 3, method=method)
    assert result.sq_distances.shape == (0, 3) and result.sq_distances.dtype == torch.float64
    assert result.ids.shape == (0, 3) and result.ids.dtype == torch.int64


# --------------------------------------------------------------------------- 8. duplicate ties


@dataclasses.dataclass(frozen=True)
class Duplicates:
    index: knnflow.Index
    queries: Tensor   # (600, d): each exactly equal to a training point (3 copies each)
    copies: Tensor    # (600, 3): the ids of each query's copies, ascending


@functools.cache
def duplicates() -> Duplicates:
    """1366 distinct points of U(-1, 1)^256, each stored 3 times at shuffled ids (n = 4098).

    n ≥ 4096 and d ≥ 256 put method="auto" on the sketch route. 600 queries of width 256 are
    enough for FAISS to take its GEMM distance form (‖q‖² + ‖x‖² - 2⟨q, x⟩) in one call,
    whose float32 rounding differs between identical rows stored at different positions.
    """
    gen = torch.Generator().manual_seed(0)
    distinct, copies, dim = 1366, 3, 256
    base = torch.rand(distinct, dim, generator=gen) * 2 - 1
    perm = torch.randperm(distinct * copies, generator=gen)
    data = base.repeat(copies, 1)[perm]  # row i is base[perm[i] % distinct]
    source = perm % distinct
    ids_of = torch.argsort(source * (distinct * copies) + torch.arange(len(perm)))
    ids_of = ids_of.reshape(distinct, copies)  # per base point, its ids in ascending order
    pick = torch.randint(distinct, (600,), generator=gen)
    index = knnflow.Index.build(data, dataset={"name": "duplicates"})
    return Duplicates(index, base[pick].clone(), ids_of[pick])


def search_in_layout(index: knnflow.Index, queries: Tensor, k: int, method: str,
                     layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """(rows searched, ids, distances) with the batch cut as `layout` says."""
    if layout == "one batch":
        result = index.search(queries, k, method=method)
        return torch.arange(len(queries)), result.ids, result.sq_distances
    size, count = (7, 70) if layout == "batches of 7" else (1, 12)
    parts = [index.search(queries[s:s + size], k, method=method)
             for s in range(0, count, size)]
    return (torch.arange(count), torch.cat([p.ids for p in parts]),
            torch.cat([p.sq_distances for p in parts]))


@pytest.mark.parametrize("layout", ["one batch", "batches of 7", "alone"])
@pytest.mark.parametrize("method", ["faiss", "sketch", "auto"])
@pytest.mark.parametrize("k", [2, 3])
def test_duplicates_come_in_id_order_on_every_route(k, method, layout):
    """Queries equal to a triplicated training point: the k nearest are its k lowest ids.

    All copies lie at distance 0 exactly, so the exact answer breaks the tie by id (as
    docs/architecture.md says). On the FAISS route the float64 rerank kept FAISS's order among
    equal distances, and in a large batch FAISS's GEMM distances order identical rows by
    rounding: the answer then depended on the batch (k = 2 also checks which copies are
    kept when the tie group is cut).
    """
    case = duplicates()
    rows, ids, distances = search_in_layout(case.index, case.queries, k, method, layout)
    assert bool((distances == 0).all())
    wrong = (ids != case.copies[rows, :k]).any(dim=1)
    assert not bool(wrong.any()), (
        f"{int(wrong.sum())} of {len(rows)} queries: first wrong row got ids "
        f"{ids[wrong][0].tolist()}, expected {case.copies[rows][wrong][0, :k].tolist()}")


class TiesReversed:
    """A FAISS index whose results list equal distances in descending id order.

    FAISS promises nothing about the order of equal distances (its GPU k-selection does not
    keep ids in order, and on the CPU the GEMM form's rounding decides), so an exact search
    must not depend on it. Everything else is the wrapped index.
    """

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def search(self, queries, k):
        distances, ids = self.inner.search(queries, k)
        ids = ids.copy()
        for row in range(len(ids)):
            order = np.lexsort((-ids[row], distances[row]))  # by distance, then id descending
            ids[row] = ids[row][order]
            distances[row] = distances[row][order]
        return distances, ids


@pytest.mark.parametrize("k", [1, 2, 3])
def test_duplicates_come_in_id_order_whatever_faiss_does_with_ties(k):
    """method="faiss" with a FAISS stand-in that lists ties in descending id order: the ids
    must still be each query's k lowest copies (the rerank must break ties by id itself)."""
    case = duplicates()
    index = dataclasses.replace(case.index, faiss_index=TiesReversed(case.index.faiss()))
    result = index.search(case.queries[:32], k, method="faiss")
    wrong = (result.ids != case.copies[:32, :k]).any(dim=1)
    assert not bool(wrong.any()), (
        f"{int(wrong.sum())} of 32 queries: first wrong row got ids "
        f"{result.ids[wrong][0].tolist()}, expected {case.copies[:32][wrong][0, :k].tolist()}")


# --------------------------------------------------------------------------- 9. certified bound


@functools.cache
def certified_case(case: str) -> tuple[knnflow.VelocityOutput, Tensor]:
    """KNNVelocity's output and the float64 reference velocity for one seeded batch."""
    gen = torch.Generator().manual_seed(0)
    if case == "digits, t in [0.65, 0.85]":
        data, count = digits(), 512
        t = 0.65 + 0.2 * torch.rand(count, generator=gen, dtype=torch.float64)
        estimator = knnflow.KNNVelocity(digits_index(), tol=1e-4, route="certify")
    else:  # "100 digits, t = 0.3" or "... 0.5": few enough points that K can be all of them
        data, count = digits()[:100], 64
        t = torch.full((count,), float(case.rsplit("=", 1)[1]), dtype=torch.float64)
        estimator = knnflow.KNNVelocity(knnflow.Index.build(data), tol=1e-4, calibrate=False,
                                        route="certify")
    x1 = data[torch.randint(len(data), (count,), generator=gen)].to(torch.float64)
    noise = torch.randn(count, data.shape[1], generator=gen, dtype=torch.float64)
    x = ((1 - t)[:, None] * noise + t[:, None] * x1).to(torch.float32)
    return estimator(x, t), reference(x, t, data)[1]


@pytest.mark.parametrize("case", ["digits, t in [0.65, 0.85]", "100 digits, t = 0.3",
                                  "100 digits, t = 0.5"])
def test_certified_bound_covers_the_returned_float32_velocity(case):
    """For every certified row (not fallback, not routed), ‖returned velocity - û*‖ ≤
    error_bound, with the float32 velocity as returned and no allowance for its rounding.

    The bound covers the left-out mass, which can be far below float32 rounding of ‖û*‖
    (~6e-8·‖û*‖): where the kept set is (nearly) every point, the bound falls to
    e^-L·reach/(1-t) (L ≈ 21 at tol = 1e-4), ~1e-8 against ‖û*‖ ≈ 10. That happens on a
    100-point index at t = 0.3-0.5, and for a few rows of a seeded digits batch at t ≈ 0.7-0.8
    (bounds down to ~2.5e-8, float32 rounding ~2.7e-7). It does not happen near t = 1 on
    digits: there the threshold term keeps the bound near 1.5e-5·‖û*‖.
    """
    out, exact = certified_case(case)
    certified = ~out.fallback & ~out.routed
    assert int(certified.sum()) >= 32
    assert out.velocity.dtype == torch.float32
    errors = (out.velocity.to(torch.float64) - exact).norm(dim=1)
    broken = certified & (errors > out.error_bound)
    assert not bool(broken.any()), (
        f"{int(broken.sum())} of {int(certified.sum())} certified rows exceed their bound; "
        f"worst error/bound {float((errors[broken] / out.error_bound[broken]).max()):.1f}, "
        f"smallest bound {float(out.error_bound[broken].min()):.1e}")


# --------------------------------------------------------------------------- 10. held-out x_t


HELD_OUT_TS = [round(0.05 * i, 2) for i in range(20)]


@functools.cache
def held_out_case(t: float | str) -> tuple[Tensor, Tensor | float, Tensor]:
    """(x, t, reference velocity): x_t = (1-t)·x0 + t·x1 with x1 from the test split."""
    seed = 100 + (int(round(100 * t)) if t != "U[0,1)" else 0)
    gen = torch.Generator().manual_seed(seed)
    held_out = digits("test")
    count = 256 if t == "U[0,1)" else 128
    times = (torch.rand(count, generator=gen, dtype=torch.float64) if t == "U[0,1)"
             else torch.full((count,), t, dtype=torch.float64))
    x1 = held_out[torch.randint(len(held_out), (count,), generator=gen)].to(torch.float64)
    x0 = torch.randn(count, 64, generator=gen, dtype=torch.float64)
    x = ((1 - times)[:, None] * x0 + times[:, None] * x1).to(torch.float32)
    t_arg = times if t == "U[0,1)" else t
    return x, t_arg, reference(x, t_arg, digits())[1]


@api_param
@pytest.mark.parametrize("t", HELD_OUT_TS + ["U[0,1)"])
def test_held_out_flow_queries_meet_the_contract(api, t):
    """Held-out x_t (x1 from the test split, x0 ~ N(0, I)) on the grid t = 0, 0.05, ..., 0.95
    and a batch with t ~ U[0, 1): the contract as stated, for closed_form_velocity and
    ExactVelocity. A regression test: the audit found no failure here."""
    x, t_arg, exact = held_out_case(t)
    assert_contract(VELOCITY_APIS[api](x, t_arg, digits()), exact)


# --------------------------------------------------------------------------- 11. one pass


def count_streaming_calls(monkeypatch) -> list[int]:
    """Rows handed to the streaming engine, call by call."""
    calls: list[int] = []
    stream = knnflow.closed_form._stream

    def spy(x64, *args, **kwargs):
        calls.append(x64.shape[0])
        return stream(x64, *args, **kwargs)

    monkeypatch.setattr(knnflow.closed_form, "_stream", spy)
    return calls


@pytest.mark.parametrize("t", [0.75, 0.8, 0.9999])
def test_one_pass_makes_coarse_rows_exact(monkeypatch, t):
    """Small sets take one pass (closed_form._one_pass). At t = 0.75-0.8 some held-out rows'
    float32 error estimates are too high and they are made exact from their few live weights
    or a float64 GEMM; at t = 0.9999 the float32 screen is too coarse for the weight floor
    in every row (bound ~10^3 nats) and only screens for the few weights that may matter,
    computed from differences. None reaches the streaming engine, and all meet the
    contract."""
    calls = count_streaming_calls(monkeypatch)
    gen = torch.Generator().manual_seed(int(t * 1e4))
    x1 = digits("test")[torch.randint(299, (128,), generator=gen)]
    x = (1 - t) * torch.randn(128, 64, generator=gen) + t * x1
    _, exact = reference(x, t, digits())
    assert_contract(knnflow.closed_form_velocity(x, t, digits()), exact)
    assert calls == []


def test_one_pass_weighs_inaccurate_rows_with_few_live_points_from_differences(monkeypatch):
    """At t = 0.8 some held-out rows' float32 error estimates exceed FLOAT64_TARGET: a few
    points share their mass. The points within the dropped-mass margin, read off the float32
    weights, are few, and are weighed from float64 differences, with no float64 GEMM. With
    EngineSettings.one_pass_pair_rows = 0 the same rows take the float64 GEMM instead. Both
    ways meet the contract."""
    import dataclasses

    from knnflow.engine_settings import CPU_SETTINGS

    gen = torch.Generator().manual_seed(80)
    t = 0.8
    x1 = digits("test")[torch.randint(299, (256,), generator=gen)]
    x = (1 - t) * torch.randn(256, 64, generator=gen) + t * x1
    _, exact = reference(x, t, digits())
    holds, pairs_into = knnflow.closed_form.dot_form_holds, knnflow.closed_form._live_pairs_into
    routes: dict[str, list[int]] = {}

    def gemm_spy(x_norm, *args):
        routes["gemm"].append(x_norm.shape[0])
        return holds(x_norm, *args)

    def pairs_spy(state, x64, t, s, train, done, live):
        routes["pairs"].append(done.shape[0])
        return pairs_into(state, x64, t, s, train, done, live)

    monkeypatch.setattr(knnflow.closed_form, "dot_form_holds", gemm_spy)
    monkeypatch.setattr(knnflow.closed_form, "_live_pairs_into", pairs_spy)
    found = {}
    for pair_rows in (CPU_SETTINGS.one_pass_pair_rows, 0):
        chosen = dataclasses.replace(CPU_SETTINGS, one_pass_pair_rows=pair_rows)
        monkeypatch.setattr(knnflow.closed_form, "engine_settings",
                            lambda device, chosen=chosen: chosen)
        routes.update(gemm=[], pairs=[])
        assert_contract(knnflow.closed_form_velocity(x, t, digits()), exact)
        found[pair_rows] = {route: sum(rows) for route, rows in routes.items()}
    paired = found[CPU_SETTINGS.one_pass_pair_rows]["pairs"]
    assert paired >= 10  # the case at issue
    assert found[CPU_SETTINGS.one_pass_pair_rows]["gemm"] == 0
    assert found[0] == {"gemm": paired, "pairs": 0}


def test_one_pass_error_estimate_leaves_out_the_exact_top(monkeypatch):
    """One pass makes each row's top weight exact (_exact_top_), so its float32 error comes
    from the other weights, the largest at most 1 - λ_top of the total. Rows whose top holds
    most of the weight, and whose estimate from that (in float64, by brute force:
    SCREEN_SAFETY·σ·√((1 - λ_top)·V)/‖D - x‖ plus the float32 sums' rounding) lies under
    half FLOAT64_TARGET, take no float64 GEMM, and still meet the contract; an estimate
    that counted the top as screened (λ_top) sent many of them to it."""
    from knnflow.closed_form import FLOAT64_TARGET, SCREEN_SAFETY
    from knnflow.rounding import FLOAT32_ROUNDOFF, screening_error_bound

    data = digits()
    p64 = data.to(torch.float64)
    gen = torch.Generator().manual_seed(85)
    t = 0.9
    x1 = digits("test")[torch.randint(299, (512,), generator=gen)]
    x = (1 - t) * torch.randn(512, 64, generator=gen) + t * x1
    x64 = x.to(torch.float64)
    logits = -(x64[:, None, :] - t * p64[None]).square().sum(dim=2) / (2 * (1 - t) ** 2)
    weights = torch.softmax(logits, dim=1)
    denoiser = weights @ p64
    spread = weights @ p64.square().sum(dim=1) - denoiser.square().sum(dim=1)
    gap = (denoiser - x64).norm(dim=1)
    top = weights.max(dim=1).values
    _, typical = screening_error_bound(x64.norm(dim=1), torch.full((512,), t, dtype=torch.float64),
                                       float(p64.norm(dim=1).max()), 64, torch.float32,
                                       x.device)
    without_top = SCREEN_SAFETY * typical * ((1 - top).clamp(min=0) * spread).sqrt() / gap
    with_top = SCREEN_SAFETY * typical * (top * spread).sqrt() / gap
    sums = FLOAT32_ROUNDOFF * (data.shape[0] ** 0.5 * denoiser.norm(dim=1)) / gap
    clear = (top > 0.5) & (without_top + sums < FLOAT64_TARGET / 2)
    assert int((clear & (with_top > FLOAT64_TARGET)).sum()) >= 20  # the case at issue
    redone: list[int] = []
    holds = knnflow.closed_form.dot_form_holds

    def spy(x_norm, *args):
        redone.append(x_norm.shape[0])
        return holds(x_norm, *args)

    monkeypatch.setattr(knnflow.closed_form, "dot_form_holds", spy)
    rows = clear.nonzero().squeeze(1)
    _, exact = reference(x[rows], t, data)
    assert_contract(knnflow.closed_form_velocity(x[rows], t, data), exact)
    assert redone == []


def test_one_pass_leaves_many_live_near_copies_to_the_streaming_engine(monkeypatch):
    """200 copies of one image: a query next to it at t = 0.9999 keeps all 200 live, more
    than one pass computes from differences (EngineSettings.one_pass_pair_rows), so those
    rows, and only those, go to the streaming engine; the batch still meets the contract."""
    calls = count_streaming_calls(monkeypatch)
    data = torch.cat([digits()[:300], digits()[:1].repeat(200, 1)])
    gen = torch.Generator().manual_seed(12)
    near = data[:1] + 1e-3 * torch.randn(8, 64, generator=gen)
    t = 0.9999
    x1 = digits("test")[:56]
    x = torch.cat([near, (1 - t) * torch.randn(56, 64, generator=gen) + t * x1])
    _, exact = reference(x, t, data)
    assert_contract(knnflow.closed_form_velocity(x, t, data), exact)
    assert calls == [8]


def test_one_pass_screens_in_the_centred_frame_where_it_errs_less(monkeypatch):
    """The digits' largest norm shrinks from 7.5 to 6.0 about their mean, so a batch whose
    screen would err by more than SCREEN_CENTRE_NATS is screened in the centred frame: its
    logits there err within screening_error_bound's proven bound for the frame (against
    float64 differences, on the digits shifted further from the origin too), fewer rows need
    float64 pairs at t = 0.75 than without the frame, and both ways meet the contract."""
    from knnflow.closed_form import TrainingSet, screened_logits
    from knnflow.rounding import screening_error_bound

    for shift in (0.0, 2.0):
        points = digits().to(torch.float64) + shift
        train = TrainingSet.from_points(points)
        frame = train.screen_frame()
        assert frame.center is not None
        assert frame.max_norm < 0.9 * train.max_norm
        gen = torch.Generator().manual_seed(7)
        for t in (0.3, 0.75, 0.95):
            x1 = digits("test")[torch.randint(299, (128,), generator=gen)].double() + shift
            x64 = (1 - t) * torch.randn(128, 64, generator=gen, dtype=torch.float64) + t * x1
            xs = x64 - t * frame.center
            s = 0.5 / (1 - t) ** 2
            got = screened_logits(xs, t, s, frame.points, frame.sq_norms).double()
            exact = s * (xs.square().sum(dim=1, keepdim=True)
                         - (x64[:, None, :] - t * points[None]).square().sum(dim=2))
            proven, _ = screening_error_bound(xs.norm(dim=1), t, frame.max_norm, 64,
                                              torch.float32, x64.device, s)
            assert bool(((got - exact).abs().amax(dim=1) <= proven).all())

    gen = torch.Generator().manual_seed(81)
    t = 0.75
    x1 = digits("test")[torch.randint(299, (256,), generator=gen)]
    x = (1 - t) * torch.randn(256, 64, generator=gen) + t * x1
    _, exact = reference(x, t, digits())
    pairs_into = knnflow.closed_form._live_pairs_into
    paired: list[int] = []

    def pairs_spy(state, x64, t, s, train, done, live):
        paired.append(done.shape[0])
        return pairs_into(state, x64, t, s, train, done, live)

    monkeypatch.setattr(knnflow.closed_form, "_live_pairs_into", pairs_spy)
    counts = []
    for nats in (knnflow.closed_form.SCREEN_CENTRE_NATS, math.inf):
        monkeypatch.setattr(knnflow.closed_form, "SCREEN_CENTRE_NATS", nats)
        paired.clear()
        assert_contract(knnflow.closed_form_velocity(x, t, digits()), exact)
        counts.append(sum(paired))
    assert counts[1] >= 10  # without the frame: the case at issue
    assert counts[0] <= counts[1] // 3


def test_one_pass_estimate_is_the_same_in_numpy_and_torch():
    """The one pass's error estimate runs in numpy on CPUs and in torch elsewhere (GPUs): the
    two agree to float64 rounding on random rows, on rows where Z = 1 (one weight) and on a
    row with D = x (‖D - x‖ ≈ 0: an estimate that fails FLOAT64_TARGET either way)."""
    from knnflow.closed_form import FLOAT64_TARGET, _one_pass_estimate

    gen = torch.Generator().manual_seed(11)
    f64 = dict(dtype=torch.float64)
    z = 1 + 50 * torch.rand(64, generator=gen, **f64)
    z[:4] = 1.0
    x = torch.randn(64, 8, generator=gen, **f64)
    d = torch.randn(64, 8, generator=gen, **f64)
    d[-1] = x[-1]
    sums = z[:, None] * d
    q = z * (d.square().sum(dim=1) + torch.rand(64, generator=gen, **f64))
    typical = 1e-6 * torch.rand(64, generator=gen, **f64)
    args = (z, sums.norm(dim=1), (sums * x).sum(dim=1), q, x.square().sum(dim=1), typical, 500)
    in_numpy = _one_pass_estimate(*args, in_numpy=True)
    in_torch = _one_pass_estimate(*args, in_numpy=False)
    assert not bool(in_numpy[-1] <= FLOAT64_TARGET) and not bool(in_torch[-1] <= FLOAT64_TARGET)
    torch.testing.assert_close(in_numpy[:-1], in_torch[:-1], rtol=1e-12, atol=0)
    assert bool((in_torch[:-1] > 0).all())
