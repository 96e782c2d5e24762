"""Side-by-side speed and error measurements, each in one run on the same queries.

`bench_exact` compares (a) the naive form of published reference code (cdist over all n, then
softmax, then matmul), (b) knnflow's streaming exact engine and (c) plain matmuls of the same
shapes, which give this machine's GEMM rate and so the two-GEMM limit of 4·n·d FLOPs per query.
(c) is measured on the full shapes and on the engine's chunk shapes; the faster one counts.
Errors are against a float64 brute force on the same queries.

The speed targets are judged on real images (photos, the default data set of every bench,
and the embedded digits) over the whole t range training draws: a grid of t plus one row with
a seeded t ~ U[0,1) per query. `synthetic` stays for scale beyond real data.
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
from typing import NamedTuple

import torch
from torch import Tensor

from knnflow.choices import BENCH_DATASET as DEFAULT_DATASET
from knnflow.choices import BENCH_T_GRID as DEFAULT_T_GRID
from knnflow.choices import UNIFORM_LABEL
from knnflow.closed_form import DEFAULT_CHUNK, TrainingSet, closed_form_state
from knnflow.data import SIZED_LOADERS, load_dataset, synthetic_images
from knnflow.errors import InputError
from knnflow.index import Index, resolve_device
from knnflow.timing import BENCH_SAMPLE_SECONDS, interleaved_seconds
from knnflow.timing import sync as _sync

Progress = Callable[[str, int, int], None]


def parse_t_grid(text: str) -> tuple[float, ...]:
    """--t-grid: a comma list (0.1,0.5,0.9) or START:STOP:STEP (STOP included when it lands on
    the grid up to rounding), sorted, each t in [0, 1); anything else is an InputError."""
    from knnflow.analysis.collapse import parse_t_grid as parse_grid

    return tuple(float(t) for t in parse_grid(text))


def _check_ts(ts: tuple[float, ...], option: str = "--t-grid") -> tuple[float, ...]:
    ts = tuple(float(t) for t in ts)
    if not ts:
        raise InputError(f"{option} holds no t values")
    bad = [t for t in ts if not 0 <= t < 1]
    if bad:
        raise InputError(f"{option}: every t must lie in [0, 1) (t = 1 is invalid: û* divides "
                         f"by 1 - t); got {bad[0]:g}")
    return ts


def _per_query_t(t: float | Tensor, batch: int) -> Tensor:
    """t as a float64 (batch,) tensor on the CPU."""
    t64 = torch.as_tensor(t, dtype=torch.float64).cpu()
    return t64.expand(batch).contiguous() if t64.ndim == 0 else t64


def _t_cases(ts: tuple[float, ...], batch: int, gen: torch.Generator,
             uniform: bool) -> list[tuple[str, float | Tensor]]:
    """(label, t) for every grid t, then the U[0,1) row: a (batch,) tensor, one seeded t per
    query."""
    cases: list[tuple[str, float | Tensor]] = [(f"{t:g}", float(t)) for t in ts]
    if uniform:
        cases.append((UNIFORM_LABEL, torch.rand(batch, generator=gen)))
    return cases


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


def naive_velocity(x: Tensor, t: float | Tensor, points: Tensor) -> Tensor:
    """The form in published reference code: a full B×n distance matrix, softmax, matmul.
    One t: torch.cdist(x, t·points). One t per query (a (B,) tensor): the same squared
    distances in cdist's own matmul form, ‖x‖² - 2t⟨x, x_j⟩ + t²‖x_j‖², row by row."""
    if torch.is_tensor(t) and t.ndim == 1:
        tt = t.to(x)[:, None]
        sq = (x.square().sum(1, keepdim=True) - 2 * tt * (x @ points.T)
              + tt.square() * points.square().sum(1)).clamp(min=0)
        weights = torch.softmax(-sq / (2 * (1 - tt) ** 2), dim=1)
        return (weights @ points - x) / (1 - tt)
    t = float(t)
    sq = torch.cdist(x, t * points).square()
    weights = torch.softmax(-sq / (2 * (1 - t) ** 2), dim=1)
    return (weights @ points - x) / (1 - t)


def float64_velocity(x: Tensor, t: float | Tensor, points: Tensor,
                     query_block: int = 64) -> Tensor:
    """Brute force in float64, t one value or one per query. For t ≤ 0.999 the GEMM form is
    exact to < 1e-6 nats in float64; beyond, distances are taken from explicit differences,
    one query at a time."""
    x64, p64 = x.to(torch.float64), points.to(torch.float64)
    t64 = _per_query_t(t, x64.shape[0]).to(x64.device)
    out = torch.empty_like(x64)
    p_norms = p64.square().sum(1)
    for i in range(0, x64.shape[0], query_block):
        q, tq = x64[i:i + query_block], t64[i:i + query_block]
        sq = (q.square().sum(1, keepdim=True) - 2 * tq[:, None] * (q @ p64.T)
              + tq[:, None].square() * p_norms)
        for row in (tq > 0.999).nonzero().squeeze(1).tolist():
            sq[row] = (q[row] - tq[row] * p64).square().sum(1)
        weights = torch.softmax(-sq * (0.5 / (1 - tq) ** 2)[:, None], dim=1)
        out[i:i + query_block] = (weights @ p64 - q) / (1 - tq)[:, None]
    return out


def oracle_window(n: int) -> float:
    """20 + ln n nats: the points further below the best logit than this carry together at
    most n·e^-(20 + ln n) = e^-20 ≈ 2e-9 of the best point's weight, so an ideal estimator
    weighs exactly the points inside the window."""
    return 20.0 + math.log(n)


def oracle_counts(x: Tensor, t: float | Tensor, points: Tensor, window: float | None = None,
                  chunk: int | None = None) -> Tensor:
    """Per query, how many training points have a logit ℓ_j = -‖x - t·x_j‖²/(2(1-t)²) within
    `window` nats (default oracle_window(n)) of its best, in float64.

    Two streaming passes over the data in chunks (the best logit, then the count), so memory
    is O(B·chunk + chunk·d), never B×n. ℓ_j + s‖x‖² = s·(2t⟨x, x_j⟩ - t²‖x_j‖²), s = 1/(2(1-t)²),
    is used: the left-out term is the same for every j and differences are what count. Its
    float64 rounding is ~d·2^-53·s·t·‖x‖·‖x_j‖, far below a nat for every t < 1 - 1e-4 on
    images. At t = 0 every logit is equal and the count is n."""
    n, dim = points.shape[0], points[0].numel()
    x64 = x.reshape(x.shape[0], -1).to(torch.float64)
    device = x64.device
    t64 = _per_query_t(t, x64.shape[0]).to(device)
    window = oracle_window(n) if window is None else window
    if bool((t64 == 0).all()):
        return torch.full((x64.shape[0],), n, dtype=torch.int64)
    # ~32 MB of float64 points per chunk (the GEMM stays efficient, the memory small)
    chunk = chunk or max(64, min(16_384, (1 << 22) // dim))
    s = 0.5 / (1 - t64) ** 2
    dot_scale, norm_scale = (2 * s * t64)[:, None], (s * t64.square())[:, None]

    def shifted_logits() -> Iterator[Tensor]:
        for start in range(0, n, chunk):
            block = points[start:start + chunk].reshape(-1, dim).to(device, torch.float64)
            yield dot_scale * (x64 @ block.T) - norm_scale * block.square().sum(1)

    best = torch.full((x64.shape[0],), -math.inf, dtype=torch.float64, device=device)
    for logits in shifted_logits():
        best = torch.maximum(best, logits.max(dim=1).values)
    count = torch.zeros(x64.shape[0], dtype=torch.int64, device=device)
    for logits in shifted_logits():
        count += (logits >= (best - window)[:, None]).sum(dim=1)
    return count.cpu()


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
class ExactBench:
    config: dict
    gemm_gflops: float
    limit_qps: float
    rows: list[ExactRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _bench_data(dataset: str, root: str | None, n: int | None, dim: int | None,
                size: int | None, batch: int, seed: int) -> tuple[Tensor, Tensor, str]:
    """Training points (n, d) and held-out images (batch, d) for the queries: a data set's
    train and test splits (n: a limit), or synthetic images of dimension dim (default 3072)."""
    if dataset == "synthetic":
        if size is not None:
            raise InputError(f"--size applies to {', '.join(SIZED_LOADERS)} and folder:PATH; "
                             "synthetic takes --d")
        shape = image_shape_for(3072 if dim is None else dim)
        points = synthetic_images(50_000 if n is None else n, shape, seed=seed)
        held_out = synthetic_images(batch, shape, seed=seed + 1)
        name = f"synthetic {'×'.join(map(str, shape))}"
    else:
        if dim is not None:
            raise InputError(f"--d applies to --dataset synthetic only; {dataset} has its own "
                             "dimension")
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
    ts = _check_ts(default_ts() if ts is None else ts)
    if min(batch, repeats) < 1 or (n is not None and n < 1) or (dim is not None and dim < 1):
        raise InputError("--n, --d, --batch and --repeats must be at least 1")
    dev = torch.device(resolve_device(device))
    points, held_out, name = _bench_data(dataset, root, n, dim, size, batch, seed)
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
    cases = _t_cases(ts, batch, gen, uniform)
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


def _exact_row(label: str, t: float | Tensor, x: Tensor, points: Tensor, points_dev: Tensor,
               train: TrainingSet, gemms: dict[str, Callable[[], object]],
               repeats: int) -> ExactRow:
    """One row: t a float (one t for every query) or a (B,) tensor (one t per query)."""
    batch, dev = x.shape[0], x.device
    n, dim = points.shape
    reference = float64_velocity(x.cpu(), t, points)
    t_dev = t if not torch.is_tensor(t) else t.to(dev)
    one_minus_t = (1 - _per_query_t(t, batch)).to(dev)[:, None]

    def naive() -> Tensor:
        return naive_velocity(x, t_dev, points_dev)

    def engine() -> Tensor:
        return (closed_form_state(x, t_dev, train).denoiser() - x.to(torch.float64)) / one_minus_t

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


def save_json(data: dict, path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def faiss_device(device: str) -> str:
    """Where FAISS runs when the torch work runs on `device`."""
    from knnflow.index import faiss_gpu_count

    return "cuda" if device == "cuda" and faiss_gpu_count() > 0 else "cpu"


# --------------------------------------------------------------------------- bench knn


class BenchSource(NamedTuple):
    """What a benchmark runs on: the index, the data set's name, root and --size."""

    index: Index
    name: str
    root: str | None
    size: int | None


def bench_index(dataset: str | None, root: str | None, limit: int | None,
                index_folder: str | Path | None, progress: Progress | None,
                device: str = "cpu", default: str = DEFAULT_DATASET,
                size: int | None = None) -> BenchSource:
    """The index a benchmark runs on: loaded from index_folder, or built in memory on the
    train split of `dataset` (None: `default`) at `size`. With an index, the data set, root,
    limit and size are the ones it was built on (its manifest's "dataset" record): a
    --dataset, --limit or --size that contradicts them is refused (held-out queries come from
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
                raise InputError(f"{index_folder} does not record its data set; pass "
                                 "--dataset (the one it was built on)")
            return BenchSource(index, dataset, root, size)
        if dataset is not None and dataset != name:
            raise InputError(f"--dataset {dataset} contradicts the index, built on {name}; "
                             "leave --dataset out with --index")
        if limit is not None and limit != described.get("limit"):
            raise InputError(f"--limit {limit} contradicts the index, built on "
                             + (f"the first {described['limit']} images"
                                if described.get("limit") else "the whole train split")
                             + "; leave --limit out with --index")
        recorded = described.get("size")
        if recorded is None and name in SIZED_LOADERS:  # an index from before size was kept
            recorded = index.image_shape[-1]
        if size is not None and size != recorded:
            raise InputError(f"--size {size} contradicts the index, built on "
                             + (f"--size {recorded}" if recorded is not None
                                else "images at their own size")
                             + "; leave --size out with --index")
        return BenchSource(index, name, root if root is not None else described.get("root"),
                           recorded)
    dataset = dataset or default
    images = load_dataset(dataset, root=root, split="train", limit=limit, size=size)
    index = Index.build(images, dataset={"name": dataset, "limit": limit, "size": size},
                        device=device, progress=progress)
    return BenchSource(index, dataset, root, size)


def held_out_images(source: BenchSource) -> Tensor:
    """The test split of the benchmark's data set, flattened to (N, d)."""
    held_out = load_dataset(source.name, root=source.root, split="test", size=source.size)
    held_out = held_out.reshape(held_out.shape[0], -1)
    if held_out.shape[1] != source.index.dim:
        raise InputError(f"{source.name}'s test split has d={held_out.shape[1]} but the index "
                         f"d={source.index.dim}; pass the --size it was built with")
    return held_out


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
class KnnBench:
    config: dict
    rows: list[KnnRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


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

    ts = _check_ts(default_ts() if ts is None else ts)
    if not (math.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive number, got {tol!r}")
    if min(batch, repeats) < 1:
        raise InputError("--batch and --repeats must be at least 1")
    if route not in ROUTES:
        raise InputError(f"unknown --route {route!r}; choose one of: {', '.join(ROUTES)}")
    device = resolve_device(device)
    search_device = resolve_device(search_device, "--search-device")
    source = bench_index(dataset, root, limit, index_folder, progress, device, size=size)
    index = source.index
    held_out = held_out_images(source)
    gen = torch.Generator().manual_seed(seed)
    exact = ExactVelocity(index, device=device)
    reference_engine = ExactVelocity(index, device=device, compute_dtype=torch.float64)
    certified = KNNVelocity(index, tol=tol, device=device, search_device=search_device,
                            route=route)
    topk = {f"top-{k}": KNNVelocity(index, k=min(k, index.n), certified=False) for k in ks}
    result = KnnBench(config={"data": source.name, "dataset": source.name, "size": source.size,
                              "n": index.n, "d": index.dim, "batch": batch, "t_grid": list(ts),
                              "tol": tol, "repeats": repeats, "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "device": device,
                              "search_device": search_device, "route": certified.route,
                              "faiss_device": faiss_device(device),
                              "oracle_window": oracle_window(index.n),
                              "gpu": torch.cuda.get_device_name() if device == "cuda" else None})
    cases = [(label, t if torch.is_tensor(t) else torch.full((batch,), t))
             for label, t in _t_cases(ts, batch, gen, uniform=True)]
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


# --------------------------------------------------------------------------- bench memorization


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
class MemorizationBench:
    config: dict
    rows: list[MemorizationRow] = field(default_factory=list)
    t_rows: list[MemorizationTRow] = field(default_factory=list)

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


def exact_sq_distances(queries: Tensor, points: Tensor, ids: Tensor) -> Tensor:
    """‖q_i - x_ids[i, r]‖² in float64 from explicit differences, (B, k), gathered in blocks of
    ~4 MB (a B×k×d float64 copy would be hundreds of MB on photos)."""
    dim = points[0].numel()
    q64 = queries.reshape(queries.shape[0], -1).to(torch.float64)
    out = torch.empty(ids.shape, dtype=torch.float64)
    rows = max(1, (1 << 19) // max(1, ids.shape[1] * dim))
    for start in range(0, ids.shape[0], rows):
        block = ids[start:start + rows]
        chosen = points[block.reshape(-1)].reshape(*block.shape, dim).to(torch.float64)
        out[start:start + rows] = (chosen - q64[start:start + rows, None]).square().sum(-1)
    return out


def float64_knn(queries: Tensor, points: Tensor, k: int = 2, block: int = 256,
                chunk: int | None = None, extra: int = 16) -> tuple[Tensor, Tensor]:
    """The k nearest training points of each query in float64, ties to the lower id; squared
    distances and ids, (B, k). Independent of Index.search: the float64 GEMM form
    ‖q‖² - 2⟨q, x⟩ + ‖x‖², streamed over the data in chunks, keeps the k + extra closest; those
    are recomputed from explicit differences. Its rounding is below
    E = 2(d + 2)·2^-53·(‖q‖ + max‖x‖)², so when the last kept screened distance minus E clears
    the k-th exact one nothing was missed; other rows (ties there) are recomputed in full."""
    n, dim = points.shape[0], points[0].numel()
    k = min(k, n)
    keep = min(n, k + extra)
    chunk = chunk or max(64, min(16_384, (1 << 22) // dim))
    q64 = queries.reshape(queries.shape[0], -1).to(torch.float64)
    max_norm = max(float(points[s:s + chunk].reshape(-1, dim).to(torch.float64).norm(dim=1).max())
                   for s in range(0, n, chunk))
    out_d = torch.empty(q64.shape[0], k, dtype=torch.float64)
    out_i = torch.empty(q64.shape[0], k, dtype=torch.int64)
    for start in range(0, q64.shape[0], block):
        q = q64[start:start + block]
        q_sq = q.square().sum(1, keepdim=True)
        best_d = torch.full((q.shape[0], 0), math.inf, dtype=torch.float64)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.int64)
        for s in range(0, n, chunk):
            p = points[s:s + chunk].reshape(-1, dim).to(torch.float64)
            screened = q_sq - 2 * q @ p.T + p.square().sum(1)
            ids = torch.arange(s, s + p.shape[0]).expand(q.shape[0], -1)
            best_d, order = torch.cat([best_d, screened], 1).topk(
                min(keep, best_d.shape[1] + p.shape[0]), dim=1, largest=False)
            best_i = torch.cat([best_i, ids], 1).gather(1, order)
        exact = exact_sq_distances(q, points, best_i)
        by_id = best_i.argsort(dim=1)  # lower id first among equal distances
        order = by_id.gather(1, exact.gather(1, by_id).argsort(dim=1, stable=True))
        exact, ids = exact.gather(1, order)[:, :k], best_i.gather(1, order)[:, :k]
        margin = 2 * (dim + 2) * 2.0 ** -53 * (q.norm(dim=1) + max_norm) ** 2
        unsure = ~(best_d[:, -1] - margin > exact[:, -1]) if keep < n else torch.zeros(
            q.shape[0], dtype=torch.bool)
        for row in unsure.nonzero().squeeze(1).tolist():
            full = torch.cat([(points[s:s + chunk].reshape(-1, dim).to(torch.float64)
                               - q[row]).square().sum(1) for s in range(0, n, chunk)])
            top = full.argsort(stable=True)[:k]
            exact[row], ids[row] = full[top], top
        out_d[start:start + block], out_i[start:start + block] = exact, ids
    return out_d, out_i


def id_mismatches(ids: Tensor, queries: Tensor, points: Tensor, truth: tuple[Tensor, Tensor]
                  ) -> int:
    """Samples where some rank's id differs from the float64 brute force's and is not an exact
    tie (the same float64 distance, which may come in either order)."""
    true_d, true_i = truth
    ids = ids[:, :true_i.shape[1]].cpu()
    differ = ids != true_i
    if not bool(differ.any()):
        return 0
    wrong = differ & (exact_sq_distances(queries, points, ids) != true_d)
    return int(wrong.any(dim=1).sum())


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
        raise InputError("--samples and --repeats must be at least 1")
    if not (math.isfinite(noise) and noise >= 0):
        raise InputError(f"--noise must be a number ≥ 0, got {noise}")
    ts = tuple(float(t) for t in ts)
    bad = [t for t in ts if not 0 < t < 1]
    if bad:
        raise InputError(f"--t-grid: bench memorization searches x_t/t, so every t must lie in "
                         f"(0, 1); got {bad[0]:g}")
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
        "data": source.name, "dataset": source.name, "size": source.size, "n": index.n,
        "d": index.dim, "samples": samples, "noise": noise, "k": 2, "t_grid": list(ts),
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


# --------------------------------------------------------------------------- bench targets


TARGET_SPECS = {
    "cfm": {"name": "cfm"},
    "ot-cfm": {"name": "ot-cfm"},
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
                  size: int | None = None, progress: Progress | None = None) -> TargetsBench:
    """For cfm, ot-cfm, efm-128, efm-1000 (independent pools), efm-128 with a shared pool and
    knn-efm, on the same (x0, x1, t) (ot-cfm re-pairs x0 within the batch, and its error is
    against û* at its own x_t): mean ‖target - û*‖² per t bin against the exact engine, and the
    median time per batch. x1 are training images, as in training."""
    from knnflow.estimators import ExactVelocity
    from knnflow.targets import make_target

    if min(batch, bins) < 1:
        raise InputError("--batch and --bins must be at least 1")
    source = bench_index(dataset, root, limit, index_folder, progress, size=size)
    index, name = source.index, source.name
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
            if label == "cfm":  # every target but ot-cfm has cfm's x_t
                reference = exact(out.x_t, t).velocity.to(torch.float64)
            own = (exact(out.x_t, t).velocity.to(torch.float64) if label == "ot-cfm"
                   else reference)  # ot-cfm re-pairs x0, so its x_t differ
            error[label].append(float((out.target.double() - own).square().sum(1).mean()))
            seconds[label].append(out.seconds)
            if label == "knn-efm":
                fallback.append(out.fallback)
    if progress:
        progress("bench targets", bins, bins)
    return TargetsBench(
        config={"data": name, "dataset": name, "size": source.size, "n": index.n,
                "d": index.dim, "batch": batch, "tol": tol,
                "threads": torch.get_num_threads(), "torch": torch.__version__},
        bins=labels, error=error,
        ms_per_batch={label: 1e3 * statistics.median(v) for label, v in seconds.items()},
        fallback=fallback)


# --------------------------------------------------------------------------- bench train


TRAIN_TARGETS = ("cfm", "efm-128", "knn-efm", "exact")


def parse_target_label(label: str, n: int) -> dict:
    """'cfm', 'exact', 'knn-efm', 'knn-efm-certify', 'knn-efm-faster', 'efm-M' or
    'efm-M-shared' (M a number or 'n') → make_target options."""
    if label in ("cfm", "ot-cfm", "exact", "knn-efm"):
        return {"name": label}
    if label in ("knn-efm-certify", "knn-efm-faster"):
        return {"name": "knn-efm", "knn_route": label.rsplit("-", 1)[1]}
    parts = label.split("-")
    if parts[0] == "efm" and len(parts) in (2, 3) and (len(parts) == 2 or parts[2] == "shared"):
        m = n if parts[1] == "n" else (int(parts[1]) if parts[1].isdigit() else 0)
        if m >= 1:
            return {"name": "efm", "m": m, "pool": "shared" if len(parts) == 3 else "independent"}
    raise InputError(f"unknown target {label!r}; use cfm, ot-cfm, exact, knn-efm (or "
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
                size: int | None = None, progress: Progress | None = None) -> TrainBench:
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
    from knnflow.trainer import BatchStream, TrainConfig, _lr_at, optimizer_step

    if min(batch, steps) < 1 or warmup < 0:
        raise InputError("--batch and --steps must be at least 1, --warmup at least 0")
    device = resolve_device(device)
    knn_search_device = resolve_device(knn_search_device, "--knn-search-device")
    prefetch = device == "cuda" if prefetch is None else prefetch
    source = bench_index(dataset, root, limit, index_folder, progress, device, size=size)
    index, name = source.index, source.name
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
        "data": name, "dataset": name, "size": source.size, "n": index.n, "d": index.dim,
        "preset": preset, "parameters": parameters,
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
