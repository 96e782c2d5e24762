"""The certified estimator over shards against the single-process one, on one machine's CPUs.

Usage: python benchmarks/distributed_knn.py INDEX_DIR [WORLD]  (the synthetic index:
knnflow build-index synthetic --out INDEX_DIR; WORLD default 2). KNNVelocity(tol=1e-4) on 256
held-out queries per t in (0.5, 0.7, 0.9): once in one process with all cores, then in WORLD
processes (gloo, file rendezvous) with cores/WORLD threads each, every process scanning and
weighing its N/WORLD points (KNNVelocity(index, group=...)). Prints the median of 3 calls per
t, the fallbacks, and the largest difference between the two velocities relative to ‖û*‖.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from distributed_exact import run_ranks  # benchmarks/ is this script's folder

from knnflow.timing import interleaved_seconds

TIMES = (0.5, 0.7, 0.9)


def queries(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    from knnflow.data import load_dataset

    held = load_dataset("synthetic", split="test").reshape(-1, 3072)
    gen = torch.Generator().manual_seed(int(t * 1000))
    x1 = held[torch.randint(held.shape[0], (256,), generator=gen)]
    return (1 - t) * torch.randn(x1.shape, generator=gen) + t * x1, torch.full((256,), t)


def measure(estimator) -> dict:
    out = {}
    for t in TIMES:
        x, tt = queries(t)
        if dist.is_initialized():
            dist.barrier()
        seconds = interleaved_seconds({"call": lambda x=x, tt=tt: estimator(x, tt)}, 3,
                                      torch.device("cpu"))["call"]
        result = estimator(x, tt)
        out[t] = (seconds, result.velocity, int(result.fallback.sum()))
    return out


def rank_main(rank: int, world: int, threads: int, index_dir: str, folder: str) -> None:
    from knnflow.estimators import KNNVelocity
    from knnflow.index import Index

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    estimator = KNNVelocity(Index.load(index_dir), tol=1e-4, group=dist.group.WORLD)
    out = measure(estimator)
    if rank == 0:
        torch.save(out, f"{folder}/ranks.pt")
    dist.destroy_process_group()


def main() -> None:
    from knnflow.bench.measure import relative_errors
    from knnflow.estimators import KNNVelocity
    from knnflow.index import Index

    index_dir = sys.argv[1]
    world = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    cores = torch.get_num_threads()
    single = measure(KNNVelocity(Index.load(index_dir), tol=1e-4))
    ranks = run_ranks(rank_main, world, index_dir)
    print(f"certified kNN, 256 queries; one process with {cores} threads against {world} "
          f"gloo processes with {max(1, cores // world)} each, each on its shard")
    for t in TIMES:
        (one, v_one, f_one), (many, v_many, f_many) = single[t], ranks[t]
        gap = float(relative_errors(v_many, v_one).max())
        print(f"t = {t}: one process {1e3 * one:.0f} ms ({f_one} fallbacks), {world} "
              f"processes {1e3 * many:.0f} ms ({f_many} fallbacks), ratio {many / one:.2f}; "
              f"largest difference {gap:.0e} of ‖û*‖")


if __name__ == "__main__":
    main()
