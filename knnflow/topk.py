"""TopKVelocity: the top-k truncation of published kNN estimators of û*, with no bound.

For a query x at time t: the softmax over the k nearest neighbours of x/t that the FAISS index
returns (no exact re-ranking, as those estimators take them), with exact float64 weights over
those k. It is the baseline the certified KNNVelocity is compared with (`knnflow bench knn`):
fast, but its error is unknown and can be large where many weights are alive.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from knnflow.closed_form import check_t, flatten_queries
from knnflow.errors import InputError
from knnflow.estimators import ExactVelocity, VelocityOutput
from knnflow.index import Index
from knnflow.pairs import ExactPairs
from knnflow.rounding import output_dtype
from knnflow.routing import MIN_INDEX_T
from knnflow.softmax import SoftmaxState

DEFAULT_K = 16


class TopKVelocity:
    """û* truncated to the k nearest neighbours of x/t (error_bound None: no proof).

    index: a knnflow.Index of the training points; k: neighbours per query (clamped to n with
    a warning); data: the training points, to check that the index was built on them.
    Queries with t below MIN_INDEX_T, where x/t leaves the float32 range and the softmax is
    flat, go to the exact engine (on `device`), marked in `fallback`.
    """

    def __init__(self, index: Index, k: int = DEFAULT_K, *, data: Tensor | None = None,
                 device: torch.device | str | None = None):
        if not isinstance(index, Index):
            raise InputError("TopKVelocity needs a knnflow.Index (see Index.build / Index.load)")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        if k > index.n:
            warnings.warn(f"k={k} is larger than the index's n={index.n}; using k={index.n}",
                          stacklevel=2)
            k = index.n
        if data is not None:
            index.verify_points(data)
        self.index, self.k = index, k
        self.train = index.training_set()
        self.exact = ExactVelocity(self.train, device=device)

    def __call__(self, x: Tensor, t: float | Tensor) -> VelocityOutput:
        flat = flatten_queries(x, self.train.dim)
        batch = flat.shape[0]
        t64 = check_t(t, batch, flat.device).cpu()
        fallback = t64 < MIN_INDEX_T
        x64 = flat.detach().cpu().to(torch.float64)
        velocity = torch.empty_like(x64)
        evaluated = torch.full((batch,), self.k, dtype=torch.int64)
        rows = (~fallback).nonzero().squeeze(1)
        if rows.numel():
            velocity[rows] = self._top_k(x64[rows], t64[rows])
        if bool(fallback.any()):
            low = fallback.nonzero().squeeze(1)
            velocity[low] = self.exact(flat[low], t64[low]).velocity.to(
                device="cpu", dtype=torch.float64)
            evaluated[low] = self.index.n
        return VelocityOutput(
            velocity=velocity.to(dtype=output_dtype(x), device=x.device).reshape(x.shape),
            error_bound=None, evaluated=evaluated, certified=False, fallback=fallback,
            routed=torch.zeros(batch, dtype=torch.bool))

    def _top_k(self, x64: Tensor, t: Tensor) -> Tensor:
        """Softmax over the k nearest neighbours of x/t, in float64."""
        k = self.k
        q = (x64 / t[:, None]).to(torch.float32).numpy()
        if self.index.kind == "ivf":
            self.index.set_nprobe(self.index.manifest["index"]["nprobe"])
        _, ids = self.index.faiss().search(q, k)
        ids = torch.from_numpy(ids).clamp(min=0)
        # Exact float64 weights over those k, in bounded blocks (never a B×k×d tensor).
        rows = torch.arange(len(t)).repeat_interleave(k)
        state = SoftmaxState.empty(len(t), x64.shape[1])
        ExactPairs(x64, t, 0.5 / (1 - t) ** 2, self.train.max_norm).add_grouped_(
            state, rows, self.train.points, ids.reshape(-1), self.train.sq_norms)
        return state.velocity_(x64, t)
