"""Training targets for flow matching: each maps (x0, x1, t) to (x_t, target).

x_t = (1-t)·x0 + t·x1, x0 ~ N(0, I), x1 a training image, t in [0, 1). Every target below has
expectation û*(x_t, t) given x_t; they differ in variance and cost:

- `cfm`: x1 - x0, the conditional velocity (one sample of the posterior; highest variance).
- `efm`: the self-normalised estimate of û* over M candidates that always include the x1 that
  made x_t (Empirical Flow Matching). With candidates c_1 = x1, c_2..c_M drawn uniformly from
  the data, Σ_j w(c_j)·c_j / Σ_j w(c_j) (w the softmax weight of û*) is an *unbiased*
  estimate of E[x1 | x_t]: since x1 ~ p(x1 | x_t) ∝ w(x1), the candidate set has density
  ∝ Σ_j w(c_j), which cancels the normaliser. M = 1 gives back cfm; M → n tends to û*.
  - pool "independent" (the paper's algorithm): x1 plus M-1 fresh draws for each x_t;
  - pool "shared" (the paper's released code): one pool for the whole batch, the batch's own
    x1s plus M fresh draws, seen by every x_t (the other rows' x1s are uniform draws for it,
    so it is the independent estimator with B + M candidates, sharing draws across rows).
- `knn-efm`: the certified kNN û* from the index (estimators.KNNVelocity), within tol; queries
  whose certification would cost more than the budget fall back to `exact` or `efm`.
- `exact`: û* over the whole training set (the exact engine).

Weights are computed in float64 (pairs.ExactPairs / the exact engine), so the 1/(1-t)
factor does not amplify rounding near t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from knnflow.choices import TARGETS
from knnflow.closed_form import TrainingSet
from knnflow.distributed import shard_of
from knnflow.efm import EFMTarget, KNNEFMTarget
from knnflow.errors import InputError, OptionError
from knnflow.estimators import ExactVelocity
from knnflow.target_base import Target, needs_data, shard_group


class CFMTarget(Target):
    """x1 - x0."""

    name = "cfm"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def velocity(self, x0, x1, x_t, t, generator):
        return x1 - x0, None, 1.0


def ot_pairing(x0: Tensor, x1: Tensor) -> Tensor:
    """perm (B,) such that pairing x0[perm[j]] with x1[j] minimises the batch's total squared
    distance Σ_j ‖x0[perm[j]] - x1[j]‖²: the exact assignment (scipy's linear_sum_assignment
    on float64 squared distances), minibatch optimal transport with uniform weights."""
    from scipy.optimize import linear_sum_assignment

    a = x1.reshape(x1.shape[0], -1).to(device="cpu", dtype=torch.float64)
    b = x0.reshape(x0.shape[0], -1).to(device="cpu", dtype=torch.float64)
    cost = torch.cdist(a, b).square()
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.empty(len(rows), dtype=torch.int64)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(x0.device)


# OT-CFM: Tong et al., "Improving and generalizing flow-based generative models with minibatch
# optimal transport" (torchcfm's ExactOptimalTransportConditionalFlowMatcher, σ = 0).
class OTCFMTarget(CFMTarget):
    """x1 - x0 after re-pairing the batch's noise with its images by exact minibatch optimal
    transport (`ot_pairing`): x_t = (1-t)·x0' + t·x1 with x0' = x0[perm]. The plan is a
    permutation, used as it is (torchcfm draws pairs from it with replacement; for a
    permutation plan that only repeats some pairs and drops others)."""

    name = "ot-cfm"
    MIN_BATCH = 2

    def couple(self, x0: Tensor, x1: Tensor) -> Tensor:
        if x1.shape[0] < 2:
            raise InputError("the ot-cfm target pairs noise with images within a batch: it "
                             f"needs at least 2 per batch, got {x1.shape[0]}")
        return x0[ot_pairing(x0, x1)]


class ExactTarget(Target):
    """û*(x_t, t) over the whole training set. With `group` (torch.distributed), `data` is
    this process's shard and the processes' softmax states are all-reduced
    (ExactVelocity(shard, group=...)): every process must then compute the same rows, which
    `whole_batch` tells the trainer."""

    name = "exact"
    OPTIONS = {"shard": False}

    @classmethod
    def from_options(cls, options, *, data, image_shape, device):
        data, group = needs_data(cls.name, data), None
        if options["shard"]:
            group = shard_group()
            data = shard_of(data.points if isinstance(data, TrainingSet) else data, group)
        return cls(data, device, group=group)

    def __init__(self, data: Tensor | TrainingSet, device: str | torch.device = "cpu",
                 group=None):
        self.device = torch.device(device)
        self.estimator = ExactVelocity(data, device=self.device, group=group)
        self.whole_batch = group is not None

    def velocity(self, x0, x1, x_t, t, generator):
        out = self.estimator(x_t.reshape(x_t.shape[0], -1), t)
        return out.velocity, None, float(self.estimator.n)


TARGET_CLASSES: dict[str, type[Target]] = {
    cls.name: cls for cls in (CFMTarget, OTCFMTarget, EFMTarget, KNNEFMTarget, ExactTarget)}
assert tuple(TARGET_CLASSES) == TARGETS


def target_class(name: str) -> type[Target]:
    """The class of the target called `name`."""
    if name not in TARGET_CLASSES:
        raise OptionError(f"unknown {{target}} {name!r}; choose one of: {', '.join(TARGETS)}",
                          "target")
    return TARGET_CLASSES[name]


def make_target(name: str, *, data: Tensor | TrainingSet | None = None,
                image_shape: tuple[int, ...] | None = None,
                device: str | torch.device = "cpu", **options) -> Target:
    """The target called `name` (cfm, ot-cfm, efm, knn-efm, exact) over the training data
    (flattened points, or a TrainingSet), computed on `device`.

    options: the target's own (its class's OPTIONS; None means the default):
      efm      m (candidates per row), pool (independent or shared), flip (draw candidates
               with random horizontal flips; needs image_shape);
      exact    shard (under torch.distributed: `data` is split over the processes and their
               softmax states are all-reduced);
      knn-efm  index (an Index or its folder), tol, budget (the largest fraction of the data
               read per row before its fallback), fallback (exact or efm, with m and pool),
               route (auto, certify or faster), search_device (of the certified search;
               default the CPU), shard (each process scans 1/N of the index).
    knn-efm checks `data`, when given, against its index.
    """
    cls = target_class(name)
    return cls.from_options(cls.check_options(options), data=data, image_shape=image_shape,
                            device=torch.device(device))
