"""knnflow collapse (paper Figure 1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from knnflow.choices import COLLAPSE_ESTIMATORS as ESTIMATORS
from knnflow.choices import COLLAPSE_GRID as DEFAULT_GRID
from knnflow.data import dataset_sources, load_dataset
from knnflow.errors import InputError
from knnflow.files import check_output_folder
from knnflow.threads import cpu_threads

from .console import console, progress_bar
from .threads import ThreadsOption


def default_collapse_folder(dataset: str) -> Path:
    """runs/collapse-<dataset>."""
    from knnflow.training_sets import dataset_slug

    return Path("runs") / f"collapse-{dataset_slug(dataset)}"


def collapse(
    dataset: Annotated[str, typer.Argument(
        help="Training data set: digits, mnist, cifar10, celeba, photos, synthetic, folder:PATH, "
             "npz:PATH, npy:PATH.")] = "digits",
    root: Annotated[Optional[Path], typer.Option(
        help="Folder holding the data set's files (default: data/NAME).")] = None,
    split: Annotated[str, typer.Option(help="Which split is the training set: train or test.")]
    = "train",
    limit: Annotated[Optional[int], typer.Option(
        help="Use only the first N images of the split (default: all).")] = None,
    pairs: Annotated[int, typer.Option(
        help="Pairs (x0, x1), x0 ~ N(0, I) and x1 a training image; the same pairs at every t.")]
    = 256,
    t_grid: Annotated[str, typer.Option(
        help="Times t in [0, 1): start:stop:step (stop included when it lands on the grid) or "
             "a comma list such as 0,0.5,0.9.")] = DEFAULT_GRID,
    dims: Annotated[Optional[str], typer.Option(
        help="Comma list of side lengths to resize the images to, such as 8,16,32; one curve "
             "per size (default: the data set's own size only).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the pairs.")] = 0,
    estimator: Annotated[str, typer.Option(
        help=f"How û* is computed: {', '.join(ESTIMATORS)}. exact: the exact engine over all "
             "points; knn: the certified kNN estimator (index built in memory); auto: exact "
             "while n·pairs·d ≤ 2^31, else knn.")] = "auto",
    tol: Annotated[float, typer.Option(
        help="knn: error tolerance on û* relative to ‖û*‖.")] = 1e-4,
    out: Annotated[Optional[Path], typer.Option(
        help="Report folder (default: runs/collapse-DATASET).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print only the summary as JSON on stdout, for scripts.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Cosine between û*(x_t, t) and x1 - x0 over t, and when the softmax collapses onto one
    training point: the first t from which 90% of pairs keep their largest weight above 0.9.
    Writes collapse.png, collapse.csv, collapse_histograms.csv and summary.json."""
    from knnflow.analysis.collapse import compute_collapse, parse_sides
    from knnflow.analysis.collapse_report import write_collapse_report
    from knnflow.t_grid import format_t, parse_t_grid

    grid = parse_t_grid(t_grid)
    sides = parse_sides(dims)
    if pairs < 1:
        raise InputError(f"--pairs must be at least 1, got {pairs}")
    if estimator not in ESTIMATORS:
        raise InputError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if not tol > 0:
        raise InputError(f"--tol must be positive, got {tol}")
    target = check_output_folder(out if out is not None else default_collapse_folder(dataset),
                                 overwrite, "collapse", dataset_sources(dataset, root))
    with progress_bar() as progress, cpu_threads(threads):
        progress(f"loading {dataset}", 0, 1)
        images = load_dataset(dataset, root=root, split=split, limit=limit)
        progress(f"loading {dataset}", 1, 1)
        result = compute_collapse(images, pairs=pairs, grid=grid, sides=sides, seed=seed,
                                  estimator=estimator, tol=tol, progress=progress)
        described = {"split": split, "limit": limit, "t_grid": t_grid, "out": str(target)}
        summary = write_collapse_report(result, target, dataset=dataset, extra=described,
                                        overwrite=overwrite)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    grid_text = (f"{format_t(float(grid[0]))}…{format_t(float(grid[-1]))}, {len(grid)} points"
                 if len(grid) > 1 else format_t(float(grid[0])))
    table = Table(title=f"Collapse of û* on {dataset} (n = {result.n}, {result.pairs} pairs, "
                        f"t grid {grid_text})", title_justify="left",
                  caption=f"report written to {target}; max λ: largest softmax weight; "
                          "'from t': 90% of pairs stay above 0.9 at every later t",
                  caption_justify="left")
    for column in ("size", "d", "estimator", f"median cosine at t={format_t(float(grid[0]))}",
                   "cosine > 0.9 from t", "max λ > 0.9 from t (collapse time)"):
        table.add_column(column, justify="left" if column in ("size", "estimator") else "right")
    for row in summary["sizes"]:
        mark = " *" if row["size"] == summary["headline_size"] and len(result.sizes) > 1 else ""
        table.add_row(f"{row['size']}{mark}", str(row["d"]), row["estimator"],
                      f"{row['median_cosine_first_t']:.3f}", format_t(row["cosine_time"]),
                      format_t(row["collapse_time"]))
    console.print(table)
    console.print(f"collapse time: {format_t(summary['collapse_time'])}", highlight=False,
                  markup=False)
