"""FAISS behind `Index`: the library, imported on first use (the command line's help does not
wait for it); an index on one GPU or sharded over all visible GPUs; flat and IVF indices built
and filled in chunks; nprobe; and index files, always written from a CPU copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from knnflow.errors import OptionError

# Points added per call: float32 copies of float16 data stay small.
ADD_CHUNK = 8192

Progress = Callable[[str, int, int], None]


def faiss_module():
    """The faiss package, imported here so that importing knnflow does not load it."""
    import faiss

    return faiss


def faiss_gpu_count() -> int:
    """GPUs this faiss build can use (0 for faiss-cpu)."""
    faiss = faiss_module()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def check_faiss_device(device: str) -> None:
    """Refuse device cuda when this faiss build cannot use a GPU."""
    if device == "cuda" and faiss_gpu_count() == 0:
        raise OptionError("this faiss build has no GPU support; install knnflow[gpu] "
                          "(faiss-gpu) or use {device} cpu", "device")


def to_faiss_device(index, device: str):
    """For device cuda: the index on the GPU, sharded over all visible GPUs when several."""
    if device != "cuda":
        return index
    check_faiss_device(device)
    faiss = faiss_module()
    gpus = faiss_gpu_count()
    if gpus == 1:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def to_cpu(index):
    """A CPU copy of a GPU index (the index itself when it is on the CPU)."""
    faiss = faiss_module()
    return faiss.index_gpu_to_cpu(index) if faiss_gpu_count() and "Gpu" in type(index).__name__ \
        else index


def add_points(index, points: np.ndarray, progress: Progress | None = None) -> None:
    """Add the points (n, d) in chunks of ADD_CHUNK, as float32."""
    n = points.shape[0]
    for begin in range(0, n, ADD_CHUNK):
        index.add(np.ascontiguousarray(points[begin:begin + ADD_CHUNK], dtype=np.float32))
        if progress:
            progress("adding points", min(begin + ADD_CHUNK, n), n)


def default_ivf_lists(n: int) -> int:
    """About 4·√n lists, but at least 39 training points per list, as FAISS asks."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_faiss_index(points: np.ndarray, kind: str, device: str, nlist: int | None = None,
                      nprobe: int | None = None,
                      progress: Progress | None = None) -> tuple[object, dict]:
    """A FAISS index holding `points` (n, d) on `device`, and its parameters for the manifest.

    kind flat: exact brute force. kind ivf: `nlist` k-means lists (default_ivf_lists(n)),
    trained on a seeded sample of at most 256 points per list; `nprobe` (default nlist/16)
    lists are searched in approximate mode.
    """
    n, dim = points.shape
    faiss = faiss_module()
    params: dict = {"metric": "l2"}
    if kind == "flat":
        return flat_faiss_index(points, device, progress), params
    else:
        nlist = default_ivf_lists(n) if nlist is None else nlist
        if not 1 <= nlist <= n:
            raise OptionError(f"must lie in [1, {n}], got {nlist}", "nlist")
        nprobe = max(1, nlist // 16) if nprobe is None else nprobe
        if not 1 <= nprobe <= nlist:
            raise OptionError(f"{{nprobe}} must lie in [1, {{nlist}} = {nlist}], got {nprobe}",
                              "nprobe", "nlist")
        params.update(nlist=nlist, nprobe=nprobe)
        index = to_faiss_device(faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist), device)
        if progress:
            progress("training k-means", 0, 1)
        sample = points[np.random.default_rng(0).permutation(n)[: 256 * nlist]]
        index.train(sample.astype(np.float32))
        if progress:
            progress("training k-means", 1, 1)
    add_points(index, points, progress)
    return index, params


def set_nprobe(index, nprobe: int) -> None:
    """The lists an IVF index (on the CPU or a GPU) searches per query."""
    faiss = faiss_module()
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except (RuntimeError, AttributeError):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)


def write_faiss_index(index, path: Path) -> None:
    """Save the index (from its CPU copy) to `path`."""
    faiss_module().write_index(to_cpu(index), str(path))


def flat_faiss_index(points: np.ndarray, device: str, progress: Progress | None = None):
    """A flat (exact brute-force) index holding `points` on `device`. It is a float32 copy of
    the data, so an index folder does not store it and Index builds it on first use."""
    index = to_faiss_device(faiss_module().IndexFlatL2(points.shape[1]), device)
    add_points(index, points, progress)
    return index


def read_faiss_index(path: Path):
    """The CPU index saved at `path`."""
    return faiss_module().read_index(str(path))
