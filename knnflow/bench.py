"""Side-by-side speed and error measurements, each in one run on the same queries.

`bench_exact` compares (a) the naive form of published reference code (cdist over all n, then
softmax, then matmul), (b) knnflow's streaming exact engine and (c) plain matmuls of the same
shapes, which give this machine's GEMM rate and so the two-GEMM limit of 4·n·d FLOPs per query.
(c) is measured on the full shapes and on the engine's chunk shapes; the faster one counts.
Errors are against a float64 brute force on the same queries.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from knnflow.closed_form import DEFAULT_CHUNK, TrainingSet, closed_form_state
from knnflow.data import load_dataset, synthetic_images
from knnflow.errors import InputError
from knnflow.index import resolve_device
from knnflow.timing import BENCH_SAMPLE_SECONDS, interleaved_seconds
from knnflow.timing import sync as _sync

QUICK_TS = (0.0, 0.1, 0.5, 0.7, 0.9, 0.99, 0.999)
Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- measuring


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_reader() -> Callable[[], int] | None:
    """Bytes malloc has handed out (main-arena heap plus mmapped blocks, glibc's mallinfo2),
    or None where that is not available. torch's CPU tensors come from malloc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return read


class PeakMemory:
    """Peak extra memory of a block: the CUDA allocator's peak on a GPU; on a CPU, the peak of
    malloc's bytes in use, read by a busy thread (glibc only; None elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None

    @contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        if self.device.type == "cuda":
            _sync(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            _sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - base
            return
        read = _heap_reader()
        if read is None:
            yield self
            return
        base = read()
        peak, done = [base], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], read())
                time.sleep(0)  # yield the GIL; a busy reader catches short-lived peaks

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()
            self.peak_bytes = max(peak[0], read()) - base


def peak_extra_bytes(fn: Callable[[], object], device: torch.device,
                     min_seconds: float = 0.1) -> int | None:
    """Peak extra memory of fn(), called repeatedly for at least `min_seconds` so that the
    sampling thread sees its short-lived peaks too."""
    meter = PeakMemory(device)
    with meter.measure():
        start = time.perf_counter()
        while True:
            fn()
            if time.perf_counter() - start >= min_seconds:
                break
    return meter.peak_bytes


def relative_errors(estimate: Tensor, reference: Tensor) -> Tensor:
    """‖estimate - reference‖ / ‖reference‖ per row, in float64."""
    estimate, reference = estimate.to(torch.float64).cpu(), reference.to(torch.float64).cpu()
    return (estimate - reference).norm(dim=1) / reference.norm(dim=1).clamp(min=1e-300)


# --------------------------------------------------------------------------- reference forms


def naive_velocity(x: Tensor, t: float, points: Tensor) -> Tensor:
    """The form in published reference code: a full B×n distance matrix, softmax, matmul."""
    sq = torch.cdist(x, t * points).square()
    weights = torch.softmax(-sq / (2 * (1 - t) ** 2), dim=1)
    return (weights @ points - x) / (1 - t)


def float64_velocity(x: Tensor, t: float, points: Tensor, query_block: int = 64) -> Tensor:
    """Brute force in float64. For t ≤ 0.999 the GEMM form is exact to < 1e-6 nats in float64;
    beyond, distances are taken from explicit differences, one query at a time."""
    x64, p64 = x.to(torch.float64), points.to(torch.float64)
    out = torch.empty_like(x64)
    s = 0.5 / (1 - t) ** 2
    p_norms = p64.square().sum(1)
    for i in range(0, x64.shape[0], query_block):
        q = x64[i:i + query_block]
        if t <= 0.999:
            sq = q.square().sum(1, keepdim=True) - 2 * t * q @ p64.T + t * t * p_norms
        else:
            sq = torch.stack([(row - t * p64).square().sum(1) for row in q])
        weights = torch.softmax(-s * sq, dim=1)
        out[i:i + query_block] = (weights @ p64 - q) / (1 - t)
    return out


# --------------------------------------------------------------------------- bench exact


def image_shape_for(dim: int) -> tuple[int, ...]:
    """A plausible image shape with `dim` values: 3×S×S or 1×S×S when square, else 1×dim."""
    for channels in (3, 1):
        side = math.isqrt(dim // channels)
        if channels * side * side == dim:
            return (channels, side, side)
    return (1, dim)


@dataclass
class ExactRow:
    t: float
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
class ExactBench:
    config: dict
    gemm_gflops: float
    limit_qps: float
    rows: list[ExactRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _bench_data(dataset: str | None, root: str | None, n: int, dim: int, batch: int,
                seed: int) -> tuple[Tensor, Tensor, str]:
    """Training points (n, d) and held-out images (batch, d) for the queries."""
    if dataset is not None:
        points = load_dataset(dataset, root=root, split="train", limit=n)
        held_out = load_dataset(dataset, root=root, split="test", limit=batch)
        name = dataset
    else:
        shape = image_shape_for(dim)
        points = synthetic_images(n, shape, seed=seed)
        held_out = synthetic_images(batch, shape, seed=seed + 1)
        name = f"synthetic {'×'.join(map(str, shape))}"
    points = points.reshape(points.shape[0], -1)
    held_out = held_out.reshape(held_out.shape[0], -1)
    if held_out.shape[0] < batch:  # small test splits: draw with replacement
        gen = torch.Generator().manual_seed(seed)
        held_out = held_out[torch.randint(held_out.shape[0], (batch,), generator=gen)]
    return points.contiguous(), held_out, name


def bench_exact(n: int = 50_000, dim: int = 3072, batch: int = 256,
                ts: tuple[float, ...] = (0.1, 0.5, 0.9), device: str = "cpu", repeats: int = 3,
                dataset: str | None = None, root: str | None = None, seed: int = 0,
                progress: Progress | None = None) -> ExactBench:
    """Queries/s, error against float64 and peak extra memory of (a) and (b); GEMM rate (c).

    For each t, (a), (b) and the two forms of (c) are timed in interleaved rounds, so a change
    in the machine's speed during the run moves all of them alike and the ratios hold.
    """
    if any(not 0 <= t < 1 for t in ts):
        raise InputError(f"every t must lie in [0, 1), got {list(ts)}")
    if min(n, dim, batch, repeats) < 1:
        raise InputError("--n, --d, --batch and --repeats must be at least 1")
    dev = torch.device(resolve_device(device))
    points, held_out, name = _bench_data(dataset, root, n, dim, batch, seed)
    n, dim = points.shape
    points_dev = points.to(dev)
    train = TrainingSet.from_points(points_dev)
    gen = torch.Generator().manual_seed(seed)
    gemms = gemm_calls(held_out.to(dev), points_dev, seed)
    result = ExactBench(config={"data": name, "n": n, "d": dim, "batch": batch,
                                "device": str(dev), "repeats": repeats,
                                "torch": torch.__version__, "threads": torch.get_num_threads()},
                        gemm_gflops=0.0, limit_qps=0.0)
    for i, t in enumerate(ts):
        if progress:
            progress("bench exact", i, len(ts))
        noise = torch.randn(batch, dim, generator=gen)
        x = ((1 - t) * noise + t * held_out).to(dev)
        result.rows.append(_exact_row(x, t, points, points_dev, train, gemms, repeats))
    if progress:
        progress("bench exact", len(ts), len(ts))
    result.gemm_gflops = statistics.median(row.gemm_gflops for row in result.rows)
    result.limit_qps = result.gemm_gflops * 1e9 / (4 * n * dim)
    return result


def gemm_calls(queries: Tensor, points: Tensor, seed: int,
               chunk_size: int = DEFAULT_CHUNK) -> dict[str, Callable[[], object]]:
    """(c): the exact computation's two GEMMs (B×d·d×n and B×n·n×d) on the full shapes, and
    the same GEMMs on the engine's chunk shapes; the faster sets the two-GEMM limit."""
    n = points.shape[0]
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


def _exact_row(x: Tensor, t: float, points: Tensor, points_dev: Tensor, train: TrainingSet,
               gemms: dict[str, Callable[[], object]], repeats: int) -> ExactRow:
    batch, dev = x.shape[0], x.device
    n, dim = points.shape
    reference = float64_velocity(x.cpu(), t, points)

    def naive() -> Tensor:
        return naive_velocity(x, t, points_dev)

    def engine() -> Tensor:
        return (closed_form_state(x, t, train).denoiser() - x.to(torch.float64)) / (1 - t)

    seconds = interleaved_seconds({"naive": naive, "engine": engine, **gemms}, repeats, dev,
                                  BENCH_SAMPLE_SECONDS)
    gemm_s = min(seconds[name] for name in gemms)
    limit_qps = batch / gemm_s
    naive_err = relative_errors(naive(), reference)
    engine_err = relative_errors(engine().to(torch.float32), reference)
    return ExactRow(
        t=t, naive_qps=batch / seconds["naive"], engine_qps=batch / seconds["engine"],
        speedup=seconds["naive"] / seconds["engine"],
        limit_fraction=gemm_s / seconds["engine"], gemm_gflops=4 * batch * n * dim / gemm_s / 1e9,
        naive_error_median=float(naive_err.median()), naive_error_max=float(naive_err.max()),
        engine_error_median=float(engine_err.median()), engine_error_max=float(engine_err.max()),
        naive_peak_bytes=peak_extra_bytes(naive, dev),
        engine_peak_bytes=peak_extra_bytes(engine, dev), limit_qps=limit_qps)


def save_json(data: dict, path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def faiss_device(device: str) -> str:
    """Where FAISS runs when the torch work runs on `device`."""
    from knnflow.index import faiss_gpu_count

    return "cuda" if device == "cuda" and faiss_gpu_count() > 0 else "cpu"


# --------------------------------------------------------------------------- bench knn


def bench_index(dataset: str | None, root: str | None, limit: int | None,
                index_folder: str | Path | None, progress: Progress | None,
                device: str = "cpu", default: str = "synthetic"):
    """(index, data set name, root) a benchmark runs on: the index loaded from index_folder,
    or built in memory on the train split of `dataset` (None: `default`). With an index, the
    data set, root and limit are the ones it was built on: a --dataset or --limit that
    contradicts them is refused (held-out queries come from that data set's test split).
    The FAISS index goes on the GPU for device cuda when FAISS has GPU support; with
    faiss-cpu it stays on the CPU (the torch work still runs on the GPU), which the results'
    config records as faiss_device."""
    from knnflow.index import Index

    device = faiss_device(device)
    if index_folder is not None:
        index = Index.load(index_folder, device=device)
        described = index.manifest.get("dataset") or {}
        name = described.get("name")
        if name in (None, "custom"):  # built from a tensor: the data set cannot be checked
            if dataset is None:
                raise InputError(f"{index_folder} does not record its data set; pass "
                                 "--dataset (the one it was built on)")
            return index, dataset, root
        if dataset is not None and dataset != name:
            raise InputError(f"--dataset {dataset} contradicts the index, built on {name}; "
                             "leave --dataset out with --index")
        if limit is not None and limit != described.get("limit"):
            raise InputError(f"--limit {limit} contradicts the index, built on "
                             + (f"the first {described['limit']} images"
                                if described.get("limit") else "the whole train split")
                             + "; leave --limit out with --index")
        return index, name, root if root is not None else described.get("root")
    dataset = dataset or default
    images = load_dataset(dataset, root=root, split="train", limit=limit)
    return Index.build(images, dataset={"name": dataset, "limit": limit}, device=device,
                       progress=progress), dataset, root


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


@dataclass
class KnnBench:
    config: dict
    rows: list[KnnRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bench_knn(dataset: str | None = None, root: str | None = None, limit: int | None = None,
              ts: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), batch: int = 256,
              tol: float = 1e-4, ks: tuple[int, ...] = (16, 256), repeats: int = 3,
              index_folder: str | Path | None = None, seed: int = 0, device: str = "cpu",
              search_device: str = "cpu", route: str = "auto",
              progress: Progress | None = None) -> KnnBench:
    """Exact engine (a) against KNNVelocity certified (b) and the top-k truncation (c), on the
    same queries x_t = (1-t)·x0 + t·x1 (x1 held-out images), for each t and for t ~ U[0,1).

    device cuda: the exact engine, the certified estimator's exact fallback and the FAISS
    index (top-k search) run on the GPU; the certified search itself runs on
    `search_device` (default the CPU). route: (b)'s route (KNNVelocity; "auto" times the
    exact engine against certifying when the exact engine runs on a GPU); its calibration
    happens in the warm-up call, outside the timings."""
    from knnflow.estimators import ROUTES, ExactVelocity, KNNVelocity

    if any(not 0 <= t < 1 for t in ts):
        raise InputError(f"every t must lie in [0, 1), got {list(ts)}")
    if not (math.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive number, got {tol!r}")
    if min(batch, repeats) < 1:
        raise InputError("--batch and --repeats must be at least 1")
    if route not in ROUTES:
        raise InputError(f"unknown --route {route!r}; choose one of: {', '.join(ROUTES)}")
    device = resolve_device(device)
    search_device = resolve_device(search_device, "--search-device")
    index, name, root = bench_index(dataset, root, limit, index_folder, progress, device)
    held_out = load_dataset(name, root=root, split="test")
    held_out = held_out.reshape(held_out.shape[0], -1)
    gen = torch.Generator().manual_seed(seed)
    exact = ExactVelocity(index, device=device)
    certified = KNNVelocity(index, tol=tol, device=device, search_device=search_device,
                            route=route)
    topk = {f"top-{k}": KNNVelocity(index, k=min(k, index.n), certified=False) for k in ks}
    result = KnnBench(config={"data": name, "n": index.n, "d": index.dim, "batch": batch,
                              "tol": tol, "repeats": repeats, "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "device": device,
                              "search_device": search_device, "route": certified.route,
                              "faiss_device": faiss_device(device),
                              "gpu": torch.cuda.get_device_name() if device == "cuda" else None})
    cases = [(f"{t:g}", torch.full((batch,), float(t))) for t in ts]
    cases.append(("U[0,1)", torch.rand(batch, generator=gen)))
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
        reference = exact(x, t).velocity.to(torch.float64)
        ref_norm = reference.norm(dim=1)
        out = certified(x, t)
        err = (out.velocity.to(torch.float64) - reference).norm(dim=1)
        bound = out.error_bound
        violations = int((err > bound + 1e-4 * ref_norm).sum())
        topk_error = {}
        for name_, est in topk.items():
            rel = relative_errors(est(x, t).velocity, reference)
            topk_error[name_] = (float(rel.median()), float(rel.max()))
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
            routed=float(out.routed.double().mean())))
    if progress:
        progress("bench knn", len(cases), len(cases))
    result.config["floors"] = list(certified.floors)
    result.config["route_timings"] = certified.route_timings
    return result


# --------------------------------------------------------------------------- bench memorization


@dataclass
class MemorizationRow:
    method: str
    samples_per_s: float
    speedup: float
    ids_differ: int
    d1_rel_diff_max: float
    d1_rel_error_max: float
    peak_bytes: int | None


@dataclass
class MemorizationBench:
    config: dict
    rows: list[MemorizationRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def cdist_topk(samples: Tensor, points: Tensor, k: int = 2,
               batch: int = 256) -> tuple[Tensor, Tensor]:
    """The published baseline: torch.cdist against the whole training set, then topk, per
    batch of samples. Returns (distances, ids), float32 distances."""
    dist, ids = [], []
    for start in range(0, samples.shape[0], batch):
        d = torch.cdist(samples[start:start + batch], points)
        values, index = d.topk(k, dim=1, largest=False)
        dist.append(values)
        ids.append(index)
    return torch.cat(dist), torch.cat(ids)


def float64_nearest(samples: Tensor, points: Tensor, block: int = 128) -> Tensor:
    """Nearest-neighbour distance in float64 (explicit differences for the winner)."""
    q64, p64 = samples.to(torch.float64), points.to(torch.float64)
    out = torch.empty(samples.shape[0], dtype=torch.float64)
    for start in range(0, q64.shape[0], block):
        q = q64[start:start + block]
        ids = torch.cdist(q, p64).argmin(dim=1)
        out[start:start + block] = (p64[ids] - q).norm(dim=1)
    return out


def bench_memorization(dataset: str | None = None, root: str | None = None,
                       limit: int | None = None, samples: int = 2048, noise: float = 0.1,
                       repeats: int = 3, index_folder: str | Path | None = None,
                       seed: int = 0, progress: Progress | None = None) -> MemorizationBench:
    """Nearest training images of `samples` images, in one run: (a) torch.cdist + topk over the
    whole training set, (b) knnflow's exact search (Index.search, sketch-pruned), (c) FAISS's
    flat search with float64 re-ranking. Samples: half held-out images, half training images
    with Gaussian noise of std `noise` (near copies). d1 is checked against float64."""

    if min(samples, repeats) < 1:
        raise InputError("--samples and --repeats must be at least 1")
    index, name, root = bench_index(dataset, root, limit, index_folder, progress)
    points = index.points.to(torch.float32)
    held_out = load_dataset(name, root=root, split="test")
    held_out = held_out.reshape(held_out.shape[0], -1)
    gen = torch.Generator().manual_seed(seed)
    fresh = held_out[torch.randint(held_out.shape[0], (samples - samples // 2,), generator=gen)]
    copies = points[torch.randint(index.n, (samples // 2,), generator=gen)]
    copies = (copies + noise * torch.randn(copies.shape, generator=gen)).clamp(-1, 1)
    queries = torch.cat([fresh, copies]).contiguous()
    calls = {
        "(a) cdist + topk": lambda: cdist_topk(queries, points),
        "(b) knnflow exact search": lambda: index.search(queries, 2),
        "(c) FAISS flat + float64 rerank": lambda: index.search(queries, 2, method="faiss"),
    }
    if progress:
        progress("bench memorization", 0, 3)
    seconds = interleaved_seconds(calls, repeats, torch.device("cpu"), BENCH_SAMPLE_SECONDS)
    if progress:
        progress("bench memorization", 1, 3)
    truth = float64_nearest(queries, points)
    if progress:
        progress("bench memorization", 2, 3)
    ours = index.search(queries, 2)
    ours_stats = dict(index.last_stats)
    ours_d1 = ours.sq_distances[:, 0].sqrt()
    results = {
        "(a) cdist + topk": cdist_topk(queries, points),
        "(b) knnflow exact search": (ours_d1[:, None], ours.ids),
    }
    faiss_result = index.search(queries, 2, method="faiss")
    results["(c) FAISS flat + float64 rerank"] = (faiss_result.sq_distances[:, :1].sqrt(),
                                                  faiss_result.ids)
    bench = MemorizationBench(config={
        "data": name, "n": index.n, "d": index.dim, "samples": samples, "noise": noise,
        "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "search": ours_stats.get("method"), "fallback": ours_stats.get("fallback"),
        "evaluated_median": ours_stats.get("evaluated_median")})
    base = seconds["(a) cdist + topk"]
    for method, (dist, ids) in results.items():
        d1 = dist[:, 0].to(torch.float64)
        scale = ours_d1.clamp(min=1e-30)
        bench.rows.append(MemorizationRow(
            method=method, samples_per_s=samples / seconds[method],
            speedup=base / seconds[method],
            ids_differ=int((ids[:, 0] != ours.ids[:, 0]).sum()),
            d1_rel_diff_max=float(((d1 - ours_d1).abs() / scale).max()),
            d1_rel_error_max=float(((d1 - truth).abs() / truth.clamp(min=1e-30)).max()),
            peak_bytes=peak_extra_bytes(calls[method], torch.device("cpu"))))
    if progress:
        progress("bench memorization", 3, 3)
    return bench


# --------------------------------------------------------------------------- bench targets


TARGET_SPECS = {
    "cfm": {"name": "cfm"},
    "efm-128": {"name": "efm", "m": 128},
    "efm-1000": {"name": "efm", "m": 1000},
    "efm-128-shared": {"name": "efm", "m": 128, "pool": "shared"},
    "knn-efm": {"name": "knn-efm"},
}


@dataclass
class TargetsBench:
    config: dict
    bins: list[str]
    error: dict[str, list[float]]
    ms_per_batch: dict[str, float]
    fallback: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def bench_targets(dataset: str | None = None, root: str | None = None, limit: int | None = None,
                  batch: int = 128, bins: int = 10, tol: float = 1e-4,
                  index_folder: str | Path | None = None, seed: int = 0,
                  progress: Progress | None = None) -> TargetsBench:
    """For cfm, efm-128, efm-1000 (independent pools), efm-128 with a shared pool and knn-efm,
    on the same (x0, x1, t): mean ‖target - û*‖² per t bin against the exact engine, and the
    median time per batch. x1 are training images, as in training."""
    from knnflow.estimators import ExactVelocity
    from knnflow.targets import make_target

    if min(batch, bins) < 1:
        raise InputError("--batch and --bins must be at least 1")
    index, name, _ = bench_index(dataset, root, limit, index_folder, progress,
                                 default="digits")
    train = index.training_set()
    exact = ExactVelocity(train)
    targets = {label: make_target(tol=tol, index=index if spec["name"] == "knn-efm" else None,
                                  data=train, **spec)
               for label, spec in TARGET_SPECS.items()}
    gen = torch.Generator().manual_seed(seed)
    error = {label: [] for label in targets}
    seconds = {label: [] for label in targets}
    fallback, labels = [], []
    for b in range(bins):
        if progress:
            progress("bench targets", b, bins)
        low, high = b / bins, (b + 1) / bins
        labels.append(f"[{low:.1f},{high:.1f})")
        t = (low + (high - low) * torch.rand(batch, generator=gen)).clamp(max=1 - 1e-4)
        x1 = train.points[torch.randint(train.n, (batch,), generator=gen)].to(torch.float32)
        x0 = torch.randn(x1.shape, generator=gen)
        for label, target in targets.items():
            out = target(x0, x1, t, generator=torch.Generator().manual_seed(seed + b))
            if label == "cfm":
                reference = exact(out.x_t, t).velocity.to(torch.float64)
            error[label].append(float((out.target.double() - reference).square().sum(1).mean()))
            seconds[label].append(out.seconds)
            if label == "knn-efm":
                fallback.append(out.fallback)
    if progress:
        progress("bench targets", bins, bins)
    return TargetsBench(
        config={"data": name, "n": index.n, "d": index.dim, "batch": batch, "tol": tol,
                "threads": torch.get_num_threads(), "torch": torch.__version__},
        bins=labels, error=error,
        ms_per_batch={label: 1e3 * statistics.median(v) for label, v in seconds.items()},
        fallback=fallback)


# --------------------------------------------------------------------------- bench train


TRAIN_TARGETS = ("cfm", "efm-128", "knn-efm", "exact")


def parse_target_label(label: str, n: int) -> dict:
    """'cfm', 'exact', 'knn-efm', 'knn-efm-certify', 'knn-efm-faster', 'efm-M' or
    'efm-M-shared' (M a number or 'n') → make_target options."""
    if label in ("cfm", "exact", "knn-efm"):
        return {"name": label}
    if label in ("knn-efm-certify", "knn-efm-faster"):
        return {"name": "knn-efm", "knn_route": label.rsplit("-", 1)[1]}
    parts = label.split("-")
    if parts[0] == "efm" and len(parts) in (2, 3) and (len(parts) == 2 or parts[2] == "shared"):
        m = n if parts[1] == "n" else (int(parts[1]) if parts[1].isdigit() else 0)
        if m >= 1:
            return {"name": "efm", "m": m, "pool": "shared" if len(parts) == 3 else "independent"}
    raise InputError(f"unknown target {label!r}; use cfm, exact, knn-efm (or "
                     "knn-efm-certify, knn-efm-faster: its --knn-route), efm-M or efm-M-shared "
                     "(M a number or n)")


@dataclass
class TrainRow:
    target: str
    ms_step: float
    ms_target: float
    ratio: float
    fallback: float | None


@dataclass
class TrainBench:
    config: dict
    rows: list[TrainRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bench_train(dataset: str | None = None, root: str | None = None, limit: int | None = None,
                preset: str = "tiny", targets: tuple[str, ...] = TRAIN_TARGETS,
                batch: int = 128, steps: int = 20, warmup: int = 3, device: str = "cpu",
                tol: float = 1e-4, index_folder: str | Path | None = None, seed: int = 0,
                prefetch: bool | None = None, knn_search_device: str = "cpu",
                progress: Progress | None = None) -> TrainBench:
    """Training step time with each target, relative to cfm, in one run: every target trains
    its own copy of the model (same initial weights) on the same seeded stream of (x0, x1, t),
    through the trainer's own BatchStream and optimizer_step. Without prefetch (the default on
    CPUs) the targets take turns step by step; with prefetch (the default on GPUs, as in
    knnflow train) each target runs its steps in one block, and a step's time runs from the
    end of the previous step to the end of this one, so a target computed while the network
    trains costs only what it adds. Median over `steps` timed steps after `warmup` untimed
    ones."""
    from knnflow.models import build_model, count_parameters
    from knnflow.targets import make_target
    from knnflow.train import BatchStream, TrainConfig, _lr_at, optimizer_step

    if min(batch, steps) < 1 or warmup < 0:
        raise InputError("--batch and --steps must be at least 1, --warmup at least 0")
    device = resolve_device(device)
    knn_search_device = resolve_device(knn_search_device, "--knn-search-device")
    prefetch = device == "cuda" if prefetch is None else prefetch
    index, name, _ = bench_index(dataset, root, limit, index_folder, progress, device,
                                 default="digits")
    train_set = index.training_set()
    specs = {label: parse_target_label(label, index.n) for label in targets}
    image_shape = index.image_shape
    images = train_set.points.reshape(-1, *image_shape)
    config = TrainConfig(dataset=name, preset=preset, batch_size=batch).resolved()
    step_ms = {label: [] for label in specs}
    target_ms = {label: [] for label in specs}
    fallback = {label: [] for label in specs}
    total = len(specs) * (warmup + steps)

    def trainer(label: str, spec: dict):
        """One target's model, EMA, optimizer and batch stream, from the same seeds."""
        torch.manual_seed(seed)
        model = build_model(preset, image_shape).to(device)
        ema = build_model(preset, image_shape).to(device)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        target = make_target(tol=tol, index=index if spec["name"] == "knn-efm" else None,
                             data=train_set, device=device, image_shape=image_shape,
                             knn_search_device=knn_search_device, **spec)
        stream = BatchStream(images, target, batch, False, torch.Generator().manual_seed(seed),
                             prefetch=prefetch,
                             target_generator=torch.Generator().manual_seed(seed + 1))
        return model, ema, torch.optim.Adam(model.parameters(), lr=config.lr), stream

    def step_once(label: str, parts, step: int, began: float) -> float:
        model, ema, optimizer, stream = parts
        t, out, _ = stream.next()
        loss = optimizer_step(model, ema, optimizer, out, t, config, step,
                              _lr_at(step, config), device)
        float(loss)  # waits for the step
        now = time.perf_counter()
        if step >= warmup:
            step_ms[label].append(1e3 * (now - began))
            target_ms[label].append(1e3 * out.seconds)
            if out.fallback is not None:
                fallback[label].append(out.fallback)
        return now

    if prefetch:
        # One target at a time: a prefetching stream would otherwise compute its next target
        # while the other targets train, which hides more than training would.
        for number, (label, spec) in enumerate(specs.items()):
            parts = trainer(label, spec)
            with parts[3]:
                _sync(torch.device(device))
                last = time.perf_counter()
                for step in range(warmup + steps):
                    if progress:
                        progress("bench train", number * (warmup + steps) + step, total)
                    last = step_once(label, parts, step, last)
            parameters = count_parameters(parts[0])
            del parts
    else:
        # Interleaved rounds in rotating order, so drift in machine speed affects all alike.
        built = {label: trainer(label, spec) for label, spec in specs.items()}
        parameters = count_parameters(next(iter(built.values()))[0])
        order = list(built)
        for step in range(warmup + steps):
            if progress:
                progress("bench train", step * len(order), total)
            order = order[1:] + order[:1]
            for label in order:
                _sync(torch.device(device))
                step_once(label, built[label], step, time.perf_counter())
    if progress:
        progress("bench train", total, total)
    result = TrainBench(config={
        "data": name, "n": index.n, "d": index.dim, "preset": preset, "parameters": parameters,
        "batch": batch, "steps": steps, "warmup": warmup, "device": device,
        "faiss_device": faiss_device(device), "prefetch": prefetch, "tol": tol,
        "knn_search_device": knn_search_device,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None})
    base = statistics.median(step_ms["cfm"]) if "cfm" in step_ms else None
    for label in specs:
        ms = statistics.median(step_ms[label])
        result.rows.append(TrainRow(
            target=label, ms_step=ms, ms_target=statistics.median(target_ms[label]),
            ratio=ms / base if base else math.nan,
            fallback=statistics.mean(fallback[label]) if fallback[label] else None))
    return result
