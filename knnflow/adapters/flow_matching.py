"""knnflow targets in facebookresearch/flow_matching training loops: swap the path.

    from knnflow.adapters.flow_matching import KNNEFMPath
    path = KNNEFMPath(knnflow.Index.load("indices/cifar10-train"), target="knn-efm")
    sample = path.sample(x_0=x_0, x_1=x_1, t=t)
    loss = ((model(sample.x_t, sample.t) - sample.dx_t) ** 2).mean()

The path is flow_matching's CondOTProbPath (x_t = t·x_1 + (1-t)·x_0, t = 0 noise), and dx_t is
the chosen knnflow target (knn-efm, efm or exact û*) instead of x_1 - x_0. x_1 must be
training images of the index.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from knnflow.adapters._common import IndexTarget


@dataclass
class PathSample:
    """The fields of flow_matching.path.PathSample (used when flow_matching is absent)."""

    x_1: Tensor
    x_0: Tensor
    t: Tensor
    x_t: Tensor
    dx_t: Tensor


def _path_sample_class():
    try:
        from flow_matching.path.path_sample import PathSample as Theirs
    except ImportError:
        return PathSample
    return Theirs


class KNNEFMPath:
    """flow_matching's probability-path interface (`sample(x_0, x_1, t)`) with a knnflow
    target as dx_t. index, target, data and options as in knnflow.adapters.torchcfm."""

    def __init__(self, index, target: str = "knn-efm", *, data: Tensor | None = None,
                 seed: int = 0, **options):
        self._target = IndexTarget(index, target, data=data, seed=seed, **options)
        self.last = None

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor):
        """A PathSample (flow_matching's when it is installed) with x_t and dx_t."""
        t, out = self._target(x_0, x_1, t)
        self.last = out
        return _path_sample_class()(x_1=x_1, x_0=x_0, t=t, x_t=out.x_t, dx_t=out.target)
