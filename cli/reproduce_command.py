"""knnflow reproduce: the paper's comparison on a data set, end to end."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from knnflow.choices import REPRODUCE_DATASETS as DATASETS

from .console import console, err_console, progress_bar


def reproduce(
    dataset: Annotated[str, typer.Argument(
        help=f"Data set: {', '.join(DATASETS)}. mnist reads the MNIST idx files and "
             "cifar10 the CIFAR-10 python batches from --root; both are meant for a GPU "
             "(--device cuda).", show_default=False)],
    budget: Annotated[str, typer.Option(
        help="small or full. digits small: 800 steps per target, one seed, about 15 minutes "
             "on a 2-core CPU; digits full: 4000 steps, seeds 0 and 1. mnist: the tiny "
             "preset, 2,000 steps in small, 20,000 and two seeds in full. cifar10: the "
             "paper's settings (cifar preset, batch 128, lr 2e-4, flips), 20,000 steps in "
             "small and the paper's 500,000 in full.")] = "small",
    root: Annotated[Optional[Path], typer.Option(
        help="Folder holding the data set's files (default: data/NAME).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        help="Replace the budget's training steps (the same for every target).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Train on the first N training images only (a quick trial; the numbers are then "
             "not those of the data set).")] = None,
    threads: Annotated[Optional[int], typer.Option(
        help="CPU threads of torch and of numpy/scipy's BLAS (default: 1 for digits: on a "
             "2-core machine a second thread made its tiny convolutions 1.3-1.9× faster when "
             "idle but up to 10× slower while another process used the other core; the "
             "libraries' defaults for cifar10).")] = None,
    device: Annotated[str, typer.Option(
        help="cpu or cuda: training, sampling, the classifier and the network's analyses.")]
    = "cpu",
    work: Annotated[Optional[Path], typer.Option(
        help="Work folder for the index, classifier, runs and analyses (default: "
             "runs/reproduce-DATASET-BUDGET). Finished stages found there are reused.",
        show_default=False)] = None,
    out_md: Annotated[Optional[Path], typer.Option(
        help="Markdown page to write (default: docs/results/DATASET.md); its figures go to "
             "the folder of the same name beside it.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Delete the work folder and start again instead of reusing finished stages.")]
    = False,
) -> None:
    """Train cfm, efm-128, efm-n (M = n; 1000 on cifar10, the paper's largest) and knn-efm
    with equal budgets and seeds; run FID (classifier features), memorization, velocity error
    and hybrid sampling on each, and collapse on the data set; write a markdown page with one
    table, figures and a verdict on each of the paper's claims. Rerunning resumes: finished
    stages are reused."""
    from knnflow.analysis.reproduce import check_dataset, get_budget
    from knnflow.analysis.reproduce import reproduce as run_reproduction
    from knnflow.devices import resolve_device

    check_dataset(dataset)
    resolve_device(device, allow_auto=False)
    chosen = get_budget(dataset, budget, steps=steps, limit=limit, threads=threads)
    command = shlex.join(["knnflow", *sys.argv[1:]])
    with progress_bar() as progress:
        result = run_reproduction(
            dataset, chosen, root=root, work=work, out_md=out_md, device=device,
            overwrite=overwrite, command=command, progress=progress,
            log=lambda text: err_console.print(text, highlight=False, markup=False,
                                             soft_wrap=True))
    table = Table(title=f"knnflow reproduce {dataset} ({chosen.name}: {chosen.steps:,} steps, "
                        f"seed{'s' if len(chosen.seeds) > 1 else ''} "
                        f"{', '.join(map(str, chosen.seeds))})", title_justify="left",
                  caption="\n".join(f"{v.title}: {v.verdict}" for v in result.verdicts)
                  + f"\nwritten to {result.markdown} (work folder {result.work}, "
                    f"{result.seconds:.0f} s)", caption_justify="left")
    for column in ("target", "final loss", "ms/step", "FID", "memorized", "mean d1",
                   "velocity error", "copies from τ"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for row in result.rows:
        table.add_row(row.label, row.loss.text(), f"{row.ms_step:.0f}", row.fid.text(),
                      f"{100 * row.memorized:.1f}%", f"{row.d1:.3g}", row.velocity_error.text(),
                      " / ".join("—" if t is None else f"{t:g}" for t in row.copy_tau))
    console.print(table)

