"""The sharded exact engine: two CPU processes with the gloo backend, each holding half of the
training set, against a float64 brute force over the whole set."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import brute_force_velocity, relative_error

N, DIM, WORLD = 37, 12, 2


def problem():
    """Uneven shards (19 + 18), two near-duplicates split across ranks, times from 0 to 0.999
    (at 0.999 one point holds nearly all the mass: the merge must keep it exact)."""
    gen = torch.Generator().manual_seed(11)
    points = torch.rand(N, DIM, generator=gen) * 2 - 1
    points[30] = points[3] + 1e-6
    t = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
    x1 = points[torch.tensor([0, 3, 7, 19, 20, 30, 36])]
    x = (1 - t)[:, None] * torch.randn(len(t), DIM, generator=gen) + t[:, None] * x1
    return points, x.double(), t


def _rank_main(rank: int, rendezvous: str, out: str) -> None:
    from knnflow.distributed import shard_of
    from knnflow.estimators import ExactVelocity

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD)
    try:
        points, x, t = problem()
        shard = shard_of(points)
        saved = {"shard": shard.shape[0]}
        for dtype in (torch.float64, torch.float32):
            exact = ExactVelocity(shard, group=dist.group.WORLD, compute_dtype=dtype)
            result = exact(x, t)
            saved[dtype] = (result.velocity, result.evaluated)
        torch.save(saved, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_sharded_exact_velocity_matches_brute_force(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_rank_main, args=(str(tmp_path / "rendezvous"), out), nprocs=WORLD, join=True)
    points, x, t = problem()
    expected = brute_force_velocity(x, t, points)
    results = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    assert [r["shard"] for r in results] == [18, 19]
    for r in results:
        # float64 arithmetic throughout: the merge adds only float64 rounding; the float32
        # screen (the engine's default) stays within its usual accuracy.
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
            velocity, evaluated = r[dtype]
            assert relative_error(velocity, expected).max() < tol
            assert (evaluated == N).all()
    # every rank holds the same merged result
    for dtype in (torch.float64, torch.float32):
        assert torch.equal(results[0][dtype][0], results[1][dtype][0])


def test_shard_range_covers_every_row_once():
    from knnflow.distributed import shard_range
    from knnflow.errors import InputError

    for n, world in [(37, 2), (10, 3), (5, 5), (1000, 7)]:
        rows = [list(range(n))[shard_range(n, r, world)] for r in range(world)]
        assert sum(rows, []) == list(range(n))
        assert max(map(len, rows)) - min(map(len, rows)) <= 1
    with pytest.raises(InputError, match="cannot be split"):
        shard_range(2, 0, 3)
    with pytest.raises(InputError, match="outside"):
        shard_range(10, 3, 3)
