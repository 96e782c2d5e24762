"""Scale-out: û* over a training set split across torch.distributed ranks.

Each rank (a GPU, or a machine) holds one shard of the training points and streams it with
the exact engine. The per-query softmax states (m, Z, S) of closed_form merge exactly, so two
all-reduces give every rank the state over the whole set: the maximum of the references m,
then the sum of (Z, S) rescaled to it. Traffic per call is O(B·d), independent of n.

    torch.distributed.init_process_group("nccl")       # under torchrun; "gloo" on CPUs
    shard = shard_of(Index.load("indices/cifar10-train"))
    exact = ExactVelocity(shard, group=torch.distributed.group.WORLD, device="cuda")
    out = exact(x, t)    # every rank calls with the same x and t, and gets û* over all n

The result equals the single-process one up to float64 rounding of the merge (the order in
which the shards' sums are added); tests/test_distributed.py checks it with two CPU processes
and the gloo backend against a float64 brute force.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from knnflow.errors import InputError
from knnflow.index import Index
from knnflow.sharded_index import ShardedIndex
from knnflow.softmax import SoftmaxState, rescale


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, number of processes) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def init_from_env(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the default process group and
    return this rank's device; otherwise return `device` unchanged. For "cuda" each process
    takes the GPU cuda:LOCAL_RANK, and the group runs NCCL for GPU tensors and gloo for CPU
    ones (the trainer's small reductions and gathered states live on the CPU); for "cpu",
    gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise InputError(f"process {local} on this machine has no GPU of its own "
                             f"({torch.cuda.device_count()} visible); start at most that many "
                             "processes per machine (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
    return device


def leave_group() -> None:
    """Leave torch.distributed cleanly, if a group was joined: wait until every process is
    done with its collectives, release what still holds the groups (DDP's reducer) while the
    interpreter is whole, then destroy every group. NCCL warns at exit without the destroy,
    and gloo's worker threads torn down during interpreter shutdown can abort the process
    (SIGABRT, "terminate called without an active exception") after its work is saved."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def shard_range(n: int, rank: int, world: int) -> slice:
    """The contiguous rows of rank `rank` among `world`: sizes differ by at most one."""
    if not 0 <= rank < world:
        raise InputError(f"rank {rank} is outside 0..{world - 1}")
    if n < world:
        raise InputError(f"{n} training points cannot be split over {world} ranks")
    start, stop = rank * n // world, (rank + 1) * n // world
    return slice(start, stop)


def shard_of(data: Tensor | np.ndarray | Index, group=None) -> Tensor:
    """This rank's rows of the whole training set (an Index's memory-mapped data are read
    only for these rows; a sharded index built with as many shards as ranks gives rank r its
    shard r), for `ExactVelocity(shard, group=group)`."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if isinstance(data, ShardedIndex) and len(data.shards) == world:
        return data.shards[rank].points  # built for this world: shard r is rank r's rows
    if isinstance(data, (Index, ShardedIndex)):
        data = data.points
    elif isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    return data[shard_range(data.shape[0], rank, world)]


def all_reduce_state_(state: SoftmaxState, group=None) -> None:
    """Replace each rank's partial state by the state over the union of all ranks' points,
    in place. Every rank must call with states of the same queries."""
    ref = state.ref.clone()
    dist.all_reduce(ref, op=dist.ReduceOp.MAX, group=group)
    scale = rescale(state.ref, ref)
    # Z and S in one message.
    packed = torch.cat([(state.z * scale)[:, None], state.s * scale[:, None]], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    state.ref, state.z, state.s = ref, packed[:, 0].contiguous(), packed[:, 1:].contiguous()


def total_points(count: int, device: torch.device, group=None) -> int:
    """The sum of `count` over the ranks."""
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(total)
