"""knnflow memorization: nearest training images of generated samples, with a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from knnflow.data import dataset_sources, load_dataset
from knnflow.errors import IndexMismatchError, InputError
from knnflow.files import check_output_folder
from knnflow.index import Index
from knnflow.memorization import REFERENCE_SIZE, default_out, parse_threshold, run_memorization

from .console import console, err_console, progress_bar
from .data_commands import build_dataset_index, default_index_folder


def cached_index_folder(dataset: str, approximate: bool) -> Path:
    """Where --dataset NAME keeps its index: indices/NAME-train (-ivf for --approximate)."""
    folder = default_index_folder(dataset, "train")
    return folder.with_name(folder.name + "-ivf") if approximate else folder


def open_index(index: Path | None, dataset: str | None, root: Path | None, approximate: bool,
               progress) -> Index:
    """--index DIR, or --dataset NAME: the cached index under indices/, built on first use."""
    if (index is None) == (dataset is None):
        raise InputError("pass exactly one of --index DIR or --dataset NAME")
    if index is not None:
        return Index.load(index)
    folder = cached_index_folder(dataset, approximate)
    if folder.exists():
        cached = Index.load(folder)
        made = cached.manifest.get("dataset") or {}
        rebuild = (f"pass --index, or rebuild it with knnflow build-index {dataset} "
                   + (f"--root {root} " if root is not None else "") + f"--out {folder} "
                   "--overwrite")
        if made.get("limit") is not None or made.get("flip"):
            which = f"the first {made['limit']}" if made.get("limit") else "other"
            raise InputError(f"the cached index {folder} holds {which} images of {dataset}, "
                             f"not its whole training set: {rebuild}")
        # The points' checksum decides, not the recorded root: the same files may sit
        # elsewhere, and other files under the same name must not pass.
        progress(f"checking {folder} against {dataset}", 0, 1)
        try:
            cached.verify_points(load_dataset(dataset, root=root, split="train"))
        except IndexMismatchError:
            built = made.get("root") or "the default place"
            raise InputError(
                f"the cached index {folder} was built from other images than {dataset} at "
                f"{root or 'the default place'} (points checksum differs; it was built from "
                f"{built}): {rebuild}") from None
        progress(f"checking {folder} against {dataset}", 1, 1)
        return cached
    build_dataset_index(dataset, folder, progress, root=root,
                        kind="ivf" if approximate else "flat")
    err_console.print(f"built and cached the index of {dataset} at {folder}")
    return Index.load(folder)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def memorization(
    samples: Annotated[Path, typer.Argument(
        help="Generated samples: a folder of images (png, jpg; nested folders allowed), an "
             ".npz or .npy array N×C×H×W in [-1, 1] or uint8 0..255, or a run's samples "
             "folder (holding samples.npz).", show_default=False)],
    index: Annotated[Optional[Path], typer.Option(
        help="Index folder of the training set (from knnflow build-index).")] = None,
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
    = REFERENCE_SIZE,
    batch_size: Annotated[int, typer.Option(help="Samples searched per batch.")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")]
    = False,
) -> None:
    """How close generated samples lie to the training set: d1, d2, the ratio test and a
    train-to-train reference, written to memorization.csv, summary.json, histogram.png and
    nearest.png."""
    parse_threshold(threshold)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    cached = None if dataset is None else cached_index_folder(dataset, approximate)
    target = check_output_folder(out if out is not None else default_out(samples), overwrite,
                                 "memorization", [samples, index, cached,
                                                  *dataset_sources(dataset, root)])
    with progress_bar() as progress:
        opened = open_index(index, dataset, root, approximate, progress)
        if approximate and opened.kind == "flat" and not as_json:
            err_console.print("note: a flat index searches exactly; --approximate changes "
                              "nothing")
        summary, folder = run_memorization(
            samples, opened, threshold=threshold, k=k, out=target, approximate=approximate,
            resize=resize, reference_size=reference_size, batch_size=batch_size,
            overwrite=overwrite, progress=progress)
    if summary["skipped_files"]:
        err_console.print(f"warning: skipped {summary['skipped_files']} files that are not "
                          "images")
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
