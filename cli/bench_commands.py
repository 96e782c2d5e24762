"""knnflow bench: speed and error measurements against baselines, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from knnflow.choices import BENCH_DATASET as DEFAULT_DATASET
from knnflow.choices import BENCH_T_GRID as DEFAULT_T_GRID
from knnflow.choices import QUICK_TS, UNIFORM_LABEL
from knnflow.errors import InputError
from knnflow.files import check_output_file

from .console import console, flags_named, human_bytes, progress_bar

# Options every benchmark on a data set shares.
RootOption = Annotated[Optional[Path], typer.Option(help="Folder of the data set's files.")]
LimitOption = Annotated[Optional[int], typer.Option(
    help="Index only the first N training images.")]
IndexOption = Annotated[Optional[Path], typer.Option(
    help="Use this index folder instead of building one in memory.")]
SIZE_HELP = "Image side: photos 32 (its default) or 64, folder:PATH resized to SIZE×SIZE"
SizeOption = Annotated[Optional[int], typer.Option(
    help=SIZE_HELP + "; with --index, the size the index was built with.")]
DatasetOption = Annotated[Optional[str], typer.Option(
    help=f"Data set: train split as data, test split for held-out queries (default "
         f"{DEFAULT_DATASET}; with --index, the index's).")]
T_GRID_HELP = ("Times t: a comma list (0.1,0.5,0.9) or START:STOP:STEP, STOP included when it "
               "lands on the grid; every t in [0, 1).")
OldTOption = Annotated[Optional[str], typer.Option(
    "--t", hidden=True, help="The old name of --t-grid (a comma list).")]


def _json_out(path: Path | None) -> Path | None:
    """--json-out is checked before any work: a bench's results are not lost at the end."""
    return check_output_file(path, "json_out")


JsonOutOption = Annotated[Optional[Path], typer.Option(help="Also write the results as JSON.",
                                                       callback=_json_out)]
DeviceOption = Annotated[str, typer.Option(
    help="cpu, cuda or auto (cuda: the FAISS index, the exact engine and the targets' dense "
         "work on the GPU).")]

app = typer.Typer(help="Measure speed and error against baselines, in one run on one machine.",
                  no_args_is_help=True)


def machine_text(config: dict) -> str:
    """'cpu (N threads)' or the GPU's name, for table titles."""
    search = config.get("search_device") or config.get("knn_search_device")
    if config.get("device") == "cuda":
        return (f"{config['gpu']} (+ {config['threads']} CPU threads; FAISS on "
                f"{config.get('faiss_device', 'cuda')}; certified search on {search or 'cpu'})")
    return f"cpu ({config['threads']} threads)"


def data_text(config: dict) -> str:
    """'photos (size 64)' or the data set's name, for table titles."""
    return config["data"] + (f" (size {config['size']})" if config.get("size") else "")


def t_grid_of(t_grid: str, old_t: str | None, default: str | None) -> tuple[float, ...]:
    """--t-grid, or the hidden --t (its old name) when that is given instead."""
    from knnflow.bench import parse_t_grid

    if old_t is not None:
        if t_grid != default:
            raise InputError("give --t-grid only (--t is its old name)")
        t_grid = old_t
    return parse_t_grid(t_grid)


@app.command("exact")
@flags_named({"dim": "--d", "ts": "--t-grid", "limit": "--n"})
def exact(
    dataset: Annotated[str, typer.Option(
        help="Data set: train split as data, test split for queries; synthetic: --n generated "
             "images of dimension --d, for scale beyond real data.")] = DEFAULT_DATASET,
    n: Annotated[Optional[int], typer.Option(
        help="Training points: the first N of the train split (default all); synthetic: N "
             "generated (default 50000).")] = None,
    d: Annotated[Optional[int], typer.Option(
        "--d", help="Dimension of --dataset synthetic (default 3072 = 3×32×32).")] = None,
    size: Annotated[Optional[int], typer.Option(help=SIZE_HELP + ".")] = None,
    batch: Annotated[int, typer.Option(help="Queries per call.")] = 256,
    t_grid: Annotated[str, typer.Option(help=T_GRID_HELP)] = DEFAULT_T_GRID,
    old_t: OldTOption = None,
    uniform: Annotated[bool, typer.Option(
        help=f"Add the {UNIFORM_LABEL} row: one seeded t per query, as training draws them.")]
    = True,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    repeats: Annotated[int, typer.Option(help="Timed calls per measurement (median taken).")]
    = 3,
    root: Annotated[Optional[Path], typer.Option(help="Folder of --dataset's files.")] = None,
    quick: Annotated[bool, typer.Option(
        help="The check table on the embedded digits: 256 queries at t = "
             f"{', '.join(map(str, QUICK_TS))} and {UNIFORM_LABEL}, at least 10 repeats "
             "(calls take ~1 ms).")]
    = False,
    json_out: Annotated[Optional[Path], typer.Option(
        help="Also write the results as JSON to this file.", callback=_json_out)] = None,
) -> None:
    """Exact û*: naive cdist+softmax+matmul (a) against knnflow's engine (b) and plain GEMMs (c)."""
    from knnflow.bench import bench_exact, save_json

    ts = t_grid_of(t_grid, old_t, DEFAULT_T_GRID)
    if quick:
        dataset, ts, n, repeats = "digits", QUICK_TS, None, max(repeats, 10)
    with progress_bar() as progress:
        result = bench_exact(dataset=dataset, n=n, dim=d, size=size, batch=batch, ts=ts,
                             uniform=uniform, device=device, repeats=repeats,
                             root=str(root) if root else None, progress=progress)
    c = result.config
    table = Table(title=(
        f"Exact û*: {data_text(c)}, n={c['n']}, d={c['d']}, batch {c['batch']}, {c['device']} "
        f"({c['threads']} threads); GEMM (c) {result.gemm_gflops:.0f} GFLOP/s (median), two-GEMM "
        f"limit {result.limit_qps:.0f} queries/s"), title_justify="left")
    for column in ("t", "(a) q/s", "(b) q/s", "b/a", "b/limit", "error (a) med/max",
                   "error (b) med/max", "mem (a)", "mem (b)"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        table.add_row(
            row.label, f"{row.naive_qps:.0f}", f"{row.engine_qps:.0f}", f"{row.speedup:.2f}×",
            f"{row.limit_fraction:.0%}",
            f"{row.naive_error_median:.0e}/{row.naive_error_max:.0e}",
            f"{row.engine_error_median:.0e}/{row.engine_error_max:.0e}",
            human_bytes(row.naive_peak_bytes), human_bytes(row.engine_peak_bytes))
    console.print(table)
    console.print("(a) naive cdist + softmax + matmul; (b) knnflow's streaming exact engine; "
                  "error: ‖v - û*‖/‖û*‖ against float64 brute force on the same queries; mem: peak "
                  f"extra memory; {UNIFORM_LABEL}: one seeded t per query.")
    if c["n"] * c["d"] < 10**7:
        console.print(f"At n·d = {c['n'] * c['d']:,} a call takes about a millisecond and fixed "
                      "per-call costs decide the speed; the engine's speed targets are judged "
                      f"on {DEFAULT_DATASET} (knnflow bench exact).")
    if json_out:
        save_json(result.to_dict(), json_out)


@app.command("knn")
@flags_named({"index_folder": "--index", "ts": "--t-grid"})
def knn(
    dataset: DatasetOption = None,
    root: RootOption = None,
    limit: LimitOption = None,
    size: SizeOption = None,
    t_grid: Annotated[str, typer.Option(
        help=T_GRID_HELP + f" A row for t ~ {UNIFORM_LABEL} is always added.")] = DEFAULT_T_GRID,
    old_t: OldTOption = None,
    batch: Annotated[int, typer.Option(help="Queries per call.")] = 256,
    tol: Annotated[float, typer.Option(help="KNNVelocity's tolerance (bound ≤ tol·‖v‖).")]
    = 1e-4,
    repeats: Annotated[int, typer.Option(help="Timed calls per measurement (median).")] = 3,
    index: IndexOption = None,
    device: DeviceOption = "cpu",
    search_device: Annotated[str, typer.Option(
        help="cpu, cuda or auto: where (b)'s certified search runs (sketch scans, the kept "
             "set's weights); its exact fallback runs on --device.")] = "cpu",
    route: Annotated[str, typer.Option(
        help="(b)'s route: certify (every t above the calibrated floor), faster (t bins where "
             "the exact engine is faster, timed once, go to it) or auto (faster, on every data "
             "set and device).")] = "auto",
    json_out: JsonOutOption = None,
) -> None:
    """Certified kNN velocity (b) against the exact engine (a) and top-k truncation (c), with
    the oracle: how many training points an ideal estimator would weigh."""
    from knnflow.bench import bench_knn, save_json

    ts = t_grid_of(t_grid, old_t, DEFAULT_T_GRID)
    check_output_file(json_out, "json_out", [index, root])
    with progress_bar() as progress:
        result = bench_knn(dataset=dataset, root=str(root) if root else None, limit=limit,
                           ts=ts, batch=batch, tol=tol, repeats=repeats, index_folder=index,
                           device=device, search_device=search_device, route=route, size=size,
                           progress=progress)
    c = result.config
    routed = c["route"] == "faster"
    table = Table(title=(f"Certified kNN û*: {data_text(c)}, n={c['n']}, d={c['d']}, batch "
                         f"{c['batch']}, tol {c['tol']:g}, {machine_text(c)}"),
                  title_justify="left")
    topk_names = list(result.rows[0].topk_qps) if result.rows else []
    columns = ["t", "(a) q/s", "(b) q/s", "b/a", *[f"{name} q/s" for name in topk_names],
               "err (b) med/max",
               "bound med/max", "fallback", *(["routed"] if routed else []), "viol.",
               "evaluated", "oracle med/p90"]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        table.add_row(
            row.label, f"{row.exact_qps:.0f}", f"{row.certified_qps:.0f}", f"{row.speedup:.2f}×",
            *[f"{row.topk_qps[name]:.0f}" for name in topk_names],
            f"{row.error_median:.0e}/{row.error_max:.0e}",
            f"{row.bound_median:.0e}/{row.bound_max:.0e}", f"{row.fallback:.0%}",
            *([f"{row.routed:.0%}"] if routed else []),
            str(row.violations), f"{row.evaluated_median:.0f}",
            f"{row.oracle_median:.0f}/{row.oracle_p90:.0f}")
    console.print(table)
    errors = Table(title="Uncertified top-k truncation (c): error against û*, median/max",
                   title_justify="left")
    for column in ("t", *topk_names):
        errors.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        errors.add_row(row.label, *[f"{row.topk_error[name][0]:.0e}/{row.topk_error[name][1]:.0e}"
                                    for name in topk_names])
    console.print(errors)
    if routed and c.get("route_timings"):
        low, high = c["floors"][0], c["floors"][1]
        exact_band = (f"t in [{low:g}, {high:g}) goes to the exact engine" if high > low
                      else "no t goes to the exact engine")
        routes = Table(title=(f"(b)'s route table: t below {low:g} falls back, {exact_band} "
                              "(probe timings, median of interleaved rounds)"),
                       title_justify="left")
        for column in ("t bin", "exact ms", "certified ms", "certified/exact", "route"):
            routes.add_column(column, justify="right", no_wrap=True)
        for row in c["route_timings"]:
            ratio = row["certified"] / row["exact"]
            routes.add_row(f"[{row['t_low']:g}, {row['t_high']:g})", f"{row['exact'] * 1e3:.1f}",
                           f"{row['certified'] * 1e3:.1f}", f"{ratio:.2f}",
                           "certify" if row["t_low"] >= c["floors"][1] else "exact")
        console.print(routes)
    console.print("(a) the exact engine; (b) KNNVelocity, certified; top-k: (c), uncertified. "
                  "Errors and bounds are relative to ‖û*‖ from the exact engine in float64; a "
                  "violation is a certified row (not fallback or routed) whose error exceeds "
                  "its bound; evaluated: median training points touched "
                  "in full dimension per query; oracle: median/90th percentile of the training "
                  f"points whose logit lies within 20 + ln n = {c['oracle_window']:.1f} nats of "
                  "the query's best (float64), the fewest an ideal estimator would weigh"
                  + ("; routed: sent to the exact engine, faster at their t (--route)."
                     if routed else "."))
    if json_out:
        save_json(result.to_dict(), json_out)


@app.command("memorization")
@flags_named({"index_folder": "--index", "ts": "--t-grid"})
def memorization(
    dataset: DatasetOption = None,
    root: RootOption = None,
    limit: LimitOption = None,
    size: SizeOption = None,
    samples: Annotated[int, typer.Option(
        help="Samples searched per call: half held-out test images, half training images "
             "plus Gaussian noise of std --noise.")] = 1024,
    noise: Annotated[float, typer.Option(
        help="Std σ of the Gaussian noise on the near-copy samples (pixels in [-1, 1]).")]
    = 0.05,
    t_grid: Annotated[Optional[str], typer.Option(
        help="Also time the search the certified velocity does: the nearest neighbours of "
             "x_t/t, x_t = (1-t)·x0 + t·x1 (x1 held-out), one row per t; a comma list or "
             "START:STOP:STEP, every t in (0, 1). Default: no t rows.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed calls per method (median).")] = 3,
    index: IndexOption = None,
    json_out: JsonOutOption = None,
) -> None:
    """Nearest training images (k = 2): torch.cdist + topk (a) against knnflow's exact search
    (b) and FAISS flat search with float64 re-ranking (c), ids checked against float64."""
    from knnflow.bench import bench_memorization, parse_t_grid, save_json

    ts = parse_t_grid(t_grid) if t_grid is not None else ()
    check_output_file(json_out, "json_out", [index, root])
    with progress_bar() as progress:
        result = bench_memorization(dataset=dataset, root=str(root) if root else None,
                                    limit=limit, samples=samples, noise=noise, repeats=repeats,
                                    index_folder=index, ts=ts, size=size, progress=progress)
    c = result.config
    table = Table(title=(f"Nearest training images (k=2): {data_text(c)}, n={c['n']}, "
                         f"d={c['d']}, {c['samples']} samples (noise σ {c['noise']:g}), cpu "
                         f"({c['threads']} threads)"), title_justify="left")
    for column in ("method", "samples/s", "vs (a)", "ids ≠ float64", "d1 rel. error vs float64",
                   "brute force", "peak extra mem"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        table.add_row(row.method, f"{row.samples_per_s:.0f}", f"{row.speedup:.2f}×",
                      str(row.id_mismatches), f"{row.d1_rel_error_max:.1e}",
                      "" if row.fallback is None else str(row.fallback),
                      human_bytes(row.peak_bytes))
    console.print(table)
    if result.t_rows:
        t_table = Table(title="Nearest neighbours of x_t/t (the certified velocity's search): "
                              "(a) cdist + topk, (b) knnflow exact search", title_justify="left")
        for column in ("t", "(a) samples/s", "(b) samples/s", "b/a", "ids ≠ float64 (a)",
                       "ids ≠ float64 (b)", "(b) brute force", "(b) evaluated"):
            t_table.add_column(column, justify="right", no_wrap=True)
        for row in result.t_rows:
            t_table.add_row(f"{row.t:g}", f"{row.cdist_per_s:.0f}", f"{row.search_per_s:.0f}",
                            f"{row.speedup:.2f}×", str(row.cdist_mismatches),
                            str(row.search_mismatches), str(row.fallback),
                            "" if row.evaluated_median is None
                            else f"{row.evaluated_median:.0f}")
        console.print(t_table)
    if c["search"] == "sketch":
        console.print(f"(b) read a median of {c['evaluated_median']:.0f} training points per "
                      "sample in full dimension; the index's sketches ruled out the rest "
                      f"({c['fallback']} samples they could not settle took the GEMM brute "
                      "force).")
    else:
        console.print(f"(b) searched by {c['search']}: on data this small (n < 4096 or "
                      "d < 256) the sketches do not pay.")
    console.print("ids ≠ float64: samples whose 2 nearest ids differ from a float64 brute force "
                  "(exact ties in either order agree); d1 errors: max over samples of "
                  "|d1 - d1_ref| / d1_ref.")
    if json_out:
        save_json(result.to_dict(), json_out)


@app.command("targets")
@flags_named({"index_folder": "--index"})
def targets(
    dataset: Annotated[Optional[str], typer.Option(
        help=f"Data set: train split as data (default {DEFAULT_DATASET}; with --index, the "
             "index's).")] = None,
    root: RootOption = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Use only the first N training images.")] = None,
    size: SizeOption = None,
    batch: Annotated[int, typer.Option(help="Rows per batch (one batch per t bin).")] = 128,
    bins: Annotated[int, typer.Option(help="Equal-width t bins over [0, 1).")] = 10,
    tol: Annotated[float, typer.Option(help="knn-efm's tolerance.")] = 1e-4,
    index: IndexOption = None,
    json_out: JsonOutOption = None,
) -> None:
    """Training targets against û*: mean ‖target - û*‖² per t bin and ms per batch for cfm,
    efm-128, efm-1000, efm-128 (shared pool) and knn-efm, on the same (x0, x1, t)."""
    from knnflow.bench import bench_targets, save_json

    check_output_file(json_out, "json_out", [index, root])
    with progress_bar() as progress:
        result = bench_targets(dataset=dataset, root=str(root) if root else None, limit=limit,
                               batch=batch, bins=bins, tol=tol, index_folder=index,
                               size=size, progress=progress)
    c = result.config
    table = Table(title=(f"Targets: mean ‖target - û*‖² per t bin, {data_text(c)}, n={c['n']}, "
                         f"d={c['d']}, batch {c['batch']}, cpu ({c['threads']} threads)"),
                  title_justify="left")
    table.add_column("t bin", no_wrap=True)
    for label in result.error:
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("knn-efm fallback", justify="right", no_wrap=True)
    table.add_column("knn-efm routed", justify="right", no_wrap=True)
    for i, label in enumerate(result.bins):
        table.add_row(label, *[f"{result.error[name][i]:.2e}" for name in result.error],
                      f"{result.fallback[i]:.0%}", f"{result.routed[i]:.0%}")
    table.add_row("ms / batch", *[f"{result.ms_per_batch[name]:.1f}" for name in result.error],
                  "", "", style="bold")
    console.print(table)
    console.print("efm pools are independent (the paper's algorithm) unless marked shared (its "
                  "released code); û* from the exact engine; ms: median over the bins.")
    if json_out:
        save_json(result.to_dict(), json_out)


@app.command("train")
@flags_named({"index_folder": "--index"})
def train(
    dataset: Annotated[Optional[str], typer.Option(
        help=f"Data set: train split as data (default {DEFAULT_DATASET}; with --index, the "
             "index's).")] = None,
    root: RootOption = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Use only the first N training images.")] = None,
    size: SizeOption = None,
    preset: Annotated[str, typer.Option(help="Model preset (see knnflow train --help).")]
    = "tiny",
    targets: Annotated[str, typer.Option(
        help="Comma-separated targets: cfm, exact, knn-efm (knn-efm-certify, knn-efm-faster: "
             "with that --knn-route), efm-M or efm-M-shared (M a number or n, the data set's "
             "size).")] = "cfm,efm-128,knn-efm,exact",
    batch: Annotated[int, typer.Option(help="Training pairs per step.")] = 128,
    steps: Annotated[int, typer.Option(help="Timed steps per target (median taken).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps per target first.")] = 3,
    tol: Annotated[float, typer.Option(help="knn-efm's tolerance.")] = 1e-4,
    device: DeviceOption = "cpu",
    prefetch: Annotated[Optional[bool], typer.Option(
        "--prefetch/--no-prefetch",
        help="Compute the next batch's target in a background thread while the network "
             "trains (default: on GPUs, as knnflow train does).")] = None,
    index: IndexOption = None,
    knn_search_device: Annotated[str, typer.Option(
        help="cpu, cuda or auto: where knn-efm's certified search runs (its exact fallback "
             "runs on --device).")] = "cpu",
    json_out: JsonOutOption = None,
) -> None:
    """Training step time with each target relative to cfm, in one run: each target trains its
    own copy of the model on the same (x0, x1, t), taking turns step by step."""
    from knnflow.bench import bench_train, save_json

    labels = tuple(part.strip() for part in targets.split(",") if part.strip())
    if not labels:
        raise InputError("--targets is empty")
    check_output_file(json_out, "json_out", [index, root])
    with progress_bar() as progress:
        result = bench_train(dataset=dataset, root=str(root) if root else None, limit=limit,
                             preset=preset, targets=labels, batch=batch, steps=steps,
                             warmup=warmup, device=device, tol=tol, index_folder=index,
                             prefetch=prefetch, knn_search_device=knn_search_device,
                             size=size, progress=progress)
    c = result.config
    table = Table(title=(f"Training step time: {data_text(c)}, n={c['n']}, preset {c['preset']} "
                         f"({c['parameters']:,} parameters), batch {c['batch']}, "
                         f"{machine_text(c)}"), title_justify="left")
    for column in ("target", "ms / step", "ms on target", "× cfm", "knn fallback", "knn routed"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        table.add_row(row.target, f"{row.ms_step:.1f}", f"{row.ms_target:.1f}",
                      f"{row.ratio:.2f}×", "" if row.fallback is None else f"{row.fallback:.0%}",
                      "" if row.routed is None else f"{row.routed:.0%}")
    console.print(table)
    console.print(f"Median over {c['steps']} steps after {c['warmup']} warm-up steps; a step is "
                  "the target, forward, backward, clipping, Adam and the EMA update"
                  + (", with the next target computed during the step (prefetch)."
                     if c["prefetch"] else "."))
    if json_out:
        save_json(result.to_dict(), json_out)


@app.command("scale")
@flags_named({"ts": "--t-grid"})
def scale(
    ns: Annotated[str, typer.Option(
        help="Training set sizes n, a comma list, stored in float16 (n = 1,000,000 at "
             "3×32×32 takes 6 GB of disk and about 17 GB of memory).")]
    = "10000,100000,1000000",
    dataset: Annotated[str, typer.Option(
        help="Training images: synthetic (made for any n), or a real set such as "
             "photos-dense (705,515 photo patches; past that, the first n/2 and their mirror "
             "images). Queries come from its test split.")] = "synthetic",
    t_grid: Annotated[str, typer.Option(help=T_GRID_HELP)] = "0.3,0.5,0.7,0.9",
    uniform: Annotated[bool, typer.Option(
        help=f"Add the {UNIFORM_LABEL} row: one seeded t per query, as training draws them.")]
    = True,
    batch: Annotated[int, typer.Option(help="Queries per call.")] = 256,
    tol: Annotated[float, typer.Option(help="KNNVelocity's relative tolerance.")] = 1e-4,
    repeats: Annotated[int, typer.Option(help="Timed calls per measurement (median taken).")]
    = 3,
    work: Annotated[Path, typer.Option(
        help="Folder for the indices of each n (built once, reused by later runs).")]
    = Path("indices/scale"),
    json_out: JsonOutOption = None,
) -> None:
    """Scale sweep: exact engine, certified kNN and exact search at each n, with fitted
    exponents of time against n."""
    from knnflow.bench import parse_t_grid, save_json
    from knnflow.bench.scale import bench_scale

    try:
        sizes = tuple(int(part.replace("_", "")) for part in ns.split(","))
    except ValueError:
        raise InputError(f"--ns takes a comma list of integers, got {ns!r}") from None
    with progress_bar() as progress:
        result = bench_scale(ns=sizes, ts=parse_t_grid(t_grid), uniform=uniform, batch=batch,
                             tol=tol, repeats=repeats, work=work, progress=progress,
                             dataset=dataset)
    c = result.config
    table = Table(title=(f"Scale: {c['data']} (d = {c['d']}) in float16, batch {c['batch']}, tol "
                         f"{c['tol']:g}, cpu ({c['threads']} threads); ms per batch"),
                  title_justify="left")
    for column in ("n", "t", "exact ms", "certified ms", "certified/exact speed", "fallback",
                   "routed", "violations"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        table.add_row(f"{row.n:,}", row.label, f"{row.exact_ms:.0f}", f"{row.certified_ms:.0f}",
                      f"{row.speedup:.2f}×", f"{row.fallback:.0%}", f"{row.routed:.0%}",
                      f"{row.violations} of {row.certified_rows}")
    console.print(table)
    search = Table(title=f"Exact search, k = 2, {c['batch']} held-out images",
                   title_justify="left")
    for column in ("n", "cdist + topk ms", "Index.search ms", "speed-up", "ids ≠ float64"):
        search.add_column(column, justify="right", no_wrap=True)
    for row in result.search:
        search.add_row(f"{row.n:,}", f"{row.cdist_ms:.0f}", f"{row.search_ms:.0f}",
                       f"{row.speedup:.2f}×", str(row.id_mismatches))
    console.print(search)
    if result.exponents:
        console.print("time ∝ n^b, fitted b: " + "; ".join(
            f"{name} {value:.2f}" for name, value in result.exponents.items()))
    if json_out:
        save_json(result.to_dict(), json_out)
