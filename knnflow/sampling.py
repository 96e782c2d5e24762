"""Sampling: integrate dx/dt = v(x, t) from noise at t = 0 to data at t = 1 with torchdiffeq,
for a trained network or for the closed-form û* itself.

Following û* exactly reproduces training images (its flow ends on the data points), which
makes closed-form sampling a check of the whole pipeline and a probe of memorization.
û* grows like 1/(1-t) near t = 1, so the closed-form flow stops at t_end = 1 - 1e-3 and
finishes with the exact denoiser E[x1 | x_t] (one Tweedie step), which is where the flow goes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from knnflow.choices import SOLVERS
from knnflow.errors import InputError, OptionError
from knnflow.estimators import ExactVelocity
from knnflow.files import atomic_folder

ADAPTIVE = {"dopri5"}
CLOSED_FORM_T_END = 1 - 1e-3

Velocity = Callable[[Tensor, Tensor], Tensor]


def check_solver(solver: str, steps: int, atol: float = 1e-5, rtol: float = 1e-5,
                 n: int = 1) -> None:
    """An OptionError naming the option unless the solver options (and `n` samples, as
    knnflow.sample calls it) are valid."""
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    if steps < 1:
        raise OptionError(f"must be at least 1, got {steps}", "steps")
    if not (atol > 0 and rtol > 0):
        raise OptionError("{atol} and {rtol} must be positive", "atol", "rtol")
    if n < 1:
        raise OptionError(f"must be at least 1, got {n}", "n")


def integrate(velocity: Velocity, x0: Tensor, solver: str = "euler", steps: int = 100,
              atol: float = 1e-5, rtol: float = 1e-5, t_end: float = 1.0,
              on_time: Callable[[float], None] | None = None) -> Tensor:
    """x(t_end) from x(0) = x0 along dx/dt = velocity(x, t) (t a (B,) tensor); on_time(t)
    at each evaluation of the velocity, for progress."""
    from torchdiffeq import odeint

    check_solver(solver, steps, atol, rtol)

    def func(t: Tensor, x: Tensor) -> Tensor:
        if on_time is not None:
            on_time(float(t))
        return velocity(x, t.expand(x.shape[0]))

    times = torch.tensor([0.0, t_end], dtype=x0.dtype, device=x0.device)
    options = None if solver in ADAPTIVE else {"step_size": t_end / steps}
    return odeint(func, x0, times, method=SOLVERS[solver], atol=atol, rtol=rtol,
                  options=options)[-1]


def batch_progress(progress: Callable[[str, int, int], None] | None, stage: str, start: int,
                   size: int, count: int, t_end: float = 1.0) -> Callable[[float], None] | None:
    """integrate's on_time for one batch of `size` samples from `start` of `count`: samples
    done, counting the batch's share by its time t (None without progress: no callback)."""
    if progress is None:
        return None
    return lambda t: progress(stage, start + int(min(t / t_end, 1.0) * size), count)


def model_velocity(model: nn.Module) -> Velocity:
    def velocity(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x, t)

    return velocity


def sample_model(model: nn.Module, count: int, image_shape: tuple[int, ...], seed: int = 0,
                 solver: str = "euler", steps: int = 100, atol: float = 1e-5, rtol: float = 1e-5,
                 batch_size: int = 256, device: str | torch.device = "cpu",
                 progress: Callable[[str, int, int], None] | None = None,
                 stage: str = "sampling") -> Tensor:
    """`count` samples of a velocity network, in [-1, 1] (clamped), float32 (N, C, H, W);
    progress(stage, done, total) after each batch when given."""
    if count < 1:
        raise OptionError(f"must be at least 1, got {count}", "count")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, *image_shape, generator=gen)
    model.eval()
    out = []
    for start in range(0, count, batch_size):
        x0 = noise[start:start + batch_size].to(device)
        on_time = batch_progress(progress, stage, start, x0.shape[0], count)
        out.append(integrate(model_velocity(model), x0, solver, steps, atol, rtol,
                             on_time=on_time).cpu())
        if progress:
            progress(stage, min(start + batch_size, count), count)
    return torch.cat(out).clamp(-1, 1)


def sample_closed_form(index, count: int, seed: int = 0, solver: str = "euler",
                       steps: int = 100, atol: float = 1e-5, rtol: float = 1e-5,
                       batch_size: int = 256,
                       progress: Callable[[str, int, int], None] | None = None,
                       device: str | torch.device = "cpu") -> Tensor:
    """`count` samples of the closed-form flow û* of an index's training set, û* computed on
    `device`; progress(stage, done, total) as the integration advances when given."""

    if count < 1:
        raise OptionError(f"must be at least 1, got {count}", "count")
    exact = ExactVelocity(index.training_set(), device=device)
    shape = index.image_shape
    # The same noises as sample_model with this seed (float32 draws), so `knnflow sample RUN`,
    # `knnflow sample --closed-form` and `knnflow hybrid` start from the same points.
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, *shape, generator=gen).reshape(count, -1).to(torch.float64)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return exact(x.to(torch.float32), t.to(torch.float64)).velocity.to(x.dtype)

    out = []
    for start in range(0, count, batch_size):
        on_time = batch_progress(progress, "sampling û*", start, min(batch_size, count - start),
                                 count, CLOSED_FORM_T_END)
        x = integrate(velocity, noise[start:start + batch_size], solver, steps, atol, rtol,
                      t_end=CLOSED_FORM_T_END, on_time=on_time)
        out.append(exact.denoiser(x.to(torch.float32), CLOSED_FORM_T_END).to(
            device="cpu", dtype=torch.float32))
    return torch.cat(out).clamp(-1, 1).reshape(count, *shape)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → uint8 (N, H, W, C)."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 (H', W', C) grid of (N, C, H, W) images in [-1, 1]."""
    pictures = to_uint8(images)
    n, h, w, c = pictures.shape
    columns = columns or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, picture in enumerate(pictures):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = picture
    return grid


def save_image(array: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)


def grid_scale(height: int) -> int:
    """Small images are enlarged in grids so they can be seen (8×8 digits → 4×)."""
    return max(1, 32 // height)


def save_samples(samples: Tensor, out: Path, overwrite: bool = False,
                 meta: dict | None = None) -> Path:
    """One PNG per sample, grid.png and samples.npz (key `samples`, float32 in [-1, 1]),
    written to a temporary folder renamed to `out` when complete."""
    import json

    with atomic_folder(out, overwrite, kind="samples") as tmp:
        for i, picture in enumerate(to_uint8(samples)):
            save_image(picture, tmp / f"sample_{i:05d}.png")
        save_image(image_grid(samples[:256]), tmp / "grid.png", grid_scale(samples.shape[2]))
        np.savez(tmp / "samples.npz", samples=samples.numpy().astype(np.float32))
        if meta is not None:
            (tmp / "sampling.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
