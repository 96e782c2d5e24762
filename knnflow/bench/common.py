"""The parts every benchmark shares: the t grid and its U[0,1) row, the data and index a
benchmark runs on, the training target of a label, the result record and writing its JSON."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from knnflow.analysis.collapse import parse_t_grid as parse_grid
from knnflow.choices import BENCH_DATASET as DEFAULT_DATASET
from knnflow.choices import BENCH_T_GRID as DEFAULT_T_GRID
from knnflow.choices import UNIFORM_LABEL
from knnflow.data import SIZED_LOADERS, load_dataset
from knnflow.errors import OptionError
from knnflow.faiss_backend import faiss_gpu_count
from knnflow.index import Index
from knnflow.synthetic import synthetic_images
from knnflow.targets import Target, make_target

Progress = Callable[[str, int, int], None]


def parse_t_grid(text: str) -> tuple[float, ...]:
    """A t grid: a comma list (0.1,0.5,0.9) or START:STOP:STEP (STOP included when it lands on
    the grid up to rounding), sorted, each t in [0, 1); anything else is an InputError."""

    return tuple(float(t) for t in parse_grid(text))


def check_ts(ts: tuple[float, ...]) -> tuple[float, ...]:
    """The grid `ts` as floats, refused unless it holds at least one t and every t is in [0, 1)."""
    ts = tuple(float(t) for t in ts)
    if not ts:
        raise OptionError("holds no t values", "ts")
    bad = [t for t in ts if not 0 <= t < 1]
    if bad:
        raise OptionError(f"{{ts}}: every t must lie in [0, 1) (t = 1 is invalid: û* divides "
                          f"by 1 - t); got {bad[0]:g}", "ts")
    return ts


def per_query_t(t: float | Tensor, batch: int) -> Tensor:
    """t as a float64 (batch,) tensor on the CPU."""
    t64 = torch.as_tensor(t, dtype=torch.float64).cpu()
    return t64.expand(batch).contiguous() if t64.ndim == 0 else t64


def t_cases(ts: tuple[float, ...], batch: int, gen: torch.Generator,
             uniform: bool) -> list[tuple[str, float | Tensor]]:
    """(label, t) for every grid t, then the U[0,1) row: a (batch,) tensor, one seeded t per
    query."""
    cases: list[tuple[str, float | Tensor]] = [(f"{t:g}", float(t)) for t in ts]
    if uniform:
        cases.append((UNIFORM_LABEL, torch.rand(batch, generator=gen)))
    return cases


def image_shape_for(dim: int) -> tuple[int, ...]:
    """A plausible image shape with `dim` values: 3×S×S or 1×S×S when square, else 1×dim."""
    for channels in (3, 1):
        side = math.isqrt(dim // channels)
        if channels * side * side == dim:
            return (channels, side, side)
    return (1, dim)


def bench_data(dataset: str, root: str | None, n: int | None, dim: int | None,
                size: int | None, batch: int, seed: int) -> tuple[Tensor, Tensor, str]:
    """Training points (n, d) and held-out images (batch, d) for the queries: a data set's
    train and test splits (n: a limit), or synthetic images of dimension dim (default 3072)."""
    if dataset == "synthetic":
        if size is not None:
            raise OptionError(f"{{size}} applies to {', '.join(SIZED_LOADERS)} and folder:PATH; "
                              "synthetic takes {dim}", "size", "dim")
        shape = image_shape_for(3072 if dim is None else dim)
        points = synthetic_images(50_000 if n is None else n, shape, seed=seed)
        held_out = synthetic_images(batch, shape, seed=seed + 1)
        name = f"synthetic {'×'.join(map(str, shape))}"
    else:
        if dim is not None:
            raise OptionError(f"{{dim}} applies to {{dataset}} synthetic only; {dataset} has its "
                              "own dimension", "dim", "dataset")
        points = load_dataset(dataset, root=root, split="train", limit=n, size=size)
        held_out = load_dataset(dataset, root=root, split="test", limit=batch, size=size)
        name = dataset
    points = points.reshape(points.shape[0], -1)
    held_out = held_out.reshape(held_out.shape[0], -1)
    if held_out.shape[0] < batch:  # small test splits: draw with replacement
        gen = torch.Generator().manual_seed(seed)
        held_out = held_out[torch.randint(held_out.shape[0], (batch,), generator=gen)]
    return points.contiguous(), held_out, name


def default_ts() -> tuple[float, ...]:
    return parse_t_grid(DEFAULT_T_GRID)


def save_json(data: dict, path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def faiss_device(device: str) -> str:
    """Where FAISS runs when the torch work runs on `device`."""

    return "cuda" if device == "cuda" and faiss_gpu_count() > 0 else "cpu"


@dataclass
class BenchResult:
    """What a benchmark returns: its config (data, options, machine) and, in each subclass,
    its measurements; to_dict() is the JSON record a bench command writes."""

    config: dict

    def to_dict(self) -> dict:
        return asdict(self)


class BenchSource(NamedTuple):
    """What a benchmark runs on: the index, the data set's name, root and image size."""

    index: Index
    name: str
    root: str | None
    size: int | None

    def described(self) -> dict:
        """The first entries of a benchmark's config: the data set, its size, n and d."""
        return {"data": self.name, "dataset": self.name, "size": self.size, "n": self.index.n,
                "d": self.index.dim}


def bench_index(dataset: str | None, root: str | None, limit: int | None,
                index_folder: str | Path | None, progress: Progress | None,
                device: str = "cpu", default: str = DEFAULT_DATASET,
                size: int | None = None) -> BenchSource:
    """The index a benchmark runs on: loaded from index_folder, or built in memory on the
    train split of `dataset` (None: `default`) at `size`. With an index, the data set, root,
    limit and size are the ones it was built on (its manifest's "dataset" record): a
    dataset, limit or size that contradicts them is refused (held-out queries come from
    that data set's test split, at that size). The FAISS index goes on the GPU for device
    cuda when FAISS has GPU support; with faiss-cpu it stays on the CPU (the torch work still
    runs on the GPU), which the results' config records as faiss_device."""
    device = faiss_device(device)
    if index_folder is not None:
        index = Index.load(index_folder, device=device)
        described = index.manifest.get("dataset") or {}
        name = described.get("name")
        if name in (None, "custom"):  # built from a tensor: the data set cannot be checked
            if dataset is None:
                raise OptionError(f"{index_folder} does not record its data set; pass "
                                  "{dataset} (the one it was built on)", "dataset")
            return BenchSource(index, dataset, root, size)
        if dataset is not None and dataset != name:
            raise OptionError(f"{{dataset}} {dataset} contradicts the index, built on {name}; "
                              "leave {dataset} out with {index_folder}", "dataset",
                              "index_folder")
        if limit is not None and limit != described.get("limit"):
            raise OptionError(f"{{limit}} {limit} contradicts the index, built on "
                              + (f"the first {described['limit']} images"
                                 if described.get("limit") else "the whole train split")
                              + "; leave {limit} out with {index_folder}", "limit",
                              "index_folder")
        recorded = described.get("size")
        if recorded is None and name in SIZED_LOADERS:  # the default size is kept as None
            recorded = index.image_shape[-1]
        if size is not None and size != recorded:
            raise OptionError(f"{{size}} {size} contradicts the index, built on "
                              + (f"{{size}} {recorded}" if recorded is not None
                                 else "images at their own size")
                              + "; leave {size} out with {index_folder}", "size",
                              "index_folder")
        return BenchSource(index, name, root if root is not None else described.get("root"),
                           recorded)
    dataset = dataset or default
    images = load_dataset(dataset, root=root, split="train", limit=limit, size=size)
    index = Index.build(images, dataset={"name": dataset, "limit": limit, "size": size},
                        device=device, progress=progress)
    return BenchSource(index, dataset, root, size)


def bench_target(spec: dict, index: Index, tol: float, search_device: str | None = None,
                 **where) -> Target:
    """The target of a benchmark's spec: {"name": NAME, its options..., "knn_route": knn-efm's
    route}. knn-efm searches `index` with tolerance tol (on search_device); the other targets
    take the spec's options only. where: make_target's data, image_shape and device."""
    options = dict(spec)
    name = options.pop("name")
    if name == "knn-efm":
        options.update(index=index, tol=tol, route=options.pop("knn_route", None),
                       search_device=search_device)
    return make_target(name, **where, **options)


def held_out_images(source: BenchSource) -> Tensor:
    """The test split of the benchmark's data set, flattened to (N, d)."""
    held_out = load_dataset(source.name, root=source.root, split="test", size=source.size)
    held_out = held_out.reshape(held_out.shape[0], -1)
    if held_out.shape[1] != source.index.dim:
        raise OptionError(f"{source.name}'s test split has d={held_out.shape[1]} but the index "
                          f"d={source.index.dim}; pass the {{size}} it was built with", "size")
    return held_out
