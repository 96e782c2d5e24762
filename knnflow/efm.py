"""Empirical Flow Matching targets: EFM's self-normalised estimate of û* over M candidates,
and knn-efm, the certified kNN û* with EFM or the exact engine for the rows it cannot
certify within budget (targets.py's docstring has the estimators' math)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from knnflow.choices import EFM_M, EFM_POOLS, KNN_BUDGET, KNN_FALLBACKS, KNN_TOL, ROUTES
from knnflow.closed_form import TrainingSet, closed_form_state
from knnflow.errors import IndexMismatchError, InputError, OptionError
from knnflow.estimators import KNNVelocity, SearchBudgets
from knnflow.images import flip_images
from knnflow.index import Index, training_set_of
from knnflow.pairs import ExactPairs, dot_form_sq
from knnflow.softmax import SoftmaxState
from knnflow.target_base import Target, needs_data, shard_group

# EFM's independent pools become one dense GEMM per batch when the draws of a row are at least
# n / DENSE_DRAW_RATIO (a GEMM element costs far less than a gathered draw) and neither the
# float64 data set nor the batch × n weights exceed DENSE_DRAW_ELEMENTS numbers.
DENSE_DRAW_RATIO = 8
DENSE_DRAW_ELEMENTS = 1 << 24


class EFMTarget(Target):
    """Self-normalised û* over M candidates including the x1 that made x_t (module docstring).

    flip + image_shape: each drawn candidate is flipped horizontally with probability 1/2,
    i.e. candidates come from the data set with both flips, as x1 does under --flip.
    """

    name = "efm"
    OPTIONS = {"m": EFM_M, "pool": EFM_POOLS[0], "flip": False}

    @classmethod
    def validate(cls, options: dict) -> None:
        m, pool = options["m"], options["pool"]
        if not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
            raise OptionError(f"must be a positive integer, got {m!r}", "m")
        if pool not in EFM_POOLS:
            raise OptionError(f"unknown {{pool}} {pool!r}; choose one of: "
                              f"{', '.join(EFM_POOLS)}", "pool")

    @classmethod
    def from_options(cls, options, *, data, image_shape, device):
        return cls(needs_data(cls.name, data), **options, image_shape=image_shape,
                   device=device)

    def __init__(self, data: Tensor | TrainingSet, m: int = EFM_M, pool: str = EFM_POOLS[0],
                 flip: bool = False, image_shape: tuple[int, ...] | None = None,
                 device: str | torch.device = "cpu"):
        self.validate({"m": m, "pool": pool})
        if flip and image_shape is None:
            raise OptionError("needs the image shape of the data", "flip")
        self.device = torch.device(device)
        self.train = training_set_of(data, self.device)
        self.m, self.pool, self.flip, self.image_shape = m, pool, flip, image_shape

    def _draw_ids(self, count: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Ids of `count` uniform draws (on the CPU generator), and which are flipped."""
        ids = torch.randint(self.train.n, (count,), generator=generator)
        flips = (torch.rand(count, generator=generator) < 0.5 if self.flip
                 else torch.zeros(count, dtype=torch.bool))
        return ids.to(self.device), flips.to(self.device)

    def _points(self, ids: Tensor, flips: Tensor) -> Tensor:
        points = self.train.points[ids].to(torch.float32)
        if bool(flips.any()):
            points[flips] = flip_images(points[flips], self.image_shape)
        return points

    def velocity(self, x0, x1, x_t, t, generator):
        return self.velocity_from(x1, x_t, t, generator), None, float(self.candidates(len(t)))

    def _add_draws(self, state: SoftmaxState, pairs: ExactPairs, rows: Tensor,
                   ids: Tensor) -> None:
        """Add the drawn candidates (rows[i], ids[i]) to the state. Where the draws per row
        outnumber the data set's points / DENSE_DRAW_RATIO, a row's candidates are all the
        points with multiplicities: its weights are one float64 GEMM over the data (counts
        times exp of the exact logits) instead of a gather per draw. Rows whose logits need
        the difference form (t near 1, ExactPairs.dot_form false) keep the pairwise path."""
        batch, n = state.z.shape[0], self.train.n
        dense = pairs.dot_form & (len(ids) >= batch * n / DENSE_DRAW_RATIO)
        too_big = max(n * self.train.dim, batch * n) > DENSE_DRAW_ELEMENTS
        if too_big or not bool(dense.any()):
            pairs.add_grouped_(state, rows, self.train.points, ids, self.train.sq_norms)
            return
        sparse = ~dense[rows]
        if bool(sparse.any()):
            pairs.add_grouped_(state, rows[sparse], self.train.points, ids[sparse],
                               self.train.sq_norms)
        which = dense.nonzero().squeeze(1)
        counts = torch.zeros(batch, n, dtype=torch.float64, device=ids.device)
        counts.index_put_((rows, ids), torch.ones_like(rows, dtype=torch.float64),
                          accumulate=True)
        counts = counts[which]
        points = self.train.points.to(torch.float64)
        t, x = pairs.t[which], pairs.x64[which]
        logits = -pairs.s[which][:, None] * dot_form_sq(
            pairs.x_sq[which][:, None], x @ points.T, t[:, None], self.train.sq_norms[None, :])
        ref = logits.masked_fill(counts == 0, -math.inf).amax(dim=1)
        weights = counts * torch.exp((logits - ref[:, None]).clamp(max=0))
        part = SoftmaxState.empty(batch, x.shape[1], x.device)
        part.ref[which], part.z[which], part.s[which] = ref, weights.sum(1), weights @ points
        state.merge_(part)

    def candidates(self, batch: int) -> int:
        return self.m if self.pool == "independent" else batch + self.m

    def velocity_from(self, x1: Tensor, x_t: Tensor, t: Tensor,
                      generator: torch.Generator | None) -> Tensor:
        batch = x1.shape[0]
        x1_flat = x1.reshape(batch, -1).to(torch.float32)
        x64 = x_t.reshape(batch, -1).to(torch.float64)
        t64 = t.to(torch.float64)
        if self.pool == "shared":
            pool = torch.cat([x1_flat, self._points(*self._draw_ids(self.m, generator))])
            state = closed_form_state(x64, t64, TrainingSet.from_points(pool))
        else:
            s = 0.5 / (1 - t64) ** 2
            max_norm = max(self.train.max_norm, float(x1_flat.norm(dim=1).max()))
            pairs = ExactPairs(x64, t64, s, max_norm)
            state = SoftmaxState.empty(batch, x64.shape[1], x64.device)
            rows = torch.arange(batch, device=x64.device)
            pairs.add_(state, rows, x1_flat, rows)
            others = self.m - 1
            if others:
                ids, flips = self._draw_ids(batch * others, generator)
                pair_rows = rows.repeat_interleave(others)
                if not self.flip:
                    self._add_draws(state, pairs, pair_rows, ids)
                # Flipped candidates are materialised in groups of ~16 MB.
                step = max(1, (1 << 22) // x64.shape[1])
                for i in range(0, len(ids) if self.flip else 0, step):
                    part = slice(i, i + step)
                    drawn = self._points(ids[part], flips[part])
                    pairs.add_grouped_(state, pair_rows[part], drawn,
                                       torch.arange(len(drawn), device=x64.device))
        return state.velocity_(x64, t64)


class KNNEFMTarget(Target):
    """The certified kNN û* (error ≤ tol·‖û*‖ per row); rows whose certification would read
    more than `budget`·n points in full dimension go to `fallback` (exact or efm). With
    `group`, KNNVelocity over shards of the index (each process its rows), for the whole
    batch on every process."""

    name = "knn-efm"
    OPTIONS = {"index": None, "tol": KNN_TOL, "budget": KNN_BUDGET,
               "fallback": KNN_FALLBACKS[0], "route": ROUTES[0], "m": EFM_M,
               "pool": EFM_POOLS[0], "shard": False, "search_device": None}

    @classmethod
    def validate(cls, options: dict) -> None:
        tol, budget, fallback = options["tol"], options["budget"], options["fallback"]
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise OptionError(f"must be a positive number, got {tol!r}", "tol")
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0 < budget <= 1):
            raise OptionError(f"must lie in (0, 1], got {budget!r}", "budget")
        if fallback not in KNN_FALLBACKS:
            raise OptionError(f"unknown {{fallback}} {fallback!r}; choose one of: "
                              f"{', '.join(KNN_FALLBACKS)}", "fallback")
        if options["route"] not in ROUTES:
            raise OptionError(f"unknown {{route}} {options['route']!r}; choose one of: "
                              f"{', '.join(ROUTES)}", "route")
        if options["shard"] and fallback != "exact":
            raise OptionError("{shard} needs {fallback} exact: the EFM fallback draws from "
                              "the whole set", "shard", "fallback")
        EFMTarget.validate(options)

    @classmethod
    def inputs(cls, options: dict) -> list[Path]:
        index = options.get("index")
        return [Path(index)] if isinstance(index, (str, Path)) else []

    @classmethod
    def from_options(cls, options, *, data, image_shape, device):
        options = dict(options)
        index = options.pop("index")
        if index is None:
            raise OptionError("the knn-efm target needs {index}, an index of the training "
                              "data: build it with knnflow build-index DATASET", "index")
        if not isinstance(index, Index):
            index = Index.load(index)
        group = shard_group() if options.pop("shard") else None
        return cls(index, data, **options, device=device, group=group)

    def __init__(self, index, data: Tensor | TrainingSet | None = None, tol: float = KNN_TOL,
                 budget: float = KNN_BUDGET, fallback: str = KNN_FALLBACKS[0], m: int = EFM_M,
                 pool: str = EFM_POOLS[0], device: str | torch.device = "cpu",
                 search_device: str | torch.device | None = None, route: str = ROUTES[0],
                 group=None):
        if not isinstance(index, Index):
            raise InputError("the knn-efm target needs a knnflow.Index of the training data "
                             "(knnflow.Index.load(FOLDER)); build one with: knnflow "
                             "build-index DATASET")
        self.validate({"index": index, "tol": tol, "budget": budget, "fallback": fallback,
                       "route": route, "m": m, "pool": pool, "shard": group is not None})
        if data is not None:
            points = data.points if isinstance(data, TrainingSet) else data
            try:
                index.verify_points(points)
            except IndexMismatchError as err:
                where = f"{index.folder} " if index.folder is not None else "the index "
                raise IndexMismatchError(f"{where}is not the index of the training data: "
                                         f"{err}; rebuild it with knnflow build-index on the "
                                         "training data") from None
        # The certified search runs on `search_device` (default the CPU); the exact fallback
        # and the EFM fallback run on `device`. route: see KNNVelocity (auto: on a GPU, t bins
        # where the exact engine is faster than certifying go to it).
        self.device = torch.device(device)
        self.estimator = KNNVelocity(index, tol=tol, budgets=SearchBudgets(exact=budget),
                                     fallback="exact" if fallback == "exact" else "none",
                                     device=self.device, search_device=search_device,
                                     route=route, group=group)
        # Over shards (group) every process computes the whole batch's targets.
        self.whole_batch = group is not None
        self.efm = EFMTarget(index.training_set(), m=m, pool=pool, device=self.device) \
            if fallback == "efm" else None

    def state(self) -> dict:
        # The estimator's floors may come from timings (route "faster"): a resumed run must
        # route the same t the same way.
        floors = self.estimator.known_floors()
        return {} if floors is None else {"knn_floors": list(floors)}

    def restore(self, state: dict) -> None:
        if "knn_floors" in state:
            self.estimator.floors = state["knn_floors"]

    def velocity(self, x0, x1, x_t, t, generator):
        out = self.estimator(x_t.reshape(x_t.shape[0], -1), t)
        velocity = out.velocity.to(torch.float64)
        evaluated = out.evaluated.to(velocity.device, torch.float64)
        rows = out.fallback.nonzero().squeeze(1).to(x_t.device)
        self.routed = float(out.routed.double().mean())
        if self.efm is not None and rows.numel():
            velocity[rows] = self.efm.velocity_from(x1[rows], x_t[rows], t[rows], generator)
            evaluated[rows] = self.efm.candidates(rows.numel())
        return velocity, float(out.fallback.double().mean()), float(evaluated.mean())
