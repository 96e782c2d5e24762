"""knnflow bench targets: each training target against û*, mean ‖target - û*‖² per t bin
and its cost."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from knnflow.bench.common import BenchResult, Progress, bench_index, bench_target
from knnflow.errors import OptionError
from knnflow.estimators import ExactVelocity

TARGET_SPECS = {
    "cfm": {"name": "cfm"},
    "ot-cfm": {"name": "ot-cfm"},
    "efm-128": {"name": "efm", "m": 128},
    "efm-1000": {"name": "efm", "m": 1000},
    "efm-128-shared": {"name": "efm", "m": 128, "pool": "shared"},
    "knn-efm": {"name": "knn-efm"},
}


@dataclass
class TargetsBench(BenchResult):
    bins: list[str]
    error: dict[str, list[float]]
    ms_per_batch: dict[str, float]
    fallback: list[float]
    routed: list[float]


def bench_targets(dataset: str | None = None, root: str | None = None, limit: int | None = None,
                  batch: int = 128, bins: int = 10, tol: float = 1e-4,
                  index_folder: str | Path | None = None, seed: int = 0,
                  size: int | None = None, progress: Progress | None = None) -> TargetsBench:
    """For cfm, ot-cfm, efm-128, efm-1000 (independent pools), efm-128 with a shared pool and
    knn-efm, on the same (x0, x1, t) (ot-cfm re-pairs x0 within the batch, and its error is
    against û* at its own x_t): mean ‖target - û*‖² per t bin against the exact engine, and the
    median time per batch. x1 are training images, as in training."""

    if min(batch, bins) < 1:
        raise OptionError("{batch} and {bins} must be at least 1", "batch", "bins")
    source = bench_index(dataset, root, limit, index_folder, progress, size=size)
    index = source.index
    train = index.training_set()
    exact = ExactVelocity(train)
    targets = {label: bench_target(spec, index, tol, data=train)
               for label, spec in TARGET_SPECS.items()}
    gen = torch.Generator().manual_seed(seed)
    error = {label: [] for label in targets}
    seconds = {label: [] for label in targets}
    fallback, routed, labels = [], [], []
    for b in range(bins):
        if progress:
            progress("bench targets", b, bins)
        low, high = b / bins, (b + 1) / bins
        labels.append(f"[{low:.1f},{high:.1f})")
        t = (low + (high - low) * torch.rand(batch, generator=gen)).clamp(max=1 - 1e-4)
        x1 = train.points[torch.randint(train.n, (batch,), generator=gen)].to(torch.float32)
        x0 = torch.randn(x1.shape, generator=gen)
        for label, target in targets.items():
            out = target(x0, x1, t, generator=torch.Generator().manual_seed(seed + b))
            if label == "cfm":  # every target but ot-cfm has cfm's x_t
                reference = exact(out.x_t, t).velocity.to(torch.float64)
            own = (exact(out.x_t, t).velocity.to(torch.float64) if label == "ot-cfm"
                   else reference)  # ot-cfm re-pairs x0, so its x_t differ
            error[label].append(float((out.target.double() - own).square().sum(1).mean()))
            seconds[label].append(out.seconds)
            if label == "knn-efm":
                fallback.append(out.fallback)
                routed.append(out.routed)
    if progress:
        progress("bench targets", bins, bins)
    return TargetsBench(
        config={**source.described(), "batch": batch, "tol": tol,
                "threads": torch.get_num_threads(), "torch": torch.__version__},
        bins=labels, error=error,
        ms_per_batch={label: 1e3 * statistics.median(v) for label, v in seconds.items()},
        fallback=fallback, routed=routed)
