"""Where the exact engine's time goes on the GPU: torch.profiler over a few calls of
ExactVelocity on CIFAR-shaped synthetic data (n = 50,000, d = 3072, 256 queries)."""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from knnflow.estimators import ExactVelocity
from knnflow.synthetic import synthetic_images

points = synthetic_images(50_000).reshape(50_000, -1).cuda()
exact = ExactVelocity(points, device="cuda")
gen = torch.Generator().manual_seed(1)
x1 = points[torch.randint(len(points), (256,), generator=gen).cuda()]
for t in (0.1, 0.5, 0.9):
    x = ((1 - t) * torch.randn(x1.shape, generator=gen).cuda() + t * x1).float()
    exact(x, t)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(3):
        exact(x, t)
    torch.cuda.synchronize()
    print(f"t={t}: {(time.perf_counter() - began) / 3 * 1e3:.1f} ms per call of 256 queries")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    exact(x, 0.5)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))
