"""knnflow targets in torchcfm's training loops: swap the matcher, keep the loop.

    from knnflow.adapters.torchcfm import KNNFlowMatcher
    FM = KNNFlowMatcher(knnflow.Index.load("indices/cifar10-train"), target="knn-efm")
    t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
    loss = ((model(t, xt) - ut) ** 2).mean()

torchcfm's convention is knnflow's: x_t = t·x1 + (1-t)·x0, t = 0 noise, t = 1 data, with
σ = 0 (no noise around the path). ut is the chosen target (knn-efm: the certified kNN û*;
efm: self-normalised û* over M candidates; exact: û*) instead of the conditional x1 - x0.
x1 must be training images of the index (that is what makes ut unbiased for û*).
"""

from __future__ import annotations

import torch
from torch import Tensor

from knnflow.adapters._common import IndexTarget


class KNNFlowMatcher:
    """The matcher interface of torchcfm (ConditionalFlowMatcher and its subclasses) with a
    knnflow target. index: a knnflow.Index of the training set; target: knn-efm, efm or
    exact; data: the training images x1 are drawn from, checked against the index; other
    options go to knnflow.make_target (tol, m, pool, device, ...)."""

    sigma = 0.0

    def __init__(self, index, target: str = "knn-efm", *, data: Tensor | None = None,
                 seed: int = 0, **options):
        self._target = IndexTarget(index, target, data=data, seed=seed, **options)
        self.last = None  # the last TargetBatch: fallback share, points evaluated, seconds

    def sample_location_and_conditional_flow(self, x0: Tensor, x1: Tensor,
                                             t: Tensor | None = None,
                                             return_noise: bool = False):
        """(t, xt, ut), or (t, xt, ut, eps) with return_noise (eps = 0: σ = 0). t: (B,) in
        [0, 1) or None to draw it uniformly."""
        t, out = self._target(x0, x1, t)
        self.last = out
        if return_noise:
            return t, out.x_t, out.target, torch.zeros_like(x0)
        return t, out.x_t, out.target
