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

This module holds that rule, the pairs and `compute_collapse`; collapse_estimators.py computes
û* and max λ at one t, collapse_report.py writes the tables, figure and summary.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import Tensor

from knnflow.analysis.collapse_estimators import (
    KnnStep,
    Progress,
    choose_estimator,
    cosine,
    exact_step,
)
from knnflow.choices import COLLAPSE_GRID as DEFAULT_GRID
from knnflow.closed_form import TrainingSet
from knnflow.errors import InputError, OptionError
from knnflow.images import resize_images
from knnflow.t_grid import check_grid, parse_t_grid

# A pair is aligned when cosine > 0.9 and collapsed when max λ > 0.9; the collapse time needs
# 90% of the pairs collapsed for good.
COSINE_THRESHOLD = 0.9
WEIGHT_THRESHOLD = 0.9
PAIR_FRACTION = 0.9
HISTOGRAM_PANELS = 6
HISTOGRAM_BINS = 40
# The largest side `parse_sides` accepts.
MAX_SIDE = 1024


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


def parse_sides(text: str | None) -> list[int] | None:
    """dims: a comma list of side lengths (8,16,32), in order, duplicates dropped."""
    if text is None or not text.strip():
        return None
    sides: list[int] = []
    for part in text.split(","):
        value = part.strip()
        if not value.isdigit() or int(value) < 1:
            raise OptionError(f"takes a comma list of positive side lengths like 8,16,32; "
                              f"got {text.strip()!r}", "dims")
        if int(value) > MAX_SIDE:
            raise OptionError(f"{{dims}}: side {value} is too large (at most {MAX_SIDE})",
                              "dims")
        if int(value) not in sides:
            sides.append(int(value))
    return sides


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
    estimator: auto (exact while n·pairs·d ≤ AUTO_EXACT_WORK of collapse_estimators, else
    knn), exact or knn (the certified KNNVelocity within tol, over an index built in memory).
    compute_dtype: the exact engine's screening precision (float64: slower, max λ exact in
    every regime).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise InputError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    if isinstance(pairs, bool) or not isinstance(pairs, numbers.Integral) or pairs < 1:
        raise OptionError(f"must be a positive integer, got {pairs!r}", "pairs")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise OptionError(f"must be a positive number, got {tol!r}", "tol")
    choose_estimator(estimator, 1, 1, 1)
    grid = parse_t_grid(DEFAULT_GRID) if grid is None else check_grid(grid, "grid")
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
