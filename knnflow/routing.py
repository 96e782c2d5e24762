"""Where KNNVelocity sends each t: the certification floor (below it nothing certifies on the
data set, so queries go straight to the fallback) and the exact floor (below it the exact
engine is faster than certifying, route="faster").

Both come from seeded probe queries (1-t)·x0 + t·x1 with x1 drawn from the training points (the
timings: shifted training images, which the set does not hold, as held-out images and samples
are not), so they depend only on the index; the exact floor also on timings, which is why
`floors` can be pinned (a resumed training run passes back the floors it used).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from knnflow.errors import InputError

# Below this t the softmax is flat (nothing to prune) and x/t leaves the float32 range.
MIN_INDEX_T = 1e-3
# Calibration: t bins of width 1/40, 16 probe queries each; a bin certifies when at most a
# quarter of its probes fall back.
CALIBRATION_BINS = 40
CALIBRATION_PROBES = 16
CALIBRATION_MAX_FAIL = 0.25
# Timing: t bins on a grid of 1/20 above the certification floor, each timed on 64 probe
# queries (median of 5 interleaved rounds) through the certified path and the exact engine;
# certifying must be at least ROUTE_MARGIN× faster to be chosen (on a tie the exact engine
# wins: bound 0, and timing noise flips fewer bins).
ROUTE_BINS = 20
ROUTE_PROBES = 64
ROUTE_REPEATS = 5
ROUTE_MARGIN = 0.9

# failed(x64, t): which float64 queries the certified path cannot certify.
Certify = Callable[[Tensor, Tensor], Tensor]


class Router:
    """The floors of one KNNVelocity.

    points: the whole index's training points (every process of a group draws the same
    probes from them); certify(x64, t) → failed (B,) bool; exact(x, t): the exact engine;
    fallback_exact: whether failed queries cost an exact call too (so the timing counts it);
    calibrate: find the certification floor (else 0); timed: find the exact floor (else 0);
    group: process 0's timings decide for every process; device: where the exact engine runs.
    """

    def __init__(self, points: Tensor, certify: Certify, exact: Callable, *,
                 fallback_exact: bool, calibrate: bool, timed: bool, group=None,
                 device: torch.device | None = None, image_shape: tuple[int, ...] | None = None):
        self.points, self.certify, self.exact = points, certify, exact
        self.image_shape = tuple(image_shape) if image_shape else None
        self.fallback_exact, self.timed, self.group = fallback_exact, timed, group
        self.device = device or torch.device("cpu")
        self.timings: list[dict[str, float]] = []
        self._t_floor: float | None = None if calibrate else 0.0
        self._exact_floor: float | None = None if timed else 0.0

    @property
    def t_floor(self) -> float:
        """Queries with t below this go to the fallback without trying to certify."""
        if self._t_floor is None:
            self._t_floor = self.calibrate()
        return self._t_floor

    @t_floor.setter
    def t_floor(self, value: float) -> None:
        self._t_floor = float(value)

    @property
    def floors(self) -> tuple[float, float]:
        """(t_floor, exact floor): below the first, queries go to the fallback; between the
        two, to the exact engine because it is faster there."""
        if self._exact_floor is None:
            self._exact_floor = self.time_routes(self.t_floor)
        return self.t_floor, max(self.t_floor, self._exact_floor)

    @floors.setter
    def floors(self, value: tuple[float, float]) -> None:
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise InputError(f"floors must be two numbers, got {value!r}") from None
        if not 0 <= low <= high <= 1:
            raise InputError(f"floors must satisfy 0 ≤ t_floor ≤ exact floor ≤ 1, got {value!r}")
        self._t_floor, self._exact_floor = low, high

    def known(self) -> tuple[float, float] | None:
        """`floors` once calibrated (or pinned), else None; never starts a calibration."""
        if self._t_floor is None or self._exact_floor is None:
            return None
        return self._t_floor, max(self._t_floor, self._exact_floor)

    def split(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(fallback, routed) masks for a call's times t (calibrating and timing on first use).

        Below MIN_INDEX_T the softmax is flat (nothing to prune) and x/t leaves float32 range;
        below the calibrated floor nothing certifies on this data set: fallback. Below the exact
        floor (timed routes) the exact engine is faster than certifying: routed. With timed
        routes, where the exact engine runs for some rows of the call anyway (routed, or
        fallback with fallback_exact), fewer than ROUTE_PROBES rows left to certify are routed
        too: the exact engine's time hardly depends on the rows it takes, and the timing that
        chose to certify was of ROUTE_PROBES rows (photos, t ~ U[0,1): 13 rows at t ≥ 0.95
        certified in 52 ms, while the other 243 rows took the exact engine as long as all 256)."""
        t_floor, exact_floor = self.floors
        low = max(MIN_INDEX_T, t_floor)
        if t.numel():  # all below the certification floor, or all between the floors: one check
            first, last = (float(v) for v in t.aminmax())
            below = last < low
            if below or (first >= low and last < exact_floor):
                every = torch.ones(t.shape, dtype=torch.bool, device=t.device)
                return (every, ~every) if below else (~every, every)
        fallback = t < low
        routed = ~fallback & (t < exact_floor)
        if self.timed:
            exact_anyway = routed | fallback if self.fallback_exact else routed
            to_certify = ~fallback & ~routed
            if bool(exact_anyway.any()) and int(to_certify.sum()) < ROUTE_PROBES:
                routed |= to_certify
        return fallback, routed

    def probes(self, t: Tensor, gen: torch.Generator, unseen: bool = False) -> Tensor:
        """Seeded float32 queries (1-t)·x0 + t·x1 with x1 drawn from the training points.

        unseen: x1 is a drawn training image shifted by an eighth of its height and width
        (wrapping round), an image the set does not hold, where the index knows an image shape
        of at least 8×8 (else a training point). Held-out images keep more points than the
        training points do, and certifying costs accordingly: on photos (n = 45,000) at t in
        [0.95, 1) the certified path takes 0.40 of the exact engine's time on training-point
        probes, but 3.8 on held-out images and 3.7 on shifted ones."""
        x1 = self.points[torch.randint(len(self.points), (len(t),), generator=gen)]
        shape = self.image_shape
        if unseen and shape is not None and len(shape) >= 2 and min(shape[-2:]) >= 8:
            x1 = torch.roll(x1.reshape(len(t), *shape), (shape[-2] // 8, shape[-1] // 8),
                            dims=(-2, -1)).reshape(len(t), -1)
        noise = torch.randn(x1.shape, generator=gen, dtype=torch.float64)
        return ((1 - t)[:, None] * noise + t[:, None] * x1.to(torch.float64)).to(torch.float32)

    def calibrate(self, bins: int = CALIBRATION_BINS, per_bin: int = CALIBRATION_PROBES,
                  seed: int = 0) -> float:
        """The lower edge of the lowest t bin from which, in every bin up to 1, at most
        CALIBRATION_MAX_FAIL of the probe queries fail to certify (1.0 when even the top bin
        fails). One batched call: a call's fixed costs (full sketch scans) dwarf those of its
        rows."""
        gen = torch.Generator().manual_seed(seed)
        low = torch.arange(bins, dtype=torch.float64).repeat_interleave(per_bin) / bins
        t = (low + torch.rand(len(low), generator=gen, dtype=torch.float64) / bins).clamp(
            MIN_INDEX_T, 1 - 1e-4)
        failed = self.certify(self.probes(t, gen).to(torch.float64), t).reshape(bins, per_bin)
        floor = 1.0
        for b in reversed(range(bins)):
            if float(failed[b].double().mean()) > CALIBRATION_MAX_FAIL:
                break
            floor = b / bins
        return max(floor, MIN_INDEX_T)

    def time_routes(self, floor: float) -> float:
        """The lower edge of the lowest t bin (on the 1/ROUTE_BINS grid, the first from `floor`
        to the next grid line) in which the certified path takes at most ROUTE_MARGIN of the
        exact engine's time on the same probes (`probes(unseen=True)`); 1.0 when no bin does.
        The certified path's
        time includes its exact fallbacks (none without fallback_exact: the caller's fallback,
        EFM in knn-efm, is cheap). Bins are timed from the floor up and the search stops at
        the first such bin (certifying gets cheaper as t grows: fewer points kept). The
        timings are kept in `timings`."""
        from knnflow.timing import interleaved_seconds

        gen = torch.Generator().manual_seed(1)
        low = floor
        while low < 1:
            high = min(1.0, (math.floor(low * ROUTE_BINS + 1e-9) + 1) / ROUTE_BINS)
            t = (low + (high - low) * torch.rand(ROUTE_PROBES, generator=gen,
                                                  dtype=torch.float64)).clamp(MIN_INDEX_T,
                                                                              1 - 1e-4)
            x = self.probes(t, gen, unseen=True)

            def certify(x=x, t=t):
                failed = self.certify(x.to(torch.float64), t)
                if self.fallback_exact and bool(failed.any()):
                    self.exact(x[failed], t[failed])

            seconds = interleaved_seconds(
                {"exact": lambda x=x, t=t: self.exact(x, t), "certified": certify},
                ROUTE_REPEATS, self.device)
            if self.group is not None:  # one verdict for all processes: process 0's timings
                shared = torch.tensor([seconds["exact"], seconds["certified"]],
                                      dtype=torch.float64)
                dist.broadcast(shared, dist.get_global_rank(self.group, 0), group=self.group)
                seconds = {"exact": float(shared[0]), "certified": float(shared[1])}
            self.timings.append({"t_low": low, "t_high": high, **seconds})
            if seconds["certified"] <= ROUTE_MARGIN * seconds["exact"]:
                return low
            low = high
        return 1.0
