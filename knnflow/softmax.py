"""The mergeable softmax state of a query over training points: reference logit m,
Z = Σ exp(ℓ_j - m) and S = Σ exp(ℓ_j - m)·x_j, in float64. Two states merge exactly by rescaling
to the larger reference, so chunks, GPU shards and distributed ranks combine the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def rescale(old_ref: Tensor, new_ref: Tensor) -> Tensor:
    """exp(old - new), with 0 where the old state was empty (old = -inf)."""
    scale = torch.exp(old_ref - new_ref)
    return torch.where(torch.isneginf(old_ref), torch.zeros_like(scale), scale)


@dataclass
class SoftmaxState:
    """Per-query running softmax over training points, in float64.

    ref: (B,) reference logit m (-inf while empty); z: (B,) Σ exp(ℓ_j - m);
    s: (B, d) Σ exp(ℓ_j - m)·x_j. Any m gives the same D = s/z; merging rescales both sides
    to the larger m, which is exact up to float64 rounding.
    """

    ref: Tensor
    z: Tensor
    s: Tensor

    @classmethod
    def empty(cls, batch: int, dim: int, device: torch.device | str = "cpu") -> SoftmaxState:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.full((batch,), -math.inf, **f64), torch.zeros(batch, **f64),
                   torch.zeros(batch, dim, **f64))

    def merge(self, other: SoftmaxState) -> SoftmaxState:
        """The state of the union of the two point sets."""
        merged = SoftmaxState(self.ref.clone(), self.z.clone(), self.s.clone())
        merged.merge_(other)
        return merged

    def merge_(self, other: SoftmaxState) -> None:
        """In-place `merge`: rescale both sides to the larger reference and add."""
        ref = torch.maximum(self.ref, other.ref)
        a, b = rescale(self.ref, ref), rescale(other.ref, ref)
        self.z.mul_(a).add_(other.z * b)
        self.s.mul_(a[:, None]).add_(other.s * b[:, None])
        self.ref = ref

    def add_points_(self, rows: Tensor, logits: Tensor, points: Tensor) -> None:
        """Add single weighted points: exp(logits[i]) · points[i] to query rows[i], in place."""
        self.raise_ref_(rows, logits)
        w = torch.exp(logits - self.ref[rows])
        self.z.index_add_(0, rows, w)
        self.s.index_add_(0, rows, w[:, None] * points)

    def raise_ref_(self, rows: Tensor, ref: Tensor) -> None:
        """Raise the reference of the given rows to at least `ref`, rescaling their sums."""
        new_ref = self.ref.scatter_reduce(0, rows, ref, reduce="amax")
        moved = (new_ref != self.ref).nonzero().squeeze(1)
        if moved.numel():
            self._scale_rows_(moved, rescale(self.ref[moved], new_ref[moved]))
        self.ref = new_ref

    def _scale_rows_(self, rows: Tensor, scale: Tensor) -> None:
        self.z[rows] *= scale
        self.s[rows] *= scale[:, None]

    def denoiser(self) -> Tensor:
        """D = Σ λ_j x_j, float64 (B, d)."""
        return self.s / self.z[:, None]

    def velocity_(self, x: Tensor, t: Tensor) -> Tensor:
        """û = (D - x) / (1 - t), float64 (B, d), for queries x (B, d) at times t (B,),
        computed in place of S, which it overwrites (the state is spent): the same roundings
        as from `denoiser`, with no B×d temporaries (fresh ones of 128 KB and more are often
        page-faulted in on every call)."""
        return self.s.div_(self.z[:, None]).sub_(x).div_((1 - t)[:, None])
