"""An index folder split into shards: `build-index --shards N` writes N complete index folders
(shard-000, shard-001, ...) of contiguous ranges of the points, the ranges of
distributed.shard_range(n, rank, N), under one top manifest.json that records each shard's
range and checksums. Under torchrun with N processes, process r opens shard r alone; on one
machine `Index.load` of the top folder gives a ShardedIndex, whose exact search merges the
shards' exact top-k (so `knnflow memorization` works on it unchanged).

Every shard is checked against the top manifest when it loads (n, d, dtype, its points'
checksum, and with verify its files' checksums): a shard that disagrees is refused in one
line that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from knnflow.closed_form import TrainingSet
from knnflow.errors import IndexMismatchError, InputError, MissingFileError
from knnflow.index_folder import ManifestView, read_manifest


def shard_name(rank: int) -> str:
    return f"shard-{rank:03d}"


class ShardedPoints:
    """The points of all shards as one read-only (n, d) array: integer, tensor and slice
    indexing read only the rows asked for, from the shards that hold them."""

    def __init__(self, shards: list, starts: list[int], n: int, dim: int):
        self.shards, self.n, self.dim = shards, n, dim
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.dtype = shards[0].points.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.dim))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, slice):
            key = torch.arange(self.n)[key]
        ids = torch.as_tensor(key, dtype=torch.int64)
        flat = ids.reshape(-1)
        if bool(((flat < 0) | (flat >= self.n)).any()):
            raise IndexError(f"point ids must lie in [0, {self.n})")
        which = torch.searchsorted(self.starts, flat, right=True) - 1
        out = torch.empty(flat.numel(), self.dim, dtype=self.dtype)
        for shard in which.unique().tolist():
            rows = (which == shard).nonzero().squeeze(1)
            out[rows] = self.shards[shard].points[flat[rows] - int(self.starts[shard])]
        return out.reshape(*ids.shape, self.dim)


@dataclass
class ShardedIndex(ManifestView):
    """The shards of a sharded index folder (each an `Index`) and the top manifest (n, d,
    image shape, kind and verify_points read it, as for one Index)."""

    shards: list
    manifest: dict
    folder: Path | None = None
    last_stats: dict = field(default_factory=dict, repr=False)
    _train: TrainingSet | None = field(default=None, repr=False)

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", verify: bool = True) -> ShardedIndex:
        from knnflow.index import Index

        folder = Path(folder)
        top = read_manifest(folder)
        shards = []
        start = 0
        for record in top["shards"]:
            name = record["folder"]
            where = folder / name
            if not where.is_dir():
                raise MissingFileError(f"{folder}: expected shard folder {name}")
            shard = Index.load(where, device=device, verify=verify)
            m = shard.manifest
            for key in ("d", "dtype", "image_shape"):
                if m[key] != top[key]:
                    raise IndexMismatchError(f"{folder}: shard {name} has {key} {m[key]}, the "
                                             f"top manifest says {top[key]}")
            for key in ("n", "points_sha256", "data_sha256"):
                if m[key] != record[key]:
                    raise IndexMismatchError(f"{folder}: shard {name} does not match the top "
                                             f"manifest ({key} differs); rebuild the index")
            if record["start"] != start:
                raise IndexMismatchError(f"{folder}: shard {name} starts at {record['start']}, "
                                         f"the shards before it end at {start}")
            start += m["n"]
            shards.append(shard)
        if start != top["n"]:
            raise IndexMismatchError(f"{folder}: the shards hold {start} points, the top "
                                     f"manifest says {top['n']}")
        return cls(shards, top, folder)

    @property
    def starts(self) -> list[int]:
        return [record["start"] for record in self.manifest["shards"]]

    @property
    def points(self) -> ShardedPoints:
        return ShardedPoints(self.shards, self.starts, self.n, self.dim)

    def training_set(self) -> TrainingSet:
        """All shards' points as one training set in memory (for the estimators on one
        machine; under torchrun each process opens its own shard instead)."""
        if self._train is None:
            points = torch.cat([shard.points for shard in self.shards])
            self._train = TrainingSet.from_points(points)
        return self._train

    def search(self, queries: Tensor, k: int, approximate: bool = False,
               method: str = "auto", **options):
        """The k nearest points over every shard: each shard's exact k nearest (float64
        distances), merged; ties go to the lower id, as within one index."""
        from knnflow.index import SearchResult

        if k > self.n:
            raise InputError(f"k = {k} exceeds the {self.n} points of the index")
        found, stats = [], []
        for shard, start in zip(self.shards, self.starts, strict=True):
            part = shard.search(queries, min(k, shard.n), approximate=approximate,
                                method=method, **options)
            found.append((part.sq_distances, part.ids + start, part.exact))
            stats.append(shard.last_stats)
        distances = torch.cat([f[0] for f in found], dim=1)
        ids = torch.cat([f[1] for f in found], dim=1)
        # Lower id first among equal distances: sort by id, then stably by distance.
        order = torch.argsort(ids, dim=1, stable=True)
        distances, ids = distances.gather(1, order), ids.gather(1, order)
        order = torch.argsort(distances, dim=1, stable=True)[:, :k]
        self.last_stats = {
            "method": "+".join(sorted({s.get("method", "faiss") for s in stats})),
            "queries": stats[0].get("queries", 0) if stats else 0,
            "fallback": max(s.get("fallback", 0) for s in stats),
            "shards": len(self.shards),
        }
        if all("evaluated_median" in s for s in stats):
            self.last_stats["evaluated_median"] = sum(s["evaluated_median"] for s in stats)
        return SearchResult(distances.gather(1, order), ids.gather(1, order),
                            exact=all(f[2] for f in found))
