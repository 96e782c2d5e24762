"""The exact closed-form velocity û*(x, t) of a finite training set, and its conversions.

Convention: x_t = (1-t)·x0 + t·x1 with x0 ~ N(0, I), t = 0 is noise and t = 1 is data. Over
training points x_1..x_n the posterior over which point made x_t is a softmax:

    ℓ_j = -‖x - t·x_j‖² / (2(1-t)²),      λ_j = softmax_j(ℓ_j)
    D(x, t)  = E[x1 | x_t = x] = Σ_j λ_j x_j          (denoiser)
    û*(x, t) = (D - x) / (1-t)                         (velocity)
    ∇log p_t(x) = (t·D - x) / (1-t)²                   (score)

The engine streams the data in chunks and keeps, per query, a mergeable softmax state
(reference logit m, Z = Σ exp(ℓ_j - m), S = Σ exp(ℓ_j - m)·x_j) in float64, so memory is
O(B·chunk) and chunks, GPU shards and distributed ranks all combine with the same merge.

Precision. Logits are screened with one GEMM in the compute dtype:
ℓ_j + s‖x‖² = 2st⟨x, x_j⟩ - st²‖x_j‖² (the ‖x‖² term is the same for every j and cancels).
That form's rounding grows with s = 1/(2(1-t)²), so the engine bounds it
(`screening_error_bound`): the proven bound decides which weights may be dropped, the typical
one how accurate the float32 sums of screened weights are. Each row's float32 error is
estimated from its posterior spread (`_float32_error`); the largest screened weights are made
exact in float64 (from x - t·x_j where the dot form would round) until the estimate meets
ACCURACY_TARGET, and rows that still exceed FLOAT64_TARGET are computed again with every
live weight exact. Rows with few live weights per chunk get exact weights directly.

The streaming pass, the one-pass path for small sets, the candidate heads and the dense sums
are one algorithm sharing per-chunk state and one error budget, so they stay in this module;
the mergeable state (softmax.py), the pair evaluation (pairs.py), the rounding bounds
(rounding.py) and the tuning knobs, one record per device kind (engine_settings.py), stand
alone.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from knnflow.engine_settings import EngineSettings, engine_settings
from knnflow.errors import InputError
from knnflow.grid_digits import Grid, GridScreen, grid_fits, grid_of, grid_sums
from knnflow.int_screen import (
    Digits,
    IntScreen,
    data_digits,
    grid_gemms_available,
    int_screen_available,
)
from knnflow.pairs import (
    GROUP_MIN_PAIRS,
    batched_dots,
    difference_sq,
    dot_form_holds,
    dot_form_sq,
    padded_pairs,
    pair_block,
    row_sq_norms,
)
from knnflow.rounding import (
    FLOAT32_ROUNDOFF,
    matmul_input_roundoff,
    output_dtype,
    screening_error_bound,
)
from knnflow.softmax import SoftmaxState, rescale

# The engine's contracts: what a result promises, whatever the tuning knobs
# (engine_settings.EngineSettings, one record per device kind) say.
# Weights below exp(-margin) of the largest are dropped: with margin = log(n) + 36 the dropped
# mass is below e^-36 ≈ 2e-16 of the total, under float64 rounding of the sums.
LN_2 = math.log(2.0)
LOG2_E = 1.0 / LN_2
DROPPED_MASS_NATS = 36.0
# Added to the one pass's margin in bits where its float32 weights (exp2 of the differences
# to the top, each within an ulp) decide which points are live.
PAIR_MARGIN_SLACK_BITS = 1e-3
# The float32 rows' estimated relative error (_float32_error): above ACCURACY_TARGET their
# largest screened weights (the recorded head) are recomputed exactly; rows still above
# FLOAT64_TARGET are computed again with every live weight exact. The estimate stays above
# 0.75× the measured error on photos (above 0.3× on digits, where the errors are ~1e-8), so
# the targets keep the measured errors at ≤ 6e-6 on photos (the contract: median ≤ 1e-5,
# max ≤ 1e-4 against float64). Tighter targets cost more exact weights at t = 0.2-0.6.
ACCURACY_TARGET = 1e-5
FLOAT64_TARGET = 3e-5
# The head weights within this many nats of a row's largest screened one are always exact
# where they hold at least NORMALISER_SHARE of the total each (the normaliser Z, for log Z
# and max λ, then errs only by what stays screened).
NORMALISER_NATS = 3.0
NORMALISER_SHARE = 0.05
# Rows whose typical screening error is below this many nats record no head: their screened
# weights are exact to ~1e-7 relative.
HEAD_SKIP_NATS = 1e-7
# _float32_error's screening estimate is its root-mean-square model times this.
SCREEN_SAFETY = 2.0
# Rows with t above this never take the float32 path: (D - x)/(1-t) would amplify its rounding.
DENSE_T_MAX = 0.95
# Nor do rows whose typical screening error exceeds this many nats (data far from the origin
# next to its spread: the error grows with s·t·‖x‖·max‖x_j‖). Their screened weights are
# then off by factors e^±error, which the head corrections, sized for small errors, do not
# cover; their live weights are all computed exactly instead. Images in [-1, 1] stay far
# below it (~0.03 nats at t = 0.95, d = 3072).
DENSE_TYPICAL_MAX = 0.05
# Rows whose screen magnitudes (2s·(‖x‖ + t·max‖x_j‖)²) reach this would overflow float32
# (3.4e38): they are computed in float64.
FLOAT32_SCREEN_MAX = 1e30


# --------------------------------------------------------------------------- validation


def check_t(t: float | Tensor, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """t as a float64 (batch,) tensor, after checking that every value lies in [0, 1)."""
    if isinstance(t, (float, int)) and not isinstance(t, bool):
        if not 0 <= t < 1:  # (also NaN)
            raise InputError(f"t must lie in [0, 1); got {float(t)!r}")
        return torch.full((batch,), float(t), dtype=torch.float64, device=device)
    t64 = torch.as_tensor(t, dtype=torch.float64, device=device)
    if t64.ndim == 0:
        t64 = t64.expand(batch)
    elif t64.shape != (batch,):
        raise InputError(f"t has shape {tuple(t64.shape)}; expected a float or a ({batch},) tensor")
    bad = torch.isnan(t64) | (t64 < 0) | (t64 >= 1)
    if bool(bad.any()):
        raise InputError(f"t must lie in [0, 1); got {t64[bad][0].item()!r}")
    return t64.contiguous()


def flatten_queries(x: Tensor, dim: int) -> Tensor:
    """x of shape (B, d) or (B, C, H, W) as (B, d), checking d against the data's dimension."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise InputError("x must be a floating-point tensor")
    if x.ndim < 2:
        raise InputError(f"x has shape {tuple(x.shape)}; expected (B, d) or (B, C, H, W)")
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # also for B = 0
    if flat.shape[1] != dim:
        raise InputError(
            f"x has shape {tuple(x.shape)} ({flat.shape[1]} values per sample) but the data has "
            f"d={dim}"
        )
    if flat.numel():
        # One reduction without a mask (10× faster than isfinite().all() on a CPU); aminmax
        # propagates NaN, and ±inf reaches one of the two ends.
        low, high = (float(v) for v in flat.aminmax())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InputError("x contains NaN or infinite values")
    return flat


# --------------------------------------------------------------------------- conversions


def velocity_from_denoiser(denoiser: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """û = (D - x) / (1 - t). t broadcasts over the batch dimension."""
    return (denoiser - x) / _per_sample(1 - t, x)


def denoiser_from_velocity(velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """D = x + (1 - t)·û."""
    return x + _per_sample(1 - t, x) * velocity


def score_from_denoiser(denoiser: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """∇log p_t(x) = (t·D - x) / (1-t)², the score of p_t = Σ_j N(t·x_j, (1-t)² I) / n."""
    return (_per_sample(t, x) * denoiser - x) / _per_sample((1 - t) ** 2, x)


def denoiser_from_score(score: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """D = (x + (1-t)²·score) / t, defined for t > 0 (at t = 0 the score does not see D)."""
    if bool((torch.as_tensor(t) <= 0).any()):
        raise InputError("the denoiser cannot be recovered from the score at t = 0")
    return (x + _per_sample((1 - t) ** 2, x) * score) / _per_sample(t, x)


def velocity_from_score(score: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """û from the score, through the denoiser, so each formula is written once."""
    return velocity_from_denoiser(denoiser_from_score(score, x, t), x, t)


def score_from_velocity(velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """∇log p_t(x) from û, through the denoiser."""
    return score_from_denoiser(denoiser_from_velocity(velocity, x, t), x, t)


def _per_sample(values: Tensor | float, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) tensor (or a scalar) to broadcast against `like` (B, ...)."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if values.ndim == 0:
        return values
    return values.reshape(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------- softmax state


# --------------------------------------------------------------------------- prepared data


@dataclass(frozen=True)
class ScreenFrame:
    """The one pass's screen in a frame centred on `center` (float64 (d,), or None: the
    points as they are): the points x_j - center and their squared norms in float32, and the
    largest norm, exact. The logits are the same in it: ℓ_j = -s‖(x - t·c) - t(x_j - c)‖²."""

    center: Tensor | None
    points: Tensor
    sq_norms: Tensor
    max_norm: float


# The one pass screens in a frame centred on the data's mean where that shrinks the largest
# norm below this fraction of the points' own (digits: 7.5 → 6.0), for batches whose screen
# errs by more than SCREEN_CENTRE_NATS (typical, screening_error_bound) in some row: below
# it the float32 rows are all accurate (digits: t < 0.65) and the frame's few B×d passes
# would cost ~5% of a call for nothing.
SCREEN_CENTRE_GAIN = 0.9
SCREEN_CENTRE_NATS = 2e-5


@dataclass(frozen=True)
class TrainingSet:
    """Training points (n, d) with what the engine needs about them, computed once.

    The points keep their storage dtype (float16, float32 or float64); chunks are converted to
    the compute dtype on the fly. sq_norms are exact float64 ‖x_j‖², sums the float64 Σ_j x_j
    (û* at t = 0 is mean - x).
    """

    points: Tensor
    sq_norms: Tensor
    max_norm: float
    sums: Tensor
    # What the engine derives from the points on first use (the int8 digits of int_screen,
    # the 8-bit grid of grid_digits).
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_points(cls, points: Tensor, chunk_size: int = 1024) -> TrainingSet:
        if not torch.is_tensor(points):
            points = torch.as_tensor(points)
        if points.ndim != 2:
            points = points.reshape(points.shape[0], -1)
        if points.shape[0] == 0:
            raise InputError("the training set is empty")
        if not points.is_floating_point():
            raise InputError(f"training points must be floating point, got {points.dtype}")
        # Small chunks: their float64 copies stay in cache (16,384 rows of 3,072 take 3× longer).
        sums = torch.zeros(points.shape[1], dtype=torch.float64, device=points.device)
        norms = row_sq_norms(points, chunk_size, sums)
        if not bool(torch.isfinite(norms).all()):
            raise InputError("the training set contains NaN or infinite values")
        return cls(points, norms, float(norms.max().sqrt()), sums)

    @property
    def n(self) -> int:
        return self.points.shape[0]

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def digits(self) -> Digits:
        """The points' int8 digits (int_screen.data_digits), made on first use and kept."""
        if "digits" not in self.derived:
            self.derived["digits"] = data_digits(self.points)
        return self.derived["digits"]

    def grid(self) -> Grid | None:
        """The 8-bit grid the points lie on (grid_digits.grid_of), or None; found on first
        use and kept."""
        if "grid" not in self.derived:
            self.derived["grid"] = grid_of(self.points)
        return self.derived["grid"]

    def sq_norms_as(self, dtype: torch.dtype) -> Tensor:
        """sq_norms in `dtype`, converted on first use and kept."""
        return self._kept_as("sq_norms", self.sq_norms, dtype)

    def points_as(self, dtype: torch.dtype) -> Tensor:
        """The points in `dtype`, converted on first use and kept (for small sets: the one
        pass reads them whole on every call)."""
        return self._kept_as("points", self.points, dtype)

    def screen_frame(self) -> ScreenFrame:
        """The frame the one pass screens in, found on first use and kept: centred on the
        points' mean where that shrinks their largest norm (the screen's rounding grows with
        ‖x‖·max‖x_j‖ and max‖x_j‖²), else the points as they are."""
        if "frame" not in self.derived:
            center = self.sums / self.n
            centred = self.points.to(torch.float64) - center
            norms = centred.square().sum(dim=1)
            reach = float(norms.max().sqrt())
            self.derived["frame"] = (
                ScreenFrame(center, centred.to(torch.float32), norms.to(torch.float32), reach)
                if reach < SCREEN_CENTRE_GAIN * self.max_norm else self.plain_frame())
        return self.derived["frame"]

    def plain_frame(self) -> ScreenFrame:
        """The points as they are, as a screen frame (no centre), kept."""
        if "plain frame" not in self.derived:
            self.derived["plain frame"] = ScreenFrame(
                None, self.points_as(torch.float32), self.sq_norms_as(torch.float32),
                self.max_norm)
        return self.derived["plain frame"]

    def _kept_as(self, name: str, values: Tensor, dtype: torch.dtype) -> Tensor:
        if dtype == values.dtype:
            return values
        key = (name, dtype)
        if key not in self.derived:
            self.derived[key] = values.to(dtype)
        return self.derived[key]

    def to(self, device: torch.device | str) -> TrainingSet:
        """The same training set with its tensors on `device`."""
        return TrainingSet(self.points.to(device), self.sq_norms.to(device), self.max_norm,
                           self.sums.to(device))


# Raw tensors passed to closed_form_velocity and friends, prepared once: preparing (float64
# norms over the whole set) cost as much as an exact call at n = 20,000, d = 3072. Keyed by
# the tensor's identity and checked against its storage, shape and version counter, so an
# in-place change of the data prepares it again; a few entries, weakly referenced.
_PREPARED: dict[int, tuple] = {}
_PREPARED_MAX = 4


def as_training_set(data: Tensor | TrainingSet) -> TrainingSet:
    """`data` as a TrainingSet; a tensor's is computed once and reused while it is unchanged."""
    if isinstance(data, TrainingSet):
        return data
    if not torch.is_tensor(data):
        return TrainingSet.from_points(data)
    try:
        version = data._version
    except RuntimeError:  # inference tensors keep no version counter: prepare every time
        return TrainingSet.from_points(data)
    key = id(data)
    stamp = (data.data_ptr(), tuple(data.shape), data.stride(), data.dtype, data.device,
             version)
    found = _PREPARED.get(key)
    if found is not None and found[0]() is data and found[1] == stamp:
        return found[2]
    train = TrainingSet.from_points(data)
    for dead in [k for k, (ref, *_) in _PREPARED.items() if ref() is None]:
        del _PREPARED[dead]
    while len(_PREPARED) >= _PREPARED_MAX:
        del _PREPARED[next(iter(_PREPARED))]
    _PREPARED[key] = (weakref.ref(data), stamp, train)
    return train


# --------------------------------------------------------------------------- error bounds


# --------------------------------------------------------------------------- the engine


def closed_form_state(x: Tensor, t: float | Tensor, data: Tensor | TrainingSet, *,
                      chunk_size: int | None = None,
                      compute_dtype: torch.dtype = torch.float32) -> SoftmaxState:
    """The softmax state of û* for queries x (B, d) at times t over all training points.

    Streams the data in chunks of `chunk_size` (default: the device's EngineSettings.chunk,
    8192 on CPUs and 16384 on GPUs). Per chunk one GEMM screens the logits, and each row's
    live weights (within the dropped-mass margin of its running maximum) are counted: a row
    with very few keeps them for exact float64 evaluation at the end, when the final maximum
    prunes most of them; a row with up to EngineSettings.sparse_limit sums its screened
    weights by a sparse product with the chunk; the others by the second GEMM, in float32.
    At the end each row's float32 error is estimated from its posterior spread
    (`_float32_error`); the largest screened weights are made exact until the estimate
    meets ACCURACY_TARGET, and rows still above FLOAT64_TARGET are computed again with every
    live weight exact. Rows at t = 0 take the exact mean; rows whose float32 screen would
    overflow go to float64. Peak extra memory is O(B·chunk + B·d) plus the recorded
    candidates (a few per row and chunk).
    """
    train = as_training_set(data)
    xf = flatten_queries(x, train.dim)
    return _closed_form_state(xf, check_t(t, xf.shape[0], xf.device), train,
                              chunk_size=chunk_size, compute_dtype=compute_dtype)


def _closed_form_state(xf: Tensor, t64: Tensor, train: TrainingSet, *, chunk_size: int | None,
                       compute_dtype: torch.dtype) -> SoftmaxState:
    """closed_form_state for checked queries xf (B, d) and times t64 ((B,) float64), both on
    the data's device."""
    batch, device = xf.shape[0], xf.device
    if compute_dtype not in (torch.float32, torch.float64):
        raise InputError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    if compute_dtype == torch.float32 and matmul_input_roundoff(compute_dtype, device) > 0:
        warnings.warn("torch's float32 matmuls run in TF32 or bf16 here: the exact engine's "
                      "screening bounds widen for it, but its dense sums are then accurate "
                      "only to ~1e-3 relative; keep TF32/bf16 off (torch's default) for "
                      "exact û*", stacklevel=2)
    if batch == 0:
        return SoftmaxState.empty(batch, train.dim, device)
    x64 = xf.to(torch.float64)
    t_min, t_max = (float(v) for v in t64.aminmax())
    settings = engine_settings(device)
    chunk_size = chunk_size or settings.chunk
    may_overflow = False
    if compute_dtype == torch.float32:
        # The screen's magnitudes must stay far inside float32's range (3.4e38).
        # (checked per row only when the batch's largest query and t could overflow)
        x_low, x_high = (float(v) for v in x64.aminmax())  # (no B×d temporary)
        reach_max = max(-x_low, x_high) * math.sqrt(train.dim) + t_max * train.max_norm
        may_overflow = not reach_max * reach_max / (1 - t_max) ** 2 < FLOAT32_SCREEN_MAX
    one_pass = compute_dtype == torch.float32 and train.n <= chunk_size and (
        train.n * train.dim <= settings.small_set_numbers)
    if one_pass and t_min > 0 and not may_overflow:
        # The usual case: every row takes the one pass, none to pick out or scatter back.
        state, rows = _one_pass(x64, t64, train, settings,
                                t_shared=t_min if t_min == t_max else None)
        if rows.numel() == 0:
            return state
        overflow = None
    else:
        state, rows, overflow = _flat_and_overflow_rows(x64, t64, train, may_overflow)
        if one_pass and rows.numel():
            part, rest = _one_pass(x64[rows], t64[rows], train, settings)
            _scatter_state(state, rows, part)
            rows = rows[rest]
    grid = None
    if rows.numel() and compute_dtype == torch.float32:
        grid = _grid_for(train, settings, device, chunk_size)
        if grid is not None or _int_screen_fits(train, settings, device):
            part, rest = _int_pass(x64[rows], t64[rows], train, chunk_size, settings, grid)
            done = (~rest).nonzero().squeeze(1)
            _scatter_state(state, rows[done], SoftmaxState(part.ref[done], part.z[done],
                                                           part.s[done]))
            rows = rows[rest]
    if rows.numel():
        part, inaccurate = _stream(x64[rows], t64[rows], train, chunk_size, compute_dtype,
                                   settings, grid=grid)
        _scatter_state(state, rows, part)
        if bool(inaccurate.any()):  # again, with exact weights for every live point
            rows = rows[inaccurate]
            part, _ = _stream(x64[rows], t64[rows], train, chunk_size, compute_dtype,
                              settings, exact_only=True, grid=grid)
            _scatter_state(state, rows, part)
    if overflow is not None and bool(overflow.any()):
        rows = overflow.nonzero().squeeze(1)
        part, _ = _stream(x64[rows], t64[rows], train, chunk_size, torch.float64, settings)
        _scatter_state(state, rows, part)
    return state


def _flat_and_overflow_rows(x64: Tensor, t64: Tensor, train: TrainingSet,
                            may_overflow: bool) -> tuple[SoftmaxState, Tensor, Tensor]:
    """(state, rows, overflow): the state with the rows at t = 0 set, the indices of the
    other rows whose float32 screen stays in range, and the mask of those that would
    overflow it (checked per row where may_overflow)."""
    batch, device = x64.shape[0], x64.device
    state = SoftmaxState.empty(batch, train.dim, device)
    # t = 0: every logit is -‖x‖²/2, so every weight is equal and D is the mean, exactly.
    flat = t64 == 0
    if bool(flat.any()):
        state.ref[flat] = -0.5 * x64[flat].square().sum(dim=1)
        state.z[flat] = float(train.n)
        state.s[flat] = train.sums.to(device)
    overflow = torch.zeros(batch, dtype=torch.bool, device=device)
    if may_overflow:
        s = 0.5 / (1 - t64) ** 2
        reach = x64.norm(dim=1) + t64 * train.max_norm
        overflow = ~(2 * s * reach * reach < FLOAT32_SCREEN_MAX) & ~flat
    return state, (~flat & ~overflow).nonzero().squeeze(1), overflow


def _one_pass(x64: Tensor, t: Tensor, train: TrainingSet, settings: EngineSettings,
              t_shared: float | None = None) -> tuple[SoftmaxState, Tensor]:
    """(state, rest) for a small training set in one chunk (t_shared: the t of every query,
    where the caller knows they share one). One float32 GEMM screens the logits of every row,
    the second sums their weights, and each row's error is estimated as in `_float32_error`,
    after the top weight is made exact (`_exact_top_`): the largest weight left screened is
    then the second, at most min(1/Z, 1 - 1/Z) of the total. Rows whose estimate exceeds
    FLOAT64_TARGET, and rows whose float32 screen is too coarse for the weight floor (t → 1),
    keep the points that may matter (within the dropped-mass margin widened by twice the
    screen's proven error) and, when those are few, weigh them exactly from float64
    differences. Rows with many take one float64 GEMM: its weights directly where its
    rounding stays below DOT_FORM_NATS, else as a screen whose few live weights are computed
    from differences. `rest` holds the indices of the rows with too many of those, left to
    the streaming engine."""
    batch, dim = x64.shape
    n, device = train.n, x64.device
    s = (1 - t).pow_(-2).mul_(0.5)
    x_norm = torch.linalg.vector_norm(x64, dim=1)
    x_sq = x_norm.square()
    # (with one t, the bound and the screen take it as a float: fewer small operations)
    t_screen, s_screen = (t, s) if t_shared is None else (t_shared, 0.5 / (1 - t_shared) ** 2)
    proven, typical = screening_error_bound(x_norm, t_screen, train.max_norm, dim,
                                            torch.float32, device, s_screen)
    # A batch whose screen errs by more than SCREEN_CENTRE_NATS somewhere is screened in the
    # frame centred on the data (train.screen_frame), where it errs less: fewer rows then
    # need float64 weights. xs = x - t·c are its queries; ⟨x, c⟩ gives ‖x - c‖ (‖D - x‖ in it).
    frame = train.screen_frame()
    xs, xs_sq, x_dot_c = x64, x_sq, None
    if frame.center is None or not float(typical.amax()) > SCREEN_CENTRE_NATS:
        frame = train.plain_frame()
    else:
        xs = (torch.add(x64, frame.center, alpha=-t_shared) if t_shared is not None
              else torch.addr(x64, t, frame.center, alpha=-1.0))
        xs_norm = torch.linalg.vector_norm(xs, dim=1)
        xs_sq = xs_norm.square()
        x_dot_c = x64 @ frame.center
        proven, typical = screening_error_bound(xs_norm, t_screen, frame.max_norm, dim,
                                                torch.float32, device, s_screen)
    # Weights below e^-floor of the top stay at e^-floor instead of 0: for rows whose bound
    # allows it, at most n·e^-(log n + 36) of the total, under the dropped mass; never
    # subnormal, nor their products with the points (those slow the second GEMM ~3×).
    floor = settings.one_pass_floor_nats
    coarse = proven > (floor - math.log(n) - DROPPED_MASS_NATS) / 2
    any_coarse = bool(coarse.any())
    rows: list[Tensor] = []
    live: list[Tensor] = []
    points, sq = frame.points, frame.sq_norms
    if any_coarse and bool(coarse.all()):  # (near t = 1: no row needs the batch's screen)
        state = SoftmaxState.empty(batch, dim, device)
    else:
        # Every row is screened, coarse ones too (their states are set again below): one GEMM
        # for the batch, no rows to pick out.
        # In bits (log2 of the weights): torch's exp2 runs 3-4× faster than its exp on AMD
        # EPYC CPUs (on Intel Xeons its exp is 1.7× faster, ~2% of a call).
        logits = screened_logits(xs, t_screen, s_screen * LOG2_E, points, sq,
                                 out=_logits_buffer(batch, n, device))
        # (torch's max over rows splits them between threads as the passes below do: numpy's
        # argmax on one thread, then those passes, move half the logits between the cores'
        # caches twice after the GEMM; its index is the first of equal maxima)
        top, first = logits.max(dim=1)
        weights = logits.sub_(top[:, None]).clamp_(min=-floor * LOG2_E).exp2_()
        z = weights.sum(dim=1).to(torch.float64)
        sums = (weights @ points).to(torch.float64)
        q = (weights @ sq).to(torch.float64)
        # In the frame (sums of x_j - c): ‖D - c‖ and ‖D - x‖ for D = S/Z, the latter from
        # ‖S‖² - 2Z⟨S, x - c⟩ + Z²‖x - c‖² (no B×d temporary: fresh ones of 128 KB are often
        # page-faulted in on every call). Its float64 cancellation, ~u·(‖x‖/‖D - x‖)²
        # relative, is far below what an estimate needs.
        s_norm = torch.linalg.vector_norm(sums, dim=1)
        s_dot_x = torch.bmm(sums[:, None, :], x64[:, :, None]).view(batch)
        xm_sq = x_sq
        if frame.center is not None:  # ⟨S, x - c⟩ and ‖x - c‖², from ⟨S, c⟩ and ⟨x, c⟩
            c = frame.center
            s_dot_x.sub_(sums @ c)
            xm_sq = (x_sq - 2 * x_dot_c).add_(float(c @ c))
        estimate = _one_pass_estimate(z, s_norm, s_dot_x, q, xm_sq, typical, n)
        ref = torch.addcmul(top.to(torch.float64).mul_(LN_2), s, xs_sq, value=-1.0)
        if frame.center is not None:
            sums.addr_(z, frame.center)  # back from the frame: Σ w_j x_j = S + Z·c
        # The top weights are made exact where one holds more than half its row's mass (Z <
        # 2; then in every row, as picking rows out costs more): the estimate leaves them out.
        # In a batch without such rows each top is the largest screened weight, which the
        # estimate counts, and its screening error moves log Z no more than the others' do.
        if bool((z < 2).any()):
            _exact_top_(ref, z, sums, first, x64, t, s, train)
        state = SoftmaxState(ref, z, sums)
        if not any_coarse and float(estimate.amax()) <= FLOAT64_TARGET:  # (NaN fails it too)
            return state, first[:0]
        # Rows the float32 sums leave too inaccurate, mostly a few points sharing the mass: as
        # for coarse rows, the points within the dropped-mass margin widened by twice the proven
        # bound (here their float32 weights show which) hold every weight that matters; where
        # they are few, they are weighed exactly from differences.
        bad = (~(estimate <= FLOAT64_TARGET) & ~coarse).nonzero().squeeze(1)
        margin = ((math.log(n) + DROPPED_MASS_NATS + 2 * proven[bad]) * LOG2_E
                  + 4 * FLOAT32_ROUNDOFF * top[bad].abs() + PAIR_MARGIN_SLACK_BITS)
        rows.append(bad)
        live.append(weights[bad] >= torch.exp2(-margin)[:, None])
    if any_coarse:
        # Too coarse for the floor, not for a screen: the float32 logits within the dropped-
        # mass margin widened by twice the proven bound hold every weight that matters, few
        # per row near t = 1.
        near = coarse.nonzero().squeeze(1)
        logits = screened_logits(xs[near], t[near], s[near], points, sq)
        top = logits.amax(dim=1).to(torch.float64)
        # (the threshold's own float32 rounding, a few units in the last place of the top)
        margin = (math.log(n) + DROPPED_MASS_NATS + 2 * proven[near]
                  + 4 * FLOAT32_ROUNDOFF * top.abs())
        rows.append(near)
        live.append(logits >= (top - margin).to(torch.float32)[:, None])
    rows, live = (rows[0], live[0]) if len(rows) == 1 else (torch.cat(rows), torch.cat(live))
    few = _row_counts(live) <= settings.one_pass_pair_rows
    _live_pairs_into(state, x64, t, s, train, rows[few], live[few])
    rows = rows[~few]
    if rows.numel() == 0:
        return state, rows
    # In place where it can (fresh temporaries of this size are page-faulted in on each call).
    p64 = train.points_as(torch.float64)
    sr, tr = s[rows], t[rows]
    full = torch.mm(x64[rows], p64.T).mul_((2 * sr * tr)[:, None])
    full.addr_(-sr * tr * tr, train.sq_norms)  # the logits less s‖x‖², the same for every j
    first = row_argmax(full)
    best = full.gather(1, first[:, None]).squeeze(1)
    direct = dot_form_holds(x_norm[rows], tr, train.max_norm, sr)
    if bool(direct.any()):
        every = bool(direct.all())
        w64 = full if every else full[direct]
        w64 = w64.sub_(best[direct, None]).clamp_(min=-floor).exp_()
        done = rows[direct]
        z, sums = w64.sum(dim=1), w64 @ p64
        state.ref[done] = _exact_top_(best[direct] - sr[direct] * x_sq[done], z, sums,
                                      first[direct], x64[done], t[done], s[done], train)
        state.z[done], state.s[done] = z, sums
        if every:
            return state, rows[:0]
    screened = rows[~direct]
    bound, _ = screening_error_bound(x_norm[screened], t[screened], train.max_norm, dim,
                                     torch.float64, device)
    margin = math.log(n) + DROPPED_MASS_NATS + 2 * bound
    live = full[~direct] >= (best[~direct] - margin)[:, None]
    few = _row_counts(live) <= settings.one_pass_pair_rows
    _live_pairs_into(state, x64, t, s, train, screened[few], live[few])
    return state, screened[~few]


def _one_pass_estimate(z: Tensor, s_norm: Tensor, s_dot_x: Tensor, q: Tensor, x_sq: Tensor,
                       typical: Tensor, n: int, in_numpy: bool | None = None) -> Tensor:
    """The one pass's error estimate per row, relative to ‖D - x‖, as `_float32_error`'s
    for a single chunk: from Z, ‖S‖, ⟨S, x⟩ and Σ w_j‖x_j‖² (float64, (B,) each) and the
    screen's typical error. The top weights are made exact (_exact_top_) in a batch where
    some λ_top = 1/Z exceeds 1/2, so the largest weight left screened is at most min(λ_top,
    1 - λ_top) of the total: the second there, the top itself in a batch without.
    On a CPU in numpy, on the tensors' memory: some 25 operations on B values, each a few
    times faster than torch's there (in_numpy: force either way; None: by device)."""
    cpu = z.device.type == "cpu" if in_numpy is None else in_numpy
    xp = np if cpu else torch
    if cpu:
        z, s_norm, s_dot_x, q, x_sq, typical = (v.numpy() for v in
                                                 (z, s_norm, s_dot_x, q, x_sq, typical))

    def above_0(v):
        return np.maximum(v, 0.0) if cpu else v.clamp(min=0.0)

    inv_z = 1 / z
    gap = xp.sqrt(above_0(s_norm * s_norm - 2 * z * s_dot_x + z * z * x_sq)) * inv_z
    d_norm, q_z = s_norm * inv_z, q * inv_z
    screened_max = xp.minimum(inv_z, above_0(1 - inv_z))
    scatter = xp.sqrt(above_0(q_z - d_norm * d_norm) * screened_max) * typical
    rounding = (xp.sqrt(q_z) + math.sqrt(n) * d_norm) * FLOAT32_ROUNDOFF
    if not cpu:
        return (rounding + SCREEN_SAFETY * scatter) / gap
    with np.errstate(divide="ignore", invalid="ignore"):  # (D = x: inf, as torch gives)
        return torch.from_numpy((rounding + SCREEN_SAFETY * scatter) / gap)


class _Screen:
    """The screened logits ℓ_j + s‖x‖² = 2st⟨x, x_j⟩ - st²‖x_j‖² of a batch of queries in
    `dtype`, chunk by chunk: the queries are scaled by 2st once, and each chunk takes one GEMM
    whose bias is -st²‖x_j‖² (the rounding screening_error_bound bounds). shared_t: whether
    every query has the same t (None: look)."""

    def __init__(self, x64: Tensor, t: Tensor, s: Tensor, dtype: torch.dtype,
                 shared_t: bool | None = None):
        # (rounded to `dtype` first: no float64 B×d temporary; the product's rounding and the
        # inputs' stay within the bound's few u·A)
        self.query = x64.to(dtype, copy=True).mul_((2 * s * t).to(dtype)[:, None])
        self.b = (s * t * t).to(dtype)
        self.shared_t = bool((t == t[0]).all()) if shared_t is None else shared_t

    def __call__(self, points: Tensor, sq: Tensor, out: Tensor | None = None) -> Tensor:
        """(B, m) screened logits over points (m, d) and their squared norms sq (m,), both in
        the screen's dtype (into `out` where given). With one t per query the bias is added
        in place, with no B×m temporary: the same two roundings as a bias matrix."""
        if self.shared_t:
            return torch.addmm((-self.b[0] * sq)[None, :], self.query, points.T, out=out)
        return torch.mm(self.query, points.T, out=out).addr_(self.b, sq, alpha=-1.0)


def screened_logits(x64: Tensor, t: Tensor | float, s: Tensor | float, points: Tensor,
                    sq: Tensor, out: Tensor | None = None) -> Tensor:
    """float32 screened logits 2st⟨x, x_j⟩ - st²‖x_j‖² (B, n) over float32 points and norms.
    With one t for the batch (t and s floats, or tensors of equal values) its scalars fold
    into the GEMM (alpha, beta) and the queries are only rounded to float32; else as
    `_Screen`. Into `out` where given."""
    if torch.is_tensor(t):
        if not bool((t == t[0]).all()):
            return _Screen(x64, t, s, torch.float32, shared_t=False)(points, sq, out)
        t, s = float(t[0]), float(s[0])
    return torch.addmm(sq[None, :], x64.to(torch.float32), points.T, beta=-s * t * t,
                       alpha=2 * s * t, out=out)


# The one pass's B×n logits, kept between calls on CPUs (one buffer per thread, up to this
# many bytes): a fresh buffer of that size is often page-faulted in and zeroed by the kernel
# on every call, which costs more than the GEMM that fills it.
_WORKSPACE = threading.local()
WORKSPACE_MAX_BYTES = 64 << 20


def _logits_buffer(rows: int, cols: int, device: torch.device) -> Tensor | None:
    """A (rows, cols) float32 buffer for one pass's logits: this thread's kept one on a
    CPU, None (a fresh output) elsewhere or above WORKSPACE_MAX_BYTES. Valid until the next
    call on this thread."""
    size = rows * cols
    if device.type != "cpu" or 4 * size > WORKSPACE_MAX_BYTES:
        return None
    buffer = getattr(_WORKSPACE, "logits", None)
    if buffer is None or buffer.numel() < size:
        buffer = _WORKSPACE.logits = torch.empty(size, dtype=torch.float32)
    return buffer[:size].view(rows, cols)


def row_argmax(values: Tensor) -> Tensor:
    """Each row's index of its largest value, the first of equals (as argmax(dim=1)); on a
    CPU by numpy's, which runs ~5× faster than torch's at the one pass's shapes."""
    if values.device.type == "cpu" and not values.requires_grad:
        return torch.from_numpy(values.numpy().argmax(axis=1))
    return values.argmax(dim=1)


def largest_logits(x: Tensor, t: float, data: Tensor | TrainingSet) -> Tensor:
    """max_j ℓ_j = -min_j ‖x - t·x_j‖² / (2(1-t)²) per query (B,), exact in float64 (what
    the largest weight max λ = exp(ℓ_max - log Z) needs, with log Z from closed_form_state).

    One pass in the engine's chunks: the float32 screen (`screened_logits`) with its proven
    error E keeps every point within 2E of its chunk's screened maximum, and those logits
    are recomputed from x - t·x_j in float64.
    """
    train = as_training_set(data)
    x64 = flatten_queries(x, train.dim).to(torch.float64)
    batch, dim = x64.shape
    s = 0.5 / (1 - t) ** 2
    if t == 0:  # every logit is -‖x‖²/2
        return -s * x64.square().sum(dim=1)
    t64 = torch.full((batch,), t, dtype=torch.float64, device=x64.device)
    proven, _ = screening_error_bound(x64.norm(dim=1), t64, train.max_norm, dim, torch.float32,
                                      x64.device)
    s64 = torch.full((batch,), s, dtype=torch.float64, device=x64.device)
    best = torch.full((batch,), -math.inf, dtype=torch.float64, device=x64.device)
    chunk_size = engine_settings(x64.device).chunk
    block = pair_block(x64.device, dim)
    for start in range(0, train.n, chunk_size):
        chunk = train.points[start:start + chunk_size]
        norms = train.sq_norms[start:start + chunk_size].to(torch.float32)
        screened = screened_logits(x64, t64, s64, chunk.to(torch.float32), norms)
        top = screened.amax(dim=1).to(torch.float64)
        live = screened.to(torch.float64) >= (top - 2 * proven)[:, None]
        rows, cols = live.nonzero().unbind(1)
        for i in range(0, rows.numel(), block):
            r, c = rows[i:i + block], cols[i:i + block]
            exact = -s * difference_sq(x64[r], t, chunk[c].to(torch.float64))
            best = best.scatter_reduce(0, r, exact, reduce="amax")
    return best


def _live_pairs_into(state: SoftmaxState, x64: Tensor, t: Tensor, s: Tensor,
                     train: TrainingSet, done: Tensor, live: Tensor) -> None:
    """Set the states of rows `done` from the exact weights of their live points (one row
    of the mask `live` per entry of done), logits from float64 differences."""
    local, c = live.nonzero().unbind(1)  # local: the row among `done`, ascending
    if local.numel() == 0:
        return
    r = done[local]
    pair = torch.index_select(train.points_as(torch.float64), 0, c)
    diff = torch.index_select(x64, 0, r).addcmul_(t[r, None], pair, value=-1.0)
    logits = -s[r] * diff.square_().sum(dim=1)
    top = torch.full((done.numel(),), -math.inf, dtype=torch.float64,
                     device=x64.device).scatter_reduce_(0, local, logits, reduce="amax")
    w = torch.exp(logits - top[local])
    state.ref[done] = top
    state.z[done] = torch.zeros_like(top).index_add_(0, local, w)
    state.s[done] = torch.zeros(done.numel(), x64.shape[1], dtype=torch.float64,
                                device=x64.device).index_add_(0, local, pair.mul_(w[:, None]))


def _exact_top_(ref: Tensor, z: Tensor, sums: Tensor, first: Tensor, x64: Tensor, t: Tensor,
                s: Tensor, train: TrainingSet) -> Tensor:
    """Make each row's top weight exact in place: the sums hold it as weight 1 at the
    reference `ref` (its dot-form logit), and the other weights relative to that reference.
    The top's weight becomes e^(exact - ref), its logit from float64 differences, so log Z
    (ref + log z) and max λ carry no rounding of the top (analysis.collapse reads them).
    Returns ref. (One B×d pass over the sums: S + (e^(exact - ref) - 1)·x_top.)"""
    top = torch.index_select(train.points_as(torch.float64), 0, first)
    exact = difference_sq(x64, t[:, None], top).mul_(s).neg_()
    gain = torch.expm1(exact.sub_(ref))
    z.add_(gain)
    sums.addcmul_(top, gain[:, None])
    return ref


def _int_screen_fits(train: TrainingSet, settings: EngineSettings, device: torch.device) -> bool:
    """Whether rows first try the int8 screen (_int_pass) on this data and device."""
    return (settings.int_screen and train.n * train.dim * 2 <= settings.int_screen_max_bytes
            and int_screen_available(device, train.dim))


def _grid_for(train: TrainingSet, settings: EngineSettings, device: torch.device,
              chunk_size: int) -> Grid | None:
    """The training set's 8-bit grid where its int8 GEMMs run here (grid_digits): the int8
    pass then screens with two digits per query against the grid's codes, and the dense
    rows of the stream take GridScreen and grid_sums in place of both float32 GEMMs."""
    if not (settings.int_screen and settings.grid_gemms
            and train.n * train.dim <= settings.int_screen_max_bytes
            and grid_fits(train.dim, chunk_size) and grid_gemms_available(device)):
        return None
    return train.grid()


def _int_pass(x64: Tensor, t: Tensor, train: TrainingSet, chunk_size: int,
              settings: EngineSettings, grid: Grid | None = None
              ) -> tuple[SoftmaxState, Tensor]:
    """(state, rest): the rows whose live weights stay few in every chunk under the int8
    screen (int_screen.IntScreen, a proven bound) get their state from the exact float64
    weights of those live points; `rest` marks the others, whose state is left empty.

    A row leaves as soon as one chunk holds more than EngineSettings.int_limit live weights
    (within the dropped-mass margin, widened by twice the screen's proven error, of its
    running top) and takes the float32 stream instead; the rows left are screened by three
    int8 GEMMs per chunk in place of one float32 GEMM (over a grid, one GEMM of two digits
    per query by the grid's codes).
    """
    batch, dim = x64.shape
    device, n = x64.device, train.n
    s = 0.5 / (1 - t) ** 2
    screen = (IntScreen(x64, t, s, train.digits(), train.max_norm) if grid is None
              else GridScreen(x64, t, s, grid, train.max_norm, count=2))
    live_margin = math.log(n) + DROPPED_MASS_NATS + 2 * screen.proven
    top = torch.full((batch,), -math.inf, dtype=torch.float64, device=device)
    active = torch.arange(batch, device=device)
    found = _Candidates(batch, device, max(1 << 18, 64 * batch), None)
    # The first chunk is a short probe: rows dense there leave after little work.
    probe = min(chunk_size, settings.row_limit_columns)
    for start in [0, *range(probe, n, chunk_size)]:
        stop = min(start + (probe if start == 0 else chunk_size), n)
        norms = train.sq_norms[start:stop].to(device=device, dtype=torch.float32)
        every = active.numel() == batch
        logits = screen(start, stop, norms, None if every else active)
        top[active] = torch.maximum(top[active], logits.amax(dim=1).to(torch.float64))
        floor = top - live_margin
        live = logits >= floor[active].to(torch.float32)[:, None]
        few = _row_counts(live) <= settings.int_limit(stop - start)
        if start == 0 and not bool(few.all()) and int(few.sum()) < settings.int_min_rows:
            # The float32 stream runs anyway: a few more rows cost it less than the int8
            # GEMMs' pass over the data for them.
            few.zero_()
        if not bool(few.all()):
            active, live, logits = active[few], live[few], logits[few]
            if active.numel() == 0:
                break
        r, c = live.nonzero().unbind(1)
        found.add_(active[r], c + start, logits[r, c].to(torch.float64), floor)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    done[active] = True
    state = _Sums.empty(batch, dim, device)
    rows, cols, _ = found.compact_(top - live_margin)
    kept = done[rows]
    _add_exact_pairs(state, x64, t, s, x64.square().sum(dim=1), train, rows[kept], cols[kept])
    return SoftmaxState(state.ref, state.z, state.s), ~done


def _row_counts(mask: Tensor) -> Tensor:
    """True entries per row of a 2-D bool mask: bytes summed into int32 (count_nonzero and
    an int64 sum are 3-4× slower on a 256 × 8192 mask here)."""
    return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32)


def _scatter_state(state: SoftmaxState, rows: Tensor, part: SoftmaxState) -> None:
    state.ref[rows], state.z[rows], state.s[rows] = part.ref, part.z, part.s


def _stream(x64: Tensor, t: Tensor, train: TrainingSet, chunk_size: int, cdt: torch.dtype,
            settings: EngineSettings, exact_only: bool = False,
            grid: Grid | None = None) -> tuple[SoftmaxState, Tensor]:
    """(state, inaccurate): the engine over every chunk for rows with t > 0; `inaccurate`
    marks float32 rows whose estimated error stays above FLOAT64_TARGET. exact_only: no
    dense rows, every live weight exact. grid (float32 only): screen with three int8 digits
    per query and sum the dense rows' weights in int8 digits (grid_digits), at the float32
    screen's accuracy."""
    batch, dim = x64.shape
    device, n = x64.device, train.n
    s = 0.5 / (1 - t) ** 2
    x_sq = x64.square().sum(dim=1)
    if grid is None:
        proven, typical = screening_error_bound(x_sq.sqrt(), t, train.max_norm, dim, cdt,
                                                device)
        screen_of = _Screen(x64, t, s, cdt)
    else:
        grid_screen = GridScreen(x64, t, s, grid, train.max_norm, count=3)
        proven, typical = grid_screen.proven, grid_screen.typical
    live_margin = math.log(n) + DROPPED_MASS_NATS + 2 * proven
    dense_allowed = (t <= DENSE_T_MAX) & (typical <= DENSE_TYPICAL_MAX) & (not exact_only)
    # Dense rows record the screened weights near their top: the candidates for exact
    # recomputation if their estimated error turns out too large.
    # Coarser screens need more of the head at hand: the weight that may stay screened
    # shrinks like 1/σ² (_correct_heads).
    head_margin = (settings.head_nats
                   + 2 * torch.log(typical / settings.head_growth_nats).clamp(min=0) + 2 * typical)
    record_head = dense_allowed & (typical > HEAD_SKIP_NATS)
    # Screened logits omit -s‖x‖², the same for every j; `offset` converts to full logits.
    offset = s * x_sq
    flush_every = settings.flush_every(chunk_size)
    sparse_limit = settings.sparse_limit(chunk_size)
    exact_limit = settings.exact_limit(chunk_size)
    dense_sums = _DenseSums(batch, dim, device, cdt, record_head, head_margin, typical,
                            flush_every * chunk_size, settings, grid)
    top = torch.full((batch,), -math.inf, dtype=torch.float64, device=device)
    live_found = _Candidates(batch, device, max(1 << 18, 64 * batch), None)
    all_dense = False
    for index, start in enumerate(range(0, n, chunk_size)):
        stop = min(start + chunk_size, n)
        chunk = train.points[start:stop].to(device=device, dtype=cdt)
        norms = train.sq_norms[start:stop].to(device=device, dtype=cdt)
        logits = screen_of(chunk, norms) if grid is None else grid_screen(start, stop, norms)
        chunk_top = logits.amax(dim=1).to(torch.float64)
        top = torch.maximum(top, chunk_top)
        if all_dense and index % settings.recheck_dense_every:
            dense = sparse = exact = None
        else:  # which rows have few enough live weights to skip the second GEMM
            live = logits >= (top - live_margin).to(cdt)[:, None]
            counts = _row_counts(live)
            dense = (counts > sparse_limit) & dense_allowed
            # Mostly dense: all rows take the GEMM (one pass over the chunk's rows; picking
            # the few others out costs more than their share of the GEMM).
            all_dense = bool(dense_allowed.all()) and (
                int(dense.sum()) >= settings.all_dense_share * batch)
            if all_dense:
                dense = sparse = exact = None
            else:
                few = (counts <= exact_limit) | ~dense_allowed
                sparse = (~dense & ~few).nonzero().squeeze(1)
                exact = few.nonzero().squeeze(1)
                dense = dense.nonzero().squeeze(1)
        if exact is not None and exact.numel():
            every = exact.numel() == batch
            r, c = (live if every else live[exact]).nonzero().unbind(1)
            r = r if every else exact[r]
            live_found.add_(r, c + start, logits[r, c].to(torch.float64), top - live_margin)
        if sparse is not None and sparse.numel():
            dense_sums.add_sparse_(logits, live, sparse, top, chunk_top, chunk, norms, start)
        if dense is None or dense.numel():
            dense_sums.add_(logits, dense, top, chunk_top, chunk, norms, start, index)
        if index % flush_every == flush_every - 1:
            dense_sums.flush_()

    # The exact part: the live weights of sparse chunks that the final top keeps.
    exact = _Sums.empty(batch, dim, device)
    rows, cols, _ = live_found.compact_(top - live_margin)
    _add_exact_pairs(exact, x64, t, s, x_sq, train, rows, cols)
    dense = dense_sums.sums(offset)
    inaccurate = torch.zeros(batch, dtype=torch.bool, device=device)
    if cdt == torch.float32 and dense_sums.used:
        largest = dense_sums.dense_top - offset
        screen, sums = _float32_error(exact, dense, x64, typical, dense_sums.accumulated,
                                      largest, dense_sums.digit_error(train.max_norm))
        # Exact weights for the largest screened ones shrink the screening error; the float32
        # sums' rounding is already made, so that part stays (rows over the target are
        # computed again with exact weights only).
        # Rows with a head always get its top weights exact: Z (the normaliser, for log Z and
        # max λ) then errs only by what stays screened.
        fix = record_head & (dense_sums.dense_top > -math.inf)
        if bool(fix.any()):
            largest = _correct_heads(exact, dense, dense_sums, fix, x64, t, s, x_sq, train,
                                     offset, top, typical)
            screen, _ = _float32_error(exact, dense, x64, typical, dense_sums.accumulated,
                                       largest)
        inaccurate = screen + sums > FLOAT64_TARGET
    total = exact.merged(dense)
    return SoftmaxState(total.ref, total.z, total.s), inaccurate


@dataclass
class _Sums(SoftmaxState):
    """A softmax state (ref in the full convention) that also sums q = Σ w_j·‖x_j‖², for the
    posterior spread in _float32_error."""

    q: Tensor

    @classmethod
    def empty(cls, batch: int, dim: int, device: torch.device) -> _Sums:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.full((batch,), -math.inf, **f64), torch.zeros(batch, **f64),
                   torch.zeros(batch, dim, **f64), torch.zeros(batch, **f64))

    def _scale_rows_(self, rows: Tensor, scale: Tensor) -> None:
        super()._scale_rows_(rows, scale)
        self.q[rows] *= scale

    def merged(self, other: _Sums) -> _Sums:
        """The sums of both, relative to the larger reference."""
        ref = torch.maximum(self.ref, other.ref)
        a, b = rescale(self.ref, ref), rescale(other.ref, ref)
        return _Sums(ref, self.z * a + other.z * b, self.s * a[:, None] + other.s * b[:, None],
                     self.q * a + other.q * b)


def _float32_error(exact: _Sums, dense: _Sums, x64: Tensor, typical: Tensor,
                   accumulated: int, largest: Tensor,
                   digit_error: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(screening, summation): estimated relative errors of each row's velocity from its
    float32 parts, the screened weights and the float32 sums of the dense rows (the exact
    part is exact).

    A screened weight is off by a factor e^δ_j, δ_j of the order of the typical screening
    error σ (screening_error_bound) and independent between points. The denoiser then moves
    by Σ_j λ_j δ'_j (x_j - D) over the screened weights (δ' = δ minus its mean), of root mean
    square σ·√(Σ λ_j²‖x_j - D‖²) ≤ σ·√(λ_max·V), with λ_max the largest screened weight
    (`largest`: its full logit) and V = E_λ‖x_j‖² - ‖D‖² the posterior spread; SCREEN_SAFETY
    covers the distribution's tail. A float32 sum of K terms of one sign errs by about u·√K
    of its value (measured with MKL: 1.0-1.1×), terms of both signs by about u of their
    magnitude √(Σ λ_j‖x_j‖²) (0.7× measured); here over the dense share. Over a grid
    (grid_digits) the dense sums are exact int32 sums of weights rounded to int8 digits:
    `digit_error` (_DenseSums.digit_error) bounds the weights' rounding, √(Σ_j δ_j²)·R in
    the dense sums' units, which moves D by about that over Z (independent roundings). All
    are relative to ‖D - x‖ = (1-t)·‖û*‖.
    """
    total = exact.merged(dense)
    denoiser = total.s / total.z[:, None]
    gap = (denoiser - x64).norm(dim=1)
    scale = rescale(dense.ref, total.ref) / total.z
    share = (dense.z * scale).clamp(min=0.0)
    biggest = torch.minimum(share, torch.exp(largest - total.ref) / total.z)
    spread = (total.q / total.z - denoiser.square().sum(dim=1)).clamp(min=0.0)
    screen = SCREEN_SAFETY * typical * (biggest * spread).sqrt() / gap
    value = dense.s.norm(dim=1) * scale
    magnitude = (dense.q.clamp(min=0) * scale).sqrt()
    sums = FLOAT32_ROUNDOFF * (math.sqrt(accumulated) * value + magnitude) / gap
    if digit_error is not None:
        sums = sums + digit_error * scale / gap
    return screen, sums


def _correct_heads(exact: _Sums, dense: _Sums, dense_sums: _DenseSums, fix: Tensor,
                   x64: Tensor, t: Tensor, s: Tensor, x_sq: Tensor, train: TrainingSet,
                   offset: Tensor, top: Tensor, typical: Tensor) -> Tensor:
    """Move the recorded screened weights of the rows in `fix` that are too large for the
    screening estimate to meet ACCURACY_TARGET (at most the settings' head_max per row,
    largest first) from the dense sums to exact float64 ones. Returns
    each row's largest full logit left screened in the dense sums (an upper bound:
    unrecorded ones lie below top - head_margin)."""
    largest = dense_sums.dense_top - offset
    rows, cols, screened = dense_sums.recorded(top)
    keep = fix[rows]
    rows, cols, screened = rows[keep], cols[keep], screened[keep] - offset[rows[keep]]
    # Unrecorded weights lie below top - head_margin, or were dropped past the cap.
    floor = torch.minimum(largest, torch.maximum(top - dense_sums.head_margin,
                                                 dense_sums.heads.dropped) - offset)
    if rows.numel() == 0:
        return torch.where(fix, floor, largest)
    total = exact.merged(dense)
    denoiser = total.s / total.z[:, None]
    gap = (denoiser - x64).norm(dim=1)
    spread = (total.q / total.z - denoiser.square().sum(dim=1)).clamp(min=1e-300)
    # The largest weight (share of the total) that may stay screened, as a full logit; the
    # weights within NORMALISER_NATS of the dense top and above NORMALISER_SHARE are taken in
    # any case.
    allowed = (ACCURACY_TARGET * gap / (SCREEN_SAFETY * typical)).square() / spread
    threshold = torch.minimum(total.ref + torch.log(allowed * total.z),
                              torch.maximum(largest - NORMALISER_NATS,
                                            total.ref + math.log(NORMALISER_SHARE) +
                                            torch.log(total.z)))
    order = torch.argsort(screened, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols, screened = rows[order], cols[order], screened[order]
    counts = torch.bincount(rows, minlength=fix.numel())
    rank = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0)
                                                              - counts)[rows]
    take = (screened > threshold[rows]) & (rank < dense_sums.settings.head_max)
    if bool(take.any()):
        _add_exact_pairs(exact, x64, t, s, x_sq, train, rows[take], cols[take],
                         remove=(dense, screened[take]))
    remaining = torch.full_like(largest, -math.inf).scatter_reduce(
        0, rows[~take], screened[~take], reduce="amax")
    return torch.where(fix, torch.maximum(floor, remaining), largest)


class _Candidates:
    """(row, col, screened logit) triples recorded chunk by chunk, in bounded memory.

    When more than `budget` are held, those below their row's current floor are dropped
    (the floor only rises) and, with a per-row cap, each row keeps its `cap` largest;
    `dropped` is then each row's largest logit let go that way (-inf if none).
    """

    def __init__(self, batch: int, device: torch.device, budget: int, cap: int | None):
        self.budget, self.cap = budget, cap
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.count = 0
        self.dropped = torch.full((batch,), -math.inf, dtype=torch.float64, device=device)

    def add_(self, rows: Tensor, cols: Tensor, values: Tensor, floor: Tensor) -> None:
        if rows.numel():
            self.parts.append((rows, cols, values))
            self.count += rows.numel()
            if self.count > self.budget:
                self.compact_(floor)

    def compact_(self, floor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Drop what lies below the floor (and past the cap); return what is kept."""
        if not self.parts:
            empty = floor.new_empty(0, dtype=torch.long)
            return empty, empty, floor.new_empty(0)
        rows, cols, values = (torch.cat(part) for part in zip(*self.parts, strict=True))
        keep = values >= floor[rows]
        rows, cols, values = rows[keep], cols[keep], values[keep]
        if self.cap is not None and rows.numel() > self.cap:
            order = torch.argsort(values, descending=True, stable=True)
            order = order[torch.argsort(rows[order], stable=True)]
            rows, cols, values = rows[order], cols[order], values[order]
            counts = torch.bincount(rows, minlength=floor.numel())
            rank = torch.arange(rows.numel(), device=rows.device) - (
                torch.cumsum(counts, 0) - counts)[rows]
            within = rank < self.cap
            if not bool(within.all()):
                self.dropped = self.dropped.scatter_reduce(0, rows[~within], values[~within],
                                                           reduce="amax")
                rows, cols, values = rows[within], cols[within], values[within]
        self.parts = [(rows, cols, values)]
        self.count = rows.numel()
        return rows, cols, values


class _DenseSums:
    """Sums of the screened weights of dense rows, relative to each row's running top
    (screened convention; `ref`). The second GEMM accumulates into float32 sums in place
    (addmm with beta = 1, no extra pass over them), which move into float64 every
    `flush_every` chunks, so a float32 sum holds at most that many chunks' terms. Rows in
    `record` also keep the positions and screened logits of their weights within head_margin
    of that top (`heads`), as `settings` bound them.
    """

    def __init__(self, batch: int, dim: int, device: torch.device, cdt: torch.dtype,
                 record: Tensor, head_margin: Tensor, typical: Tensor, accumulated: int,
                 settings: EngineSettings, grid: Grid | None = None):
        self.record, self.head_margin, self.settings = record, head_margin, settings
        self.grid = grid
        # Over a grid: Σ_j (ŵ_j - w_j)² of the weights' int8 rounding, in the sums' units.
        self.rounded_sq = torch.zeros(batch, dtype=torch.float64, device=device)
        # The smallest share of Z a recorded weight may hold: below it no correction is
        # needed while ‖D - x‖² ≥ V (_correct_heads' allowance).
        self.log_share_min = torch.log(torch.clamp(
            (ACCURACY_TARGET / (SCREEN_SAFETY * typical)).square(), max=settings.head_share_min))
        self.any_record = bool(record.any())
        self.ref = torch.full((batch,), -math.inf, dtype=torch.float64, device=device)
        self.total = _Sums.empty(batch, dim, device)
        self.s32 = torch.zeros(batch, dim, dtype=cdt, device=device)
        self.pending = False
        self.paused_until = torch.zeros(batch, dtype=torch.long, device=device)
        self.heads = _Candidates(batch, device, max(1 << 16, 4 * batch * settings.head_max),
                                 settings.head_max)
        # The largest screened logit summed here, per row.
        self.dense_top = torch.full((batch,), -math.inf, dtype=torch.float64, device=device)
        self.used = False
        # At most this many terms go into one float32 sum (flush_ every flush_terms).
        self.accumulated = accumulated

    def add_(self, logits: Tensor, rows: Tensor | None, top: Tensor, chunk_top: Tensor,
             chunk: Tensor, norms: Tensor, start: int, index: int) -> None:
        """Second GEMM over the screened weights of `rows` (None: all) in this chunk;
        chunk_top: every row's largest screened logit in the chunk."""
        def pick(values: Tensor) -> Tensor:
            return values if rows is None else values[rows]

        self.used = True
        if rows is None:
            torch.maximum(self.dense_top, chunk_top, out=self.dense_top)
        else:
            self.dense_top[rows] = torch.maximum(self.dense_top[rows], chunk_top[rows])
        lead, ref64 = self._raise_(rows, pick(top))
        weights = pick(logits)
        weights.sub_(ref64.to(logits.dtype)[:, None])
        if self.any_record:
            self._record_head_(weights, rows, ref64, lead, top, chunk_top, start, index)
        # Clamping at -80 nats keeps exp out of denormals (slow on CPUs); a weight of e^-80 per
        # point is far below the dropped-mass margin.
        weights.clamp_(min=-80.0).exp_()
        if self.grid is not None:
            q = weights @ norms
            sums, z, rounded_sq = grid_sums(weights, self.grid, start, start + weights.shape[1])
            at = slice(None) if rows is None else rows
            self.total.z[at] += z
            self.total.s[at] += sums
            self.total.q[at] += q
            self.rounded_sq[at] += rounded_sq
            return
        self.pending = True
        if rows is None:
            self.total.z += weights.sum(dim=1)
            self.s32.addmm_(weights, chunk)
            self.total.q += weights @ norms
        else:
            self.total.z[rows] += weights.sum(dim=1)
            self.s32[rows] += weights @ chunk
            self.total.q[rows] += weights @ norms

    def _raise_(self, rows: Tensor | None, top: Tensor) -> tuple[Tensor, Tensor]:
        """(lead, ref): the references of `rows` (None: all), raised to their running top
        where it exceeds them by more than the settings' ref_slack nats (rescaling their
        sums), and how far the top lies above them (0 ≤ lead ≤ ref_slack). Weights up to
        e^ref_slack then enter the sums; rescaling every time the top rises a little costs
        3% of a call."""
        old = self.ref if rows is None else self.ref[rows]
        moved = (top - old > self.settings.ref_slack).nonzero().squeeze(1)
        if moved.numel():
            target = moved if rows is None else rows[moved]
            scale = rescale(old[moved], top[moved])
            self.total.z[target] *= scale
            self.total.s[target] *= scale[:, None]
            self.total.q[target] *= scale
            self.rounded_sq[target] *= scale.square()
            self.s32[target] *= scale.to(self.s32.dtype)[:, None]
            self.ref[target] = top[moved]
        ref = self.ref if rows is None else self.ref[rows]
        return top - ref, ref

    def add_sparse_(self, logits: Tensor, live: Tensor, rows: Tensor, top: Tensor,
                    chunk_top: Tensor, chunk: Tensor, norms: Tensor, start: int) -> None:
        """The live screened weights of `rows` (few per row) in this chunk, summed by a
        sparse (CSR) product with the chunk while it is in cache: about a fifth of a dense
        row's cost per 100 weights here. Every head weight among them is recorded."""
        self.used = True
        self.dense_top[rows] = torch.maximum(self.dense_top[rows], chunk_top[rows])
        lead, ref64 = self._raise_(rows, top[rows])
        r, c = live[rows].nonzero().unbind(1)  # row-major, as CSR wants
        full = rows[r]
        values = logits[full, c] - ref64.to(logits.dtype)[r]
        cut = (lead - self.head_margin[rows]).to(values.dtype)
        head = (values >= cut[r]) & self.record[full]
        if bool(head.any()):
            self.heads.add_(full[head], c[head] + start,
                            values[head].to(torch.float64) + ref64[r[head]],
                            top - self.head_margin)
        weights = values.clamp_(min=-80.0).exp_()
        self.total.z.index_add_(0, full, weights.to(torch.float64))
        self.total.q.index_add_(0, full, (weights * norms[c]).to(torch.float64))
        # One CSR row per query of the batch (the others empty), so the product adds into
        # the float32 sums in place.
        batch = self.s32.shape[0]
        crow = torch.zeros(batch + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(torch.bincount(full, minlength=batch), 0, out=crow[1:])
        with warnings.catch_warnings():  # torch calls its CSR support "beta"
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(crow, c, weights, (batch, chunk.shape[0]))
            self.s32.addmm_(matrix, chunk)
        self.pending = True

    def _record_head_(self, weights: Tensor, rows: Tensor | None, ref64: Tensor, lead: Tensor,
                      top: Tensor, chunk_top: Tensor, start: int, index: int) -> None:
        """Record the chunk's head weights (weights: screened logits minus ref, per row of
        `rows`): those within head_margin of the running top that also hold at least
        `share_min` of the weight summed so far (smaller ones never need correcting, and
        flat rows then record nothing). A row with more than the settings' head_chunk_max of
        them records those within head_near_nats of its top instead, where few enough; a row
        with more even there records nothing and pauses for recheck_dense_every chunks.
        `heads.dropped` bounds the logits left out."""
        settings = self.settings
        def full(local: Tensor) -> Tensor:
            return local if rows is None else rows[local]

        every_row = slice(None) if rows is None else rows
        eligible = self.record[every_row] & (self.paused_until[every_row] <= index)
        dropped = self.heads.dropped
        paused = full((self.record[every_row] & ~eligible).nonzero().squeeze(1))
        dropped[paused] = torch.maximum(dropped[paused], chunk_top[paused])
        floor = self.log_share_min[every_row] + torch.log(self.total.z[every_row])
        near_top = lead - self.head_margin[every_row]  # head_margin below the running top
        cut = torch.maximum(near_top, floor)
        # Rows whose share floor binds leave out weights below ref + cut.
        bound = eligible & (floor > near_top)
        which = full(bound.nonzero().squeeze(1))
        dropped[which] = torch.maximum(dropped[which], (ref64 + cut)[bound])
        act = (eligible & (chunk_top[every_row] - ref64 >= cut)).nonzero().squeeze(1)
        if act.numel() == 0:
            return
        part = weights if act.numel() == weights.shape[0] else weights[act]
        head = part >= cut[act].to(part.dtype)[:, None]
        crowded = (_row_counts(head) > settings.head_chunk_max).nonzero().squeeze(1)
        if crowded.numel():
            near_nats = settings.head_near_nats
            near = part[crowded] >= (lead[act[crowded]] - near_nats).to(part.dtype)[:, None]
            few = _row_counts(near) <= settings.head_chunk_max
            head[crowded] = near & few[:, None]
            which = full(act[crowded])
            bound = torch.where(few, top[which] - near_nats, chunk_top[which])
            dropped[which] = torch.maximum(dropped[which], bound)
            self.paused_until[which[~few]] = index + settings.recheck_dense_every
        r, c = head.nonzero().unbind(1)
        if r.numel():
            local = act[r]
            self.heads.add_(full(local), c + start,
                            part[r, c].to(torch.float64) + ref64[local],
                            top - self.head_margin)

    def digit_error(self, max_norm: float) -> Tensor | None:
        """Over a grid, √(Σ_j δ_j²)·2R per row (R the data's largest norm, bounding
        ‖x_j - D‖), in the sums' units: the size of the weights' int8 rounding in S."""
        if self.grid is None:
            return None
        return self.rounded_sq.sqrt() * (2 * max_norm)

    def flush_(self) -> None:
        """Move the float32 sums into the float64 ones."""
        if self.pending:
            self.total.s += self.s32
            self.s32.zero_()
            self.pending = False

    def sums(self, offset: Tensor) -> _Sums:
        """The float64 sums, relative to the full-convention logit of their reference."""
        self.flush_()
        return _Sums(self.ref - offset, self.total.z, self.total.s, self.total.q)

    def recorded(self, top: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, cols, screened logits) of the recorded head weights within head_margin of
        the final top, at most the settings' head_max per row (the largest)."""
        return self.heads.compact_(top - self.head_margin)


def _add_exact_pairs(sums: _Sums, x64: Tensor, t: Tensor, s: Tensor, x_sq: Tensor,
                     train: TrainingSet, rows: Tensor, cols: Tensor,
                     remove: tuple[_Sums, Tensor] | None = None) -> None:
    """Add the exact float64 weights e^ℓ_j of the pairs (rows, cols) to `sums` (z, s, q,
    raising its references as needed). With remove = (other, logits), the weights e^logits
    of the same pairs also leave `other` (screened weights replaced by their exact values;
    `other`'s references are at least those logits).

    ‖x - t·x_j‖² is taken in the dot form ‖x‖² - 2t⟨x, x_j⟩ + t²‖x_j‖² where its float64
    rounding, about 4u·(‖x‖ + t‖x_j‖)²·s nats, stays below DOT_FORM_NATS, else from the
    difference. On the CPU, rows with at least GROUP_MIN_PAIRS pairs go in padded per-row
    blocks (row_groups): their points are read once into a reused buffer and both products
    are batched matrix products; the other pairs go in flat blocks.
    """
    if rows.numel() == 0:
        return
    batch, dim = x64.shape
    points, sq_norms = train.points, train.sq_norms
    dot_form = dot_form_holds(x_sq.sqrt(), t, train.max_norm, s)
    removed = None if remove is None else remove[1]
    on_cpu = rows.device.type == "cpu"
    grouped = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
    if on_cpu:
        plan = padded_pairs(rows, cols, batch, GROUP_MIN_PAIRS, dim)
        grouped = plan.grouped
        buffer = torch.empty(plan.largest, dim, dtype=points.dtype)
        buffer64 = buffer if points.dtype == torch.float64 else torch.empty(
            plan.largest, dim, dtype=torch.float64)
        for group, pos, idx in plan.blocks:  # a row appears at most once per block
            valid = pos >= 0
            size = idx.numel()
            found = torch.index_select(points, 0, idx.reshape(-1), out=buffer[:size])
            p64 = found if found.dtype == torch.float64 else buffer64[:size].copy_(found)
            p64 = p64.view(*idx.shape, dim)
            x, tt = x64[group], t[group, None]
            if bool(dot_form[group].all()):
                sq = dot_form_sq(x_sq[group, None], batched_dots(p64, x), tt, sq_norms[idx])
            else:
                sq = difference_sq(x[:, None, :], tt[:, :, None], p64)
            logits = (-s[group, None] * sq).masked_fill(~valid, -math.inf)
            sums.raise_ref_(group, logits.amax(dim=1))
            weight = torch.exp(logits - sums.ref[group, None])
            sq_p = sq_norms[idx]
            sums.z[group] += weight.sum(dim=1)
            sums.q[group] += (weight * sq_p).sum(dim=1)
            sums.s[group] += torch.bmm(weight[:, None, :], p64).squeeze(1)
            if removed is not None:
                other = remove[0]
                gone = torch.exp(removed[pos.clamp(min=0)] - other.ref[group, None])
                gone = gone.masked_fill(~valid, 0.0)
                other.z[group] -= gone.sum(dim=1)
                other.q[group] -= (gone * sq_p).sum(dim=1)
                other.s[group] -= torch.bmm(gone[:, None, :], p64).squeeze(1)
    single = (~grouped).nonzero().squeeze(1)
    block = pair_block(rows.device, dim)
    for i in range(0, single.numel(), block):
        which = single[i:i + block]
        r, c = rows[which], cols[which]
        p64 = points[c].to(torch.float64)
        tt = t[r]
        if bool(dot_form[r].all()):
            sq = dot_form_sq(x_sq[r], (p64 * x64[r]).sum(dim=1), tt, sq_norms[c])
        else:
            sq = difference_sq(x64[r], tt[:, None], p64)
        logits = -s[r] * sq
        sums.raise_ref_(r, logits)
        weight = torch.exp(logits - sums.ref[r])
        sq_p = sq_norms[c]
        sums.z.index_add_(0, r, weight)
        sums.q.index_add_(0, r, weight * sq_p)
        sums.s.index_add_(0, r, weight[:, None] * p64)
        if removed is not None:
            other = remove[0]
            gone = torch.exp(removed[which] - other.ref[r])
            other.z.index_add_(0, r, -gone)
            other.q.index_add_(0, r, -gone * sq_p)
            other.s.index_add_(0, r, p64.mul_(-gone[:, None]))


def closed_form_denoiser(x: Tensor, t: float | Tensor, data: Tensor | TrainingSet,
                         **engine_options) -> Tensor:
    """E[x1 | x_t = x] over the training set, shaped like x (typed as `output_dtype`)."""
    state = closed_form_state(x, t, data, **engine_options)
    return state.denoiser().to(output_dtype(x)).reshape(x.shape)


def closed_form_velocity(x: Tensor, t: float | Tensor, data: Tensor | TrainingSet, *,
                         chunk_size: int | None = None,
                         compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """The exact optimal velocity û*(x, t), shaped like x (typed as `output_dtype`).

    x: (B, d) or (B, C, H, W); t: a float or a (B,) tensor in [0, 1); data: (n, d) training
    points (or a prepared `TrainingSet`; a tensor is prepared once and reused while
    unchanged). Computed in float64 from the softmax state, so the 1/(1-t) factor does not
    amplify float32 rounding of D - x.
    """
    train = as_training_set(data)
    # (the float64 queries serve the engine and the velocity: no mixed-dtype B×d passes)
    x64 = flatten_queries(x, train.dim).to(torch.float64)
    t64 = check_t(t, x64.shape[0], x64.device)
    state = _closed_form_state(x64, t64, train, chunk_size=chunk_size,
                               compute_dtype=compute_dtype)
    return state.velocity_(x64, t64).to(output_dtype(x)).reshape(x.shape)
