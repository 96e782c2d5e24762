"""Building an index folder: its parts (FAISS index, sketches), its manifest and files, and
the streaming build that never holds the float32 data set in memory.

`write_index` reads a data set in batches (data.ImageSource: memory-mapped npy files, folders
read per batch, synthetic images made per batch), writes each batch into data.npy (float16 or
float32) as it comes, hashing the points on the way, then builds the sketches and, for IVF,
the FAISS index from the memory-mapped file. Before any work it checks that the disk and the
memory can hold what the build makes, and everything is written into a temporary folder that
is renamed only when complete (files.atomic_folder), so a killed build leaves no folder that
loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from knnflow.errors import InputError, OptionError
from knnflow.faiss_backend import (
    build_faiss_index,
    check_faiss_device,
    faiss_module,
    write_faiss_index,
)
from knnflow.files import atomic_folder, human_bytes, sha256_file
from knnflow.index_folder import DATA_FILE, FORMAT_VERSION, INDEX_FILE, MANIFEST
from knnflow.sketch import Sketches, default_sketches

Progress = Callable[[str, int, int], None]


def index_parts(points: np.ndarray, image_shape: tuple[int, ...], kind: str, device: str,
                nlist: int | None, nprobe: int | None, progress: Progress | None = None,
                ) -> tuple[object | None, Sketches, dict]:
    """(FAISS index or None for flat, sketches, the index's manifest parameters) of points
    (n, d), which may be a memory map: both are built in chunks."""
    if kind == "flat":
        check_faiss_device(device)
        index, params = None, {"metric": "l2"}
    else:
        index, params = build_faiss_index(points, kind, device, nlist, nprobe, progress)
    sketches = Sketches.build(torch.from_numpy(points), image_shape, progress)
    return index, sketches, params


def new_manifest(shape: tuple[int, int], image_shape: list[int] | tuple[int, ...], dtype: str,
                 kind: str, params: dict, device: str, dataset: dict | None, seconds: float,
                 checksum: str, rounding: float = 0.0) -> dict:
    """The manifest of a freshly built index (its files' checksums are added on saving).
    rounding: the largest ‖x_j - stored x_j‖ (float16 storage rounds the images; the index's
    training set, and every result and bound computed from it, are the stored points)."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset or {"name": "custom"},
        "n": shape[0],
        "d": shape[1],
        "image_shape": list(image_shape),
        "dtype": dtype,
        "index": {"kind": kind, **params},
        "faiss_version": faiss_module().__version__,
        "build_device": device,
        "build_seconds": round(seconds, 3),
        "points_sha256": checksum,
        "storage_rounding": rounding,
    }


def write_folder_files(tmp: Path, manifest: dict, faiss_index, sketches: Sketches | None,
                       progress: Progress | None = None) -> dict:
    """Beside data.npy (already in `tmp`): the FAISS index (not for a flat one: it is a copy
    of data.npy, built from it on first use), the sketches, and manifest.json with every
    file's checksum. Returns the manifest written."""
    index_file = None if manifest["index"]["kind"] == "flat" else INDEX_FILE
    if index_file:
        write_faiss_index(faiss_index, tmp / index_file)
    sketch_files = sketches.save(tmp) if sketches is not None else []
    if progress:
        progress("checksumming", 0, 1)
    manifest = dict(manifest, data_file=DATA_FILE, index_file=index_file,
                    data_sha256=sha256_file(tmp / DATA_FILE),
                    index_sha256=sha256_file(tmp / index_file) if index_file else None,
                    sketch_sha256={name: sha256_file(tmp / name) for name in sketch_files})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        progress("checksumming", 1, 1)
    return manifest


def storage_rounding(original: np.ndarray, stored: np.ndarray) -> float:
    """The largest ‖original_j - stored_j‖ over the rows, in float64."""
    if stored.dtype == original.dtype:
        return 0.0
    diff = original.astype(np.float64) - stored.astype(np.float64)
    return float(np.sqrt(np.einsum("ij,ij->i", diff, diff).max())) if len(diff) else 0.0


# --------------------------------------------------------------------------- capacity


def build_bytes(n: int, dim: int, dtype: str, kind: str) -> tuple[int, int]:
    """(disk, memory) bytes a build of n points of dimension d makes: on disk data.npy, the
    sketches' points (float32) and for IVF a float32 copy of the data in index.faiss; in
    memory the sketches' points while they are made, one batch of the data and, for IVF,
    FAISS's float32 copy."""
    coarse, fine = default_sketches(dim)
    sketch = n * 4 * (coarse.width + (fine.width if fine else 0))
    data = n * dim * np.dtype(dtype).itemsize
    ivf = n * dim * 4 if kind == "ivf" else 0
    batch = 4096 * dim * 8
    return data + sketch + ivf, sketch + ivf + batch


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where the platform has no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_capacity(folder: Path, n: int, dim: int, dtype: str, kind: str) -> None:
    """A one-line InputError, before any work, when the disk under `folder` or this machine's
    free memory cannot hold what the build makes."""
    disk, memory = build_bytes(n, dim, dtype, kind)
    parent = folder.resolve()
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    smaller = " (--dtype float16 halves data.npy)" if dtype == "float32" else ""
    if disk > free:
        raise InputError(f"not enough disk for the index at {folder}: {n:,} points of d={dim} in "
                         f"{dtype} need {human_bytes(disk)}, {human_bytes(free)} is free"
                         f"{smaller}; use fewer points (--limit) or another --out")
    spare = available_memory()
    if spare is not None and memory > spare:
        raise InputError(f"not enough memory to build the index: {n:,} points of d={dim} need "
                         f"{human_bytes(memory)} while building, {human_bytes(spare)} is "
                         "available; use fewer points (--limit)")


# --------------------------------------------------------------------------- streaming build


def check_shards(shards: int, n: int | None = None) -> None:
    """A one-line OptionError unless `shards` is at least 1 and, when n is given, at most n."""
    if shards < 1:
        raise OptionError(f"must be at least 1, got {shards}", "shards")
    if n is not None and shards > n:
        raise OptionError(f"{{shards}} {shards} exceeds the {n} images to index: every shard "
                          "needs at least one", "shards")


def write_index(source, folder: Path, *, kind: str = "flat", device: str = "cpu",
                dtype: str = "float32", nlist: int | None = None, nprobe: int | None = None,
                dataset: dict | None = None, progress: Progress | None = None,
                overwrite: bool = False, shards: int = 1) -> dict:
    """Index the images of `source` (data.ImageSource) into `folder`, batch by batch;
    returns the manifest written. Peak memory: one batch, the sketches' points and, for
    IVF, FAISS's copy of the data (build_bytes), not the data set.

    shards > 1: `folder` holds shard-000.. (sharded_index.py), complete index folders of
    the ranges distributed.shard_range(n, r, shards), and a top manifest.json recording each
    shard's range and checksums; the data are still read once."""
    from knnflow.distributed import shard_range
    from knnflow.sharded_index import shard_name

    n, dim = source.n, math.prod(source.image_shape)
    check_shards(shards, n)
    check_capacity(folder, n, dim, dtype, kind)
    start = time.perf_counter()
    ranges = [shard_range(n, rank, shards) for rank in range(shards)]
    with atomic_folder(folder, overwrite, kind="index") as tmp:
        roots = [tmp / shard_name(rank) for rank in range(shards)] if shards > 1 else [tmp]
        for root in roots:
            root.mkdir(exist_ok=True)
        files = [np.lib.format.open_memmap(root / DATA_FILE, mode="w+", dtype=dtype,
                                           shape=(part.stop - part.start, dim))
                 for root, part in zip(roots, ranges, strict=True)]
        digests = [hashlib.sha256() for _ in ranges]
        whole = hashlib.sha256()
        rounding = [0.0] * shards
        done = 0
        for batch in source.batches():
            flat = np.ascontiguousarray(batch.reshape(batch.shape[0], dim), dtype=dtype)
            if not np.isfinite(flat).all():
                raise InputError(f"{source.name} contains NaN or infinite values (or values "
                                 f"beyond {dtype}'s range) in images {done}..{done + len(flat)}")
            whole.update(flat.data)
            original = batch.reshape(len(flat), dim)
            for rank, part in enumerate(ranges):  # the rows of this batch in each shard
                first, last = max(done, part.start), min(done + len(flat), part.stop)
                if first < last:
                    rows = slice(first - done, last - done)
                    files[rank][first - part.start:last - part.start] = flat[rows]
                    digests[rank].update(flat[rows].data)
                    rounding[rank] = max(rounding[rank],
                                         storage_rounding(original[rows], flat[rows]))
            done += len(flat)
            if progress:
                progress("reading images", done, n)
        for data in files:
            data.flush()
        del files, data
        manifests = []
        for rank, (root, part) in enumerate(zip(roots, ranges, strict=True)):
            points = np.load(root / DATA_FILE, mmap_mode="c")
            index, sketches, params = index_parts(points, tuple(source.image_shape), kind,
                                                  device, nlist, nprobe, progress)
            described = dataset if shards == 1 else dict(
                dataset or {"name": "custom"}, shard={"rank": rank, "of": shards,
                                                      "start": part.start})
            manifest = new_manifest(points.shape, source.image_shape, dtype, kind, params,
                                    device, described, time.perf_counter() - start,
                                    digests[rank].hexdigest(), rounding[rank])
            del points
            manifests.append(write_folder_files(root, manifest, index, sketches, progress))
        if shards == 1:
            return manifests[0]
        top = new_manifest((n, dim), source.image_shape, dtype, kind,
                           {k: v for k, v in manifests[0]["index"].items() if k != "kind"},
                           device, dataset, time.perf_counter() - start, whole.hexdigest(),
                           max(rounding))
        top["shards"] = [{"folder": root.name, "start": part.start, "n": m["n"],
                          "points_sha256": m["points_sha256"], "data_sha256": m["data_sha256"]}
                         for root, part, m in zip(roots, ranges, manifests, strict=True)]
        (tmp / MANIFEST).write_text(json.dumps(top, indent=2) + "\n")
        return top
