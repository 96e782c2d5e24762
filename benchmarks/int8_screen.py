"""The exact engine with its int8 paths (the int8 pass, and over uint8 images such as photos
the grid's int8 GEMMs for the dense rows) against the same engine with float32 GEMMs only,
on photos (n = 45,000, d = 3072), B = 256 held-out queries per t over the grid 0:0.95:0.05 and
a U[0,1) batch; the pass is toggled between interleaved calls in one process (5 each, seeded
order, median). Prints a markdown table (docs/benchmarks.md, "The int8 screen").

    python benchmarks/int8_screen.py
"""

from __future__ import annotations

import math
import random
import time

import torch

import knnflow.closed_form as closed_form
from knnflow import int_screen
from knnflow.data import load_dataset


def main(batch: int = 256, calls: int = 5) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    data = load_dataset("photos").reshape(45_000, -1)
    held = load_dataset("photos", split="test").reshape(-1, data.shape[1])
    train = closed_form.as_training_set(data)
    train.digits()
    train.grid()
    grid = [round(0.05 * i, 2) for i in range(20)] + ["U[0,1)"]
    cpu = torch.device("cpu")
    print(f"int8 GEMM / float32 GEMM time ratio here: {int_screen.int8_gemm_ratio(cpu):.2f}")
    print("| t | float32 GEMMs only, ms | with the int8 paths, ms | speed-up |")
    print("|---|---|---|---|")
    for t in grid:
        x1 = held[torch.randint(len(held), (batch,))]
        tt = torch.rand(batch) if t == "U[0,1)" else torch.full((batch,), float(t))
        x = (1 - tt[:, None]) * torch.randn_like(x1) + tt[:, None] * x1
        closed_form.closed_form_velocity(x, tt, train)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        order = [True, False] * calls
        rng.shuffle(order)
        for use in order:
            int_screen._RATIOS["cpu"] = 0.0 if use else math.inf
            start = time.perf_counter()
            closed_form.closed_form_velocity(x, tt, train)
            times[use].append(time.perf_counter() - start)
        int_screen._RATIOS.pop("cpu")
        off, on = (sorted(times[k])[calls // 2] * 1e3 for k in (False, True))
        print(f"| {t} | {off:.0f} | {on:.0f} | {off / on:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
