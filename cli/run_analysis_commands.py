"""knnflow velocity-error and knnflow hybrid: analyses of a trained run against û*."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from knnflow.choices import COPY_FRACTION, GRID_ROWS, SOLVERS, WEIGHT_LABELS, WEIGHT_SETS
from knnflow.choices import HYBRID_REFERENCE as REFERENCE_SIZE
from knnflow.choices import HYBRID_TAUS as DEFAULT_TAUS
from knnflow.errors import InputError
from knnflow.files import check_output_folder
from knnflow.threads import cpu_threads

from .console import console, progress_bar
from .threads import ThreadsOption

WEIGHT_CHOICES = {"both": WEIGHT_SETS, "ema": ("ema",), "raw": ("raw",)}

RunArgument = Annotated[Path, typer.Argument(
    help="Run folder written by knnflow train (config.json and checkpoints/).",
    show_default=False)]
IndexOption = Annotated[Optional[Path], typer.Option(
    help="Index folder of the run's training images (knnflow build-index DATASET, with --flip "
         "for a --flip run): û* from the certified KNNVelocity instead of the exact engine, "
         "for large data.")]


def _tol(value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise InputError(f"--tol must be a positive number, got {value}")
    return value


TolOption = Annotated[float, typer.Option(
    help="With --index: error tolerance of û* relative to ‖û*‖ (certified).", callback=_tol)]
BatchOption = Annotated[int, typer.Option(help="Queries per batch.")]
DeviceOption = Annotated[str, typer.Option(help="cpu or cuda (the network and û*).")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace an existing output folder.")]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print only the JSON summary on stdout, for scripts.")]



def _output_folder(out: Path | None, run: Path, name: str, overwrite: bool,
                   index: Path | None = None) -> Path:
    return check_output_folder(out if out is not None else run / name, overwrite, name,
                               [run, index])


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def velocity_error(
    run: RunArgument,
    t_bins: Annotated[int, typer.Option(
        help="Equal bins of t over [0, 1 - 1e-4] (t = 0 noise, t = 1 data).")] = 20,
    n: Annotated[int, typer.Option(
        "--n", help="Queries per t bin (x1 from the training images, x0 ~ N(0, I), t uniform "
                    "in the bin).")] = 512,
    weights: Annotated[str, typer.Option(
        help="Weight sets to measure: both, ema or raw.")] = "both",
    index: IndexOption = None,
    tol: TolOption = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed of the queries (x1, x0 and t).")] = 0,
    batch_size: BatchOption = 256,
    device: DeviceOption = "cpu",
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default: RUN/velocity-error).")] = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    threads: ThreadsOption = None,
) -> None:
    """E‖u_θ(x_t, t) - û*(x_t, t)‖² per t bin for a trained run, EMA and raw weights (paper
    Figure 2, left); writes velocity_error.png, velocity_error.csv and summary.json."""
    from knnflow.analysis.velocity_error import (
        check_counts,
        velocity_error_of_run,
        write_velocity_error,
    )

    check_counts(t_bins, n)
    if weights not in WEIGHT_CHOICES:
        raise InputError(f"unknown --weights {weights!r}; choose both, ema or raw")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    from knnflow.devices import resolve_device

    device = resolve_device(device, allow_auto=False)
    target = _output_folder(out, run, "velocity-error", overwrite, index)
    with progress_bar() as progress, cpu_threads(threads):
        result, summary = velocity_error_of_run(
            run, weights=WEIGHT_CHOICES[weights], t_bins=t_bins, n=n, seed=seed, index=index,
            tol=tol, batch_size=batch_size, device=device, progress=progress)
    write_velocity_error(target, result, summary, overwrite)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    names = list(result.errors)
    peaks = "\n".join(f"{WEIGHT_LABELS[name]}: peak at t ≈ {result.peak(name)['t']:.3g}"
                      for name in names)
    table = Table(title=f"E‖u_θ − û*‖², {n} queries per t bin", title_justify="left",
                  caption=f"{peaks}\nsum over d = {result.dim}; written to {target}",
                  caption_justify="left")
    table.add_column("t bin", justify="right")
    for name in names:
        table.add_column(WEIGHT_LABELS[name], justify="right")
    table.add_column("E‖û*‖²", justify="right")
    for b in range(t_bins):
        marks = [" ◀ peak" if result.peak(name)["bin"] == b else "" for name in names]
        table.add_row(f"{result.edges[b]:.3f}–{result.edges[b + 1]:.3f}",
                      *[_fmt(result.errors[name][b]) + mark
                        for name, mark in zip(names, marks, strict=True)],
                      _fmt(result.target_sq[b]))
    console.print(table)


def hybrid(
    run: RunArgument,
    taus: Annotated[str, typer.Option(
        help="Switch times τ in [0, 1]: comma-separated (0,0.5,1), or start:stop:count "
             "(0.8:1:11 is 11 evenly spaced values from 0.8 to 1).")] = DEFAULT_TAUS,
    n: Annotated[int, typer.Option("--n", help="Noises (samples per τ).")] = 256,
    seed: Annotated[int, typer.Option(
        help="Seed of the noises (the noises of knnflow sample RUN --seed).")] = 0,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")] = True,
    solver: Annotated[str, typer.Option(help=f"ODE solver: {', '.join(SOLVERS)}.")] = "euler",
    steps: Annotated[int, typer.Option(
        help="Steps of fixed-step solvers over [0, 1]: ceil(τ·steps) on [0, τ], "
             "ceil((1-τ)·steps) on [τ, 1].")] = 100,
    atol: Annotated[float, typer.Option(help="dopri5: absolute tolerance.")] = 1e-5,
    rtol: Annotated[float, typer.Option(help="dopri5: relative tolerance.")] = 1e-5,
    index: IndexOption = None,
    tol: TolOption = 1e-4,
    threshold: Annotated[str, typer.Option(
        help="A sample is memorized when d1/d2 < THRESHOLD; a number or fraction in (0, 1].")]
    = "1/3",
    copy_fraction: Annotated[float, typer.Option(
        help="Copy onset: the smallest τ from which the memorized fraction stays at least "
             "this at every larger τ.")] = COPY_FRACTION,
    rows: Annotated[int, typer.Option(help="Noises shown as rows of grid.png.")] = GRID_ROWS,
    reference_size: Annotated[int, typer.Option(
        help="Training images in the train-to-train distance reference.")] = REFERENCE_SIZE,
    batch_size: Annotated[int, typer.Option(
        help="Noises per batch (256 as knnflow sample, so τ = 0 reproduces it exactly).")]
    = 256,
    device: DeviceOption = "cpu",
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default: RUN/hybrid).")] = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Follow û* on [0, τ], then the network on [τ, 1], from fixed noises (paper Figure 3);
    writes hybrid.png, grid.png, hybrid.csv, summary.json and samples.npz."""
    from knnflow.analysis.hybrid import check_options, hybrid_of_run
    from knnflow.analysis.hybrid_report import solver_text, write_hybrid
    from knnflow.devices import resolve_device

    values = check_options(taus, n, solver, steps, threshold, copy_fraction, reference_size,
                           batch_size)
    if rows < 1:
        raise InputError(f"--rows must be at least 1, got {rows}")
    device = resolve_device(device, allow_auto=False)
    target = _output_folder(out, run, "hybrid", overwrite, index)
    with progress_bar() as progress, cpu_threads(threads):
        result, summary = hybrid_of_run(
            run, taus=values, n=n, seed=seed, ema=ema, solver=solver, steps=steps, atol=atol,
            rtol=rtol, index=index, tol=tol, threshold=threshold, copy_fraction=copy_fraction,
            reference_size=reference_size, batch_size=batch_size, device=device,
            progress=progress)
    write_hybrid(target, result, summary, overwrite, rows)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    onset = summary["copy_tau"]
    table = Table(title=f"Hybrid sampling: û* on [0, τ], network on [τ, 1] ({n} noises, "
                        f"{solver_text(summary)})", title_justify="left",
                  caption=(f"copies from τ = {onset:g}" if onset is not None else
                           "no τ where the samples stay copies")
                  + f": {summary['copy_rule']}\nwritten to {target}",
                  caption_justify="left")
    for column in ("τ", "steps û* + net", "mean d1", "memorized", "mean distance to τ = 1"):
        table.add_column(column, justify="right")
    adaptive = summary["steps"] is None
    for row in result.rows():
        table.add_row(f"{row['tau']:g}",
                      "adaptive" if adaptive else
                      f"{row['closed_form_steps']} + {row['network_steps']}",
                      _fmt(row["d1_mean"]),
                      f"{row['memorized_count']} ({100 * row['memorized_fraction']:.1f}%)",
                      _fmt(row["to_closed_form_mean"]))
    table.add_row("train→train", "", _fmt(summary["train_to_train_mean"]), "", "")
    console.print(table)
