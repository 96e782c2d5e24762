"""knnflow bench scale: how the exact engine, the certified kNN velocity and the exact search
grow with n, on training sets stored in float16: synthetic images (6 GB at n = 10⁶, d = 3072)
or a real set such as photos-dense (705,515 photo patches; with their mirror images past that).

For each n the index is built once by the streaming build (index_build.write_index) into a
work folder and reused while its points match. The held-out queries are the data set's first
test images (synthetic: a seeded batch of its own). Per n and per t (a grid and a U[0,1) batch):
time per batch of B queries of ExactVelocity and KNNVelocity (tol, default route), the
certified rows' bound violations against the float64 engine, and for the exact search
(Index.search, k = 2) of B held-out images against chunked torch.cdist + topk (the published
baseline, cut into chunks of CDIST_CHUNK points so its float32 copy of the data fits).
Exponents: the least-squares slope of log time against log n, per method and row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from knnflow.bench.common import BenchResult, Progress, check_ts, t_cases
from knnflow.errors import OptionError
from knnflow.timing import BENCH_SAMPLE_SECONDS, interleaved_seconds

CDIST_CHUNK = 65_536
SCALE_TS = (0.3, 0.5, 0.7, 0.9)


@dataclass
class ScaleRow:
    n: int
    label: str
    exact_ms: float
    certified_ms: float
    speedup: float
    fallback: float
    routed: float
    violations: int
    certified_rows: int


@dataclass
class SearchRow:
    n: int
    cdist_ms: float
    search_ms: float
    speedup: float
    id_mismatches: int


@dataclass
class ScaleBench(BenchResult):
    rows: list[ScaleRow] = field(default_factory=list)
    search: list[SearchRow] = field(default_factory=list)
    exponents: dict[str, float] = field(default_factory=dict)


def cdist_topk_chunked(samples: Tensor, points: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """torch.cdist + topk over float32 chunks of the points, the running k best merged."""
    best_d = torch.full((samples.shape[0], 0), math.inf)
    best_i = torch.empty(samples.shape[0], 0, dtype=torch.int64)
    for start in range(0, points.shape[0], CDIST_CHUNK):
        chunk = points[start:start + CDIST_CHUNK].to(torch.float32)
        d, i = torch.cdist(samples, chunk).topk(min(k, chunk.shape[0]), dim=1, largest=False)
        merged_d, order = torch.cat([best_d, d], 1).topk(k, dim=1, largest=False)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
        best_d = merged_d
    return best_d, best_i


def slope(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(n)."""
    xs = [math.log(n) for n in ns]
    ys = [math.log(max(v, 1e-12)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def scale_source(dataset: str, n: int):
    """The first n training images of `dataset` as an ImageSource, and how the manifest
    describes them. Past the split's size the first n/2 images and their mirror images are
    taken (n must then be even and at most twice the split); synthetic makes n images."""
    from knnflow.data import image_source

    available = None if dataset == "synthetic" else image_source(dataset).n
    if available is None or n <= available:
        return image_source(dataset, limit=n), {"name": dataset, "limit": n}
    if n > 2 * available or n % 2:
        raise OptionError(f"{dataset} has {available:,} training images ({2 * available:,} "
                          f"with mirror images, for even n); {{ns}} asks for {n:,}", "ns")
    return (image_source(dataset, limit=n // 2, flip=True),
            {"name": dataset, "limit": n // 2, "flip": True})


def scale_index(n: int, work: Path, progress: Progress | None, dataset: str = "synthetic"):
    """The float16 index of the first n training images of `dataset` under `work`, built on
    first use."""
    from knnflow.index import Index
    from knnflow.index_build import write_index
    from knnflow.training_sets import dataset_slug

    folder = work / f"{dataset_slug(dataset)}-{n}-float16"
    if not (folder / "manifest.json").is_file():
        source, described = scale_source(dataset, n)
        write_index(source, folder, dtype="float16", dataset=described, progress=progress)
    return Index.load(folder, verify=False)


def held_out(dataset: str, batch: int) -> Tensor:
    """The sweep's B queries' images, flattened: the first test images of `dataset`
    (synthetic: a seeded batch apart from the training images)."""
    from knnflow.data import load_dataset
    from knnflow.synthetic import synthetic_images

    if dataset == "synthetic":
        return synthetic_images(batch, seed=1).reshape(batch, -1)
    images = load_dataset(dataset, split="test", limit=batch)
    if len(images) < batch:
        raise OptionError(f"{dataset}'s test split has {len(images)} images, fewer than "
                          f"{{batch}} = {batch}", "batch")
    return images.reshape(batch, -1)


def bench_scale(ns: tuple[int, ...] = (10_000, 100_000, 1_000_000),
                ts: tuple[float, ...] = SCALE_TS, uniform: bool = True, batch: int = 256,
                tol: float = 1e-4, repeats: int = 3, work: str | Path = "indices/scale",
                seed: int = 0, progress: Progress | None = None,
                dataset: str = "synthetic") -> ScaleBench:
    """The scale sweep (see the module docstring); `work` keeps the indices between runs."""
    from knnflow.bench.references import float64_knn, id_mismatches
    from knnflow.estimators import ExactVelocity, KNNVelocity

    ts = check_ts(tuple(ts))
    if not ns or min(ns) < 2:
        raise OptionError("every {ns} must be at least 2", "ns")
    if min(batch, repeats) < 1:
        raise OptionError("{batch} and {repeats} must be at least 1", "batch", "repeats")
    work = Path(work)
    held = held_out(dataset, batch)
    result = ScaleBench(config={"data": dataset, "dtype": "float16", "d": held.shape[1],
                                "ns": list(ns), "t_grid": list(ts), "uniform": uniform,
                                "batch": batch, "tol": tol, "repeats": repeats,
                                "threads": torch.get_num_threads(), "torch": torch.__version__,
                                "device": "cpu"})
    for n in sorted(ns):
        index = scale_index(n, work, progress, dataset)
        exact = ExactVelocity(index)
        reference = ExactVelocity(index, compute_dtype=torch.float64)
        certified = KNNVelocity(index, tol=tol)
        gen = torch.Generator().manual_seed(seed)
        cases = t_cases(ts, batch, gen, uniform)
        for step, (label, t) in enumerate(cases):
            x0 = torch.randn(held.shape, generator=gen)
            tt = t if torch.is_tensor(t) else torch.full((batch,), float(t))
            x = (1 - tt[:, None]) * x0 + tt[:, None] * held
            out = certified(x, tt)  # also the warm-up (calibration happens here)
            seconds = interleaved_seconds(
                {"exact": lambda e=exact, x=x, tt=tt: e(x, tt),
                 "certified": lambda c=certified, x=x, tt=tt: c(x, tt)},
                repeats, torch.device("cpu"), BENCH_SAMPLE_SECONDS)
            truth = reference(x, tt).velocity.to(torch.float64)
            error = (out.velocity.to(torch.float64) - truth).norm(dim=1)
            rows = ~out.fallback & ~out.routed
            violations = int((error[rows] > out.error_bound[rows]).sum())
            result.rows.append(ScaleRow(
                n, label, 1e3 * seconds["exact"], 1e3 * seconds["certified"],
                seconds["exact"] / seconds["certified"], float(out.fallback.double().mean()),
                float(out.routed.double().mean()), violations, int(rows.sum())))
            if progress:
                progress(f"bench scale n={n:,}", step + 1, len(cases) + 1)
        points = index.points
        seconds = interleaved_seconds({"cdist": lambda p=points: cdist_topk_chunked(held, p),
                                       "search": lambda i=index: i.search(held, 2)},
                                      repeats, torch.device("cpu"), BENCH_SAMPLE_SECONDS)
        truth = float64_knn(held, points, 2)
        mismatches = id_mismatches(index.search(held, 2).ids, held, points, truth)
        result.search.append(SearchRow(n, 1e3 * seconds["cdist"], 1e3 * seconds["search"],
                                       seconds["cdist"] / seconds["search"], mismatches))
        if progress:
            progress(f"bench scale n={n:,}", len(cases) + 1, len(cases) + 1)
    if len(ns) > 1:
        sizes = sorted(ns)
        for label in dict.fromkeys(row.label for row in result.rows):
            rows = [r for r in result.rows if r.label == label]
            result.exponents[f"exact {label}"] = slope(sizes, [r.exact_ms for r in rows])
            result.exponents[f"certified {label}"] = slope(sizes, [r.certified_ms for r in rows])
        result.exponents["search"] = slope(sizes, [r.search_ms for r in result.search])
        result.exponents["cdist + topk"] = slope(sizes, [r.cdist_ms for r in result.search])
    return result
