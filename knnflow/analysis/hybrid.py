"""Hybrid sampling (paper Figure 3): from fixed noises, follow û* on [0, τ] and the network on
[τ, 1], and see from which τ on the samples are copies of training images.

The noises are those of `sample.sample_model` for the same seed (float32, N×C×H×W), so τ = 0 is
plain network sampling, bit for bit. The closed-form part runs in float64 like
`sample.sample_closed_form`; û* grows like 1/(1-t) near t = 1, so for τ > 1 - 1e-3 it stops at
1 - 1e-3 and takes the exact denoiser E[x1 | x_t] as the sample (the network is not used): τ = 1
is the pure closed-form flow from the same noises.

Time grid: fixed-step solvers take ceil(τ·steps) equal steps on [0, τ] and ceil((1-τ)·steps)
equal steps on [τ, 1] (τ = 1: `steps` steps on [0, 1 - 1e-3], as sample_closed_form). When τ is
a multiple of 1/steps, both parts lie on the one uniform grid of step 1/steps that
`knnflow sample` uses. dopri5 adapts its steps on each part.

Per τ: the distance d1 of each sample to its nearest training image and the ratio test
d1/d2 < threshold (1/3) of nearest.py, and the distance to the τ = 1 sample of the same
noise. The copy onset is the smallest τ from which the memorized fraction stays at least
`copy_fraction` (0.9) for every larger τ measured; None when the largest τ falls short.
hybrid_report.py writes the figures and files of a result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from knnflow.analysis.velocity_error import closed_form_estimator, training_images
from knnflow.choices import COPY_FRACTION
from knnflow.choices import HYBRID_REFERENCE as REFERENCE_SIZE
from knnflow.choices import HYBRID_TAUS as DEFAULT_TAUS
from knnflow.errors import InputError, OptionError
from knnflow.index import Index
from knnflow.nearest import nearest_training, parse_threshold, train_reference
from knnflow.runs import load_run_model
from knnflow.samples import Samples
from knnflow.sampling import ADAPTIVE, CLOSED_FORM_T_END, SOLVERS, integrate, model_velocity

Velocity = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[[str, int, int], None]


def parse_taus(text: str) -> list[float]:
    """Comma-separated numbers in [0, 1], or start:stop:count for `count` evenly spaced values
    from start to stop; returned sorted, without repeats."""
    raw = str(text).strip()
    usage = (f"takes numbers in [0, 1] like 0,0.5,1 or start:stop:count like 0:1:11, "
             f"got {raw!r}")
    try:
        if ":" in raw:
            parts = raw.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise ValueError
            values = np.linspace(start, stop, count).tolist() if count > 1 else [start]
        else:
            values = [float(part) for part in raw.split(",")]
    except ValueError:
        raise OptionError(usage, "taus") from None
    bad = [v for v in values if not (math.isfinite(v) and 0 <= v <= 1)]
    if bad:
        raise OptionError(f"every τ must lie in [0, 1]; got {bad[0]:g} in {{taus}} {raw}",
                          "taus")
    return sorted({round(v, 12) for v in values})


def segment_steps(tau: float, steps: int) -> tuple[int, int]:
    """Fixed steps of the closed-form part [0, τ] and of the network part [τ, 1]."""
    if steps < 1:
        raise OptionError(f"must be at least 1, got {steps}", "steps")
    # 1e-9 keeps 0.3·100 = 30.000000000000004 at 30 steps.
    closed = 0 if tau == 0 else max(1, math.ceil(tau * steps - 1e-9))
    network = 0 if tau > CLOSED_FORM_T_END else max(1, math.ceil((1 - tau) * steps - 1e-9))
    return closed, network


def _integrate_from(velocity: Velocity, x: Tensor, start: float, end: float, solver: str,
                    steps: int, atol: float, rtol: float) -> Tensor:
    """x(end) from x(start): sample.integrate on the shifted time s = t - start (exactly
    sample.integrate when start = 0)."""
    if start == 0:
        return integrate(velocity, x, solver, steps, atol, rtol, t_end=end)
    return integrate(lambda y, s: velocity(y, s + start), x, solver, steps, atol, rtol,
                     t_end=end - start)


def _closed_form_velocity(estimator) -> Velocity:
    """û* along the float64 closed-form flow, called as sample_closed_form calls it."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return estimator(x.to(torch.float32), t.to(torch.float64)).velocity.to(x.dtype)

    return velocity


def _denoised(estimator, x: Tensor, t: float) -> Tensor:
    """E[x1 | x_t = x], float32 like x: the estimator's denoiser, or x + (1-t)·û."""
    flat = x.reshape(len(x), -1).to(torch.float32)
    if hasattr(estimator, "denoiser"):
        out = estimator.denoiser(flat, t)
    else:
        out = flat.to(torch.float64) + (1 - t) * estimator(flat, t).velocity.to(torch.float64)
    return out.to(torch.float32).cpu().reshape(x.shape)


def hybrid_sample(network: Velocity, closed_form, noise: Tensor, tau: float,
                  solver: str = "euler", steps: int = 100, atol: float = 1e-5,
                  rtol: float = 1e-5, device: str | torch.device = "cpu") -> Tensor:
    """Samples in [-1, 1] (clamped), float32 like noise: û* of `closed_form` (an estimator:
    ExactVelocity or KNNVelocity) on [0, τ], then `network` (x on `device`) on [τ, 1]."""
    if not 0 <= tau <= 1:
        raise InputError(f"τ must lie in [0, 1], got {tau}")
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    closed_steps, network_steps = segment_steps(tau, steps)
    x = noise.to(torch.float32)
    if closed_steps:
        end = min(tau, CLOSED_FORM_T_END)
        x = _integrate_from(_closed_form_velocity(closed_form), x.to(torch.float64), 0.0, end,
                            solver, closed_steps, atol, rtol)
        if not network_steps:
            return _denoised(closed_form, x, end).clamp(-1, 1)
    x = _integrate_from(network, x.to(torch.float32).to(device), tau, 1.0, solver,
                        network_steps, atol, rtol)
    return x.cpu().clamp(-1, 1)


def check_options(taus: list[float] | str, n: int, solver: str, steps: int,
                  threshold: float | str, copy_fraction: float, reference_size: int,
                  batch_size: int) -> list[float]:
    """Refuse bad options in one line each; returns the τ values sorted, without repeats."""

    values = parse_taus(taus) if isinstance(taus, str) else sorted(set(map(float, taus)))
    if not values:
        raise OptionError("is empty", "taus")
    for tau in values:
        if not 0 <= tau <= 1:
            raise InputError(f"every τ must lie in [0, 1], got {tau:g}")
    if n < 1:
        raise OptionError(f"must be at least 1, got {n}", "n")
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    segment_steps(0.0, steps)
    parse_threshold(threshold)
    if not 0 < copy_fraction <= 1:
        raise OptionError(f"must lie in (0, 1], got {copy_fraction}", "copy_fraction")
    for name, value in (("reference_size", reference_size), ("batch_size", batch_size)):
        if value < 1:
            raise OptionError(f"must be at least 1, got {value}", name)
    return values


def copy_onset(taus: list[float] | np.ndarray, fractions: np.ndarray,
               copy_fraction: float = COPY_FRACTION) -> float | None:
    """The smallest τ from which the memorized fraction is ≥ copy_fraction at every larger
    τ measured, or None."""
    onset = None
    for tau, fraction in sorted(zip(taus, fractions, strict=True), reverse=True):
        if fraction < copy_fraction:
            break
        onset = float(tau)
    return onset


@dataclass
class HybridResult:
    """Per τ (T values) and noise (n): samples (T, n, C, H, W) float32 in [-1, 1]; d1, d2
    (T, n) L2 distances to the two nearest training images and their ids; to_closed_form
    (T, n) the L2 distance to the τ = 1 sample of the same noise. reference: leave-one-out
    train-to-train distances, for scale."""

    taus: list[float]
    steps: list[tuple[int, int]]
    noise: Tensor
    samples: Tensor
    closed_form: Tensor
    nearest_ids: Tensor
    d1: Tensor
    d2: Tensor
    to_closed_form: Tensor
    reference: Tensor
    threshold: float
    copy_fraction: float
    seed: int
    solver: str
    seconds: float

    @property
    def ratio(self) -> Tensor:
        """d1/d2, 0/0 (a copy of a duplicated training image) read as 0 (nearest.py)."""
        return torch.where(self.d2 > 0, self.d1 / self.d2.clamp(min=1e-300),
                           torch.zeros_like(self.d1))

    @property
    def memorized(self) -> Tensor:
        return self.ratio < self.threshold

    @property
    def memorized_fraction(self) -> np.ndarray:
        return self.memorized.double().mean(1).numpy()

    @property
    def copy_tau(self) -> float | None:
        return copy_onset(self.taus, self.memorized_fraction, self.copy_fraction)

    def rows(self) -> list[dict]:
        """One record per τ: every number the curves plot."""
        fractions = self.memorized_fraction
        return [{"tau": tau, "closed_form_steps": self.steps[i][0],
                 "network_steps": self.steps[i][1],
                 "d1_mean": float(self.d1[i].mean()), "d1_median": float(self.d1[i].median()),
                 "d1_over_d2_median": float(self.ratio[i].median()),
                 "memorized_count": int(self.memorized[i].sum()),
                 "memorized_fraction": float(fractions[i]),
                 "to_closed_form_mean": float(self.to_closed_form[i].mean()),
                 "to_closed_form_median": float(self.to_closed_form[i].median()),
                 "train_to_train_mean": float(self.reference.mean())}
                for i, tau in enumerate(self.taus)]

    def summary(self) -> dict:
        return {
            "n": self.samples.shape[1], "seed": self.seed, "solver": self.solver,
            "taus": self.taus,
            "copy_tau": self.copy_tau,
            "copy_rule": f"smallest τ from which the memorized fraction (d1/d2 < "
                         f"{self.threshold:.6g}) is ≥ {self.copy_fraction:g} at every larger τ",
            "threshold": self.threshold, "copy_fraction": self.copy_fraction,
            "train_to_train_mean": float(self.reference.mean()),
            "per_tau": self.rows(),
            "seconds": round(self.seconds, 3),
        }


def run_hybrid(network: Velocity, closed_form, index, image_shape: tuple[int, ...],
               taus: list[float] | str, n: int = 256, seed: int = 0, solver: str = "euler",
               steps: int = 100, atol: float = 1e-5, rtol: float = 1e-5,
               threshold: float | str = 1 / 3, copy_fraction: float = COPY_FRACTION,
               reference_size: int = REFERENCE_SIZE, batch_size: int = 256,
               device: str | torch.device = "cpu",
               progress: Progress | None = None) -> HybridResult:
    """Hybrid samples for every τ from the noises of sample_model(seed), scored against the
    training images of `index` (knnflow.Index) with the ratio test."""

    taus = check_options(taus, n, solver, steps, threshold, copy_fraction, reference_size,
                         batch_size)
    threshold = parse_threshold(threshold)
    if tuple(index.image_shape) != tuple(image_shape):
        raise InputError(f"the index holds images of shape {tuple(index.image_shape)}, the "
                         f"network makes {tuple(image_shape)}")
    began = time.perf_counter()
    noise = torch.randn(n, *image_shape, generator=torch.Generator().manual_seed(seed))
    todo = taus if taus[-1] == 1 else [*taus, 1.0]
    total, done = len(todo) * n, 0
    made = {}
    for tau in todo:
        parts = []
        for start in range(0, n, batch_size):
            parts.append(hybrid_sample(network, closed_form, noise[start:start + batch_size],
                                       tau, solver, steps, atol, rtol, device))
            done += len(parts[-1])
            if progress:
                progress("hybrid sampling", done, total)
        made[tau] = torch.cat(parts)
    samples = torch.stack([made[tau] for tau in taus])
    closed = made[1.0]
    ids, d1, d2 = [], [], []
    for i, tau in enumerate(taus):
        array = samples[i].numpy()
        scores = nearest_training(index, Samples(Path(f"hybrid-tau-{tau:g}"), "array",
                                                 [f"tau={tau:g}[{j}]" for j in range(n)],
                                                 tuple(image_shape), "float in [-1, 1]",
                                                 _array=array),
                                  k=2, batch_size=batch_size)
        ids.append(scores.ids[:, 0])
        d1.append(scores.distances[:, 0])
        d2.append(scores.distances[:, 1])
        if progress:
            progress("nearest training images", i + 1, len(taus))
    _, reference = train_reference(index, reference_size, seed=seed, batch_size=batch_size,
                                   progress=progress)
    to_closed = (samples.to(torch.float64) - closed.to(torch.float64)).flatten(2).norm(dim=2)
    return HybridResult(taus, [segment_steps(tau, steps) for tau in taus], noise, samples,
                        closed, torch.stack(ids), torch.stack(d1), torch.stack(d2), to_closed,
                        reference, threshold, copy_fraction, seed, solver,
                        time.perf_counter() - began)


def hybrid_of_run(run: str | Path, *, taus: list[float] | str = DEFAULT_TAUS, n: int = 256,
                  seed: int = 0, ema: bool = True, solver: str = "euler", steps: int = 100,
                  atol: float = 1e-5, rtol: float = 1e-5, index: str | Path | None = None,
                  tol: float = 1e-4, threshold: float | str = 1 / 3,
                  copy_fraction: float = COPY_FRACTION, reference_size: int = REFERENCE_SIZE,
                  batch_size: int = 256, device: str = "cpu",
                  progress: Progress | None = None) -> tuple[HybridResult, dict]:
    """run_hybrid for a run folder's newest checkpoint. û* and the nearest-image search use
    the run's training images: the exact engine and an in-memory index, or with `index` the
    certified KNNVelocity and that index. Returns the result and its JSON summary."""

    values = check_options(taus, n, solver, steps, threshold, copy_fraction, reference_size,
                           batch_size)
    model, record = load_run_model(Path(run), use_ema=ema, device=device)
    images = training_images(record)
    estimator, described, opened = closed_form_estimator(images, index, tol, device)
    if opened is None:
        opened = Index.build(images, progress=progress)
    result = run_hybrid(model_velocity(model), estimator, opened, tuple(record["image_shape"]),
                        values, n=n, seed=seed, solver=solver, steps=steps, atol=atol,
                        rtol=rtol, threshold=threshold, copy_fraction=copy_fraction,
                        reference_size=reference_size, batch_size=batch_size, device=device,
                        progress=progress)
    summary = {"run": str(run), "checkpoint_step": record["checkpoint_step"],
               "weights": "ema" if ema else "raw", "dataset": record["dataset"],
               "n_train": len(images), "closed_form": described,
               "steps": None if solver in ADAPTIVE else steps, "atol": atol, "rtol": rtol,
               **result.summary()}
    return result, summary
