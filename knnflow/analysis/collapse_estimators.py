"""One t of the collapse analysis: û*(x_t, t) and the largest softmax weight max λ for a
batch of queries, from the exact engine or from the certified kNN estimator.

max λ = max_j softmax_j(ℓ_j) with ℓ_j = -‖x_t - t·x_j‖² / (2(1-t)²). The exact engine
(closed_form.py) gives û* and the log-normaliser log Z = m + log z of its softmax state, and
max λ = exp(ℓ_max - log Z) with the largest logit ℓ_max, exact in float64, from the engine's
`largest_logits`.
With the engine's float32 screening, Z may be off by up to ~1e-4 relative on rows with many
comparable weights (max λ far below 0.9 there); compute_dtype=float64 makes every number
float64-exact. On large data sets the certified KNNVelocity gives û* (within tol·‖û*‖) and the
K nearest neighbours of x/t bound max λ from both sides (`KnnStep`); rows where those bounds
disagree by more than 1e-9, and rows the estimator cannot certify cheaply, take the exact
engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from knnflow.choices import COLLAPSE_ESTIMATORS as ESTIMATORS
from knnflow.closed_form import (
    TrainingSet,
    closed_form_state,
    largest_logits,
    velocity_from_denoiser,
)
from knnflow.errors import InputError
from knnflow.estimators import KNNVelocity
from knnflow.index import Index

Progress = Callable[[str, int, int], None]

# auto picks the exact engine while one pass over the data costs at most this many
# multiply-adds per t (n·pairs·d): digits at 32×32 is 0.5e9, MNIST 1.2e10, CIFAR-10 3.9e10.
AUTO_EXACT_WORK = 2**31
# Nearest neighbours of x/t that bound max λ on the knn path, and how close the two bounds must
# be (relative) for the upper one to stand as the value.
KNN_NEIGHBOURS = 16
KNN_WEIGHT_GAP = 1e-9
# Elements per float64 block when gathering the nearest neighbours (32 MB).
RERANK_BLOCK = 1 << 22


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine in float64, clamped to [-1, 1] (rounding can exceed 1 by an ulp);
    0 where a vector is zero."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    norms = a.norm(dim=1) * b.norm(dim=1)
    value = ((a * b).sum(dim=1) / norms.clamp(min=1e-300)).clamp(-1.0, 1.0)
    return torch.where(norms > 0, value, torch.zeros_like(norms))


def exact_step(x64: Tensor, t: float, train: TrainingSet,
               compute_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(û*(x, t) float64 (B, d), max λ (B,)) from the exact engine.

    With float32 screening the engine leaves logit errors up to 1e-4 nats uncorrected on rows
    with many comparable weights (they average out in û*, not in Z), so max λ there is within
    about 1e-4 relative, at weights far below the 0.9 threshold; float64 makes it exact.
    """
    state = closed_form_state(x64, t, train, compute_dtype=compute_dtype)
    velocity = velocity_from_denoiser(state.denoiser(), x64, t)
    log_z = state.ref + torch.log(state.z)
    weight = torch.exp(largest_logits(x64, t, train) - log_z).clamp(max=1.0)
    return velocity, weight


class KnnStep:
    """û* from the certified KNNVelocity and max λ from the nearest neighbours of x/t.

    For the K nearest neighbours of q = x/t (exact search at the float32-rounded query q', with
    δ = ‖q - q'‖), the logits are recomputed in float64; every other point lies at least
    d_K(q') - δ from q. So with Z_K = Σ_K e^(ℓ_j - ℓ_1) and the left-out mass
    R ≤ (n - K)·e^(-st²(d_K - δ)² - ℓ_1):  1/(Z_K + R) ≤ max λ ≤ 1/Z_K, provided the nearest
    point found is closer than d_K - δ (else the true argmax might be left out). Rows where the
    bounds differ by more than KNN_WEIGHT_GAP, and rows KNNVelocity leaves uncertified, take
    the exact engine.
    """

    def __init__(self, images: Tensor, tol: float, progress: Progress | None = None,
                 compute_dtype: torch.dtype = torch.float32):

        self.index = Index.build(images, progress=progress)
        self.velocity = KNNVelocity(self.index, tol=tol, fallback="none")
        self.train = self.index.training_set()
        self.exact_rows = 0
        self.compute_dtype = compute_dtype

    def __call__(self, x64: Tensor, t: float) -> tuple[Tensor, Tensor]:
        out = self.velocity(x64, t)
        velocity = out.velocity.to(torch.float64)
        weight = torch.full((len(x64),), math.nan, dtype=torch.float64)
        need_exact = out.fallback.clone()
        rows = (~need_exact).nonzero().squeeze(1)
        if rows.numel():
            bounds = self._weight_bounds(x64[rows], t)
            tight = bounds[1] - bounds[0] <= KNN_WEIGHT_GAP * bounds[1]
            weight[rows[tight]] = bounds[1][tight]
            need_exact[rows[~tight]] = True
        exact = need_exact.nonzero().squeeze(1)
        if exact.numel():
            v, w = exact_step(x64[exact], t, self.train, self.compute_dtype)
            velocity[exact], weight[exact] = v, w
            self.exact_rows += exact.numel()
        return velocity, weight

    def _weight_bounds(self, x64: Tensor, t: float) -> tuple[Tensor, Tensor]:
        n, k = self.train.n, min(KNN_NEIGHBOURS, self.train.n)
        s = 0.5 / (1 - t) ** 2
        q = x64 / t
        found = self.index.search(q, k)
        delta = (q - q.to(torch.float32).to(torch.float64)).norm(dim=1)
        logits = torch.empty(found.ids.shape, dtype=torch.float64)
        rows = max(1, RERANK_BLOCK // (k * x64.shape[1]))  # bounded (rows, K, d) gathers
        for i in range(0, len(x64), rows):
            ids = found.ids[i:i + rows]
            points = self.train.points[ids.reshape(-1)].to(torch.float64).reshape(*ids.shape, -1)
            logits[i:i + rows] = -s * (x64[i:i + rows, None, :] - t * points).square().sum(2)
        top = logits.amax(dim=1)
        z_k = torch.exp(logits - top[:, None]).sum(dim=1)
        upper = 1.0 / z_k
        if k == n:
            return upper, upper
        reach = (found.sq_distances[:, -1].sqrt() - delta).clamp(min=0)
        left_out = math.log(n - k) - s * t * t * reach.square() - top
        lower = 1.0 / (z_k + torch.exp(left_out.clamp(max=700)))
        # The argmax is among the K only if it is provably nearer than every left-out point.
        nearest = (-top / (s * t * t)).sqrt()
        lower = torch.where(nearest < reach, lower, torch.zeros_like(lower))
        return lower, upper


def choose_estimator(estimator: str, n: int, pairs: int, dim: int) -> str:
    """auto: exact while n·pairs·dim ≤ AUTO_EXACT_WORK, else knn; exact and knn as given."""
    if estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator {estimator!r}; choose one of: "
                         f"{', '.join(ESTIMATORS)}")
    if estimator != "auto":
        return estimator
    return "exact" if n * pairs * dim <= AUTO_EXACT_WORK else "knn"
