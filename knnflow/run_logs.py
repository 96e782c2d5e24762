"""What a run folder shows besides its metrics: loss.png, progress grids, TensorBoard scalars."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from knnflow.errors import InputError
from knnflow.sampling import grid_scale, image_grid, sample_model, save_image

LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install "
                         "'knnflow[tensorboard]'") from None
    return SummaryWriter


def tensorboard_writer(folder: Path, start: int):
    """A SummaryWriter on FOLDER/tensorboard; events past `start` (a resumed run's
    checkpoint) are purged."""
    return summary_writer_class()(str(folder / TENSORBOARD),
                                   purge_step=start if start else None)


def plot_loss(metrics_path: Path, path: Path, title: str) -> None:
    """The logged loss against step (log scale when positive) from metrics.jsonl, written
    to `path` through a temporary file (a crash leaves the previous picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    for line in metrics_path.read_text().splitlines():
        try:
            entry = json.loads(line)
            steps.append(int(entry["step"]))
            losses.append(float(entry["loss"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, ms=3, lw=1)
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean squared error)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def progress_grid(model: nn.Module, image_shape: tuple[int, ...], path: Path,
                   device: str) -> None:
    """A 64-sample grid from the EMA model (Euler, 50 steps), without disturbing the RNGs."""

    state = torch.get_rng_state()
    samples = sample_model(model, 64, image_shape, seed=0, steps=50, device=device)
    torch.set_rng_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(samples), path, grid_scale(image_shape[1]) if len(image_shape) == 3
               else 1)
