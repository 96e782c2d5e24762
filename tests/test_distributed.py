"""torch.distributed on CPUs (gloo, two processes): the sharded exact engine, each process
holding half of the training set, against a float64 brute force over the whole set; DDP
training against one process, its resume, and the torchrun command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import brute_force_velocity, relative_error

from knnflow.distributed import leave_group

N, DIM, WORLD = 37, 12, 2


def _destroy_if_left() -> None:
    """After a failure (no barrier: the other process may be elsewhere), drop the group; after
    success leave_group already did, with a barrier first (without it, gloo's threads can abort
    a process at exit: SIGABRT, "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


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
        leave_group()
    finally:
        _destroy_if_left()


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


# --------------------------------------------------------------------------- DDP training


def _made_up_route_timing(self, floor):
    """Router.time_routes stand-in: an exact floor that differs between processes."""
    return 0.8 + 0.05 * dist.get_rank()


def _no_route_timing(self, floor):
    raise AssertionError("a resumed process timed its routes again")


def _train_rank(rank: int, rendezvous: str, jobs: list, route_timing=None) -> None:
    """Run train() for each (config fields, folder, resume) in `jobs` as process `rank` of
    WORLD; an InputError is written to FOLDER.error.RANK instead of raised. route_timing
    replaces Router.time_routes, per job when it is a list."""
    from knnflow.errors import InputError
    from knnflow.routing import Router
    from knnflow.runs import TrainConfig
    from knnflow.trainer import train

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD)
    try:
        for number, (fields, folder, resume) in enumerate(jobs):
            timing = route_timing[number] if isinstance(route_timing, list) else route_timing
            if timing is not None:
                Router.time_routes = timing
            try:
                train(TrainConfig(**fields), folder, resume=resume)
            except InputError as err:
                with open(f"{folder}.error.{rank}", "w") as f:
                    f.write(str(err))
        leave_group()
    finally:
        _destroy_if_left()


def _spawn_training(tmp_path, jobs: list, route_timing=None) -> None:
    rendezvous = tmp_path / f"rendezvous-{len(list(tmp_path.glob('rendezvous-*')))}"
    mp.spawn(_train_rank, args=(str(rendezvous), jobs, route_timing), nprocs=WORLD, join=True)
    rendezvous.touch()  # a fresh name for the next spawn


def _checkpoint(folder, step):
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoints" / f"step_{step}.safetensors"))


DDP_RUN = {"limit": 200, "preset": "mlp", "batch_size": 16, "checkpoint_every": 2,
           "log_every": 1}


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_ddp_training_matches_one_process_and_resumes_exactly(tmp_path):
    """Two gloo processes, each training on half of every batch (DDP), follow the
    single-process run of the same config (cfm: same batches, gradients averaged); with EFM
    (each process its own candidate draws) a run stopped at step 2 and resumed equals an
    uninterrupted one bit for bit; resuming with another number of processes, and a batch
    that does not split evenly, are refused."""
    from knnflow.errors import InputError
    from knnflow.runs import TrainConfig
    from knnflow.trainer import train

    efm = {**DDP_RUN, "target": "efm", "target_options": {"m": 8}}
    _spawn_training(tmp_path, [
        ({**DDP_RUN, "steps": 4}, tmp_path / "ddp", False),
        ({**efm, "steps": 4}, tmp_path / "whole", False),
        ({**efm, "steps": 2}, tmp_path / "parts", False),
        ({**efm, "steps": 4}, tmp_path / "parts", True),
        ({**DDP_RUN, "steps": 2, "batch_size": 15}, tmp_path / "odd", False)])
    train(TrainConfig(**DDP_RUN, steps=4), tmp_path / "single")
    single, ddp = _checkpoint(tmp_path / "single", 4), _checkpoint(tmp_path / "ddp", 4)
    for key in (k for k in single if k.startswith("model.")):
        assert torch.allclose(single[key], ddp[key], rtol=0, atol=1e-6), key
    whole, parts = _checkpoint(tmp_path / "whole", 4), _checkpoint(tmp_path / "parts", 4)
    assert set(whole) == set(parts) and "rank1.rng.target" in whole
    # Process 1 draws its own EFM candidates and dropout masks (not process 0's).
    assert not torch.equal(whole["rank1.rng.target"], whole["rng.target"])
    assert not torch.equal(whole["rank1.rng.torch"], whole["rng.torch"])
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
    for rank in range(WORLD):
        assert "multiple of the 2 processes" in (tmp_path / f"odd.error.{rank}").read_text()
    with pytest.raises(InputError, match="trained by 2 processes and this is 1"):
        train(TrainConfig(**efm, steps=6), tmp_path / "parts", resume=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_train_command_under_torchrun(tmp_path):
    """The user's command: torchrun with two CPU processes; one report, one run folder."""
    env = {k: v for k, v in os.environ.items() if k != "KNNFLOW_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "knnflow.cli.main", "train", "digits", "--limit", "200", "--preset", "mlp",
         "--steps", "3", "--batch-size", "8", "--name", "run"],
        capture_output=True, text=True, cwd=tmp_path, env={**env, "COLUMNS": "200"},
        timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Training finished") == 1 and "processes (DDP)" in result.stdout
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["processes"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step_3.json").is_file()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_exact_target_over_sharded_data_trains_like_the_whole_set(tmp_path):
    """--shard-data: each of two processes holds half of the training set; û* of the whole
    batch comes from the all-reduced states, so training follows the run in which each
    process holds all of it (same batches, targets equal to float64 rounding)."""
    from knnflow.errors import InputError
    from knnflow.runs import TrainConfig
    from knnflow.trainer import train

    exact = {**DDP_RUN, "target": "exact", "steps": 3}
    shard = {"target_options": {"shard": True}}
    _spawn_training(tmp_path, [({**exact, **shard}, tmp_path / "sharded", False),
                               (exact, tmp_path / "whole", False),
                               ({**DDP_RUN, "steps": 1, **shard}, tmp_path / "cfm", False)])
    sharded, whole = _checkpoint(tmp_path / "sharded", 3), _checkpoint(tmp_path / "whole", 3)
    for key in (k for k in whole if k.startswith("model.")):
        assert torch.allclose(sharded[key], whole[key], rtol=0, atol=1e-6), key
    metrics = [json.loads(line) for line in
               (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in
                 (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(metrics, reference, strict=True):
        assert a["target_sq"] == pytest.approx(b["target_sq"], rel=1e-6)
    for rank in range(WORLD):
        assert ("the cfm target has no option shard"
                in (tmp_path / f"cfm.error.{rank}").read_text())
    with pytest.raises(InputError, match="several processes"):
        train(TrainConfig(**{**exact, **shard}), tmp_path / "alone")


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_ddp_knn_efm_keeps_each_process_route_floors(tmp_path):
    """knn-efm with --knn-route faster under DDP: each process times its own routes (made up
    here, different per process); the checkpoint keeps both processes' floors, and a resumed
    run takes them back instead of timing again, bit for bit as an uninterrupted run."""
    from knnflow.data import load_dataset
    from knnflow.index import Index

    Index.build(load_dataset("digits", limit=200)).save(tmp_path / "idx")
    knn = {**DDP_RUN, "target": "knn-efm",
           "target_options": {"index": str(tmp_path / "idx"), "route": "faster"}}
    _spawn_training(tmp_path, [({**knn, "steps": 4}, tmp_path / "whole", False),
                               ({**knn, "steps": 2}, tmp_path / "parts", False),
                               ({**knn, "steps": 4}, tmp_path / "parts", True)],
                    route_timing=[_made_up_route_timing, _made_up_route_timing,
                                  _no_route_timing])
    assert not list(tmp_path.glob("*.error.*"))
    meta = json.loads((tmp_path / "parts" / "checkpoints" / "step_4.json").read_text())
    assert meta["knn_floors"][1] == pytest.approx(0.8)
    assert meta["ranks"]["1"]["knn_floors"][1] == pytest.approx(0.85)
    whole, parts = _checkpoint(tmp_path / "whole", 4), _checkpoint(tmp_path / "parts", 4)
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key


# --------------------------------------------------------------------------- certified, sharded


def _rank_timings(calls, repeats, device):
    """interleaved_seconds stand-in: runs every call once (they hold collectives), then
    reports timings that disagree between processes: process 0 finds certifying faster from
    t = 0.8 on, process 1 never."""
    for call in calls.values():
        call()
    estimator_bin = _rank_timings.bins.pop(0)
    faster = dist.get_rank() == 0 and estimator_bin >= 0.8 - 1e-9
    return {"exact": 1.0, "certified": 0.5 if faster else 2.0}


def _certified_rank(rank: int, rendezvous: str, folder: str) -> None:
    """KNNVelocity over two shards of the digits index: batched t from 0 to 0.999, uniform
    t = 0.9; route="faster" with pinned floors, and timed with timings that differ between
    the processes."""
    import knnflow.timing
    from knnflow.estimators import KNNVelocity
    from knnflow.index import Index

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD)
    try:
        index = Index.load(f"{folder}/idx")
        x, t = torch.load(f"{folder}/queries")
        saved = {}
        for name, kwargs in (("certify", {"route": "certify"}),
                             ("none", {"fallback": "none", "route": "certify"}),
                             ("faster", {"route": "faster", "floors": (0.3, 0.6)})):
            estimator = KNNVelocity(index, tol=1e-4, group=dist.group.WORLD, **kwargs)
            out = estimator(x, t)
            saved[name] = (out.velocity, out.error_bound, out.evaluated, out.fallback,
                           out.routed, estimator.t_floor)
        timed = KNNVelocity(index, tol=1e-4, group=dist.group.WORLD, route="faster")
        timed.router.t_floor = 0.7
        _rank_timings.bins = [0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
        knnflow.timing.interleaved_seconds = _rank_timings
        saved["timed"] = timed.floors
        torch.save(saved, f"{folder}/out.{rank}")
        leave_group()
    finally:
        _destroy_if_left()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_certified_velocity_over_shards_holds_its_bound(tmp_path, digits):
    """Two processes, each scanning half of the digits: both get the same velocities and
    bounds, every row within its bound of float64 brute force over all the points, rows at
    high t pruned (fewer points read than n), routed rows exact."""
    from conftest import flow_queries

    from knnflow.estimators import KNNVelocity
    from knnflow.index import Index
    from knnflow.routing import ROUTE_PROBES

    Index.build(digits).save(tmp_path / "idx")
    # Enough rows above the pinned exact floor that route="faster" certifies them beside the
    # exact rows (fewer than ROUTE_PROBES would join the exact engine's call).
    t = torch.cat([torch.linspace(0, 0.999, 48), torch.full((ROUTE_PROBES,), 0.9)])
    x = torch.cat([flow_queries(digits, float(ti), 1, seed=i) for i, ti in enumerate(t)])
    torch.save((x, t), tmp_path / "queries")
    mp.spawn(_certified_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)),
             nprocs=WORLD, join=True)
    outs = [torch.load(tmp_path / f"out.{rank}") for rank in range(WORLD)]
    reference = brute_force_velocity(x, t, digits)
    n = digits.shape[0]
    for name in ("certify", "none", "faster"):
        for a, b in zip(outs[0][name][:5], outs[1][name][:5], strict=True):
            assert bool(((a == b) | (a != a) & (b != b)).all()), name  # NaN rows alike
        velocity, bound, evaluated, fallback, routed, _ = outs[0][name]
        kept = ~fallback if name == "none" else torch.ones(len(t), dtype=torch.bool)
        err = (velocity.to(torch.float64) - reference).norm(dim=1)
        allowed = bound + 1e-4 * reference.norm(dim=1)
        assert bool((err[kept] <= allowed[kept]).all()), name
        assert bool((evaluated[t >= 0.9] < n / 4).all()), name
    assert outs[0]["certify"][5] == outs[1]["certify"][5]  # one calibrated floor
    # The left-out mass is counted over all shards: the bounds are the single process's
    # (same threshold from the best seed of all, same kept points), up to summation order.
    single = KNNVelocity(Index.load(tmp_path / "idx"), tol=1e-4, route="certify")(x, t)
    velocity, bound, _, fallback, _, _ = outs[0]["certify"]
    both = ~fallback & ~single.fallback
    assert int(both.sum()) >= 16
    assert torch.allclose(bound[both], single.error_bound[both], rtol=1e-6, atol=0)
    # Route timings that disagree between processes: process 0's verdict for both, no hang.
    assert outs[0]["timed"] == outs[1]["timed"] == (0.7, 0.8)
    routed = outs[0]["faster"][4]
    assert torch.equal(routed, (t >= 0.3) & (t < 0.6))
    assert relative_error(outs[0]["faster"][0][routed], reference[routed]).max() < 1e-5


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_knn_efm_over_sharded_data_trains_like_the_whole_index(tmp_path):
    """knn-efm with --shard-data: the certified estimator over the two processes' shards of
    the index gives the targets of the unsharded run (within its bound), so training follows
    it; the EFM fallback, which draws from the whole set, is refused with shards."""
    from knnflow.data import load_dataset
    from knnflow.index import Index

    Index.build(load_dataset("digits", limit=200)).save(tmp_path / "idx")
    index = {"index": str(tmp_path / "idx")}
    knn = {**DDP_RUN, "target": "knn-efm", "target_options": index, "steps": 3}
    _spawn_training(tmp_path, [
        ({**knn, "target_options": {**index, "shard": True}}, tmp_path / "sharded", False),
        (knn, tmp_path / "whole", False),
        ({**knn, "target_options": {**index, "shard": True, "fallback": "efm"}},
         tmp_path / "efm", False)])
    sharded, whole = _checkpoint(tmp_path / "sharded", 3), _checkpoint(tmp_path / "whole", 3)
    for key in (k for k in whole if k.startswith("model.")):
        assert torch.allclose(sharded[key], whole[key], rtol=0, atol=1e-5), key
    for rank in range(WORLD):
        assert "shard needs fallback exact" in (tmp_path / f"efm.error.{rank}").read_text()
