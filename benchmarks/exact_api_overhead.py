"""closed_form_velocity on a raw tensor against a prepared ExactVelocity, on real images.

Usage: python benchmarks/exact_api_overhead.py [N]  (default 20000). The first N training
images of `photos` as a raw float32 tensor; 256 held-out x_t per t in (0.1, 0.3, 0.5, 0.7,
0.9) and a U[0,1) batch; interleaved rounds (knnflow.timing), median of 5. Prints ms per
call of each and their ratio: the README's first function prepares the tensor (float64 norms
and sums) once and reuses it while the tensor is unchanged, so the ratio should be ~1.
"""

from __future__ import annotations

import sys

import torch

import knnflow
from knnflow.timing import interleaved_seconds


def main(n: int = 20000) -> None:
    data = knnflow.load_dataset("photos", split="train")[:n].reshape(n, -1).contiguous()
    held = knnflow.load_dataset("photos", split="test").reshape(-1, data.shape[1])
    prepared = knnflow.ExactVelocity(data)
    gen = torch.Generator().manual_seed(0)
    print(f"photos, n={n}, d={data.shape[1]}, batch 256, {torch.get_num_threads()} threads")
    print(f"{'t':>7} {'raw tensor ms':>14} {'ExactVelocity ms':>17} {'ratio':>6}")
    for t in (0.1, 0.3, 0.5, 0.7, 0.9, "U[0,1)"):
        times = (torch.rand(256, generator=gen, dtype=torch.float64) if t == "U[0,1)"
                 else torch.full((256,), float(t), dtype=torch.float64))
        x1 = held[torch.randint(held.shape[0], (256,), generator=gen)]
        tt = times.to(torch.float32)[:, None]
        x = (1 - tt) * torch.randn(256, data.shape[1], generator=gen) + tt * x1
        arg = times if t == "U[0,1)" else float(t)
        seconds = interleaved_seconds(
            {"raw": lambda x=x, arg=arg: knnflow.closed_form_velocity(x, arg, data),
             "prepared": lambda x=x, arg=arg: prepared(x, arg).velocity}, 5,
            torch.device("cpu"))
        print(f"{t!s:>7} {seconds['raw'] * 1e3:14.1f} {seconds['prepared'] * 1e3:17.1f} "
              f"{seconds['raw'] / seconds['prepared']:6.2f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
