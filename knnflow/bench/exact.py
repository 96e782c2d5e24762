"""knnflow bench exact: naive cdist + softmax + matmul (a) against knnflow's streaming exact
engine (b) and plain GEMMs of the same shapes (c), the two-GEMM limit of 4·n·d FLOPs per query."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from knnflow.bench.common import (
    BenchResult,
    Progress,
    bench_data,
    check_ts,
    default_ts,
    t_cases,
)
from knnflow.bench.measure import peak_extra_bytes, relative_errors
from knnflow.bench.references import float64_velocity, naive_velocity
from knnflow.choices import BENCH_DATASET as DEFAULT_DATASET
from knnflow.closed_form import TrainingSet, closed_form_velocity
from knnflow.devices import resolve_device
from knnflow.engine_settings import engine_settings
from knnflow.errors import OptionError
from knnflow.timing import BENCH_SAMPLE_SECONDS, interleaved_seconds


@dataclass
class ExactRow:
    label: str
    t: float | None  # None for the U[0,1) row (one t per query)
    naive_qps: float
    engine_qps: float
    speedup: float
    limit_fraction: float
    gemm_gflops: float
    limit_qps: float
    naive_error_median: float
    naive_error_max: float
    engine_error_median: float
    engine_error_max: float
    naive_peak_bytes: int | None
    engine_peak_bytes: int | None


@dataclass
class ExactBench(BenchResult):
    gemm_gflops: float
    limit_qps: float
    rows: list[ExactRow] = field(default_factory=list)


def bench_exact(dataset: str = DEFAULT_DATASET, n: int | None = None, dim: int | None = None,
                size: int | None = None, batch: int = 256, ts: tuple[float, ...] | None = None,
                uniform: bool = True, device: str = "cpu", repeats: int = 3,
                root: str | None = None, seed: int = 0,
                progress: Progress | None = None) -> ExactBench:
    """Queries/s, error against float64 and peak extra memory of (a) and (b); GEMM rate (c).

    Data: `dataset`'s train split (n: use only the first n), queries from its test split; or
    dataset "synthetic": n (default 50,000) synthetic images of dimension dim (default 3072).
    Rows: each t of `ts` (default 0:0.95:0.05), then (uniform) one row with a seeded
    t ~ U[0,1) per query, which the naive form, the engine and the float64 reference all take
    per query; the two-GEMM limit does not depend on t. For each row, (a), (b) and the two
    forms of (c) are timed in interleaved rounds, so a change in the machine's speed during
    the run moves all of them alike and the ratios hold.
    """
    ts = check_ts(default_ts() if ts is None else ts)
    if min(batch, repeats) < 1 or (n is not None and n < 1) or (dim is not None and dim < 1):
        raise OptionError("{n}, {dim}, {batch} and {repeats} must be at least 1", "n", "dim",
                          "batch", "repeats")
    dev = torch.device(resolve_device(device))
    points, held_out, name = bench_data(dataset, root, n, dim, size, batch, seed)
    n, dim = points.shape
    points_dev = points.to(dev)
    train = TrainingSet.from_points(points_dev)
    gen = torch.Generator().manual_seed(seed)
    gemms = gemm_calls(held_out.to(dev), points_dev, seed)
    result = ExactBench(config={"data": name, "dataset": dataset, "size": size, "n": n,
                                "d": dim, "batch": batch, "t_grid": list(ts),
                                "uniform_row": uniform, "device": str(dev), "repeats": repeats,
                                "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "gpu": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                        else None)},
                        gemm_gflops=0.0, limit_qps=0.0)
    cases = t_cases(ts, batch, gen, uniform)
    for i, (label, t) in enumerate(cases):
        if progress:
            progress("bench exact", i, len(cases))
        noise = torch.randn(batch, dim, generator=gen)
        tq = t[:, None] if torch.is_tensor(t) else t
        x = ((1 - tq) * noise + tq * held_out).to(dev)
        result.rows.append(_exact_row(label, t, x, points, points_dev, train, gemms, repeats))
    if progress:
        progress("bench exact", len(cases), len(cases))
    result.gemm_gflops = statistics.median(row.gemm_gflops for row in result.rows)
    result.limit_qps = result.gemm_gflops * 1e9 / (4 * n * dim)
    return result


def gemm_calls(queries: Tensor, points: Tensor, seed: int,
               chunk_size: int | None = None) -> dict[str, Callable[[], object]]:
    """(c): the exact computation's two GEMMs (B×d·d×n and B×n·n×d) on the full shapes, and
    the same GEMMs on the engine's chunk shapes (its device's, unless chunk_size); the faster
    sets the two-GEMM limit."""
    n = points.shape[0]
    chunk_size = chunk_size or engine_settings(points.device).chunk
    weights = torch.rand(queries.shape[0], n,
                         generator=torch.Generator().manual_seed(seed)).to(points.device)

    def full() -> None:
        queries @ points.T
        weights @ points

    def chunked() -> None:
        for start in range(0, n, chunk_size):
            chunk = points[start:start + chunk_size]
            queries @ chunk.T
            weights[:, start:start + chunk_size] @ chunk

    return {"gemm full": full, "gemm chunked": chunked}


def _exact_row(label: str, t: float | Tensor, x: Tensor, points: Tensor, points_dev: Tensor,
               train: TrainingSet, gemms: dict[str, Callable[[], object]],
               repeats: int) -> ExactRow:
    """One row: t a float (one t for every query) or a (B,) tensor (one t per query)."""
    batch, dev = x.shape[0], x.device
    n, dim = points.shape
    reference = float64_velocity(x.cpu(), t, points)
    t_dev = t if not torch.is_tensor(t) else t.to(dev)

    def naive() -> Tensor:
        return naive_velocity(x, t_dev, points_dev)

    def engine() -> Tensor:
        return closed_form_velocity(x, t_dev, train)

    seconds = interleaved_seconds({"naive": naive, "engine": engine, **gemms}, repeats, dev,
                                  BENCH_SAMPLE_SECONDS)
    gemm_s = min(seconds[name] for name in gemms)
    limit_qps = batch / gemm_s
    naive_err = relative_errors(naive(), reference)
    engine_err = relative_errors(engine().to(torch.float32), reference)
    return ExactRow(
        label=label, t=None if torch.is_tensor(t) else t,
        naive_qps=batch / seconds["naive"], engine_qps=batch / seconds["engine"],
        speedup=seconds["naive"] / seconds["engine"],
        limit_fraction=gemm_s / seconds["engine"], gemm_gflops=4 * batch * n * dim / gemm_s / 1e9,
        naive_error_median=float(naive_err.median()), naive_error_max=float(naive_err.max()),
        engine_error_median=float(engine_err.median()), engine_error_max=float(engine_err.max()),
        naive_peak_bytes=peak_extra_bytes(naive, dev),
        engine_peak_bytes=peak_extra_bytes(engine, dev), limit_qps=limit_qps)
