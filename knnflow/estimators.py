"""Estimators of û*(x, t) behind one interface: est(x, t) -> VelocityOutput.

- `ExactVelocity` streams the whole training set (closed_form.py); error bound 0.
- `KNNVelocity` evaluates only the nearest neighbours of x/t that can matter, proven by the
  index's band sketches (sketch.py), and returns a proven bound on ‖velocity - û*‖; queries
  it cannot certify cheaply fall back to the exact engine.

The top-k truncation of published kNN estimators, with no bound, is topk.TopKVelocity.

The module passes 400 lines because KNNVelocity is one algorithm of about 300 (seeds,
threshold, scans, kept set, bound and the routing around them share one call's state); the
output every estimator returns and the exact estimator it falls back to stay beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import Tensor

from knnflow.choices import ROUTES
from knnflow.closed_form import (
    TrainingSet,
    _closed_form_state,
    check_t,
    closed_form_state,
    flatten_queries,
    velocity_from_denoiser,
)
from knnflow.distributed import all_reduce_state_, shard_range, total_points
from knnflow.errors import InputError, OptionError
from knnflow.index import Index, training_set_of
from knnflow.pairs import (
    DOT_FORM_NATS,
    LIVE_NATS,
    ExactPairs,
    batched_dots,
    difference_sq,
    dot_form_sq,
)
from knnflow.prune import SketchScanner
from knnflow.rounding import FLOAT64_ROUNDOFF, output_dtype, unit_roundoff
from knnflow.routing import Router
from knnflow.sharded_index import ShardedIndex
from knnflow.softmax import SoftmaxState


@dataclass
class VelocityOutput:
    """What every estimator returns for a batch of B queries.

    velocity: shaped like x, typed like x for float32 and float64 queries and float32 for
    float16 and bfloat16 ones (rounding to those would exceed the bounds: 2^-11 and 2^-8 of
    ‖û*‖ against tol = 1e-4).
    error_bound: (B,) float64, or None for estimators that give no bound (random or
    approximate ones). For a row certified from an index (KNNVelocity) it is a proven upper
    bound on ‖velocity - û*‖₂ for the velocity as returned: the left-out mass, the float64
    rounding of the kept weights and the rounding to the returned dtype. For a row the exact
    engine computed (ExactVelocity; KNNVelocity's fallback and routed rows) it is 0, with
    the engine's rounding as the one allowance: float32 screening whose error is estimated
    per row and kept below closed_form.FLOAT64_TARGET = 3e-5 of ‖û*‖ (rows above it are
    computed again with exact weights), measured at ≤ 6e-6 on photos and ≤ 1e-5 on digits,
    typically ~1e-7 (docs/benchmarks.md); compute_dtype=float64 leaves ~1e-14.
    evaluated: (B,) how many training points each query touched in full dimension.
    certified: whether error_bound is a proof (False: no bound at all).
    fallback: (B,) bool, queries that an index-based estimator could not certify (sent to
    its fallback).
    routed: (B,) bool, queries sent to the exact engine because it is faster at their t
    (KNNVelocity(route="faster")); exact, bound 0, not counted in `fallback`.
    """

    velocity: Tensor
    error_bound: Tensor | None
    evaluated: Tensor
    certified: bool = True
    fallback: Tensor | None = field(default=None)
    routed: Tensor | None = field(default=None)


class ExactVelocity:
    """û* over every training point, exact up to the engine's rounding (error_bound = 0; see
    VelocityOutput for the allowance).

    compute_dtype=float32 screens logits with float32 GEMMs, sums most weights in float32 and
    makes the weights that matter exact in float64, so that each row's estimated error stays
    below closed_form.FLOAT64_TARGET (docs/architecture.md, the exact engine): measured
    relative errors ~1e-7 median, ≤ 6e-6 on photos and ≤ 1e-5 on digits over t in [0, 1), queries
    near the data mean, near fixed points of the denoiser and training images included;
    float64 does all arithmetic in float64 (slower, for references: ~1e-14).
    device: where the data lives while computing (for example "cuda"); default: where it is.
    group: a torch.distributed process group whose ranks each hold one shard of the training
    set (knnflow.distributed.shard_of); the data passed is then this rank's shard, every rank
    calls with the same x and t, and each gets û* over all shards (their softmax states are
    all-reduced). Constructing it is a collective too (the shards' sizes are summed).
    """

    def __init__(self, data_or_index: Tensor | TrainingSet | Index, *,
                 chunk_size: int | None = None, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, group=None):
        self.train = training_set_of(data_or_index, device)
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype
        self.group = group
        self.n = self.train.n
        if group is not None:
            self.n = total_points(self.train.n, self.train.points.device, group)

    def denoiser(self, x: Tensor, t: float | Tensor) -> Tensor:
        """E[x1 | x_t = x], float64 (B, d)."""
        state = closed_form_state(x.to(self.train.points.device), t, self.train,
                                  chunk_size=self.chunk_size, compute_dtype=self.compute_dtype)
        if self.group is not None:
            all_reduce_state_(state, self.group)
        return state.denoiser()

    def __call__(self, x: Tensor, t: float | Tensor) -> VelocityOutput:
        # (float64 once: the engine and the velocity both take it, no mixed-dtype passes)
        flat = flatten_queries(x, self.train.dim).to(self.train.points.device, torch.float64)
        return self._velocity(x, flat, check_t(t, flat.shape[0], flat.device))

    def _velocity(self, x: Tensor, flat: Tensor, t64: Tensor) -> VelocityOutput:
        """û* for x, whose checked (B, d) form is `flat` on the data's device, at checked t64
        ((B,) float64 on that device)."""
        state = _closed_form_state(flat, t64, self.train, chunk_size=self.chunk_size,
                                   compute_dtype=self.compute_dtype)
        if self.group is not None:
            all_reduce_state_(state, self.group)
        velocity = state.velocity_(flat, t64)
        batch = x.shape[0]
        return VelocityOutput(
            velocity=velocity.to(dtype=output_dtype(x), device=x.device).reshape(x.shape),
            error_bound=torch.zeros(batch, dtype=torch.float64),
            evaluated=torch.full((batch,), self.n, dtype=torch.int64),
        )


# The kept set's screen drops at least e^-LIVE_NATS_MIN of Z_K (pairs.LIVE_NATS at most).
LIVE_NATS_MIN = 20.0


@dataclass(frozen=True)
class SearchBudgets:
    """How much of the data KNNVelocity's certified search may read per query.

    seeds: points of smallest coarse lower bound read in full first; coarse: the largest
    fraction of n (at least 512 points) that may survive the coarse sketch, exact: of the fine
    one (at least 128), before the query falls back; scan_chunk: points per sketch-scan GEMM.
    """

    seeds: int = 4
    coarse: float = 0.1
    exact: float = 0.05
    scan_chunk: int = 8192


class KNNVelocity:
    """û* from the training points near x/t, exact or within a proven bound.

    For a query x at time t, ℓ_j = -s·t²‖x/t - x_j‖² (s = 1/(2(1-t)²)), so the weights that
    matter belong to the nearest neighbours of q = x/t. Per query:

    1. The coarse sketch (sketch.py) gives a proven lower bound L_j ≤ ‖q - x_j‖² for every
       point from ~128 numbers; the `budgets.seeds` points of smallest L_j get exact distances, the
       smallest is d_b².
    2. Every point is left out whose lower bound exceeds thr = d_b² + Δ, with Δ chosen from
       tol (a left-out point has weight below e^(-s·t²·Δ) of the best one). The coarse
       survivors are screened again with the fine sketch (~512 numbers).
    3. The remaining set K is evaluated exactly in float64 (a float32 screen with a proven
       error skips pairs that weigh below e^-L of Z_K in all, L = ln(1/tol) + 11 +
       ln(1/(1-t)) within [20, 40]: ExactPairs.add_grouped_). The left-out mass is at most
       Z_R ≤ (n - |K|)·e^(-s·t²·thr) + e^-L·Z_K, so
       ‖û_K - û*‖ ≤ Z_R/(Z_K + Z_R)·(‖D_K - mean‖ + R)/(1-t) with R the largest distance of
       a training point from the mean. That is error_bound.
    4. A query falls back to the exact engine (bound 0) when t is below the calibrated floor
       (below, see `calibrate`) or below 1e-3, when more than
       `budgets.coarse`·n points (at least 512) survive the coarse sketch (the fine filter
       costs about a fifth of an exact pair per point, so this budget is loose) or
       `budgets.exact`·n (at least 128) the fine one, or when the bound exceeds
       tol·‖velocity‖. The exact engine's bound 0 assumes full float32 matmuls (torch's
       default): with TF32 or bf16 matmuls switched on it warns, and its dense sums are only
       ~1e-3 accurate; the certified rows' bounds account for such settings.

    data: the training points, to check that the index was built on them.
    fallback="none" leaves the queries that would fall back to the caller: their velocity is
    NaN, their bound inf and `fallback` marks them (the knn-efm target fills them with EFM).
    device: where the exact engine runs the fallback queries (for example "cuda").
    search_device: where the certified search runs (sketch scans, the kept set's weights);
    default the CPU. "cuda" keeps the sketches and the training points on the GPU (the exact
    engine's copy) and scans there; not yet measured on a GPU (docs/benchmarks.md).
    calibrate: below some t no query certifies on a given data set (the noise in x/t hides the
    neighbours from every lower bound), and trying costs a sketch scan per query. On the first
    call, seeded probe queries built from the training points (16 per t bin of width 0.025,
    in one batched call) find the lowest bin from which every bin up to 1 certifies at least
    three quarters of its probes; queries below it go straight to the exact engine. The
    probes depend only on the index, so results are reproducible; the floor is in `t_floor`.
    calibrate=False tries every query.
    route: "certify" certifies every query above that floor. "faster" also times, once, the
    certified path against the exact engine on seeded probes of images the set does not hold
    (shifted training images, routing.Router.probes) in t bins (a 0.05 grid) above the floor,
    and sends every t from the floor up to the lowest bin in which certifying is clearly
    faster (ROUTE_MARGIN) to the exact engine (bound 0, `routed`, not counted as fallback,
    whatever `fallback` says): on a GPU the exact engine outruns the certified search at
    n = 50,000 (docs/benchmarks.md). In a call where the exact engine runs for some rows
    anyway, fewer than ROUTE_PROBES rows to certify go to it too (routed): its time hardly
    depends on its row count, and the timing was of ROUTE_PROBES rows. The choice
    depends on timings, so two estimators may route differently; `floors` holds it and can be
    passed back to pin it (a resumed training run does). "auto" (default): "faster", on every
    data set and device: on real images the exact engine outruns certifying at most t (on a
    CPU with fast int8 GEMMs, photos at every t from the calibrated floor; the digits at
    every t, certifying taking 2.5-3.5× its time on the probes), and only a timing tells
    which on a given machine.
    floors: (certification floor, exact floor) from an earlier estimator's `floors`: no
    calibration and no timing.
    group: a torch.distributed process group over which the training points are split
    (distributed.shard_range of the index's rows, each process its own): every process passes
    the whole Index and calls with the same queries; each scans, keeps and weighs its shard's
    points, and the thresholds (the smallest), the over-budget flags, the softmax states and
    the kept counts are all-reduced, so every process gets the same velocities and bounds,
    the bound covering what all shards left out. The fallback is the sharded exact engine;
    route="faster" takes process 0's timings. Constructing it and every call are collective;
    the group needs a CPU backend (gloo) beside NCCL: the search's reductions run where the
    search does, by default the CPU (distributed.init_from_env makes such a group).
    """

    def __init__(self, index: Index, tol: float = 1e-4, *, data: Tensor | None = None,
                 budgets: SearchBudgets | None = None, fallback: str = "exact",
                 device: torch.device | str | None = None, calibrate: bool = True,
                 search_device: torch.device | str | None = None, route: str = "auto",
                 floors: tuple[float, float] | None = None, group=None):
        if not isinstance(index, Index):
            raise InputError(_not_one_index("KNNVelocity", index))
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise OptionError(f"must be a positive number, got {tol!r}", "tol")
        if fallback not in ("exact", "none"):
            raise OptionError(f"must be 'exact' or 'none', got {fallback!r}", "fallback")
        if route not in ROUTES:
            raise OptionError(f"unknown {{route}} {route!r}; choose one of: {', '.join(ROUTES)}",
                              "route")
        if data is not None:
            index.verify_points(data)
        if index.sketches is None:
            raise InputError("this index has no sketch for certified search; rebuild it with "
                             "knnflow build-index")
        self.index, self.tol, self.certified = index, float(tol), True
        self.fallback = fallback
        self.group = group
        self.sketches = index.sketches
        if group is None:
            self.train = index.training_set()
        else:  # this process's rows of the points and of their sketches
            rows = shard_range(index.n, dist.get_rank(group), dist.get_world_size(group))
            self.train = training_set_of(index.points[rows])
            self.sketches = replace(index.sketches,
                                    coarse_points=index.sketches.coarse_points[rows],
                                    fine_points=None if index.sketches.fine_points is None
                                    else index.sketches.fine_points[rows])
        budgets = budgets or SearchBudgets()
        seeds = budgets.seeds
        self.seeds = max(1, min(seeds, self.train.n))
        # Seeds read in full per query, over all processes (for `evaluated`).
        self.all_seeds = self.seeds
        if group is not None:
            world = dist.get_world_size(group)
            shards = [shard_range(index.n, r, world) for r in range(world)]
            self.all_seeds = sum(max(1, min(seeds, s.stop - s.start)) for s in shards)
        # Small data sets get absolute floors: gathering a few hundred points costs little.
        self.coarse_budget = max(512, int(budgets.coarse * self.train.n))
        self.exact_budget = max(128, int(budgets.exact * self.train.n))
        self.exact = ExactVelocity(self.train, device=device, group=group)
        self.search_device = torch.device(search_device or "cpu")
        # The kept set and the seeds are read from the training points on the search device.
        on_engine = self.exact.train.points.device
        if self.search_device.type == "cpu":
            self.search_train = self.train
        elif on_engine.type == self.search_device.type and self.search_device.index in (
                None, on_engine.index):
            self.search_train = self.exact.train  # one copy on the GPU
        else:
            self.search_train = training_set_of(self.train, self.search_device)
        self.last_stats: dict[str, float] = {}
        self.scanner = SketchScanner(self.sketches, budgets.scan_chunk, self.search_device,
                                     plan_n=index.n)
        if route == "auto":
            route = "faster"
        self.route = route
        self.router = Router(index.points, lambda x64, t: self._certified(x64, t)[3],
                             self.exact, fallback_exact=fallback == "exact",
                             calibrate=calibrate, timed=route == "faster", group=group,
                             device=self.exact.train.points.device,
                             image_shape=index.image_shape)
        if floors is not None:
            self.router.floors = floors

    @property
    def t_floor(self) -> float:
        """Queries with t below this go to the fallback without trying to certify (Router)."""
        return self.router.t_floor

    @property
    def floors(self) -> tuple[float, float]:
        """(t_floor, exact floor): below the first, queries go to the fallback; between the
        two, to the exact engine because it is faster there (route="faster"). Settable, to
        pin an earlier estimator's floors."""
        return self.router.floors

    @floors.setter
    def floors(self, value: tuple[float, float]) -> None:
        self.router.floors = value

    def known_floors(self) -> tuple[float, float] | None:
        """`floors` once calibrated (or pinned), else None; never starts a calibration."""
        return self.router.known()

    @property
    def route_timings(self) -> list[dict[str, float]]:
        """The timings behind the exact floor (route="faster"), one per t bin timed."""
        return self.router.timings

    # ------------------------------------------------------------------ interface

    def __call__(self, x: Tensor, t: float | Tensor) -> VelocityOutput:
        flat = flatten_queries(x, self.train.dim)
        batch = flat.shape[0]
        t64 = check_t(t, batch, flat.device)
        t64 = t64.cpu()
        bound = torch.zeros(batch, dtype=torch.float64)
        evaluated = torch.full((batch,), self.index.n, dtype=torch.int64)
        fallback, routed = self.router.split(t64)
        if self.fallback == "exact" and bool((fallback | routed).all()):
            # Every row goes to the exact engine: no rows to pick out or scatter back.
            self.last_stats = {"queries": batch, "fallback": int(fallback.sum()),
                               "routed": int(routed.sum()), "evaluated_median": float(self.index.n)}
            return VelocityOutput(
                velocity=self.exact._velocity(
                    x, flat.to(self.train.points.device),
                    t64.to(self.train.points.device)).velocity,
                error_bound=bound, evaluated=evaluated,
                certified=True, fallback=fallback, routed=routed)
        x64 = flat.detach().cpu().to(torch.float64)
        velocity = torch.empty_like(x64)
        todo = (~fallback & ~routed).nonzero().squeeze(1)
        if todo.numel():
            v, b, ev, failed = self._certified(x64[todo], t64[todo])
            velocity[todo], evaluated[todo] = v, ev
            # The bound covers the velocity as returned: rounding to its dtype moves it by at
            # most u·‖v‖.
            bound[todo] = b + unit_roundoff(output_dtype(x)) * v.norm(dim=1)
            fallback[todo] = failed
        exact_rows = routed | fallback if self.fallback == "exact" else routed
        if bool(exact_rows.any()):  # one call of the exact engine for all of them
            rows = exact_rows.nonzero().squeeze(1)
            device = self.train.points.device
            velocity[rows] = self.exact._velocity(
                flat[rows], flat[rows].to(device), t64[rows].to(device)).velocity.to(
                device="cpu", dtype=torch.float64)
            bound[rows], evaluated[rows] = 0.0, self.index.n
        if self.fallback == "none" and bool(fallback.any()):
            rows = fallback.nonzero().squeeze(1)
            velocity[rows], bound[rows], evaluated[rows] = math.nan, math.inf, 0
        self.last_stats = {"queries": batch, "fallback": int(fallback.sum()),
                           "routed": int(routed.sum()),
                           "evaluated_median": float(evaluated.double().median())}
        return VelocityOutput(
            velocity=velocity.to(dtype=output_dtype(x), device=x.device).reshape(x.shape),
            error_bound=bound, evaluated=evaluated,
            certified=True, fallback=fallback, routed=routed)

    # ------------------------------------------------------------------ certified path

    def _certified(self, x64: Tensor, t: Tensor):
        """(velocity, bound, evaluated, failed) for float64 queries and times, returned on the
        CPU; computed on the search device."""
        out = self._certified_on_device(x64.to(self.search_device), t.to(self.search_device))
        return tuple(part.cpu() for part in out)

    def _all_reduce(self, values: Tensor, op) -> Tensor:
        """values reduced over the group (in place; unchanged without one)."""
        if self.group is not None:
            dist.all_reduce(values, op=op, group=self.group)
        return values

    def _certified_on_device(self, x64: Tensor, t: Tensor):
        # n: all the training points (every shard's, with a group); train: this process's.
        sk, n, train = self.sketches, self.index.n, self.search_train
        s = 0.5 / (1 - t) ** 2
        st2 = s * t * t
        queries = self.scanner.sketch(x64 / t[:, None])
        pairs = ExactPairs(x64, t, s, train.max_norm)

        # 1-2. Seeds (small coarse-sketch distances) place the threshold: a left-out point's
        #    weight is below e^(-s·t²·Δ) of the best seed's. Their distances only place it
        #    (the bound below holds for any threshold), so float32 suffices for choosing.
        def threshold_of(rows: slice, seeds: Tensor) -> Tensor:
            x, tt = x64[rows], t[rows]
            seed_points = torch.index_select(train.points, 0, seeds.reshape(-1)).to(
                torch.float32).reshape(*seeds.shape, -1)
            dots = batched_dots(seed_points, x.to(torch.float32))
            seed_sq = dot_form_sq(pairs.x_sq[rows, None], dots.to(torch.float64), tt[:, None],
                                  train.sq_norms[seeds]) / (tt * tt)[:, None]
            best = seed_sq.argmin(dim=1)
            best_point = seed_points[torch.arange(len(tt), device=x.device), best].to(
                torch.float64)
            # The best seed's own distance, exactly: the threshold must clear it (keep it in K).
            best_sq = difference_sq(x, tt[:, None], best_point) / (tt * tt)
            speed = ((best_point - x).norm(dim=1) / (1 - tt)).clamp(min=1e-12)
            spread = 2 * sk.max_radius
            log_terms = math.log(n) + torch.log(
                spread / ((1 - tt) * self.tol * 0.5 * speed)) + 1.0
            # With shards, the smallest threshold: it clears the best seed of all of them.
            return self._all_reduce(best_sq + log_terms.clamp(min=0) / st2[rows],
                                    dist.ReduceOp.MIN)

        # 3. One pass of coarse GEMMs (seeds and survivors), then the fine sketch.
        scan = self.scanner.seeded_scan(queries, self.seeds, threshold_of, self.coarse_budget)
        threshold, over = scan.threshold, scan.over
        rows, cols = self.scanner.fine_filter(queries, scan.rows, scan.cols, threshold)
        counts = torch.bincount(rows, minlength=len(t))
        over |= counts > self.exact_budget
        # A query over budget on any shard falls back on all of them.
        over = self._all_reduce(over.to(torch.uint8), dist.ReduceOp.MAX).bool()
        keep = ~over[rows]
        rows, cols = rows[keep], cols[keep]

        # 4. Exact float64 weights over the kept set, and the bound on what was left out.
        state = SoftmaxState.empty(len(t), x64.shape[1], x64.device)
        # The kept set's screen may drop pairs below e^-L of Z_K, counted in the bound:
        # e^-L = e^-11·tol·(1-t), invisible next to tol·‖v‖ (the bound's term is
        # e^-L·reach/(1-t)), and fewer pairs need float64 weights (t = 0.5 on the synthetic
        # set: 8,200 → 2,700 of 25,600 at L = 40 → 20).
        live_nats = (math.log(1 / self.tol) + 11.0 - torch.log1p(-t)).clamp(LIVE_NATS_MIN,
                                                                            LIVE_NATS)
        pairs.add_grouped_(state, rows, train.points, cols, train.sq_norms,
                           live_nats=live_nats)
        kept = self._all_reduce(torch.bincount(rows, minlength=len(t)), dist.ReduceOp.SUM)
        if self.group is not None:
            all_reduce_state_(state, self.group)
        denoiser = state.denoiser()
        velocity = velocity_from_denoiser(denoiser, x64, t)
        left_out = (n - kept).to(torch.float64)
        log_ratio = torch.log(left_out) - st2 * threshold - state.ref - torch.log(state.z)
        # The kept set's screen (ExactPairs.add_grouped_) may leave out pairs inside the
        # threshold whose weights sum below e^-LIVE_NATS of Z_K: they count as left out too.
        ratio = torch.exp(log_ratio.clamp(max=700)) + torch.exp(-live_nats)
        reach = (denoiser - sk.transform.mean.to(x64.device)).norm(dim=1) + sk.max_radius
        bound = ratio / (1 + ratio) * reach / (1 - t)
        # The kept weights' own rounding: float64 logits off by δ_j move D by at most
        # 2.01·Σλ_j|δ_j|·reach. δ_j ≤ DOT_FORM_NATS in the dot form; from differences,
        # δ_j ≤ (d + 4)·u·|ℓ_j|, and Σλ_j|ℓ_j| ≤ |ℓ_max| + K/e. Float64 sums of K terms and
        # of (D - x) add a few u.
        u, dim = FLOAT64_ROUNDOFF, x64.shape[1]
        logit_error = torch.where(pairs.dot_form, torch.full_like(t, DOT_FORM_NATS),
                                  (dim + 4) * u * (state.ref.abs() + kept / math.e))
        bound += ((2.01 * logit_error + 4 * (kept + dim) * u) * reach
                  + 2 * u * (denoiser.norm(dim=1) + x64.norm(dim=1))) / (1 - t)
        failed = over | ~(bound <= self.tol * velocity.norm(dim=1)) | (kept == 0)
        velocity = torch.where(failed[:, None], torch.zeros_like(velocity), velocity)
        bound = torch.where(failed, torch.zeros_like(bound), bound)
        return velocity, bound, kept + self.all_seeds, failed


def _not_one_index(who: str, index) -> str:
    """Why `index` cannot serve `who`, in one line."""
    if isinstance(index, ShardedIndex):
        return (f"{who} takes one index folder, and {index.folder} is sharded: open one of its "
                "shards (Index.load(FOLDER/shard-000)), or build the index without --shards")
    return f"{who} needs a knnflow.Index (see Index.build / Index.load)"
