"""KNNVelocity with and without its calibrated t floor, on the same queries, timed in
interleaved rounds (median of 3) against the exact engine.

Usage: python benchmarks/knn_calibration.py INDEX_DIR  (an index of the synthetic set, made by
knnflow build-index synthetic --out INDEX_DIR). Queries: x_t from held-out images.
"""

from __future__ import annotations

import sys

import torch

from knnflow.data import load_dataset
from knnflow.estimators import ExactVelocity, KNNVelocity
from knnflow.index import Index
from knnflow.timing import interleaved_seconds

index = Index.load(sys.argv[1] if len(sys.argv) > 1 else "indices/synthetic-train")
held = load_dataset("synthetic", split="test").reshape(10000, -1)
gen = torch.Generator().manual_seed(0)
exact = ExactVelocity(index)
estimators = {"calibrated": KNNVelocity(index, tol=1e-4),
              "uncalibrated": KNNVelocity(index, tol=1e-4, calibrate=False)}
print(f"calibrated floor: t = {estimators['calibrated'].t_floor}")
for label in ("0.1", "0.3", "0.5", "0.9", "U[0,1)"):
    t = torch.rand(256, generator=gen) if label == "U[0,1)" else torch.full((256,), float(label))
    x1 = held[torch.randint(len(held), (256,), generator=gen)]
    x = ((1 - t)[:, None] * torch.randn(x1.shape, generator=gen) + t[:, None] * x1).float()
    calls = {"exact": lambda x=x, t=t: exact(x, t)}
    calls.update({name: (lambda est=est, x=x, t=t: est(x, t)) for name, est in estimators.items()})
    seconds = interleaved_seconds(calls, 3, torch.device("cpu"))
    reference = exact(x, t).velocity.double()
    parts = [f"t={label}: exact {256 / seconds['exact']:.0f} q/s"]
    for name, est in estimators.items():
        out = est(x, t)
        over = ((out.velocity.double() - reference).norm(dim=1) - out.error_bound
                - 1e-4 * reference.norm(dim=1))
        parts.append(f"{name} {256 / seconds[name]:.0f} q/s "
                     f"({seconds['exact'] / seconds[name]:.2f}x, violations "
                     f"{int((over > 0).sum())})")
    print("; ".join(parts))
