"""knnflow bench knn: the certified kNN velocity (b) against the exact engine (a) and top-k
truncation (c), with the float64 oracle count of points that matter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knnflow.bench.common import (
    BenchResult,
    Progress,
    bench_index,
    check_ts,
    default_ts,
    faiss_device,
    held_out_images,
    t_cases,
)
from knnflow.bench.measure import relative_errors
from knnflow.bench.references import oracle_counts, oracle_window
from knnflow.devices import resolve_device
from knnflow.errors import OptionError
from knnflow.timing import BENCH_SAMPLE_SECONDS, interleaved_seconds
from knnflow.topk import TopKVelocity


@dataclass
class KnnRow:
    label: str
    exact_qps: float
    certified_qps: float
    speedup: float
    topk_qps: dict[str, float]
    error_median: float
    error_max: float
    bound_median: float
    bound_max: float
    fallback: float
    violations: int
    evaluated_median: float
    topk_error: dict[str, tuple[float, float]]
    routed: float = 0.0
    oracle_median: float = 0.0
    oracle_p90: float = 0.0


@dataclass
class KnnBench(BenchResult):
    rows: list[KnnRow] = field(default_factory=list)


def bench_knn(dataset: str | None = None, root: str | None = None, limit: int | None = None,
              ts: tuple[float, ...] | None = None, batch: int = 256, tol: float = 1e-4,
              ks: tuple[int, ...] = (16, 256), repeats: int = 3,
              index_folder: str | Path | None = None, seed: int = 0, device: str = "cpu",
              search_device: str = "cpu", route: str = "auto", size: int | None = None,
              progress: Progress | None = None) -> KnnBench:
    """Exact engine (a) against KNNVelocity certified (b) and the top-k truncation (c), on the
    same queries x_t = (1-t)·x0 + t·x1 (x1 held-out images), for each t of `ts` (default
    0:0.95:0.05) and for t ~ U[0,1). The oracle: per row, the median and 90th percentile over
    the queries of how many training points lie within oracle_window(n) nats of the best
    logit (float64, oracle_counts), the fewest an ideal estimator would weigh, next to (b)'s
    evaluated count.

    device cuda: the exact engine, the certified estimator's exact fallback, the oracle's
    float64 passes and the FAISS index (top-k search) run on the GPU; the certified search
    itself runs on `search_device` (default the CPU). route: (b)'s route (KNNVelocity;
    "auto" times the exact engine against certifying when the exact engine runs on a GPU);
    its calibration happens in the warm-up call, outside the timings."""
    from knnflow.estimators import ROUTES, ExactVelocity, KNNVelocity

    ts = check_ts(default_ts() if ts is None else ts)
    if not (math.isfinite(tol) and tol > 0):
        raise OptionError(f"must be a positive number, got {tol!r}", "tol")
    if min(batch, repeats) < 1:
        raise OptionError("{batch} and {repeats} must be at least 1", "batch", "repeats")
    if route not in ROUTES:
        raise OptionError(f"unknown {{route}} {route!r}; choose one of: {', '.join(ROUTES)}",
                          "route")
    device = resolve_device(device)
    search_device = resolve_device(search_device, "search_device")
    source = bench_index(dataset, root, limit, index_folder, progress, device, size=size)
    index = source.index
    held_out = held_out_images(source)
    gen = torch.Generator().manual_seed(seed)
    exact = ExactVelocity(index, device=device)
    reference_engine = ExactVelocity(index, device=device, compute_dtype=torch.float64)
    certified = KNNVelocity(index, tol=tol, device=device, search_device=search_device,
                            route=route)
    topk = {f"top-{k}": TopKVelocity(index, k=min(k, index.n)) for k in ks}
    result = KnnBench(config={**source.described(), "batch": batch, "t_grid": list(ts),
                              "tol": tol, "repeats": repeats, "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "device": device,
                              "search_device": search_device, "route": certified.route,
                              "faiss_device": faiss_device(device),
                              "oracle_window": oracle_window(index.n),
                              "gpu": torch.cuda.get_device_name() if device == "cuda" else None})
    # Grid rows at their exact t (float32 puts 0.95 just below a route bin's edge at 0.95).
    cases = [(label, t if torch.is_tensor(t) else torch.full((batch,), t, dtype=torch.float64))
             for label, t in t_cases(ts, batch, gen, uniform=True)]
    for i, (label, t) in enumerate(cases):
        if progress:
            progress("bench knn", i, len(cases))
        x1 = held_out[torch.randint(held_out.shape[0], (batch,), generator=gen)]
        noise = torch.randn(x1.shape, generator=gen)
        x = ((1 - t)[:, None] * noise + t[:, None] * x1).to(torch.float32)
        calls = {"exact": lambda x=x, t=t: exact(x, t),
                 "certified": lambda x=x, t=t: certified(x, t),
                 **{name_: (lambda est=est, x=x, t=t: est(x, t)) for name_, est in topk.items()}}
        seconds = interleaved_seconds(calls, repeats, torch.device(device),
                                      BENCH_SAMPLE_SECONDS)
        # The reference is the exact engine in float64: a certified row's bound must hold
        # against it with no allowance (rows the exact engine computed report bound 0).
        reference = reference_engine(x, t).velocity.to(torch.float64)
        ref_norm = reference.norm(dim=1)
        out = certified(x, t)
        err = (out.velocity.to(torch.float64) - reference).norm(dim=1)
        bound = out.error_bound
        certified_rows = ~out.fallback & ~out.routed
        violations = int((certified_rows & (err > bound)).sum())
        topk_error = {}
        for name_, est in topk.items():
            rel = relative_errors(est(x, t).velocity, reference)
            topk_error[name_] = (float(rel.median()), float(rel.max()))
        oracle = oracle_counts(x.to(device), t.to(device), index.points).double()
        result.rows.append(KnnRow(
            label=label, exact_qps=batch / seconds["exact"],
            certified_qps=batch / seconds["certified"],
            speedup=seconds["exact"] / seconds["certified"],
            topk_qps={name_: batch / seconds[name_] for name_ in topk},
            error_median=float((err / ref_norm).median()), error_max=float((err / ref_norm).max()),
            bound_median=float((bound / ref_norm).median()),
            bound_max=float((bound / ref_norm).max()),
            fallback=float(out.fallback.double().mean()), violations=violations,
            evaluated_median=float(out.evaluated.double().median()), topk_error=topk_error,
            routed=float(out.routed.double().mean()),
            oracle_median=float(oracle.median()),
            oracle_p90=float(oracle.quantile(0.9, interpolation="higher"))))
    if progress:
        progress("bench knn", len(cases), len(cases))
    result.config["floors"] = list(certified.floors)
    result.config["route_timings"] = certified.route_timings
    return result
