"""knnflow bench memorization: torch.cdist + topk (a) against knnflow's exact search (b),
ids checked against float64."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knnflow.bench.common import BenchResult, Progress, bench_index, held_out_images
from knnflow.bench.measure import peak_extra_bytes
from knnflow.bench.references import cdist_topk, float64_knn, id_mismatches
from knnflow.errors import OptionError
from knnflow.timing import BENCH_SAMPLE_SECONDS, interleaved_seconds


@dataclass
class MemorizationRow:
    method: str
    samples_per_s: float
    speedup: float
    id_mismatches: int  # samples whose k nearest ids differ from float64 brute force (ties aside)
    d1_rel_error_max: float
    peak_bytes: int | None
    fallback: int | None = None  # (b): samples the sketches left to the brute force
    evaluated_median: float | None = None  # (b): training points read in full dimension


@dataclass
class MemorizationTRow:
    """Nearest neighbours of x_t/t, x_t = (1-t)·x0 + t·x1: the search of the certified
    velocity at t, by (a) cdist + topk and (b) Index.search."""

    t: float
    cdist_per_s: float
    search_per_s: float
    speedup: float
    cdist_mismatches: int
    search_mismatches: int
    fallback: int
    evaluated_median: float | None


@dataclass
class MemorizationBench(BenchResult):
    rows: list[MemorizationRow] = field(default_factory=list)
    t_rows: list[MemorizationTRow] = field(default_factory=list)


def bench_memorization(dataset: str | None = None, root: str | None = None,
                       limit: int | None = None, samples: int = 1024, noise: float = 0.05,
                       repeats: int = 3, index_folder: str | Path | None = None,
                       ts: tuple[float, ...] = (), size: int | None = None, seed: int = 0,
                       progress: Progress | None = None) -> MemorizationBench:
    """Nearest training images (k = 2) of `samples` images, in one run: (a) torch.cdist + topk
    over the whole training set, (b) knnflow's exact search (Index.search: sketch-pruned, with
    its brute-force fallback), (c) FAISS's flat search with float64 re-ranking. Samples: half
    held-out test images, half training images plus Gaussian noise of std `noise` (near
    copies, clamped to [-1, 1]). Every method's ids are checked against a float64 brute force
    (float64_knn; (b) and (c) must have 0 mismatches) and d1 against its distance; (b)'s
    fallback counts the samples the sketches could not settle, which Index.search answered
    by brute force (index.last_stats).

    ts: optional rows for the search the certified velocity does at t: the nearest
    neighbours of x_t/t, x_t = (1-t)·x0 + t·x1 with x0 ~ N(0, I) and x1 held-out, by (a)
    and (b), each t in (0, 1)."""
    if min(samples, repeats) < 1:
        raise OptionError("{samples} and {repeats} must be at least 1", "samples", "repeats")
    if not (math.isfinite(noise) and noise >= 0):
        raise OptionError(f"must be a number ≥ 0, got {noise}", "noise")
    ts = tuple(float(t) for t in ts)
    bad = [t for t in ts if not 0 < t < 1]
    if bad:
        raise OptionError(f"{{ts}}: bench memorization searches x_t/t, so every t must lie in "
                          f"(0, 1); got {bad[0]:g}", "ts")
    source = bench_index(dataset, root, limit, index_folder, progress, size=size)
    index, points = source.index, source.index.points
    held_out = held_out_images(source)
    gen = torch.Generator().manual_seed(seed)
    fresh = held_out[torch.randint(held_out.shape[0], (samples - samples // 2,), generator=gen)]
    copies = points[torch.randint(index.n, (samples // 2,), generator=gen)].to(torch.float32)
    copies = (copies + noise * torch.randn(copies.shape, generator=gen)).clamp(-1, 1)
    queries = torch.cat([fresh, copies]).contiguous()
    points32 = points.to(torch.float32)
    calls = {
        "(a) cdist + topk": lambda: cdist_topk(queries, points32),
        "(b) knnflow exact search": lambda: index.search(queries, 2),
        "(c) FAISS flat + float64 rerank": lambda: index.search(queries, 2, method="faiss"),
    }
    stages = 3 + len(ts)
    if progress:
        progress("bench memorization", 0, stages)
    seconds = interleaved_seconds(calls, repeats, torch.device("cpu"), BENCH_SAMPLE_SECONDS)
    if progress:
        progress("bench memorization", 1, stages)
    truth = float64_knn(queries, points, 2)
    true_d1 = truth[0][:, 0].sqrt()
    if progress:
        progress("bench memorization", 2, stages)
    cdist_d, cdist_i = cdist_topk(queries, points32)
    ours = index.search(queries, 2)
    ours_stats = dict(index.last_stats)
    theirs = index.search(queries, 2, method="faiss")
    results = {
        "(a) cdist + topk": (cdist_d[:, 0].to(torch.float64), cdist_i),
        "(b) knnflow exact search": (ours.sq_distances[:, 0].sqrt(), ours.ids),
        "(c) FAISS flat + float64 rerank": (theirs.sq_distances[:, 0].sqrt(), theirs.ids),
    }
    bench = MemorizationBench(config={
        **source.described(), "samples": samples, "noise": noise, "k": 2, "t_grid": list(ts),
        "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "search": ours_stats.get("method"), "fallback": ours_stats.get("fallback"),
        "evaluated_median": ours_stats.get("evaluated_median")})
    base = seconds["(a) cdist + topk"]
    for method, (d1, ids) in results.items():
        ours_row = method.startswith("(b)")
        bench.rows.append(MemorizationRow(
            method=method, samples_per_s=samples / seconds[method],
            speedup=base / seconds[method],
            id_mismatches=id_mismatches(ids, queries, points, truth),
            d1_rel_error_max=float(((d1 - true_d1).abs() / true_d1.clamp(min=1e-30)).max()),
            peak_bytes=peak_extra_bytes(calls[method], torch.device("cpu")),
            fallback=ours_stats.get("fallback") if ours_row else None,
            evaluated_median=ours_stats.get("evaluated_median") if ours_row else None))
    for number, t in enumerate(ts):
        if progress:
            progress("bench memorization", 3 + number, stages)
        x1 = held_out[torch.randint(held_out.shape[0], (samples,), generator=gen)]
        x_t = (1 - t) * torch.randn(x1.shape, generator=gen) + t * x1
        scaled = (x_t / t).to(torch.float32).contiguous()
        t_calls = {"cdist": lambda q=scaled: cdist_topk(q, points32),
                   "search": lambda q=scaled: index.search(q, 2)}
        t_seconds = interleaved_seconds(t_calls, repeats, torch.device("cpu"),
                                        BENCH_SAMPLE_SECONDS)
        t_truth = float64_knn(scaled, points, 2)
        found = index.search(scaled, 2)
        stats = dict(index.last_stats)
        bench.t_rows.append(MemorizationTRow(
            t=t, cdist_per_s=samples / t_seconds["cdist"],
            search_per_s=samples / t_seconds["search"],
            speedup=t_seconds["cdist"] / t_seconds["search"],
            cdist_mismatches=id_mismatches(cdist_topk(scaled, points32)[1], scaled, points,
                                           t_truth),
            search_mismatches=id_mismatches(found.ids, scaled, points, t_truth),
            fallback=int(stats.get("fallback", 0)),
            evaluated_median=stats.get("evaluated_median")))
    if progress:
        progress("bench memorization", stages, stages)
    return bench
