"""Collapse of the closed-form velocity onto single training points (the paper's Figure 1).

For pairs (x0, x1), x0 ~ N(0, I) and x1 a training image, and for every t of a grid, with
x_t = (1-t)·x0 + t·x1:

    cosine(t)  = cos(û*(x_t, t), x1 - x0)            the direction û* points in
    max λ(t)   = max_j softmax_j(ℓ_j),  ℓ_j = -‖x_t - t·x_j‖² / (2(1-t)²)

Cosine alone is a poor criterion for collapse: at t = 0, û* = mean - x0 and x1 - x0 both point
along -x0, so on data of small norm (MNIST, digits) the cosine is already high. The softmax is
what collapses: the collapse time T is the first grid t from which at least 90% of pairs keep
max λ > 0.9 at that t and at every later grid t (per pair: a pair that drops below 0.9 later
has not collapsed yet).

û* and max λ come from the exact engine (closed_form.py): its softmax state gives û* and the
log-normaliser log Z = m + log z, and max λ = exp(ℓ_max - log Z) with the largest logit ℓ_max
recomputed in float64 (`max_logits`). With the engine's float32 screening, Z may be off by up
to ~1e-4 relative on rows with many comparable weights (max λ far below 0.9 there);
compute_dtype=float64 makes every number float64-exact. On large data sets the certified
KNNVelocity gives û* (within tol·‖û*‖) and the K nearest neighbours of x/t bound max λ from
both sides; rows where those bounds disagree by more than 1e-9, and rows the estimator cannot
certify cheaply, take the exact engine.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from knnflow.choices import COLLAPSE_ESTIMATORS as ESTIMATORS
from knnflow.choices import COLLAPSE_GRID as DEFAULT_GRID
from knnflow.closed_form import (
    DEFAULT_CHUNK,
    TrainingSet,
    closed_form_state,
    screened_logits,
    velocity_from_denoiser,
)
from knnflow.errors import InputError
from knnflow.estimators import KNNVelocity
from knnflow.files import atomic_folder
from knnflow.images import resize_images
from knnflow.index import Index
from knnflow.rounding import screening_error_bound

Progress = Callable[[str, int, int], None]

# A pair is aligned when cosine > 0.9 and collapsed when max λ > 0.9; the collapse time needs
# 90% of the pairs collapsed for good.
COSINE_THRESHOLD = 0.9
WEIGHT_THRESHOLD = 0.9
PAIR_FRACTION = 0.9
HISTOGRAM_PANELS = 6
HISTOGRAM_BINS = 40
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# auto picks the exact engine while one pass over the data costs at most this many
# multiply-adds per t (n·pairs·d): digits at 32×32 is 0.5e9, MNIST 1.2e10, CIFAR-10 3.9e10.
AUTO_EXACT_WORK = 2**31
# Nearest neighbours of x/t that bound max λ on the knn path, and how close the two bounds must
# be (relative) for the upper one to stand as the value.
KNN_NEIGHBOURS = 16
KNN_WEIGHT_GAP = 1e-9
# Elements per float64 block when recomputing candidate logits (32 MB).
RERANK_BLOCK = 1 << 22


# --------------------------------------------------------------------------- parsing


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{option}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{option}: {text.strip()!r} is not a finite number")
    return value


def check_grid(values, option: str = "--t-grid") -> np.ndarray:
    """A sorted float64 grid without duplicates, every t in [0, 1)."""
    grid = np.asarray(values, dtype=np.float64).reshape(-1)
    if grid.size == 0:
        raise InputError(f"{option} holds no t values")
    bad = grid[~((grid >= 0) & (grid < 1))]
    if bad.size:
        raise InputError(f"{option}: every t must lie in [0, 1) (t = 1 is invalid: û* divides "
                         f"by 1 - t); got {bad[0]:g}")
    return np.unique(grid)


def parse_t_grid(text: str) -> np.ndarray:
    """'start:stop:step' (stop included when it lands on the grid) or a comma list of t."""
    raw = text.strip()
    if ":" in raw:
        parts = raw.split(":")
        if len(parts) != 3:
            raise InputError(f"--t-grid takes start:stop:step or a comma list, got {raw!r}")
        start, stop, step = (_number(p, "--t-grid") for p in parts)
        if step <= 0:
            raise InputError(f"--t-grid: the step must be positive, got {step:g}")
        if stop < start:
            raise InputError(f"--t-grid: stop {stop:g} is below start {start:g}")
        if stop > start and step > stop - start:
            raise InputError(f"--t-grid {raw!r}: the step {step:g} is larger than the range "
                             f"(start:stop:STEP, not a count: for 10 points from {start:g} to "
                             f"{stop:g} write {start:g}:{stop:g}:{(stop - start) / 9:g})")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > 100_000:
            raise InputError(f"--t-grid {raw!r} has {count} points; at most 100000")
        # Rounding to 12 decimals turns 0.30000000000000004 into 0.3.
        values = np.round(start + step * np.arange(count), 12)
    else:
        items = [p for p in raw.split(",")]
        if not raw or any(not p.strip() for p in items):
            raise InputError(f"--t-grid takes start:stop:step or a comma list, got {raw!r}")
        values = np.array([_number(p, "--t-grid") for p in items])
    return check_grid(values)


def parse_sides(text: str | None) -> list[int] | None:
    """--dims: a comma list of side lengths (8,16,32), in order, duplicates dropped."""
    if text is None or not text.strip():
        return None
    sides: list[int] = []
    for part in text.split(","):
        value = part.strip()
        if not value.isdigit() or int(value) < 1:
            raise InputError(f"--dims takes a comma list of positive side lengths like 8,16,32; "
                             f"got {text.strip()!r}")
        if int(value) > 1024:
            raise InputError(f"--dims: side {value} is too large (at most 1024)")
        if int(value) not in sides:
            sides.append(int(value))
    return sides


def format_t(t: float | None) -> str:
    """A grid t as printed: 0.12 (more decimals only when the grid needs them); None: never."""
    if t is None:
        return "never"
    for decimals in range(2, 7):
        if abs(round(t, decimals) - t) < 1e-9:
            return f"{t:.{decimals}f}"
    return f"{t:g}"


# --------------------------------------------------------------------------- the rule


def persistent_fraction(values: np.ndarray, threshold: float) -> np.ndarray:
    """(T,) fraction of pairs whose value exceeds threshold at grid t and every later grid t.

    values: (T, P) over an increasing grid. Non-decreasing in t by construction.
    """
    above = np.asarray(values) > threshold
    kept = np.flip(np.logical_and.accumulate(np.flip(above, axis=0), axis=0), axis=0)
    return kept.mean(axis=1)


def collapse_time(max_weight: np.ndarray, grid: np.ndarray, threshold: float = WEIGHT_THRESHOLD,
                  fraction: float = PAIR_FRACTION) -> float | None:
    """The first grid t from which at least `fraction` of the pairs keep max λ > threshold at
    every later grid t; None when no grid t qualifies. max_weight: (T, P)."""
    kept = persistent_fraction(max_weight, threshold)
    hits = np.nonzero(kept >= fraction - 1e-12)[0]
    return float(grid[hits[0]]) if hits.size else None


# --------------------------------------------------------------------------- exact numbers


def max_logits(x64: Tensor, t: float, train: TrainingSet,
               chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """max_j ℓ_j = -min_j ‖x - t·x_j‖² / (2(1-t)²) per query, exact in float64.

    Screens with the engine's float32 GEMM form ℓ_j + s‖x‖² = 2st⟨x, x_j⟩ - st²‖x_j‖², whose
    proven error E comes from `screening_error_bound`; every point within 2E of its chunk's
    screened maximum may be the argmax and gets its logit recomputed from x - t·x_j in float64.
    """
    batch, dim = x64.shape
    s = 0.5 / (1 - t) ** 2
    if t == 0:  # every logit is -‖x‖²/2
        return -s * x64.square().sum(dim=1)
    t64 = torch.full((batch,), t, dtype=torch.float64)
    proven, _ = screening_error_bound(x64.norm(dim=1), t64, train.max_norm, dim, torch.float32,
                                      x64.device)
    s64 = torch.full((batch,), s, dtype=torch.float64)
    best = torch.full((batch,), -math.inf, dtype=torch.float64)
    for start in range(0, train.n, chunk_size):
        chunk = train.points[start:start + chunk_size]
        norms = train.sq_norms[start:start + chunk_size].to(torch.float32)
        screened = screened_logits(x64, t64, s64, chunk.to(torch.float32), norms)
        top = screened.amax(dim=1).to(torch.float64)
        live = screened.to(torch.float64) >= (top - 2 * proven)[:, None]
        rows, cols = live.nonzero().unbind(1)
        block = max(1, RERANK_BLOCK // dim)
        for i in range(0, rows.numel(), block):
            r, c = rows[i:i + block], cols[i:i + block]
            exact = -s * (x64[r] - t * chunk[c].to(torch.float64)).square().sum(dim=1)
            best = best.scatter_reduce(0, r, exact, reduce="amax")
    return best


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
    weight = torch.exp(max_logits(x64, t, train) - log_z).clamp(max=1.0)
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


# --------------------------------------------------------------------------- the analysis


@dataclass
class CollapseResult:
    """Per size s, grid time t and pair p: cosine[s, t, p] and max_weight[s, t, p].

    sizes: (H, W) per size; dims: d = C·H·W per size; estimators: what gave û* per size;
    headline: the index of the size whose collapse time is the headline (the data set's own
    size when it is among the sizes, else the first).
    """

    grid: np.ndarray
    sizes: list[tuple[int, int]]
    dims: list[int]
    estimators: list[str]
    n: int
    channels: int
    native: tuple[int, int]
    pairs: int
    seed: int
    cosine: np.ndarray
    max_weight: np.ndarray
    headline: int
    seconds: float = 0.0
    exact_rows: list[int] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [f"{h}x{w}" for h, w in self.sizes]

    @property
    def collapse_times(self) -> list[float | None]:
        return [collapse_time(self.max_weight[i], self.grid) for i in range(len(self.sizes))]

    @property
    def cosine_times(self) -> list[float | None]:
        """The same rule applied to cosine > 0.9: when û* points along x1 - x0 for good."""
        return [collapse_time(self.cosine[i], self.grid, COSINE_THRESHOLD)
                for i in range(len(self.sizes))]

    @property
    def collapse_time(self) -> float | None:
        return self.collapse_times[self.headline]

    def histogram_times(self) -> list[int]:
        """Grid indices of the six histogram panels: evenly spread over the grid, inner ones
        at round times (0.2, 0.4, ...) when the grid spans half of [0, 1) or more."""
        targets = np.linspace(self.grid[0], self.grid[-1], HISTOGRAM_PANELS)
        if self.grid[-1] - self.grid[0] >= 0.5:
            targets[1:-1] = np.round(targets[1:-1], 1)
        picks = [int(np.abs(self.grid - target).argmin()) for target in targets]
        return sorted(set(picks))

    def histogram_bins(self, size: int) -> np.ndarray:
        """Bin edges shared by a size's panels: from 0.5 (lower when a cosine is below it,
        to a multiple of 0.1) up to 1, so the mass near 1 is resolved."""
        low = float(self.cosine[size, self.histogram_times()].min())
        start = max(-1.0, min(0.5, math.floor(10 * low) / 10))
        return np.linspace(start, 1.0, HISTOGRAM_BINS + 1)


def choose_estimator(estimator: str, n: int, pairs: int, dim: int) -> str:
    if estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator {estimator!r}; choose one of: "
                         f"{', '.join(ESTIMATORS)}")
    if estimator != "auto":
        return estimator
    return "exact" if n * pairs * dim <= AUTO_EXACT_WORK else "knn"


def resize_to(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Images (N, C, H, W) resized to size (bicubic, antialiased, clamped to [-1, 1])."""
    if tuple(images.shape[2:]) == size:
        return images

    return torch.from_numpy(resize_images(images.numpy(), (images.shape[1], *size)))


def draw_pairs(n: int, dim: int, pairs: int, seed: int,
               size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(ids of x1 (pairs,), x0 float64 (pairs, dim)) for one size.

    The ids depend on (n, pairs, seed) only, so every size uses the same training images; x0
    comes from a generator seeded by (seed, size), so a size's pairs do not depend on which
    other sizes are computed.
    """
    ids = torch.randint(n, (pairs,), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + size[0] * 1009 + size[1])
    return ids, torch.randn(pairs, dim, generator=gen, dtype=torch.float64)


def compute_collapse(images: Tensor, *, pairs: int = 256, grid=None,
                     sides: list[int] | None = None, seed: int = 0, estimator: str = "auto",
                     tol: float = 1e-4, compute_dtype: torch.dtype = torch.float32,
                     progress: Progress | None = None) -> CollapseResult:
    """Cosine(û*(x_t, t), x1 - x0) and max λ for `pairs` seeded pairs over the t grid.

    images: (N, C, H, W) in [-1, 1] (the training set). sides: square sizes to resize to
    (default: the images' own size only). The x1 are the same training images at every size
    and every t (`draw_pairs`). Each t is one batched call of the engine.
    estimator: auto (exact while n·pairs·d ≤ AUTO_EXACT_WORK, else knn), exact or knn (the
    certified KNNVelocity within tol, over an index built in memory). compute_dtype: the exact
    engine's screening precision (float64: slower, max λ exact in every regime).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise InputError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    if isinstance(pairs, bool) or not isinstance(pairs, numbers.Integral) or pairs < 1:
        raise InputError(f"--pairs must be a positive integer, got {pairs!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InputError(f"--tol must be a positive number, got {tol!r}")
    choose_estimator(estimator, 1, 1, 1)
    grid = parse_t_grid(DEFAULT_GRID) if grid is None else check_grid(grid)
    images = images.to(torch.float32)
    n, channels = images.shape[0], images.shape[1]
    native = (int(images.shape[2]), int(images.shape[3]))
    sizes = [native] if not sides else [(side, side) for side in sides]
    headline = sizes.index(native) if native in sizes else 0
    began = time.perf_counter()
    cos = np.empty((len(sizes), len(grid), pairs))
    weight = np.empty((len(sizes), len(grid), pairs))
    dims, estimators, exact_rows = [], [], []
    for i, size in enumerate(sizes):
        label = f"{size[0]}x{size[1]}"
        data = resize_to(images, size)
        flat = data.reshape(n, -1)
        dim = flat.shape[1]
        chosen = choose_estimator(estimator, n, pairs, dim)
        if chosen == "exact":
            train = TrainingSet.from_points(flat)
            step = partial(exact_step, train=train, compute_dtype=compute_dtype)
        else:
            step = KnnStep(data, tol, progress, compute_dtype)
        ids, x0 = draw_pairs(n, dim, pairs, seed, size)
        x1 = flat[ids].to(torch.float64)
        direction = x1 - x0
        for j, t in enumerate(grid.tolist()):
            x = (1 - t) * x0 + t * x1
            velocity, max_weight = step(x, t)
            cos[i, j] = cosine(velocity, direction).numpy()
            weight[i, j] = max_weight.numpy()
            if progress:
                progress(f"collapse {label}", j + 1, len(grid))
        dims.append(dim)
        estimators.append(chosen)
        exact_rows.append(getattr(step, "exact_rows", len(grid) * pairs))
    return CollapseResult(grid=grid, sizes=sizes, dims=dims, estimators=estimators, n=n,
                          channels=channels, native=native, pairs=pairs, seed=seed, cosine=cos,
                          max_weight=weight, headline=headline,
                          seconds=time.perf_counter() - began, exact_rows=exact_rows)


# --------------------------------------------------------------------------- report


def curve_table(result: CollapseResult) -> list[dict]:
    """One row per (size, t): every number the line panels plot."""
    rows = []
    for i, label in enumerate(result.labels):
        kept = persistent_fraction(result.max_weight[i], WEIGHT_THRESHOLD)
        for j, t in enumerate(result.grid.tolist()):
            c, w = result.cosine[i, j], result.max_weight[i, j]
            row = {"size": label, "d": result.dims[i], "t": t}
            row.update({f"cosine_q{round(100 * q):02d}": float(np.quantile(c, q))
                        for q in QUANTILES})
            row.update({
                "cosine_mean": float(c.mean()),
                "frac_cosine_gt_0.9": float((c > COSINE_THRESHOLD).mean()),
                "max_weight_median": float(np.median(w)),
                "frac_max_weight_gt_0.9": float((w > WEIGHT_THRESHOLD).mean()),
                "frac_collapsed_for_good": float(kept[j]),
            })
            rows.append(row)
    return rows


def histogram_table(result: CollapseResult) -> list[dict]:
    """Cosine histogram counts at the panel times, for every size (the plot shows the
    headline size)."""
    rows = []
    for i, label in enumerate(result.labels):
        bins = result.histogram_bins(i)
        for j in result.histogram_times():
            counts, _ = np.histogram(result.cosine[i, j], bins=bins)
            for b, count in enumerate(counts.tolist()):
                rows.append({"size": label, "t": float(result.grid[j]),
                             "bin_left": float(bins[b]), "bin_right": float(bins[b + 1]),
                             "count": count})
    return rows


def summarize(result: CollapseResult, dataset: str, extra: dict | None = None) -> dict:
    times, cos_times = result.collapse_times, result.cosine_times
    return {
        "dataset": dataset,
        **(extra or {}),
        "n": result.n,
        "image_shape": [result.channels, *result.native],
        "pairs": result.pairs,
        "seed": result.seed,
        "grid": [round(t, 12) for t in result.grid.tolist()],
        "rule": f"first grid t from which at least {PAIR_FRACTION:.0%} of pairs keep "
                f"max softmax weight > {WEIGHT_THRESHOLD} at every later grid t",
        "sizes": [
            {"size": label, "d": result.dims[i], "estimator": result.estimators[i],
             "rows_on_exact_engine": int(result.exact_rows[i]),
             "collapse_time": times[i], "cosine_time": cos_times[i],
             "median_cosine_first_t": float(np.median(result.cosine[i, 0]))}
            for i, label in enumerate(result.labels)],
        "headline_size": result.labels[result.headline],
        "collapse_time": result.collapse_time,
        "seconds": round(result.seconds, 3),
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.10g}" if isinstance(value, float) else value
                             for key, value in row.items()})


ESTIMATOR_WORDS = {"exact": "the exact engine (all n points)",
                   "knn": "the certified kNN estimator (KNNVelocity)"}


def estimator_text(estimators: list[str]) -> str:
    """What computed û*, for the figure (each size's estimator is in collapse.csv)."""
    kinds = list(dict.fromkeys(estimators))
    return " and ".join(ESTIMATOR_WORDS.get(kind, kind) for kind in kinds)


def plot_collapse(path: Path, result: CollapseResult, dataset: str) -> None:
    """collapse.png: collapse_figure."""
    import matplotlib.pyplot as plt

    fig = collapse_figure(result, dataset)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def collapse_figure(result: CollapseResult, dataset: str):
    """Six cosine histograms (headline size) over three curves against t, one line per size;
    the title names the estimator of û*, the histograms' legend sits above the first panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    picks = result.histogram_times()
    fig = plt.figure(figsize=(15, 8.5), dpi=110)
    # Columns divisible by both the histogram count and the three curve panels.
    grid_spec = fig.add_gridspec(2, math.lcm(len(picks), 3), height_ratios=(1, 1.25),
                                 hspace=0.42, wspace=0.9)
    width = grid_spec.ncols // len(picks)
    head = result.headline
    bins = result.histogram_bins(head)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, j in enumerate(picks):
        ax = fig.add_subplot(grid_spec[0, panel * width:(panel + 1) * width])
        ax.hist(result.cosine[head, j], bins=bins, color="tab:blue", alpha=0.75,
                label=f"{result.labels[head]} pairs")
        ax.axvline(COSINE_THRESHOLD, color="tab:red", linestyle="--", linewidth=1,
                   label="cosine 0.9")
        ax.set_title(f"t = {format_t(float(result.grid[j]))}", fontsize=10)
        ax.set_xlim(bins[0], 1)
        ax.set_xlabel("cos(û*, x1 − x0)", fontsize=9)
        if panel == 0:
            ax.set_ylabel(f"pairs (of {result.pairs})", fontsize=9)
            # Above the panel: at t = 0 the bars can fill any corner.
            ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.12), ncol=2,
                      borderaxespad=0, frameon=False)
        ax.tick_params(labelsize=8)
    thirds = grid_spec.ncols // 3
    axes = [fig.add_subplot(grid_spec[1, k * thirds:(k + 1) * thirds]) for k in range(3)]
    times = result.collapse_times
    t = result.grid
    for i, label in enumerate(result.labels):
        color = colors[i % len(colors)]
        name = f"{label} (d={result.dims[i]})"
        c, w = result.cosine[i], result.max_weight[i]
        axes[0].plot(t, np.median(c, axis=1), color=color, label=name)
        axes[0].fill_between(t, np.quantile(c, 0.25, axis=1), np.quantile(c, 0.75, axis=1),
                             color=color, alpha=0.18, linewidth=0)
        axes[1].plot(t, (c > COSINE_THRESHOLD).mean(axis=1), color=color, label=name)
        axes[2].plot(t, (w > WEIGHT_THRESHOLD).mean(axis=1), color=color,
                     label=f"{name}: collapse time {format_t(times[i])}")
        axes[2].plot(t, persistent_fraction(w, WEIGHT_THRESHOLD), color=color, linestyle="--")
        if times[i] is not None:
            axes[2].axvline(times[i], color=color, linestyle=":", linewidth=1.5)
    axes[0].set_title("Median cosine (band: quartiles)\nat t = 0, û* = mean − x0 and "
                      "x1 − x0 both point near −x0", fontsize=10)
    axes[0].set_ylabel("cos(û*(x_t, t), x1 − x0)")
    axes[1].set_title("Pairs with cosine > 0.9", fontsize=10)
    axes[1].set_ylabel("fraction of pairs")
    axes[2].set_title("Pairs whose largest softmax weight > 0.9", fontsize=10)
    axes[2].set_ylabel("fraction of pairs")
    axes[2].axhline(PAIR_FRACTION, color="grey", linewidth=0.8, linestyle="-.")
    axes[0].set_ylim(top=1.01)
    for ax in axes:
        ax.set_xlim(0, 1)
        if ax is not axes[0]:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("t  (0 = noise, 1 = data)")
        ax.grid(alpha=0.3)
        if ax is not axes[2]:
            ax.legend(fontsize=7, loc="best")
    # Line styles of the max λ panel, explained once beside the per-size colours.
    handles, _ = axes[2].get_legend_handles_labels()
    styles = [Line2D([], [], color="black", label="max λ > 0.9 at t"),
              Line2D([], [], color="black", linestyle="--",
                     label="… at t and every later grid t"),
              Line2D([], [], color="black", linestyle=":", label="collapse time: dashed "
                     f"line reaches {PAIR_FRACTION:.0%}"),
              Line2D([], [], color="grey", linestyle="-.", linewidth=0.8,
                     label=f"{PAIR_FRACTION:.0%} of pairs")]
    axes[2].legend(handles=handles + styles, fontsize=7, loc="upper left",
                   bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    headline = format_t(result.collapse_time)
    fig.suptitle(f"Collapse of û* on {dataset} (n = {result.n}; {result.pairs} pairs "
                 f"x0 ~ N(0, I), x1 ~ training data; x_t = (1−t)·x0 + t·x1): collapse time "
                 f"{headline} at {result.labels[head]}\nû* computed by "
                 f"{estimator_text(result.estimators)}", fontsize=12, y=1.0)
    return fig


def write_collapse_report(result: CollapseResult, out: str | Path, *, dataset: str,
                          extra: dict | None = None, overwrite: bool = False) -> dict:
    """collapse.png, collapse.csv (one row per size and t), collapse_histograms.csv and
    summary.json, written atomically to `out`. Returns the summary."""
    summary = summarize(result, dataset, extra)
    with atomic_folder(out, overwrite, kind="collapse") as tmp:
        _write_csv(tmp / "collapse.csv", curve_table(result))
        _write_csv(tmp / "collapse_histograms.csv", histogram_table(result))
        plot_collapse(tmp / "collapse.png", result, dataset)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
