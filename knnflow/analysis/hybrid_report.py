"""The hybrid sampling report (hybrid_of_run's result): hybrid.png (mean d1, memorized
fraction and distance to the τ = 1 sample against τ), grid.png (samples per noise and τ, copies
framed), hybrid.csv (one row per τ), summary.json and samples.npz, written atomically by
`write_hybrid`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from knnflow.analysis.hybrid import HybridResult
from knnflow.choices import GRID_ROWS
from knnflow.files import atomic_folder
from knnflow.images import displayable
from knnflow.sampling import ADAPTIVE

CURVES_NAME, GRID_NAME, CSV_NAME = "hybrid.png", "grid.png", "hybrid.csv"
SUMMARY_NAME, ARRAYS_NAME = "summary.json", "samples.npz"


def solver_text(summary: dict) -> str:
    """The solver of a summary as printed: dopri5 with its tolerances, or a fixed-step solver
    with its step count."""
    if summary["solver"] in ADAPTIVE:
        return f"{summary['solver']}, atol {summary['atol']:g}, rtol {summary['rtol']:g}"
    return f"{summary['solver']}, {summary['steps']} steps"


def plot_title(summary: dict) -> str:
    """The figures' title: the run, its checkpoint step, weights, solver and noise count."""
    if "run" not in summary:
        return f"Hybrid sampling ({summary['n']} noises)"
    return (f"Hybrid sampling of {summary['run']} (step {summary['checkpoint_step']}, "
            f"{'EMA' if summary['weights'] == 'ema' else 'raw'} weights, "
            f"{solver_text(summary)}, {summary['n']} noises)")


def plot_curves(path: Path, result: HybridResult, title: str) -> None:
    """Mean d1, memorized fraction and distance to the τ = 1 sample against τ, the copy onset
    marked in each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows()
    taus = [r["tau"] for r in rows]
    onset = result.copy_tau
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    panels = (
        ("d1_mean", "mean L2 distance to the nearest\ntraining image (pixels in [-1, 1])",
         "tab:blue", "samples: mean d1"),
        ("memorized_fraction", f"memorized fraction (d1/d2 < {result.threshold:.3g})",
         "tab:red", "samples: memorized fraction"),
        ("to_closed_form_mean", "mean L2 distance to the pure û*\nsample of the same noise "
         "(τ = 1)", "tab:green", "samples: mean distance to τ = 1"))
    for ax, (key, ylabel, color, label) in zip(axes, panels, strict=True):
        ax.plot(taus, [r[key] for r in rows], marker="o", ms=4, color=color, label=label)
        if key == "d1_mean":
            ax.axhline(rows[0]["train_to_train_mean"], color="grey", linestyle="--", lw=1,
                       label="training → nearest other training image (mean)")
        if key == "memorized_fraction":
            ax.axhline(result.copy_fraction, color="grey", linestyle="--", lw=1,
                       label=f"copy level {result.copy_fraction:g}")
            ax.set_ylim(-0.03, 1.03)
        if onset is not None:
            ax.axvline(onset, color="black", linestyle=":", lw=1.2,
                       label=f"copies from τ = {onset:g}")
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("τ  (û* on [0, τ], network on [τ, 1]; t: 0 = noise, 1 = data)",
                      fontsize=8)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_grid(path: Path, result: HybridResult, title: str, rows: int = GRID_ROWS) -> None:
    """Rows: the first `rows` noises; columns: τ. Memorized samples get a red frame; the copy
    onset's column title is red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, result.samples.shape[1])
    taus = result.taus
    onset = result.copy_tau
    memorized = result.memorized
    grey = result.samples.shape[2] == 1
    cell = 0.95
    fig, axes = plt.subplots(rows, len(taus), figsize=(1.0 + cell * len(taus), 1.3 + cell * rows),
                             dpi=110, squeeze=False)
    for c, tau in enumerate(taus):
        for r in range(rows):
            ax = axes[r, c]
            ax.imshow(displayable(result.samples[c, r].numpy()), cmap="gray" if grey else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            copy = bool(memorized[c, r])
            for spine in ax.spines.values():
                spine.set_visible(copy)
                spine.set_color("red")
                spine.set_linewidth(2.0)
            if c == 0:
                ax.set_ylabel(f"noise {r}", fontsize=7)
        top = axes[0, c]
        is_onset = onset is not None and tau == onset
        top.set_title(f"τ={tau:g}" + ("\ncopies from here" if is_onset else ""), fontsize=7,
                      color="red" if is_onset else "black",
                      fontweight="bold" if is_onset else "normal")
    fig.suptitle(f"{title}\ncolumns: τ (û* on [0, τ], network on [τ, 1]); red frame: "
                 f"memorized (d1/d2 < {result.threshold:.3g})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_hybrid_csv(path: Path, result: HybridResult) -> None:
    rows = result.rows()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.9g}" if isinstance(v, float) else v
                             for k, v in row.items()})


def write_hybrid(out: str | Path, result: HybridResult, summary: dict, overwrite: bool = False,
                 rows: int = GRID_ROWS) -> Path:
    """hybrid.png, grid.png, hybrid.csv, summary.json and samples.npz (taus, noise, samples,
    d1, d2, nearest_ids, memorized), written atomically."""
    title = plot_title(summary)
    with atomic_folder(out, overwrite, kind="hybrid") as tmp:
        write_hybrid_csv(tmp / CSV_NAME, result)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        np.savez(tmp / ARRAYS_NAME, taus=np.array(result.taus), noise=result.noise.numpy(),
                 samples=result.samples.numpy(), d1=result.d1.numpy(), d2=result.d2.numpy(),
                 nearest_ids=result.nearest_ids.numpy(), memorized=result.memorized.numpy())
        plot_curves(tmp / CURVES_NAME, result, title)
        plot_grid(tmp / GRID_NAME, result, title, rows)
    return Path(out)

