"""The page's figures: losses, velocity errors, hybrid sampling, samples and collapse."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from knnflow.analysis.reproduce.budgets import FIGURES_MARK, Budget, TargetSpec
from knnflow.analysis.reproduce.common import COLORS, EFM_COLORS, MEMORIZATION_THRESHOLD
from knnflow.analysis.reproduce.statistics import read_metrics
from knnflow.choices import COPY_FRACTION

if TYPE_CHECKING:
    from knnflow.analysis.reproduce.pipeline import Pipeline





def _color(label: str, labels: list[str]) -> str:
    if label in COLORS:
        return COLORS[label]
    efms = [x for x in labels if x not in COLORS]
    return EFM_COLORS[efms.index(label) % len(EFM_COLORS)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path, title: str) -> None:
    """Title, grid and legend of a one-panel figure, saved to `path` and closed."""
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_losses(path: Path, curves: dict[str, list[tuple[int, list[dict]]]], caption: str) -> None:
    """Training loss against step, one colour per target (dashed: further seeds): the logged
    batch losses, faint, and their moving average over 5 logged steps."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    labels = list(curves)
    for label, seeds in curves.items():
        for i, (seed, lines) in enumerate(seeds):
            steps = np.array([m["step"] for m in lines])
            loss = np.array([m["loss"] for m in lines])
            color, style = _color(label, labels), "-" if i == 0 else "--"
            ax.plot(steps, loss, color=color, linestyle=style, lw=0.6, alpha=0.3)
            window = min(5, len(loss))
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color=color, linestyle=style, marker=".",
                    ms=2, label=label if len(seeds) == 1 else f"{label} (seed {seed})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss: batch MSE to the target\n(faint: logged values; line: "
                  "mean of 5)")
    _finish(plt, fig, ax, path, f"Training loss per target ({caption})")


def plot_velocity_errors(path: Path, curves: dict[str, list[tuple[int, dict]]],
                         caption: str) -> None:
    """E‖u_θ - û*‖² per t bin, one line per target (band: ± one standard error), and E‖û*‖²."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    labels = list(curves)
    scale = None
    for label, seeds in curves.items():
        for i, (seed, result) in enumerate(seeds):
            t = np.array(result["t"])
            errors, se = np.array(result["errors"]), np.array(result["stderr"])
            color = _color(label, labels)
            ax.fill_between(t, np.clip(errors - se, 1e-12, None), errors + se, color=color,
                            alpha=0.15, lw=0)
            ax.plot(t, errors, marker="o", ms=3, color=color, linestyle="-" if i == 0 else "--",
                    label=label if len(seeds) == 1 else f"{label} (seed {seed})")
            scale = result
    ax.plot(np.array(scale["t"]), np.array(scale["target_sq"]), color="grey", linestyle=":",
            label=r"$E\,\|\hat{u}^*\|^2$ on the same queries (for scale)")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("t  (0 = noise, 1 = data)")
    ax.set_ylabel(r"$E\,\|u_\theta(x_t, t) - \hat{u}^*(x_t, t)\|^2$" + f"  (sum over d = "
                  f"{scale['dim']})")
    _finish(plt, fig, ax, path, f"Velocity error of the EMA networks against û* ({caption})")


def plot_hybrid(path: Path, curves: dict[str, list[tuple[int, dict]]],
                collapse_t: float | None, caption: str) -> None:
    """Memorized fraction of hybrid samples against τ, one line per target."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    labels = list(curves)
    level, threshold = COPY_FRACTION, MEMORIZATION_THRESHOLD
    for label, seeds in curves.items():
        for i, (seed, result) in enumerate(seeds):
            onset = result["copy_tau"]
            name = label if len(seeds) == 1 else f"{label} (seed {seed})"
            ax.plot(result["taus"], result["memorized_fraction"], marker="o", ms=4,
                    color=_color(label, labels), linestyle="-" if i == 0 else "--",
                    label=f"{name}: copies from τ = " + ("—" if onset is None else f"{onset:g}"))
            level, threshold = result["copy_fraction"], result["threshold"]
    ax.axhline(level, color="grey", linestyle="--", lw=1, label=f"copy level {level:g}")
    if collapse_t is not None:
        ax.axvline(collapse_t, color="black", linestyle=":", lw=1.2,
                   label=f"collapse time of û* on the data, T = {collapse_t:.2f}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("τ: û* on [0, τ], network on [τ, 1]  (t: 0 = noise, 1 = data)")
    ax.set_ylabel(f"memorized fraction (d1/d2 < {threshold:.3g})")
    ax.set_title(f"Hybrid sampling: when do samples become copies? ({caption})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(path: Path, panels: dict[str, torch.Tensor], caption: str) -> None:
    """Up to 64 images per panel: each target's samples and real training images."""
    from knnflow.sampling import image_grid

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.8), dpi=100,
                             squeeze=False)
    for ax, (label, images) in zip(axes[0], panels.items(), strict=True):
        grid = image_grid(images[:64], columns=8)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid,
                  cmap="gray" if grid.shape[-1] == 1 else None, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def copy_small_png(source: Path, target: Path, width: int = 1400) -> None:
    """Copy a PNG, shrunk to at most `width` pixels across and stored with a palette of 256
    colours (a plot loses nothing visible, and the file a half to two thirds of its size)."""
    from PIL import Image

    with Image.open(source) as image:
        picture = image.convert("RGB")
    if picture.width > width:
        picture = picture.resize((width, round(picture.height * width / picture.width)),
                                 Image.LANCZOS)
    picture.quantize(256).save(target, optimize=True)


def write_figures(folder: Path, specs: list[TargetSpec], budget: Budget, runs: dict[str, dict],
                  pipeline: Pipeline, collapse_t: float | None) -> dict[str, Path]:
    """samples.png, loss.png, velocity_error.png, hybrid.png and collapse.png, written
    atomically into `folder`; returns name → final path."""
    from knnflow.files import atomic_folder

    caption = (f"{pipeline.dataset}, {budget.steps:,} steps, preset {budget.preset}, batch "
               f"{budget.batch_size}")

    def per_target(getter) -> dict[str, list]:
        return {spec.label: [(seed, getter(runs[f"{spec.label}-seed{seed}"]))
                             for seed in budget.seeds] for spec in specs}

    names = ("samples", "loss", "velocity_error", "hybrid", "collapse")
    with atomic_folder(folder, overwrite=True) as tmp:
        (tmp / FIGURES_MARK).write_text("figures of knnflow reproduce; replaced on every call\n")
        first = budget.seeds[0]
        panels = {spec.label: torch.from_numpy(np.load(
            runs[f"{spec.label}-seed{first}"]["folder"] / "samples" / "samples.npz")["samples"])
            for spec in specs}
        panels["training images"] = pipeline.images[:64]
        plot_samples(tmp / "samples.png", panels, f"{caption}, seed {first}")
        plot_losses(tmp / "loss.png",
                    per_target(lambda run: read_metrics(run["folder"] / "metrics.jsonl")),
                    caption)
        plot_velocity_errors(tmp / "velocity_error.png",
                             per_target(lambda run: run["velocity"]["result"]), caption)
        plot_hybrid(tmp / "hybrid.png", per_target(lambda run: run["hybrid"]["result"]),
                    collapse_t, caption)
        copy_small_png(pipeline.collapse_folder / "collapse.png", tmp / "collapse.png")
    return {name: folder / f"{name}.png" for name in names}
