"""knnflow memorization: nearest training images of generated samples, with a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from knnflow.choices import MEMORIZATION_REFERENCE

from .console import console, err_console, progress_bar


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def memorization(
    samples: Annotated[Path, typer.Argument(
        help="Generated samples: a folder of images (png, jpg; nested folders allowed), an "
             ".npz or .npy array N×C×H×W in [-1, 1] or uint8 0..255, or a run's samples "
             "folder (holding samples.npz).", show_default=False)],
    index: Annotated[Optional[Path], typer.Option(
        help="Index folder of the training set (from knnflow build-index). Without it and "
             "--dataset: the training set the samples record (a run's samples folder, "
             "closed-form samples), else the default data set, digits.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Training data set instead of --index: its index is built on first use and "
             "cached under indices/.")] = None,
    root: Annotated[Optional[Path], typer.Option(
        help="Folder holding --dataset's files (default: data/NAME).")] = None,
    threshold: Annotated[str, typer.Option(
        help="A sample is memorized when d1/d2 < THRESHOLD; a number or fraction in (0, 1].")]
    = "1/3",
    k: Annotated[int, typer.Option(
        "--k", help="Nearest training images per sample (at least 2); the CSV lists d1..dk.")]
    = 2,
    out: Annotated[Optional[Path], typer.Option(
        help="Report folder (default: SAMPLES-memorization beside SAMPLES).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print only the summary as JSON on stdout, for scripts.")] = False,
    approximate: Annotated[bool, typer.Option(
        help="Allow approximate search (an IVF index's nprobe lists); the summary says so.")]
    = False,
    resize: Annotated[bool, typer.Option(
        help="Resize samples of another size or channel count to the index's image shape.")]
    = False,
    reference_size: Annotated[int, typer.Option(
        help="Training images in the leave-one-out train-to-train reference.")]
    = MEMORIZATION_REFERENCE,
    batch_size: Annotated[int, typer.Option(help="Samples searched per batch.")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")]
    = False,
) -> None:
    """How close generated samples lie to the training set: d1, d2, the ratio test and a
    train-to-train reference, written to memorization.csv, summary.json, histogram.png and
    nearest.png."""
    from knnflow.api import memorization as score

    def log(text: str) -> None:
        if not as_json:
            err_console.print(text, soft_wrap=True)

    with progress_bar() as progress:
        summary = score(samples, index=index, dataset=dataset, root=root, threshold=threshold,
                        k=k, out=out, approximate=approximate, resize=resize,
                        reference_size=reference_size, batch_size=batch_size,
                        overwrite=overwrite, progress=progress, log=log)
    folder, compared = summary.pop("report"), summary["compared_against"]
    for grid in summary["skipped_grids"]:
        err_console.print(f"note: skipped {grid}, the grid picture knnflow sample writes "
                          "beside its samples", soft_wrap=True)
    if summary["skipped_files"]:
        err_console.print(f"warning: skipped {summary['skipped_files']} files that are not "
                          "images")
    if index is None and dataset is None and not as_json:
        err_console.print(f"note: compared against {compared}; pass --index DIR or "
                          "--dataset NAME to pick another training set", soft_wrap=True)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    d1, ref, mem = summary["d1"], summary["reference"], summary["memorized"]
    table = Table(title=f"Memorization of {summary['n_samples']} samples "
                        f"({summary['input']}) against {summary['n_train']} training images",
                  title_justify="left", caption=f"report written to {folder}",
                  caption_justify="left")
    table.add_column("", style="bold")
    table.add_column("L2 (pixels in [-1, 1])", justify="right")
    table.add_column("L2 / √d", justify="right")
    root_d = summary["d"] ** 0.5
    for label, key in (("d1 mean", "mean"), ("d1 median", "median"), ("d1 5%", "q05"),
                       ("d1 95%", "q95"), ("d1 min", "min")):
        table.add_row(label, _fmt(d1[key]), _fmt(d1[key] / root_d))
    table.add_row(f"train-to-train mean ({ref['train_images']} images)", _fmt(ref["mean"]),
                  _fmt(ref["mean_over_sqrt_d"]))
    table.add_row("d1 mean / reference mean", _fmt(summary["d1_mean_over_reference_mean"]), "")
    table.add_row(f"memorized ({mem['rule']})",
                  f"{mem['count']} ({100 * mem['fraction']:.2f}%)", "")
    table.add_row("search", f"{'exact' if summary['exact'] else 'APPROXIMATE'} "
                  f"({summary['search']})", "")
    console.print(table)
