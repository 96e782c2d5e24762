"""Seconds per training step of a model preset on this machine: forward, backward and Adam.

    python benchmarks/tiny_step.py [--preset tiny] [--threads N]

Prints the median of 6 steps (after 2 warm-up steps) at digits (1×8×8) and MNIST (1×28×28)
shapes, batch 128 and 32; the figures behind the tiny preset's help text.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from knnflow.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="model preset")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for shape in ((1, 8, 8), (1, 28, 28)):
        for batch in (128, 32):
            model = build_model(args.preset, shape)
            opt = torch.optim.Adam(model.parameters(), 1e-3)
            seconds = []
            for _ in range(8):
                x, t = torch.randn(batch, *shape), torch.rand(batch)
                start = time.perf_counter()
                loss = (model(x, t) - x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                seconds.append(time.perf_counter() - start)
            print(f"{args.preset} {'×'.join(map(str, shape))} batch {batch}: "
                  f"{statistics.median(seconds[2:]):.3f} s/step", flush=True)


if __name__ == "__main__":
    main()
