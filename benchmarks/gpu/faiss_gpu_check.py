"""faiss-gpu on the lent GPU: a flat L2 index of 200,000 × 3072 float32 points built on the GPU
and searched, against the CPU index and an exact float64 reference on the same queries."""

from __future__ import annotations

import sys
import time

import faiss
import numpy as np
import torch

if "--quick" in sys.argv:  # does a GPU flat search run at all?
    index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), 8)
    index.add(np.eye(8, dtype=np.float32))
    assert index.search(np.eye(8, dtype=np.float32), 1)[1].ravel().tolist() == list(range(8))
    sys.exit(0)
n, d, q, k = 200_000, 3072, 1024, 16
print("faiss", faiss.__version__, "GPUs seen by faiss:", faiss.get_num_gpus())
gen = torch.Generator(device="cuda").manual_seed(0)
points_gpu = torch.rand(n, d, device="cuda", generator=gen) * 2 - 1
queries_gpu = points_gpu[:q] + 0.3 * torch.randn(q, d, device="cuda", generator=gen)
points, queries = points_gpu.cpu().numpy(), queries_gpu.cpu().numpy()

resources = faiss.StandardGpuResources()
began = time.perf_counter()
gpu_index = faiss.GpuIndexFlatL2(resources, d)
gpu_index.add(points)
gpu_build = time.perf_counter() - began
gpu_index.search(queries[:64], k)  # warm-up
began = time.perf_counter()
_, gpu_ids = gpu_index.search(queries, k)
gpu_search = time.perf_counter() - began

cpu_index = faiss.IndexFlatL2(d)
began = time.perf_counter()
cpu_index.add(points)
cpu_build = time.perf_counter() - began
began = time.perf_counter()
_, cpu_ids = cpu_index.search(queries, k)
cpu_search = time.perf_counter() - began

# Exact reference: float64 distances on the GPU.
p64, q64 = points_gpu.double(), queries_gpu.double()
sq = (q64.square().sum(1, keepdim=True) - 2 * q64 @ p64.T + p64.square().sum(1)[None])
ref = sq.topk(k, dim=1, largest=False).indices.cpu().numpy()


def recall(ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, ref, strict=True)]))


print(f"n={n} d={d} queries={q} k={k}")
print(f"gpu flat: add {gpu_build:.2f}s, search {gpu_search * 1e3:.1f} ms "
      f"({q / gpu_search:.0f} q/s), recall@{k} vs float64 {recall(gpu_ids):.4f}")
print(f"cpu flat ({torch.get_num_threads()} threads): add {cpu_build:.2f}s, search "
      f"{cpu_search * 1e3:.1f} ms ({q / cpu_search:.0f} q/s), recall@{k} {recall(cpu_ids):.4f}")
print(f"search speedup gpu/cpu: {cpu_search / gpu_search:.1f}x")
