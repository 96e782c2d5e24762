"""Where the time of one t ~ U[0,1) batch goes: the exact engine on all rows, on the rows below
KNNVelocity's calibrated floor and on those above it, against KNNVelocity on all rows and on
the rows above. Shows the bound on b/a that the rows below the floor set: they go to the exact
engine in either case.

Usage: python benchmarks/knn_u01_split.py INDEX_DIR [BATCH]  (the synthetic index:
knnflow build-index synthetic --out INDEX_DIR). Median of 5 interleaved rounds, one process.
"""

from __future__ import annotations

import sys

import torch

from knnflow.data import load_dataset
from knnflow.estimators import ExactVelocity, KNNVelocity
from knnflow.index import Index
from knnflow.timing import interleaved_seconds


def main() -> None:
    index = Index.load(sys.argv[1])
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    name = index.manifest["dataset"].get("name", "synthetic")
    held = load_dataset(name, split="test").reshape(-1, index.dim)
    certified, exact = KNNVelocity(index, tol=1e-4), ExactVelocity(index)
    gen = torch.Generator().manual_seed(0)
    x1 = held[torch.randint(len(held), (batch,), generator=gen)]
    t = torch.rand(batch, generator=gen)
    x = (1 - t)[:, None] * torch.randn(x1.shape, generator=gen) + t[:, None] * x1
    low = t < certified.t_floor
    high = ~low
    print(f"floor t = {certified.t_floor}: {int(low.sum())} of {batch} rows below it")
    ms = {name: 1e3 * s for name, s in interleaved_seconds({
        "a": lambda: exact(x, t), "b": lambda: certified(x, t),
        "a_low": lambda: exact(x[low], t[low]), "a_high": lambda: exact(x[high], t[high]),
        "b_high": lambda: certified(x[high], t[high])}, 5, torch.device("cpu")).items()}
    a, b, a_low, a_high, b_high = (ms[k] for k in ("a", "b", "a_low", "a_high", "b_high"))
    print(f"(a) exact, all rows {a:.0f} ms; rows below the floor {a_low:.0f} ms, above "
          f"{a_high:.0f} ms")
    print(f"(b) certified, all rows {b:.0f} ms (b/a {a / b:.2f}×); rows above the floor "
          f"{b_high:.0f} ms (b/a there {a_high / b_high:.2f}×)")
    print(f"even free certification above the floor leaves b ≥ {a_low:.0f} ms: b/a ≤ "
          f"{a / a_low:.2f}×")


if __name__ == "__main__":
    main()
