"""Training targets for flow matching: each maps (x0, x1, t) to (x_t, target).

x_t = (1-t)·x0 + t·x1, x0 ~ N(0, I), x1 a training image, t in [0, 1). Every target below has
expectation û*(x_t, t) given x_t; they differ in variance and cost:

- `cfm`: x1 - x0, the conditional velocity (one sample of the posterior; highest variance).
- `efm`: the self-normalised estimate of û* over M candidates that always include the x1 that
  made x_t (Empirical Flow Matching). With candidates c_1 = x1, c_2..c_M drawn uniformly from
  the data, Σ_j w(c_j)·c_j / Σ_j w(c_j) (w the softmax weight of û*) is an *unbiased*
  estimate of E[x1 | x_t]: since x1 ~ p(x1 | x_t) ∝ w(x1), the candidate set has density
  ∝ Σ_j w(c_j), which cancels the normaliser. M = 1 gives back cfm; M → n tends to û*.
  - pool "independent" (the paper's algorithm): x1 plus M-1 fresh draws for each x_t;
  - pool "shared" (the paper's released code): one pool for the whole batch, the batch's own
    x1s plus M fresh draws, seen by every x_t (the other rows' x1s are uniform draws for it,
    so it is the independent estimator with B + M candidates, sharing draws across rows).
- `knn-efm`: the certified kNN û* from the index (estimators.KNNVelocity), within tol; queries
  whose certification would cost more than the budget fall back to `exact` or `efm`.
- `exact`: û* over the whole training set (the exact engine).

Weights are computed in float64 (closed_form.ExactPairs / the exact engine), so the 1/(1-t)
factor does not amplify rounding near t = 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from knnflow.choices import EFM_POOLS, KNN_FALLBACKS, TARGETS
from knnflow.closed_form import (
    TrainingSet,
    check_t,
    closed_form_state,
    velocity_from_denoiser,
)
from knnflow.errors import IndexMismatchError, InputError
from knnflow.estimators import ExactVelocity, KNNVelocity, SearchBudgets
from knnflow.index import Index, training_set_of
from knnflow.pairs import ExactPairs
from knnflow.softmax import SoftmaxState

# EFM's independent pools become one dense GEMM per batch when the draws of a row are at least
# n / DENSE_DRAW_RATIO (a GEMM element costs far less than a gathered draw) and neither the
# float64 data set nor the batch × n weights exceed DENSE_DRAW_ELEMENTS numbers.
DENSE_DRAW_RATIO = 8
DENSE_DRAW_ELEMENTS = 1 << 24


@dataclass
class TargetBatch:
    """x_t and the regression target (both shaped like x1, float32), with what it cost.

    fallback: fraction of the batch that knn-efm sent to its fallback (None for others).
    evaluated: mean number of training points read per row. seconds: time spent on the target.
    """

    x_t: Tensor
    target: Tensor
    fallback: float | None
    evaluated: float
    seconds: float


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1-t)·x0 + t·x1 with t (B,) broadcast over the remaining dimensions."""
    tb = t.to(x1.dtype).reshape(-1, *([1] * (x1.dim() - 1)))
    return (1 - tb) * x0 + tb * x1


def flip_images(flat: Tensor, image_shape: tuple[int, ...]) -> Tensor:
    """Horizontal flips of flattened images (B, d)."""
    return flat.reshape(-1, *image_shape).flip(-1).reshape(flat.shape[0], -1)


class Target:
    """Base: subclasses compute the velocity target from float64 x_t."""

    name = "target"
    device = torch.device("cpu")

    def __call__(self, x0: Tensor, x1: Tensor, t: Tensor,
                 generator: torch.Generator | None = None) -> TargetBatch:
        """x_t and the target, on the target's device. Random draws (EFM candidates) come
        from `generator` on the CPU, so a run draws the same numbers on any device."""
        if x0.shape != x1.shape:
            raise InputError(f"x0 has shape {tuple(x0.shape)} but x1 has {tuple(x1.shape)}")
        x0, x1 = x0.to(self.device), x1.to(self.device)
        x0 = self.couple(x0, x1)
        t = check_t(t, x1.shape[0], x1.device)
        x_t = interpolate(x0, x1, t)
        began = time.perf_counter()
        target, fallback, evaluated = self.velocity(x0, x1, x_t, t, generator)
        if self.device.type == "cuda":  # the time spent must include the queued GPU work
            torch.cuda.current_stream(self.device).synchronize()
        return TargetBatch(x_t, target.to(x1.dtype).reshape(x1.shape), fallback, evaluated,
                           time.perf_counter() - began)

    def couple(self, x0: Tensor, x1: Tensor) -> Tensor:
        """The noise paired with each x1 (the batch's own x0 but for coupled targets)."""
        return x0

    def velocity(self, x0, x1, x_t, t, generator):
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run computes the same targets (JSON)."""
        return {}

    def restore(self, state: dict) -> None:
        """Take back what state() gave, from a checkpoint's JSON (other keys ignored)."""


class CFMTarget(Target):
    """x1 - x0."""

    name = "cfm"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def velocity(self, x0, x1, x_t, t, generator):
        return x1 - x0, None, 1.0


def ot_pairing(x0: Tensor, x1: Tensor) -> Tensor:
    """perm (B,) such that pairing x0[perm[j]] with x1[j] minimises the batch's total squared
    distance Σ_j ‖x0[perm[j]] - x1[j]‖²: the exact assignment (scipy's linear_sum_assignment
    on float64 squared distances), minibatch optimal transport with uniform weights."""
    from scipy.optimize import linear_sum_assignment

    a = x1.reshape(x1.shape[0], -1).to(device="cpu", dtype=torch.float64)
    b = x0.reshape(x0.shape[0], -1).to(device="cpu", dtype=torch.float64)
    cost = torch.cdist(a, b).square()
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.empty(len(rows), dtype=torch.int64)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(x0.device)


# OT-CFM: Tong et al., "Improving and generalizing flow-based generative models with minibatch
# optimal transport" (torchcfm's ExactOptimalTransportConditionalFlowMatcher, σ = 0).
class OTCFMTarget(CFMTarget):
    """x1 - x0 after re-pairing the batch's noise with its images by exact minibatch optimal
    transport (`ot_pairing`): x_t = (1-t)·x0' + t·x1 with x0' = x0[perm]. The plan is a
    permutation, used as it is (torchcfm draws pairs from it with replacement; for a
    permutation plan that only repeats some pairs and drops others)."""

    name = "ot-cfm"

    def couple(self, x0: Tensor, x1: Tensor) -> Tensor:
        if x1.shape[0] < 2:
            raise InputError("the ot-cfm target pairs noise with images within a batch: it "
                             f"needs at least 2 per batch, got {x1.shape[0]}")
        return x0[ot_pairing(x0, x1)]


class EFMTarget(Target):
    """Self-normalised û* over M candidates including the x1 that made x_t (module docstring).

    flip + image_shape: each drawn candidate is flipped horizontally with probability 1/2,
    i.e. candidates come from the data set with both flips, as x1 does under --flip.
    """

    name = "efm"

    def __init__(self, data: Tensor | TrainingSet, m: int = 128, pool: str = "independent",
                 flip: bool = False, image_shape: tuple[int, ...] | None = None,
                 device: str | torch.device = "cpu"):
        if not (isinstance(m, int) and m >= 1):
            raise InputError(f"--m must be a positive integer, got {m!r}")
        if pool not in EFM_POOLS:
            raise InputError(f"unknown --efm-pool {pool!r}; choose one of: {', '.join(EFM_POOLS)}")
        if flip and image_shape is None:
            raise InputError("--flip needs the image shape of the data")
        self.device = torch.device(device)
        self.train = training_set_of(data, self.device)
        self.m, self.pool, self.flip, self.image_shape = m, pool, flip, image_shape

    def _draw_ids(self, count: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Ids of `count` uniform draws (on the CPU generator), and which are flipped."""
        ids = torch.randint(self.train.n, (count,), generator=generator)
        flips = (torch.rand(count, generator=generator) < 0.5 if self.flip
                 else torch.zeros(count, dtype=torch.bool))
        return ids.to(self.device), flips.to(self.device)

    def _points(self, ids: Tensor, flips: Tensor) -> Tensor:
        points = self.train.points[ids].to(torch.float32)
        if bool(flips.any()):
            points[flips] = flip_images(points[flips], self.image_shape)
        return points

    def velocity(self, x0, x1, x_t, t, generator):
        return self.velocity_from(x1, x_t, t, generator), None, float(self.candidates(len(t)))

    def _add_draws(self, state: SoftmaxState, pairs: ExactPairs, rows: Tensor,
                   ids: Tensor) -> None:
        """Add the drawn candidates (rows[i], ids[i]) to the state. Where the draws per row
        outnumber the data set's points / DENSE_DRAW_RATIO, a row's candidates are all the
        points with multiplicities: its weights are one float64 GEMM over the data (counts
        times exp of the exact logits) instead of a gather per draw. Rows whose logits need
        the difference form (t near 1, ExactPairs.dot_form false) keep the pairwise path."""
        batch, n = state.z.shape[0], self.train.n
        dense = pairs.dot_form & (len(ids) >= batch * n / DENSE_DRAW_RATIO)
        too_big = max(n * self.train.dim, batch * n) > DENSE_DRAW_ELEMENTS
        if too_big or not bool(dense.any()):
            pairs.add_grouped_(state, rows, self.train.points, ids, self.train.sq_norms)
            return
        sparse = ~dense[rows]
        if bool(sparse.any()):
            pairs.add_grouped_(state, rows[sparse], self.train.points, ids[sparse],
                               self.train.sq_norms)
        which = dense.nonzero().squeeze(1)
        counts = torch.zeros(batch, n, dtype=torch.float64, device=ids.device)
        counts.index_put_((rows, ids), torch.ones_like(rows, dtype=torch.float64),
                          accumulate=True)
        counts = counts[which]
        points = self.train.points.to(torch.float64)
        t, x = pairs.t[which], pairs.x64[which]
        logits = -pairs.s[which][:, None] * (
            pairs.x_sq[which][:, None] - 2 * t[:, None] * (x @ points.T)
            + (t * t)[:, None] * self.train.sq_norms[None, :])
        ref = logits.masked_fill(counts == 0, -math.inf).amax(dim=1)
        weights = counts * torch.exp((logits - ref[:, None]).clamp(max=0))
        part = SoftmaxState.empty(batch, x.shape[1], x.device)
        part.ref[which], part.z[which], part.s[which] = ref, weights.sum(1), weights @ points
        state.merge_(part)

    def candidates(self, batch: int) -> int:
        return self.m if self.pool == "independent" else batch + self.m

    def velocity_from(self, x1: Tensor, x_t: Tensor, t: Tensor,
                      generator: torch.Generator | None) -> Tensor:
        batch = x1.shape[0]
        x1_flat = x1.reshape(batch, -1).to(torch.float32)
        x64 = x_t.reshape(batch, -1).to(torch.float64)
        t64 = t.to(torch.float64)
        if self.pool == "shared":
            pool = torch.cat([x1_flat, self._points(*self._draw_ids(self.m, generator))])
            state = closed_form_state(x64, t64, TrainingSet.from_points(pool))
        else:
            s = 0.5 / (1 - t64) ** 2
            max_norm = max(self.train.max_norm, float(x1_flat.norm(dim=1).max()))
            pairs = ExactPairs(x64, t64, s, max_norm)
            state = SoftmaxState.empty(batch, x64.shape[1], x64.device)
            rows = torch.arange(batch, device=x64.device)
            pairs.add_(state, rows, x1_flat, rows)
            others = self.m - 1
            if others:
                ids, flips = self._draw_ids(batch * others, generator)
                pair_rows = rows.repeat_interleave(others)
                if not self.flip:
                    self._add_draws(state, pairs, pair_rows, ids)
                # Flipped candidates are materialised in groups of ~16 MB.
                step = max(1, (1 << 22) // x64.shape[1])
                for i in range(0, len(ids) if self.flip else 0, step):
                    part = slice(i, i + step)
                    drawn = self._points(ids[part], flips[part])
                    pairs.add_grouped_(state, pair_rows[part], drawn,
                                       torch.arange(len(drawn), device=x64.device))
        return velocity_from_denoiser(state.denoiser(), x64, t64)


class ExactTarget(Target):
    """û*(x_t, t) over the whole training set. With `group` (torch.distributed), `data` is
    this process's shard and the processes' softmax states are all-reduced
    (ExactVelocity(shard, group=...)): every process must then compute the same rows, which
    `whole_batch` tells the trainer."""

    name = "exact"

    def __init__(self, data: Tensor | TrainingSet, device: str | torch.device = "cpu",
                 group=None):
        self.device = torch.device(device)
        self.estimator = ExactVelocity(data, device=self.device, group=group)
        self.whole_batch = group is not None

    def velocity(self, x0, x1, x_t, t, generator):
        out = self.estimator(x_t.reshape(x_t.shape[0], -1), t)
        return out.velocity, None, float(self.estimator.n)


class KNNEFMTarget(Target):
    """The certified kNN û* (error ≤ tol·‖û*‖ per row); rows whose certification would read
    more than `budget`·n points in full dimension go to `fallback` (exact or efm). With
    `group`, KNNVelocity over shards of the index (each process its rows), for the whole
    batch on every process."""

    name = "knn-efm"

    def __init__(self, index, data: Tensor | TrainingSet | None = None, tol: float = 1e-4,
                 budget: float = 0.005, fallback: str = "exact", m: int = 128,
                 pool: str = "independent", device: str | torch.device = "cpu",
                 search_device: str | torch.device | None = None, route: str = "auto",
                 group=None):
        if index is None or not isinstance(index, Index):
            raise InputError("the knn-efm target needs an index of the training data; build "
                             "one with: knnflow build-index DATASET")
        if fallback not in KNN_FALLBACKS:
            raise InputError(f"unknown --knn-fallback {fallback!r}; choose one of: "
                             f"{', '.join(KNN_FALLBACKS)}")
        if not (math.isfinite(budget) and 0 < budget <= 1):
            raise InputError(f"--knn-budget must lie in (0, 1], got {budget}")
        if data is not None:
            points = data.points if isinstance(data, TrainingSet) else data
            try:
                index.verify_points(points)
            except IndexMismatchError as err:
                raise IndexMismatchError(f"{err}; build the index of the training data with "
                                         "knnflow build-index (with --flip, on the data set "
                                         "with both flips)") from None
        # The certified search runs on `search_device` (default the CPU); the exact fallback
        # and the EFM fallback run on `device`. route: see KNNVelocity (auto: on a GPU, t bins
        # where the exact engine is faster than certifying go to it).
        self.device = torch.device(device)
        self.estimator = KNNVelocity(index, tol=tol, budgets=SearchBudgets(exact=budget),
                                     fallback="exact" if fallback == "exact" else "none",
                                     device=self.device, search_device=search_device,
                                     route=route, group=group)
        # Over shards (group) every process computes the whole batch's targets.
        self.whole_batch = group is not None
        self.efm = EFMTarget(index.training_set(), m=m, pool=pool, device=self.device) \
            if fallback == "efm" else None

    def state(self) -> dict:
        # The estimator's floors may come from timings (route "faster"): a resumed run must
        # route the same t the same way.
        floors = self.estimator.known_floors()
        return {} if floors is None else {"knn_floors": list(floors)}

    def restore(self, state: dict) -> None:
        if "knn_floors" in state:
            self.estimator.floors = state["knn_floors"]

    def velocity(self, x0, x1, x_t, t, generator):
        out = self.estimator(x_t.reshape(x_t.shape[0], -1), t)
        velocity = out.velocity.to(torch.float64)
        evaluated = out.evaluated.to(velocity.device, torch.float64)
        rows = out.fallback.nonzero().squeeze(1).to(x_t.device)
        if self.efm is not None and rows.numel():
            velocity[rows] = self.efm.velocity_from(x1[rows], x_t[rows], t[rows], generator)
            evaluated[rows] = self.efm.candidates(rows.numel())
        return velocity, float(out.fallback.double().mean()), float(evaluated.mean())


def make_target(name: str, *, data: Tensor | TrainingSet | None = None, index=None,
                m: int = 128, pool: str = "independent", tol: float = 1e-4,
                knn_budget: float = 0.005, knn_fallback: str = "exact", flip: bool = False,
                image_shape: tuple[int, ...] | None = None,
                device: str | torch.device = "cpu",
                knn_search_device: str | torch.device | None = None,
                knn_route: str = "auto", group=None) -> Target:
    """The target called `name` (cfm, ot-cfm, efm, knn-efm, exact), from the training data (or the
    index's data), computed on `device` (knn-efm's certified search on knn_search_device,
    by default the CPU)."""
    if name not in TARGETS:
        raise InputError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    if name == "cfm":
        return CFMTarget(device)
    if name == "ot-cfm":
        return OTCFMTarget(device)
    if name == "knn-efm":
        return KNNEFMTarget(index, data, tol=tol, budget=knn_budget, fallback=knn_fallback,
                            m=m, pool=pool, device=device, search_device=knn_search_device,
                            route=knn_route, group=group)
    source = data if data is not None else (index.training_set() if index is not None else None)
    if source is None:
        raise InputError(f"the {name} target needs the training data")
    if name == "efm":
        return EFMTarget(source, m=m, pool=pool, flip=flip, image_shape=image_shape,
                         device=device)
    return ExactTarget(source, device, group=group)
