"""How close samples lie to the training set, as numbers: nearest-neighbour distances, the
ratio test and a train-to-train reference.

For each sample x: d1 and d2, its L2 distances (pixels in [-1, 1]) to the nearest and
second-nearest training images, found exactly by `Index.search` (float64 distances from the
raw data). A sample is memorized when d1/d2 < threshold (1/3 by default: the ratio test of
Carlini et al. and Somepalli et al.). The reference line is the mean distance from a training
image to its nearest *other* training image (leave-one-out), over a seeded sample of at most
10,000 training images. Gu et al. divide distances by √d; the summary gives both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from knnflow.choices import MEMORIZATION_REFERENCE as REFERENCE_SIZE
from knnflow.errors import InputError, OptionError
from knnflow.index import Index
from knnflow.samples import Samples

Progress = Callable[[str, int, int], None]
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclass
class Scores:
    """Per sample: ids (N, k) of the nearest training images and distances (N, k), L2."""

    ids: Tensor
    distances: Tensor
    exact: bool
    search: str
    evaluated_median: float | None = None

    @property
    def ratio(self) -> Tensor:
        """d1/d2, with 0/0 (a copy of a duplicated training image) read as 0."""
        d1, d2 = self.distances[:, 0], self.distances[:, 1]
        return torch.where(d2 > 0, d1 / d2.clamp(min=1e-300), torch.zeros_like(d1))


def nearest_training(index: Index, samples: Samples, k: int = 2, approximate: bool = False,
                     batch_size: int = 256, progress: Progress | None = None) -> Scores:
    """The k nearest training images of every sample, in batches (never an N×n matrix)."""
    if k < 2:
        raise OptionError(f"must be at least 2 (the ratio test needs d2), got {k}", "k")
    if k > index.n:
        raise OptionError(f"{{k}} {k} exceeds the {index.n} training images of the index", "k")
    n = len(samples)
    ids = torch.empty(n, k, dtype=torch.int64)
    dist = torch.empty(n, k, dtype=torch.float64)
    exact, methods, evaluated = True, set(), []
    for start in range(0, n, batch_size):
        values = samples.batch(start, start + batch_size)
        found = index.search(torch.from_numpy(values).reshape(len(values), -1), k,
                             approximate=approximate)
        ids[start:start + len(values)] = found.ids
        dist[start:start + len(values)] = found.sq_distances.clamp(min=0).sqrt()
        exact &= found.exact
        methods.add(index.last_stats.get("method", "faiss"))
        if "evaluated_median" in index.last_stats:
            evaluated.append(index.last_stats["evaluated_median"])
        if progress:
            progress("nearest training images", min(start + batch_size, n), n)
    search = "+".join(sorted(methods))
    return Scores(ids, dist, exact, search,
                  float(np.median(evaluated)) if evaluated else None)


def train_reference(index: Index, size: int = REFERENCE_SIZE, seed: int = 0,
                    approximate: bool = False, batch_size: int = 256,
                    progress: Progress | None = None) -> tuple[Tensor, Tensor]:
    """Leave-one-out: for a seeded sample of min(size, n) training images, the distance to
    the nearest *other* training image. Returns (sampled ids, distances)."""
    n = index.n
    if n < 2:
        raise InputError("the index holds one training image; the train-to-train reference "
                         "needs two")
    count = min(size, n)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort()[0]
    out = torch.empty(count, dtype=torch.float64)
    for start in range(0, count, batch_size):
        ids = chosen[start:start + batch_size]
        found = index.search(index.points[ids].to(torch.float32), 2, approximate=approximate)
        # The image itself is one of the two unless duplicates tie with it at distance 0.
        self_first = found.ids[:, 0] == ids
        other = torch.where(self_first, found.sq_distances[:, 1], found.sq_distances[:, 0])
        out[start:start + len(ids)] = other.clamp(min=0).sqrt()
        if progress:
            progress("train-to-train reference", min(start + batch_size, count), count)
    return chosen, out


def _stats(values: Tensor) -> dict[str, float]:
    v = values.to(torch.float64)
    out = {"mean": float(v.mean()), "median": float(v.median()), "min": float(v.min()),
           "max": float(v.max())}
    qs = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64))
    out.update({f"q{round(q * 100):02d}": float(x) for q, x in zip(QUANTILES, qs, strict=True)})
    return out


def summarize(samples: Samples, index: Index, scores: Scores, reference: Tensor,
              threshold: float, seconds: float) -> dict:
    d1 = scores.distances[:, 0]
    ratio = scores.ratio
    memorized = ratio < threshold
    root_d = math.sqrt(index.dim)
    return {
        "n_samples": len(samples),
        "samples": str(samples.source),
        "input": samples.detected,
        "skipped_files": len(samples.skipped),
        "skipped_grids": [str(p) for p in samples.grids],
        "index": str(index.folder) if index.folder else None,
        "dataset": index.manifest.get("dataset"),
        "n_train": index.n,
        "image_shape": list(index.image_shape),
        "d": index.dim,
        "k": scores.ids.shape[1],
        "threshold": threshold,
        "d1": _stats(d1),
        "d1_over_sqrt_d": _stats(d1 / root_d),
        "d1_over_d2": _stats(ratio),
        "reference": {
            "what": "L2 distance from a training image to its nearest other training image "
                    "(leave-one-out), over a seeded sample",
            "train_images": len(reference),
            "of": index.n,
            "mean": float(reference.mean()),
            "median": float(reference.median()),
            "mean_over_sqrt_d": float(reference.mean()) / root_d,
            "median_over_sqrt_d": float(reference.median()) / root_d,
        },
        "d1_mean_over_reference_mean": float(d1.mean()) / max(float(reference.mean()), 1e-300),
        "memorized": {"count": int(memorized.sum()),
                      "fraction": float(memorized.double().mean()),
                      "rule": f"d1/d2 < {threshold_text(threshold)}"},
        "exact": scores.exact,
        "search": scores.search,
        "seconds": round(seconds, 3),
    }


def threshold_text(threshold: float) -> str:
    """1/3 rather than 0.333333: a simple fraction where the value is one, else 4 digits."""
    simple = Fraction(threshold).limit_denominator(12)
    if simple.denominator > 1 and abs(float(simple) - threshold) <= 1e-12:
        return f"{simple.numerator}/{simple.denominator}"
    return f"{threshold:.4g}"


def parse_threshold(text: str | float) -> float:
    """A number or a fraction such as 1/3, in (0, 1]."""
    raw = str(text).strip()
    try:
        if "/" in raw:
            num, den = raw.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        raise OptionError(f"takes a number or a fraction like 1/3, got {raw!r}",
                          "threshold") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise OptionError(f"must lie in (0, 1], got {raw}", "threshold")
    return value

