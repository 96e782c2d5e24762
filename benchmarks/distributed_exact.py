"""The sharded exact engine against the single-process one, on one machine's CPU cores.

Usage: python benchmarks/distributed_exact.py [N] [WORLD]  (defaults 50000, 2). Runs the exact
engine on the synthetic set (d = 3072) for 256 queries at t = 0.3, 0.5, 0.9: once in one
process with all cores, then in WORLD processes (gloo, file rendezvous) with cores/WORLD
threads each, every rank holding N/WORLD points. Prints the median of 3 calls per t, the time
of the state all-reduce alone, and the largest difference between the two velocities
relative to ‖û*‖. The split costs nothing in arithmetic; what it adds is the all-reduce of
256 × 3073 float64 values and a process's fixed costs.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from knnflow.timing import interleaved_seconds

TIMES = (0.3, 0.5, 0.9)


def queries(points: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(t * 1000))
    x1 = points[torch.randint(points.shape[0], (256,), generator=gen)]
    tt = torch.full((256,), t)
    x = (1 - t) * torch.randn(x1.shape, generator=gen) + t * x1
    return x, tt


def median_seconds(call, repeats: int = 3) -> float:
    return interleaved_seconds({"call": call}, repeats, torch.device("cpu"))["call"]


def run_ranks(rank_main, world: int, *args) -> dict:
    """rank_main(rank, world, threads, *args, folder) in `world` gloo processes with this
    machine's cores split between them; returns what rank 0 saved to FOLDER/ranks.pt."""
    threads = max(1, torch.get_num_threads() // world)
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        mp.spawn(rank_main, args=(world, threads, *args, folder), nprocs=world)
        return torch.load(f"{folder}/ranks.pt")


def rank_main(rank: int, world: int, threads: int, n: int, folder: str) -> None:
    from knnflow.closed_form import closed_form_state
    from knnflow.distributed import all_reduce_state_, shard_of
    from knnflow.estimators import ExactVelocity
    from knnflow.synthetic import synthetic_images

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    points = synthetic_images(n).reshape(n, -1)
    exact = ExactVelocity(shard_of(points), group=dist.group.WORLD)
    out = {}
    for t in TIMES:
        x, tt = queries(points, t)
        dist.barrier()
        seconds = median_seconds(lambda x=x, tt=tt: exact(x, tt))
        state = closed_form_state(x, tt, exact.train)
        dist.barrier()
        reduce_seconds = median_seconds(
            lambda s=state: all_reduce_state_(type(s)(s.ref.clone(), s.z.clone(), s.s.clone())))
        out[t] = (seconds, reduce_seconds, exact(x, tt).velocity)
    if rank == 0:
        torch.save(out, f"{folder}/ranks.pt")
    dist.destroy_process_group()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    world = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    cores = torch.get_num_threads()
    from knnflow.bench.measure import relative_errors
    from knnflow.estimators import ExactVelocity
    from knnflow.synthetic import synthetic_images

    points = synthetic_images(n).reshape(n, -1)
    exact = ExactVelocity(points)
    single = {}
    for t in TIMES:
        x, tt = queries(points, t)
        single[t] = (median_seconds(lambda x=x, tt=tt: exact(x, tt)), exact(x, tt).velocity)
    ranks = run_ranks(rank_main, world, n)
    print(f"n = {n}, d = 3072, 256 queries; one process with {cores} threads against {world} "
          f"gloo ranks with {max(1, cores // world)} each")
    for t in TIMES:
        one, v_one = single[t]
        many, reduce_seconds, v_many = ranks[t]
        gap = float(relative_errors(v_many, v_one).max())
        print(f"t = {t}: one process {1e3 * one:.0f} ms, {world} ranks {1e3 * many:.0f} ms "
              f"(all-reduce {1e3 * reduce_seconds:.1f} ms), ratio {many / one:.2f}; "
              f"largest difference {gap:.0e} of ‖û*‖")


if __name__ == "__main__":
    main()
