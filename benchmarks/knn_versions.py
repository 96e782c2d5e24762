"""KNNVelocity of an earlier commit against the working tree's, in one process on the same
queries, timed in interleaved rounds (median of 9 calls each): on a machine whose speed drifts
by 10-20% from one run to the next, separate `knnflow bench knn` runs cannot show a change
of that size; this can.

Usage: python benchmarks/knn_versions.py REV INDEX_DIR [T,T,...]  (REV: any git revision, e.g.
HEAD~1; INDEX_DIR: an index of the synthetic set, made by knnflow build-index synthetic --out
INDEX_DIR; times default 0.5,0.7,0.9). The old package is exported with git archive into a
temporary folder as `knnflow_old`. Queries: x_t from held-out images, 256 per t. Prints both
medians, their ratio, and the largest difference between the two velocities relative to ‖û*‖.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch


def export_old(rev: str, folder: Path) -> None:
    """The package at `rev` as folder/knnflow_old, its imports renamed."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "knnflow"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "knnflow").rename(folder / "knnflow_old")
    for path in (folder / "knnflow_old").rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) knnflow\b", r"\1 knnflow_old", text))


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1])
    rev, index_dir = sys.argv[1], sys.argv[2]
    times = [float(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "0.5,0.7,0.9").split(",")]
    folder = Path(tempfile.mkdtemp(prefix="knnflow-old-"))
    export_old(rev, folder)
    sys.path.insert(0, str(folder))
    import knnflow_old.estimators as old_estimators
    import knnflow_old.index as old_index

    from knnflow.data import load_dataset
    from knnflow.estimators import ExactVelocity, KNNVelocity
    from knnflow.index import Index

    new_index = Index.load(index_dir)
    estimators = {"old": old_estimators.KNNVelocity(old_index.Index.load(index_dir), tol=1e-4),
                  "new": KNNVelocity(new_index, tol=1e-4)}
    exact = ExactVelocity(new_index)
    print(f"calibrated floors: old {estimators['old'].t_floor}, new {estimators['new'].t_floor}")
    held = load_dataset("synthetic", split="test").reshape(10000, -1)
    gen = torch.Generator().manual_seed(0)
    for value in times:
        t = torch.full((256,), value)
        x1 = held[torch.randint(len(held), (256,), generator=gen)]
        x = ((1 - t)[:, None] * torch.randn(x1.shape, generator=gen) + t[:, None] * x1).float()
        outs = {name: est(x, t).velocity.double() for name, est in estimators.items()}
        seconds: dict[str, list[float]] = {name: [] for name in estimators}
        for _ in range(9):
            for name, est in estimators.items():
                began = time.perf_counter()
                est(x, t)
                seconds[name].append(time.perf_counter() - began)
        ms = {name: 1e3 * sorted(v)[4] for name, v in seconds.items()}
        ref = exact(x, t).velocity.double()
        gap = float(((outs["old"] - outs["new"]).norm(dim=1) / ref.norm(dim=1)).max())
        print(f"t = {value}: old {ms['old']:.0f} ms, new {ms['new']:.0f} ms per 256 queries, "
              f"old/new {ms['old'] / ms['new']:.2f}; largest |old - new| / ‖û*‖ {gap:.0e}")


if __name__ == "__main__":
    main()
