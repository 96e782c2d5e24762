"""How many training points the certified search's sketches keep per query, by t, with the
budgets lifted: what decides where certification pays.

Usage: python benchmarks/knn_survivors.py INDEX_DIR [T,T,...]  (an index of the synthetic
set, made by knnflow build-index synthetic --out INDEX_DIR; times default 0.2,0.3,0.35,0.4,0.5).
Queries: 64 per t, x_t from held-out images. Prints the 10/50/90% quantiles of the points that
survive the coarse sketch (scanned for every point) and the fine sketch (read for the coarse
survivors); the survivors of the fine sketch are read in full dimension.
"""

from __future__ import annotations

import sys

import torch

from knnflow.data import load_dataset
from knnflow.estimators import KNNVelocity, SearchBudgets
from knnflow.index import Index
from knnflow.prune import SketchScanner


def quantiles(rows: torch.Tensor, batch: int) -> str:
    counts = torch.bincount(rows, minlength=batch).double()
    return " / ".join(f"{float(counts.quantile(q)):.0f}" for q in (0.1, 0.5, 0.9))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__.split("\n\n")[1])
    index = Index.load(sys.argv[1])
    times = [float(v) for v in (sys.argv[2] if len(sys.argv) > 2
                                else "0.2,0.3,0.35,0.4,0.5").split(",")]
    held = load_dataset("synthetic", split="test").reshape(10000, -1)
    estimator = KNNVelocity(index, tol=1e-4, calibrate=False,
                            budgets=SearchBudgets(coarse=1.0, exact=1.0))
    found = {}
    scan, fine = SketchScanner.seeded_scan, SketchScanner.fine_filter

    def watched_scan(self, queries, *args):
        result = scan(self, queries, *args)
        found["coarse"] = quantiles(result.rows, queries.q.shape[0])
        return result

    def watched_fine(self, queries, rows, cols, threshold):
        rows, cols = fine(self, queries, rows, cols, threshold)
        found["fine"] = quantiles(rows, queries.q.shape[0])
        return rows, cols

    SketchScanner.seeded_scan, SketchScanner.fine_filter = watched_scan, watched_fine
    gen = torch.Generator().manual_seed(0)
    print(f"n = {index.n}; survivors per query, 10% / 50% / 90% quantiles of 64 queries")
    for value in times:
        t = torch.full((64,), value)
        x1 = held[torch.randint(len(held), (64,), generator=gen)]
        x = ((1 - t)[:, None] * torch.randn(x1.shape, generator=gen) + t[:, None] * x1).float()
        out = estimator(x, t)
        print(f"t = {value}: coarse {found['coarse']}, fine {found['fine']}, "
              f"certified {int((~out.fallback).sum())} of 64")


if __name__ == "__main__":
    main()
