"""How far a trained network's velocity lies from the closed-form û*, as a function of t
(paper Figure 2, left).

For each of `t_bins` equal bins of [0, t_max] and n queries per bin (stratified, seeded):
x1 a training image drawn uniformly, x0 ~ N(0, I), t uniform in the bin, x_t = (1-t)·x0 + t·x1,
and the squared error ‖u_θ(x_t, t) - û*(x_t, t)‖² summed over the d pixel values. Every weight
set sees the same queries, so their curves differ only by the network. The error is measured
on the flow the network was trained on: x1 from the run's training set (both flips when it
trained with flip) and û* of that same set.

t_max = 1 - 1e-4: û* grows like 1/(1-t) off the data, and t must stay below 1 in float32 (the
network's input). Queries are float32 (what the network sees); û* is evaluated at the same
float32 values, with t rounded to float32 first.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from knnflow.choices import WEIGHT_LABELS, WEIGHT_SETS
from knnflow.data import load_dataset
from knnflow.errors import InputError, OptionError
from knnflow.estimators import ExactVelocity, KNNVelocity
from knnflow.files import atomic_folder
from knnflow.images import with_flips
from knnflow.index import Index
from knnflow.runs import load_run_model
from knnflow.sampling import model_velocity

Velocity = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[[str, int, int], None]
T_MAX = 1 - 1e-4
TITLE_CHARACTERS = 95  # a line of the 9-point title across the 7-inch figure
PLOT_NAME, CSV_NAME, SUMMARY_NAME = "velocity_error.png", "velocity_error.csv", "summary.json"


def training_images(record: dict) -> Tensor:
    """The images a run was trained on, (N, C, H, W) in [-1, 1]: the training split of its
    data set (first `limit`), and every image also flipped when it trained with flip."""

    images = load_dataset(record["dataset"], root=record.get("root"), split="train",
                          limit=record.get("limit"))
    return with_flips(images) if record.get("flip") else images


def estimator_velocity(estimator) -> Velocity:
    """An estimator (est(x, t) → VelocityOutput, estimators.py) as a velocity callable. x is
    passed in float64 (exact in float64, since queries are float32), so û* comes back in
    float64 without a float32 rounding of its own."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return estimator(x.to(torch.float64), t.to(torch.float64)).velocity

    return velocity


@dataclass
class BinDraw:
    """The n queries of one t bin: x (n, C, H, W) float32, t (n,) float32, ids of x1."""

    bin: int
    x: Tensor
    t: Tensor
    ids: Tensor


def check_counts(t_bins: int, n: int) -> None:
    if t_bins < 1:
        raise OptionError(f"must be at least 1, got {t_bins}", "t_bins")
    if n < 1:
        raise OptionError(f"must be at least 1, got {n}", "n")


def bin_edges(t_bins: int, t_max: float = T_MAX) -> np.ndarray:
    return np.linspace(0.0, t_max, t_bins + 1)


def stratified_draws(images: Tensor, t_bins: int, n: int, seed: int = 0,
                     t_max: float = T_MAX) -> Iterator[BinDraw]:
    """Per bin, in order, from one generator seeded with `seed`: n training ids (uniform),
    n noises x0 and n times t uniform in the bin; x_t = (1-t)·x0 + t·x1 rounded to float32."""
    check_counts(t_bins, n)
    if not 0 < t_max < 1:
        raise InputError(f"t_max must lie in (0, 1), got {t_max}")
    edges = bin_edges(t_bins, t_max)
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(images.shape[1:])
    for b in range(t_bins):
        ids = torch.randint(len(images), (n,), generator=gen)
        x0 = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        t = (edges[b] + (edges[b + 1] - edges[b]) * u).to(torch.float32)
        t64 = t.to(torch.float64).reshape(n, *([1] * len(shape)))
        x = ((1 - t64) * x0 + t64 * images[ids].to(torch.float64)).to(torch.float32)
        yield BinDraw(b, x, t, ids)


@dataclass
class VelocityErrorResult:
    """Per bin: edges, the mean t drawn, and for each weight set the mean squared error
    E‖u_θ - û*‖² (sum over d) with its standard error; target_sq is E‖û*‖² on the same
    queries, for scale."""

    edges: np.ndarray
    t_mean: np.ndarray
    errors: dict[str, np.ndarray]
    stderr: dict[str, np.ndarray]
    target_sq: np.ndarray
    n_per_bin: int
    seed: int
    dim: int
    seconds: float

    @property
    def centres(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2

    def peak(self, name: str) -> dict:
        """The bin of largest mean error for one weight set."""
        errors = self.errors[name]
        b = int(np.argmax(errors))
        return {"bin": b, "t": float(self.centres[b]),
                "t_range": [float(self.edges[b]), float(self.edges[b + 1])],
                "error": float(errors[b]), "stderr": float(self.stderr[name][b]),
                "relative_error": float(errors[b] / max(self.target_sq[b], 1e-300))}

    def summary(self) -> dict:
        return {
            "error": "mean over queries of ‖u_θ(x_t, t) - û*(x_t, t)‖², summed over the "
                     f"d = {self.dim} pixel values",
            "t_bins": len(self.t_mean), "t_max": float(self.edges[-1]),
            "n_per_bin": self.n_per_bin, "seed": self.seed,
            "weights": {name: {"peak": self.peak(name),
                               "mean_error": float(np.mean(self.errors[name]))}
                        for name in self.errors},
            "seconds": round(self.seconds, 3),
        }


def velocity_error(velocities: Mapping[str, Velocity], images: Tensor, reference: Velocity,
                   t_bins: int = 20, n: int = 512, seed: int = 0, t_max: float = T_MAX,
                   batch_size: int = 256, device: str | torch.device = "cpu",
                   progress: Progress | None = None) -> VelocityErrorResult:
    """E‖u(x_t, t) - û*(x_t, t)‖² per t bin for each named velocity callable.

    velocities: name → callable (x (B, C, H, W) float32, t (B,) float32) → velocity like x,
    for example sample.model_velocity(model). reference: û* as such a callable (t passed in
    float64), for example estimator_velocity(ExactVelocity(images)). images: the training
    images x1 is drawn from, (N, C, H, W).
    """
    check_counts(t_bins, n)
    if not velocities:
        raise InputError("no velocity to measure")
    if batch_size < 1:
        raise OptionError(f"must be at least 1, got {batch_size}", "batch_size")
    began = time.perf_counter()
    sums = {name: np.zeros(t_bins) for name in velocities}
    squares = {name: np.zeros(t_bins) for name in velocities}
    target_sq, t_mean = np.zeros(t_bins), np.zeros(t_bins)
    done, total = 0, t_bins * n
    for draw in stratified_draws(images, t_bins, n, seed, t_max):
        t_mean[draw.bin] = float(draw.t.to(torch.float64).mean())
        for start in range(0, n, batch_size):
            x = draw.x[start:start + batch_size].to(device)
            t = draw.t[start:start + batch_size].to(device)
            exact = reference(x, t.to(torch.float64)).detach().cpu().to(torch.float64)
            target_sq[draw.bin] += float(exact.flatten(1).square().sum(1).sum())
            for name, velocity in velocities.items():
                with torch.no_grad():
                    got = velocity(x, t).detach().cpu().to(torch.float64)
                err = (got - exact).flatten(1).square().sum(1)
                sums[name][draw.bin] += float(err.sum())
                squares[name][draw.bin] += float(err.square().sum())
            done += len(x)
            if progress:
                progress("velocity error", done, total)
    errors = {name: sums[name] / n for name in velocities}
    # Standard error of a mean of n draws: sqrt(s² / n) with s² = n/(n-1)·(E[e²] - E[e]²),
    # which is sqrt((E[e²] - E[e]²) / (n-1)); 0 for n = 1.
    stderr = {name: np.sqrt(np.clip(squares[name] / n - errors[name] ** 2, 0, None)
                            / max(n - 1, 1)) for name in velocities}
    return VelocityErrorResult(bin_edges(t_bins, t_max), t_mean, errors, stderr, target_sq / n,
                               n, seed, math.prod(images.shape[1:]),
                               time.perf_counter() - began)


def closed_form_estimator(images: Tensor, index: str | Path | None = None, tol: float = 1e-4,
                          device: str = "cpu"):
    """û* of a run's training images: (estimator, a description, the Index or None).

    Without an index, the exact engine (ExactVelocity, on `device`); with an index folder, the
    certified KNNVelocity (within tol·‖û*‖), after checking that the index holds exactly these
    images (points checksum).
    """

    if index is None:
        return (ExactVelocity(images, device=device if str(device) != "cpu" else None),
                "exact engine over the run's training images", None)
    opened = Index.load(index)
    estimator = KNNVelocity(opened, tol=tol, data=images.reshape(len(images), -1))
    return estimator, f"certified KNNVelocity (index {index}, tol {tol:g})", opened


def velocity_error_of_run(run: str | Path, *, weights: tuple[str, ...] = WEIGHT_SETS,
                          t_bins: int = 20, n: int = 512, seed: int = 0,
                          index: str | Path | None = None, tol: float = 1e-4,
                          batch_size: int = 256, device: str = "cpu",
                          progress: Progress | None = None) -> tuple[VelocityErrorResult, dict]:
    """velocity_error for a run folder's newest checkpoint: `weights` among "ema" and "raw",
    x1 and û* from the run's training images. Returns the result and its JSON summary."""

    check_counts(t_bins, n)
    if not weights or any(w not in WEIGHT_SETS for w in weights):
        raise InputError(f"weights must be some of ema and raw, got {', '.join(weights)}")
    models, record = {}, {}
    for name in weights:
        models[name], record = load_run_model(Path(run), use_ema=name == "ema", device=device)
    images = training_images(record)
    estimator, described, _ = closed_form_estimator(images, index, tol, device)
    result = velocity_error({name: model_velocity(model) for name, model in models.items()},
                            images, estimator_velocity(estimator), t_bins=t_bins, n=n,
                            seed=seed, batch_size=batch_size, device=device, progress=progress)
    summary = {"run": str(run), "checkpoint_step": record["checkpoint_step"],
               "dataset": record["dataset"], "n_train": len(images),
               "image_shape": list(images.shape[1:]), "reference": described,
               **result.summary()}
    return result, summary


# --------------------------------------------------------------------------- outputs


def plot_velocity_error(path: Path, result: VelocityErrorResult, title: str,
                        labels: Mapping[str, str] = WEIGHT_LABELS) -> None:
    """velocity_error.png: velocity_error_figure."""
    import matplotlib.pyplot as plt

    fig = velocity_error_figure(result, title, labels)
    fig.savefig(path)
    plt.close(fig)


def velocity_error_figure(result: VelocityErrorResult, title: str,
                          labels: Mapping[str, str] = WEIGHT_LABELS):
    """The error per bin against t for each weight set (band: ± one standard error), the
    peak marked, and E‖û*‖² for scale; log scale when every value is positive. The title
    wraps to the figure's width (a long run path breaks across lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    t = result.centres
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
    for (name, errors), color in zip(result.errors.items(), colors, strict=False):
        peak = result.peak(name)
        low = np.clip(errors - result.stderr[name], 1e-300, None)
        ax.fill_between(t, low, errors + result.stderr[name], color=color, alpha=0.2, lw=0)
        ax.plot(t, errors, marker="o", ms=3, color=color,
                label=f"{labels.get(name, name)}: peak at t ≈ {peak['t']:.3g}")
        ax.axvline(peak["t"], color=color, linestyle=":", lw=1)
        ax.plot([peak["t"]], [peak["error"]], marker="*", ms=13, color=color,
                markeredgecolor="black", linestyle="none")
    ax.plot(t, result.target_sq, color="grey", linestyle="--", lw=1,
            label=r"$E\,\|\hat{u}^*(x_t, t)\|^2$ on the same queries (for scale)")
    values = np.concatenate([*result.errors.values(), result.target_sq])
    if (values > 0).all():
        ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("t  (0 = noise, 1 = data)")
    ax.set_ylabel(r"$E\,\|u_\theta(x_t, t) - \hat{u}^*(x_t, t)\|^2$"
                  + f"  (sum over d = {result.dim})")
    ax.set_title("\n".join(textwrap.wrap(title, TITLE_CHARACTERS, break_on_hyphens=False)),
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_velocity_error_csv(path: Path, result: VelocityErrorResult) -> None:
    names = list(result.errors)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bin", "t_low", "t_high", "t_centre", "t_mean", "n",
                         *[c for name in names for c in (f"error_{name}", f"stderr_{name}")],
                         "target_sq"])
        for b in range(len(result.t_mean)):
            writer.writerow([b, f"{result.edges[b]:.9g}", f"{result.edges[b + 1]:.9g}",
                             f"{result.centres[b]:.9g}", f"{result.t_mean[b]:.9g}",
                             result.n_per_bin,
                             *[f"{v:.9g}" for name in names
                               for v in (result.errors[name][b], result.stderr[name][b])],
                             f"{result.target_sq[b]:.9g}"])


def plot_title(summary: dict) -> str:
    if "run" not in summary:
        return "Velocity error against the closed-form û*"
    return (f"Velocity error of {summary['run']} (step {summary['checkpoint_step']}) against "
            f"û* of its {summary['n_train']} training images, {summary['n_per_bin']} queries "
            "per bin")


def write_velocity_error(out: str | Path, result: VelocityErrorResult, summary: dict,
                         overwrite: bool = False) -> Path:
    """velocity_error.png, velocity_error.csv and summary.json, written atomically."""
    with atomic_folder(out, overwrite, kind="velocity-error") as tmp:
        write_velocity_error_csv(tmp / CSV_NAME, result)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        plot_velocity_error(tmp / PLOT_NAME, result, plot_title(summary))
    return Path(out)
