"""Estimators of û*(x, t) behind one interface: est(x, t) -> VelocityOutput.

Exact: `ExactVelocity` streams the whole training set (closed_form.py), error bound 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from knnflow.closed_form import (
    DEFAULT_CHUNK,
    TrainingSet,
    check_t,
    closed_form_state,
    flatten_queries,
    velocity_from_denoiser,
)
from knnflow.errors import InputError
from knnflow.index import Index


@dataclass
class VelocityOutput:
    """What every estimator returns for a batch of B queries.

    velocity: shaped and typed like x. error_bound: (B,) float64 upper bound on
    ‖velocity - û*‖₂, or None for estimators that give no bound (random or approximate ones).
    evaluated: (B,) how many training points each query touched.
    """

    velocity: Tensor
    error_bound: Tensor | None
    evaluated: Tensor


def training_set_of(data_or_index: Tensor | TrainingSet | Index,
                    device: torch.device | str | None = None) -> TrainingSet:
    """The TrainingSet behind a tensor, a TrainingSet or an Index, on `device` when given."""
    if isinstance(data_or_index, Index):
        train = data_or_index.training_set()
    elif isinstance(data_or_index, TrainingSet):
        train = data_or_index
    elif torch.is_tensor(data_or_index):
        train = TrainingSet.from_points(data_or_index)
    else:
        raise InputError("expected a tensor of training points, a TrainingSet or an Index")
    if device is not None and train.points.device != torch.device(device):
        train = TrainingSet(train.points.to(device), train.sq_norms.to(device), train.max_norm)
    return train


class ExactVelocity:
    """û* over every training point, right to float64 precision (error_bound = 0).

    compute_dtype=float32 screens logits with float32 GEMMs and recomputes every weight that
    matters in float64; float64 does all arithmetic in float64 (slower, for references).
    device: where the data lives while computing (for example "cuda"); default: where it is.
    """

    def __init__(self, data_or_index: Tensor | TrainingSet | Index, *,
                 chunk_size: int = DEFAULT_CHUNK, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        self.train = training_set_of(data_or_index, device)
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype

    def denoiser(self, x: Tensor, t: float | Tensor) -> Tensor:
        """E[x1 | x_t = x], float64 (B, d)."""
        state = closed_form_state(x.to(self.train.points.device), t, self.train,
                                  chunk_size=self.chunk_size, compute_dtype=self.compute_dtype)
        return state.denoiser()

    def __call__(self, x: Tensor, t: float | Tensor) -> VelocityOutput:
        flat = flatten_queries(x, self.train.dim).to(self.train.points.device)
        denoiser = self.denoiser(flat, t)
        t64 = check_t(t, flat.shape[0], flat.device)
        velocity = velocity_from_denoiser(denoiser, flat.to(torch.float64), t64)
        batch = x.shape[0]
        return VelocityOutput(
            velocity=velocity.to(dtype=x.dtype, device=x.device).reshape(x.shape),
            error_bound=torch.zeros(batch, dtype=torch.float64),
            evaluated=torch.full((batch,), self.train.n, dtype=torch.int64),
        )
