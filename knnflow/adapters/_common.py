"""What both adapters share: one knnflow target over an index, checked against the x1 given."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from knnflow.errors import InputError
from knnflow.index import Index
from knnflow.target_base import TargetBatch
from knnflow.targets import make_target

ADAPTER_TARGETS = ("knn-efm", "efm", "exact")


class IndexTarget:
    """A knnflow target (knn-efm, efm or exact) over the training set an index holds.

    data: the training images the caller draws x1 from, checked against the index (points
    checksum) so that the target and the batches stand for the same data. seed: EFM's
    candidate draws (knn-efm's EFM fallback too) come from their own seeded generator.
    options: make_target's (device, and the target's own: tol, m, pool, fallback, route, ...).
    """

    def __init__(self, index: Index, target: str = "knn-efm", *, data: Tensor | None = None,
                 seed: int = 0, **options):
        if not isinstance(index, Index):
            raise InputError("the adapter needs a knnflow.Index (knnflow.Index.load(FOLDER))")
        if target not in ADAPTER_TARGETS:
            raise InputError(f"unknown target {target!r}; choose one of: "
                             f"{', '.join(ADAPTER_TARGETS)}")
        if data is not None:
            index.verify_points(data)
        self.index, self.name = index, target
        self.target = make_target(target, index=index if target == "knn-efm" else None,
                                  data=index.training_set() if target != "knn-efm" else None,
                                  **options)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x0: Tensor, x1: Tensor, t: Tensor | float | None) -> tuple[Tensor,
                                                                                  TargetBatch]:
        """(t as a (B,) tensor, the target batch), x_t and the target on x1's device."""
        dim = math.prod(x1.shape[1:]) if x1.ndim > 1 else 0
        if dim != self.index.dim:
            raise InputError(f"x1 has shape {tuple(x1.shape)} ({dim} values per image) but the "
                             f"index holds images of {'×'.join(map(str, self.index.image_shape))}")
        if t is None:
            t = torch.rand(x1.shape[0], generator=self.generator)
        t = torch.as_tensor(t, dtype=torch.float32)
        t = t.expand(x1.shape[0]) if t.ndim == 0 else t.reshape(-1)
        out = self.target(x0, x1, t.to(self.target.device), generator=self.generator)
        out.x_t = out.x_t.to(x1.device)
        out.target = out.target.to(x1.device)
        return t.to(x1.device, x1.dtype), out
