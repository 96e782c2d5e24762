"""The report folder of `knnflow memorization` and the run that fills it: memorization.csv
(one row per sample: nearest training id, d1, d2, d1/d2, the verdict), summary.json,
histogram.png (d1 against the train-to-train reference) and nearest.png (the samples of
smallest d1/d2 beside their nearest and second-nearest training images).
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from knnflow.choices import MEMORIZATION_REFERENCE as REFERENCE_SIZE
from knnflow.errors import OptionError
from knnflow.files import atomic_folder
from knnflow.images import displayable
from knnflow.index import Index
from knnflow.nearest import (
    Progress,
    Scores,
    nearest_training,
    parse_threshold,
    summarize,
    threshold_text,
    train_reference,
)
from knnflow.samples import Samples, load_samples

NEAREST_PAIRS = 16


def plot_histogram(path: Path, d1: Tensor, reference: Tensor, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    values = torch.cat([d1, reference]).numpy()
    bins = np.linspace(0, max(float(values.max()), 1e-9) * 1.02, 60)
    ax.hist(d1.numpy(), bins=bins, density=True, alpha=0.6, color="tab:blue",
            label=f"samples → nearest training image (n={len(d1)})")
    ax.hist(reference.numpy(), bins=bins, density=True, alpha=0.45, color="tab:orange",
            label=f"training → nearest other training image (n={len(reference)})")
    ax.axvline(float(reference.mean()), color="tab:red", linestyle="--",
               label=f"reference mean {float(reference.mean()):.3g}")
    ax.set_xlabel("L2 distance to the nearest training image (pixels in [-1, 1])")
    ax.set_ylabel("density (each histogram has area 1)")
    ax.set_title(f"Memorization: d1 against the train-to-train reference "
                 f"(d1/d2 < {threshold_text(threshold)} flagged)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def nearest_title(memorized: int, shown: int, threshold: float) -> str:
    """nearest.png's title: it shows memorized samples only when there are some."""
    rule = f"d1/d2 < {threshold_text(threshold)}"
    if memorized == 0:
        return (f"No sample is memorized ({rule}): the {shown} samples of smallest d1/d2, "
                "beside their nearest and second-nearest training images")
    which = (f"the {memorized} memorized samples" if memorized <= shown else
             f"{shown} of the {memorized} memorized samples, those of smallest d1/d2")
    return (f"{which.capitalize()} ({rule}) beside their nearest and second-nearest "
            "training images")


def nearest_figure(samples: Samples, index: Index, scores: Scores, threshold: float,
                   count: int = NEAREST_PAIRS):
    """The figure of nearest.png and the samples it shows: the `count` samples of smallest
    d1/d2, each beside its nearest and second-nearest training images (d1, d2 under them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = scores.ratio
    order = torch.argsort(ratio, stable=True)[:count].tolist()
    cols = 4
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(3 * cols * 1.05, rows * 1.6 + 0.4),
                             dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    pictures = samples.take(order)
    shape = index.image_shape
    cmap = "gray" if shape[0] == 1 else None
    for slot, sample in enumerate(order):
        r, c = divmod(slot, cols)
        panels = axes[r, 3 * c:3 * c + 3]
        panels[0].imshow(displayable(pictures[slot]), cmap=cmap, vmin=0, vmax=1,
                         interpolation="nearest")
        panels[0].set_title(f"sample {sample}", fontsize=6)
        panels[0].text(0.5, -0.06, f"d1/d2={float(ratio[sample]):.3f}",
                       transform=panels[0].transAxes, ha="center", va="top", fontsize=6)
        for rank, ax in enumerate(panels[1:]):
            train_id = int(scores.ids[sample, rank])
            train = index.points[train_id].to(torch.float32).reshape(shape).numpy()
            ax.imshow(displayable(train), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{('1st', '2nd')[rank]}: train {train_id}", fontsize=6)
            ax.text(0.5, -0.06, f"d{rank + 1}={float(scores.distances[sample, rank]):.3g}",
                    transform=ax.transAxes, ha="center", va="top", fontsize=6)
    memorized = int((ratio < threshold).sum())
    fig.suptitle("\n".join(textwrap.wrap(nearest_title(memorized, len(order), threshold), 110,
                                          break_on_hyphens=False)),
                 fontsize=8)
    fig.tight_layout()
    return fig, order


def plot_nearest(path: Path, samples: Samples, index: Index, scores: Scores, threshold: float,
                 count: int = NEAREST_PAIRS) -> list[int]:
    """nearest.png (nearest_figure); the samples it shows."""
    import matplotlib.pyplot as plt

    fig, order = nearest_figure(samples, index, scores, threshold, count)
    fig.savefig(path)
    plt.close(fig)
    return order


def write_csv(path: Path, samples: Samples, scores: Scores, threshold: float) -> None:
    k = scores.ids.shape[1]
    ratio = scores.ratio
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "nearest_train_id", "d1", "d2", "d1_over_d2", "memorized",
                         *[f"d{j}" for j in range(3, k + 1)]])
        for i, name in enumerate(samples.names):
            d = scores.distances[i].tolist()
            writer.writerow([name, int(scores.ids[i, 0]), f"{d[0]:.9g}", f"{d[1]:.9g}",
                             f"{float(ratio[i]):.9g}", int(bool(ratio[i] < threshold)),
                             *[f"{x:.9g}" for x in d[2:]]])


def write_report(out: Path, samples: Samples, index: Index, scores: Scores,
                 reference: Tensor, summary: dict, overwrite: bool = False) -> Path:
    """Write the report folder atomically: everything goes into a temporary folder that is
    renamed to `out` once complete, so a crash leaves no half-written report."""
    with atomic_folder(out, overwrite, kind="memorization") as tmp:
        write_csv(tmp / "memorization.csv", samples, scores, summary["threshold"])
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_histogram(tmp / "histogram.png", scores.distances[:, 0], reference,
                       summary["threshold"])
        plot_nearest(tmp / "nearest.png", samples, index, scores, summary["threshold"])
    return out


def default_out(samples_path: str | Path) -> Path:
    """<folder>-memorization beside a samples folder; <stem>-memorization beside a file."""
    path = Path(samples_path).expanduser().resolve()
    name = path.name if path.is_dir() else path.stem
    return path.parent / f"{name}-memorization"


def run_memorization(samples_path: str | Path, index: Index, *, threshold: float = 1 / 3,
                     k: int = 2, out: str | Path | None = None, approximate: bool = False,
                     resize: bool = False, reference_size: int = REFERENCE_SIZE,
                     batch_size: int = 256, overwrite: bool = False,
                     progress: Progress | None = None) -> tuple[dict, Path]:
    """Score samples against an index and write the report folder; returns (summary, out)."""
    threshold = parse_threshold(threshold)
    if reference_size < 1:
        raise OptionError(f"must be at least 1, got {reference_size}", "reference_size")
    out_path = Path(out) if out is not None else default_out(samples_path)
    if out_path.exists() and not overwrite:
        raise OptionError(f"{out_path} already exists; pass {{overwrite}} to replace it",
                          "overwrite")
    samples = load_samples(samples_path, index.image_shape, resize)
    began = time.perf_counter()
    scores = nearest_training(index, samples, k=k, approximate=approximate,
                              batch_size=batch_size, progress=progress)
    _, reference = train_reference(index, reference_size, approximate=approximate,
                                   batch_size=batch_size, progress=progress)
    summary = summarize(samples, index, scores, reference, threshold,
                        time.perf_counter() - began)
    write_report(out_path, samples, index, scores, reference, summary, overwrite)
    return summary, out_path
