"""A FAISS index together with the raw data it points to, saved as one folder.

Folder layout (index_folder.py, which checks a folder before it loads): manifest.json (what
was indexed, how, and checksums), data.npy (the points, float32 or float16, memory-mapped on
load) and index.faiss (faiss_backend.py builds, places and stores it). A folder is written
under a temporary name and renamed when complete, so a killed build never leaves a folder
that loads.

`Index.search` is exact by default, by one of two routes. On large, high-dimensional data the
band sketches (prune.py) rule out, with proof, every point that cannot be among the k nearest,
and only the rest is read in full dimension; queries the sketches cannot settle within budget
take a brute force of float32 GEMMs with a proven rounding bound and float64 distances for
the points within it (prune.screened_knn). Small data on the CPU takes that brute force
directly. With method="faiss" (and for an index on the GPU when the sketches do not apply)
FAISS proposes candidates from float32 distances, their distances are recomputed in float64
from the raw data, and the candidate list grows until a rounding-error bound on FAISS's
distances proves that no point outside it is nearer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from knnflow.choices import DTYPE_NAMES, INDEX_KINDS
from knnflow.closed_form import TrainingSet, as_training_set
from knnflow.devices import resolve_device
from knnflow.errors import InputError, OptionError
from knnflow.faiss_backend import (
    check_faiss_device,
    flat_faiss_index,
    read_faiss_index,
    set_nprobe,
    to_faiss_device,
)
from knnflow.files import atomic_folder
from knnflow.index_build import index_parts, new_manifest, storage_rounding, write_folder_files
from knnflow.index_folder import (
    DATA_FILE,
    ManifestView,
    check_faiss_index,
    check_files,
    check_points,
    points_sha256,
    read_manifest,
)
from knnflow.prune import SketchScanner, screened_knn, sketch_knn
from knnflow.rounding import FLOAT32_ROUNDOFF
from knnflow.sharded_index import ShardedIndex
from knnflow.sketch import Sketches

KINDS = INDEX_KINDS
DTYPES = {name: np.dtype(name).type for name in DTYPE_NAMES}
SEARCH_METHODS = ("auto", "sketch", "faiss")
# method="auto" prunes with the sketches from this size on; below it FAISS's scan is cheap.
SKETCH_MIN_N, SKETCH_MIN_DIM = 4096, 256
# Rows per GEMM pass of the brute force that settles what the sketches could not.
BRUTE_FORCE_ROWS = 1024

Progress = Callable[[str, int, int], None]


def check_build_options(kind: str, dtype: str, nlist: int | None = None,
                        nprobe: int | None = None) -> None:
    """A one-line InputError unless an index of `kind` with data `dtype` (and, for ivf, the
    counts of lists) can be built; checked before any data is read."""
    if kind not in KINDS:
        raise InputError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown data dtype {dtype!r}; choose {' or '.join(DTYPES)}")
    if kind == "flat" and (nlist is not None or nprobe is not None):
        raise OptionError("{nlist} and {nprobe} apply to {kind} ivf only", "nlist", "nprobe",
                          "kind")
    for option, value in (("nlist", nlist), ("nprobe", nprobe)):
        if value is not None and value < 1:
            raise OptionError(f"must be at least 1, got {value}", option)


def l2_error_bound(query_sq_norms: Tensor, max_sq_norm: float, dim: int) -> Tensor:
    """Bound on |float32 ‖q-x‖² - ‖q-x‖²| for FAISS's ‖q‖² + ‖x‖² - 2⟨q,x⟩ or direct form.

    The dot product has error ≤ γ_d‖q‖‖x‖ (any summation order); the norms and the final sum add
    a few u(‖q‖² + ‖x‖²). The direct form Σ(q_i - x_i)² is within the same bound.
    """
    u = FLOAT32_ROUNDOFF
    gamma = dim * u / (1 - dim * u)
    cross = query_sq_norms.sqrt() * math.sqrt(max_sq_norm)
    return 1.01 * (2 * (gamma + 2 * u) * cross + (gamma + 6 * u) * (query_sq_norms + max_sq_norm))


@dataclass
class SearchResult:
    """k nearest training points per query: exact float64 squared distances, ascending."""

    sq_distances: Tensor
    ids: Tensor
    exact: bool


@dataclass
class Index(ManifestView):
    """Training points (n, d) with a FAISS index over them and a manifest describing both.

    faiss_index: the FAISS index, or None for a flat one until its first use (`faiss()`): a
    flat index is a float32 copy of the points that the sketch-pruned search never needs, so
    building, saving and loading a flat index hold the points once.
    """

    points: Tensor
    faiss_index: object | None
    manifest: dict
    folder: Path | None = None
    sketches: Sketches | None = field(default=None, repr=False)
    _train: TrainingSet | None = field(default=None, repr=False)
    _scanner: SketchScanner | None = field(default=None, repr=False)
    last_stats: dict = field(default_factory=dict, repr=False)
    faiss_device: str = "cpu"

    # ------------------------------------------------------------------ build / save / load

    @classmethod
    def build(cls, data: Tensor | np.ndarray, *, kind: str = "flat", device: str = "cpu",
              dtype: str = "float32", nlist: int | None = None, nprobe: int | None = None,
              dataset: dict | None = None, progress: Progress | None = None) -> Index:
        """Index N images (N, C, H, W) or points (N, d).

        kind: flat (exact brute force) or ivf (k-means lists; exact search still scans all
        lists, `approximate=True` searches `nprobe` of them). dataset: what the data is, kept in
        the manifest (name, split, limit, ...).
        """
        check_build_options(kind, dtype, nlist, nprobe)
        array = data.numpy() if torch.is_tensor(data) else np.asarray(data)
        if array.ndim < 2 or array.shape[0] == 0:
            raise InputError(f"cannot index data of shape {array.shape}")
        image_shape = list(array.shape[1:]) if array.ndim > 2 else [array.shape[1]]
        points = np.ascontiguousarray(array.reshape(array.shape[0], -1), dtype=DTYPES[dtype])
        if not np.isfinite(points).all():
            raise InputError("the data contains NaN or infinite values")
        device = resolve_device(device)
        start = time.perf_counter()
        index, sketches, params = index_parts(points, tuple(image_shape), kind, device, nlist,
                                              nprobe, progress)
        manifest = new_manifest(points.shape, image_shape, dtype, kind, params, device,
                                dataset, time.perf_counter() - start, points_sha256(points),
                                storage_rounding(array.reshape(points.shape), points))
        return cls(torch.from_numpy(points), index, manifest, sketches=sketches,
                   faiss_device=device)

    def save(self, folder: str | Path, overwrite: bool = False,
             progress: Progress | None = None) -> Path:
        """Write the folder atomically: a temporary sibling, renamed when complete."""
        folder = Path(folder)
        with atomic_folder(folder, overwrite, kind="index") as tmp:
            if progress:
                progress("writing data", 0, 1)
            np.save(tmp / DATA_FILE, self.points.numpy())
            manifest = write_folder_files(tmp, self.manifest, self.faiss_index, self.sketches,
                                          progress)
        self.manifest, self.folder = manifest, folder
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", verify: bool = True) -> Index:
        """Open an index folder; data.npy is memory-mapped. Refuses any mismatch in one line.
        A sharded folder (build-index --shards) opens as a sharded_index.ShardedIndex."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if "shards" in manifest:  # build-index --shards: one Index per shard
            return ShardedIndex.load(folder, device, verify)
        check_files(folder, manifest, verify)
        points = np.load(folder / DATA_FILE, mmap_mode="c")
        check_points(folder, manifest, points)
        index_file = manifest.get("index_file")
        device = resolve_device(device)
        index = None
        if index_file:
            index = read_faiss_index(folder / index_file)
            check_faiss_index(folder, manifest, index)
            index = to_faiss_device(index, device)
        else:
            check_faiss_device(device)
        sketches = Sketches.load(folder) if manifest.get("sketch_sha256") else None
        return cls(torch.from_numpy(points), index, manifest, folder, sketches,
                   faiss_device=device)

    def faiss(self):
        """The FAISS index (a flat one is built from the points on first use)."""
        if self.faiss_index is None:
            self.faiss_index = flat_faiss_index(self.points.numpy(), self.faiss_device)
        return self.faiss_index

    def training_set(self) -> TrainingSet:
        """The points with their float64 norms, computed once."""
        if self._train is None:
            self._train = TrainingSet.from_points(self.points)
        return self._train

    # ------------------------------------------------------------------ search

    def search(self, queries: Tensor | np.ndarray, k: int, approximate: bool = False,
               method: str = "auto", sketch_budget: float = 0.02,
               batch_size: int = 1024) -> SearchResult:
        """The k nearest points of each query, with float64 squared distances from the raw data.

        Exact by default (see the module docstring). method: "sketch" prunes with the band
        sketches, "faiss" reranks FAISS's candidates, "auto" picks sketch on large data with
        d ≥ 256 and otherwise the GEMM brute force (FAISS for an index on the GPU). Rows
        whose sketch survivors exceed sketch_budget·n (at least 512) take the GEMM brute force
        (prune.screened_knn; counted in last_stats["fallback"]).
        approximate=True takes an IVF index's candidates from `nprobe` lists as they are,
        which may miss true neighbours. Queries are processed batch_size at a time. Queries
        are rounded to float32 first (images, samples and the stored points are float32 or
        float16): ids and distances are exact for the rounded queries, and a float64 query
        that differs from its rounding below float32 resolution may get another neighbour.
        """
        q = torch.as_tensor(queries)
        q = q.reshape(q.shape[0], math.prod(q.shape[1:])) if q.ndim > 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries have shape {tuple(torch.as_tensor(queries).shape)} but the "
                             f"index holds d={self.dim} (image shape {self.image_shape})")
        if not 1 <= k <= self.n:
            raise InputError(f"k must lie in [1, {self.n}], got {k}")
        if q.is_complex() or q.dtype == torch.bool:
            raise InputError(f"queries must be real numbers, got {q.dtype}")
        if q.is_floating_point() and not bool(torch.isfinite(q).all()):
            bad = int((~torch.isfinite(q)).any(dim=1).sum())
            raise InputError(f"{bad} of {q.shape[0]} queries contain NaN or infinite values")
        if method not in SEARCH_METHODS:
            raise InputError(f"unknown search method {method!r}; choose one of: "
                             f"{', '.join(SEARCH_METHODS)}")
        if method == "sketch" and self.sketches is None:
            raise InputError("this index has no sketches; rebuild it with knnflow build-index")
        q32 = np.ascontiguousarray(q.detach().cpu().numpy(), dtype=np.float32)
        if not np.isfinite(q32).all():
            raise InputError("queries exceed float32's range (the stored points' precision)")
        q64 = torch.from_numpy(q32).to(torch.float64)
        if q64.shape[0] == 0:
            self.last_stats = {"method": "none", "queries": 0, "fallback": 0}
            return SearchResult(torch.empty(0, k, dtype=torch.float64),
                                torch.empty(0, k, dtype=torch.int64), exact=not approximate)
        if approximate and self.kind == "ivf":
            self.set_nprobe(self.manifest["index"]["nprobe"])
            _, ids = self.faiss().search(q32, k)
            self.last_stats = {"method": "faiss-approximate", "queries": len(q32)}
            return self._rerank(q64, torch.from_numpy(ids), k, exact=False)
        use_sketch = method == "sketch" or (
            method == "auto" and self.sketches is not None and self.n >= SKETCH_MIN_N
            and self.dim >= SKETCH_MIN_DIM)
        if not use_sketch and (method == "faiss" or self.faiss_device == "cuda"):
            self.last_stats = {"method": "faiss", "queries": len(q32), "fallback": len(q32)}
            return self._exact_search(q32, q64, k)
        train = self.training_set()
        out_d = torch.empty(len(q64), k, dtype=torch.float64)
        out_i = torch.empty(len(q64), k, dtype=torch.int64)
        if use_sketch:
            if self._scanner is None:
                self._scanner = SketchScanner(self.sketches)
            budget = max(512, int(sketch_budget * self.n))
            evaluated = torch.full((len(q64),), self.n, dtype=torch.int64)
            rest = []
            for start in range(0, len(q64), batch_size):
                part = slice(start, start + batch_size)
                found = sketch_knn(self._scanner, self.points, q64[part], k, budget,
                                   sq_norms=train.sq_norms)
                out_d[part], out_i[part] = found.sq_distances, found.ids
                evaluated[part] = torch.where(found.done, found.evaluated, self.n)
                rest.append((~found.done).nonzero().squeeze(1) + start)
            rest = torch.cat(rest)
            self.last_stats = {"method": "sketch", "queries": len(q32),
                               "fallback": int((evaluated == self.n).sum()),
                               "evaluated_median": float(evaluated.double().median())}
        else:  # small data on the CPU: the GEMM brute force, 5× FAISS's on digits
            rest = torch.arange(len(q64))
            self.last_stats = {"method": "brute-force", "queries": len(q32),
                               "fallback": len(q32)}
        # One brute force for every row the sketches could not settle: it reads the data once.
        for first in range(0, rest.numel(), BRUTE_FORCE_ROWS):
            rows = rest[first:first + BRUTE_FORCE_ROWS]
            out_d[rows], out_i[rows] = screened_knn(train.points, train.sq_norms, q64[rows], k)
        return SearchResult(out_d, out_i, exact=True)

    def set_nprobe(self, nprobe: int) -> None:
        """The IVF lists searched per query in approximate mode."""
        set_nprobe(self.faiss(), nprobe)

    def _exact_search(self, q32: np.ndarray, q64: Tensor, k: int) -> SearchResult:
        if self.kind == "ivf":
            self.set_nprobe(self.manifest["index"]["nlist"])
        bound = l2_error_bound(q64.square().sum(1), self.training_set().max_norm ** 2, self.dim)
        out_d = torch.empty(q64.shape[0], k, dtype=torch.float64)
        out_i = torch.empty(q64.shape[0], k, dtype=torch.int64)
        todo = torch.arange(q64.shape[0])
        depth = min(self.n, max(2 * k, k + 16))
        while todo.numel():
            screened, ids = self.faiss().search(q32[todo.numpy()], depth)
            result = self._rerank(q64[todo], torch.from_numpy(ids), k, exact=True)
            out_d[todo], out_i[todo] = result.sq_distances, result.ids
            if depth >= self.n:
                break
            # Every point not returned has screened distance ≥ the last one returned, so its true
            # distance is ≥ that minus the bound; if that clears the k-th exact distance, done.
            floor = torch.from_numpy(screened[:, -1]).to(torch.float64) - bound[todo]
            todo = todo[~(floor > result.sq_distances[:, -1])]
            depth = min(self.n, depth * 4)
        return SearchResult(out_d, out_i, exact=True)

    def _rerank(self, q64: Tensor, ids: Tensor, k: int, exact: bool) -> SearchResult:
        """Recompute candidate distances in float64 and keep the k smallest."""
        valid = ids >= 0
        safe = ids.clamp(min=0)
        dist = torch.empty(ids.shape, dtype=torch.float64)
        rows_per_block = max(1, (1 << 22) // (ids.shape[1] * self.dim))
        for start in range(0, ids.shape[0], rows_per_block):
            block = safe[start:start + rows_per_block]
            points = self.points[block.reshape(-1)].to(torch.float64).reshape(*block.shape, -1)
            dist[start:start + rows_per_block] = (
                points - q64[start:start + rows_per_block, None]).square().sum(-1)
        dist[~valid] = math.inf
        # Ties (duplicate points) in id order, whatever order FAISS listed them in.
        by_id = torch.where(valid, safe, self.n).argsort(dim=1, stable=True)
        order = by_id.gather(1, dist.gather(1, by_id).argsort(dim=1, stable=True))[:, :k]
        return SearchResult(dist.gather(1, order), safe.gather(1, order), exact)


def training_set_of(data_or_index: Tensor | TrainingSet | Index,
                    device: torch.device | str | None = None) -> TrainingSet:
    """The TrainingSet behind a tensor, a TrainingSet or an Index (a sharded one: all its
    shards), on `device` when given."""
    if isinstance(data_or_index, (Index, ShardedIndex)):
        train = data_or_index.training_set()
    elif isinstance(data_or_index, TrainingSet) or torch.is_tensor(data_or_index):
        train = as_training_set(data_or_index)
    else:
        raise InputError("expected a tensor of training points, a TrainingSet or an Index")
    if device is not None and train.points.device != torch.device(device):
        train = train.to(device)
    return train
