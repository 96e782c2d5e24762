"""A proven screen of the exact engine's logits from int8 digits and exact int32 GEMMs.

Each vector v is written as σ·(V0 + V1/β + e) with int8 digits V0, V1 in [-127, 127],
β = 254 and a remainder |e_i| ≤ 1/(2β): σ = max|v_i|/127 per query, one σ for the whole
training set. Then

    ⟨x, p⟩ = σ_x·σ_p·(X0·P0 + (X0·P1 + X1·P0)/β) + error,
    |error| ≤ σ_x·σ_p·(‖X1‖·‖P1‖/β² + ‖x̂‖·‖e_p‖ + ‖e_x‖·‖p/σ_p‖)   (x̂ = X0 + X1/β),

by Cauchy-Schwarz on each left-out term. The three digit products are integer GEMMs
(torch._int_mm): exact in int32, whatever the summation order, and on CPUs with int8 matrix
units (AMX, VNNI) ~2.7× faster together than one float32 GEMM of the same shape. The bound is
computed per query from its own digits and the data's largest digit norms, so it is a proof,
not an estimate; at the engine's scale (images in [-1, 1], d = 3072) it is a few tenths of a
nat at t = 0.7 and a few nats at t = 0.9, below the float32 screen's proven bound.

The screen only decides which weights are live; every live weight is then computed exactly
in float64 (closed_form._int_pass). It runs on CPUs with AMX int8 units, and elsewhere where
a one-off timing shows it faster than the float32 screen (`int8_gemm_ratio`, one measured
ratio for this pass and for the grid's int8 GEMMs of grid_digits.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from knnflow.rounding import FLOAT32_ROUNDOFF

BASE = 254.0
DIGIT_MAX = 127
# Int32 sums of d products of two digits (|·| ≤ 127², two such sums added) stay exact below
# 2^31 up to this dimension.
MAX_DIM = (2**31 - 1) // (2 * DIGIT_MAX * DIGIT_MAX)
# The float32 steps after the integer GEMMs (conversions, the 1/β scaling, the row scale and
# the bias) round a few times: this many units of roundoff of the logit's magnitude.
FLOAT_STEPS = 10


@dataclass(frozen=True)
class Digits:
    """int8 digits of vectors (rows), in the layout the GEMM wants, with their bound terms.

    high, low: the digits V0 and V1, (d, m) for training points (columns are points) or
    (m, d) for queries. scale: σ (float for the data, (m,) float64 tensor for queries).
    low_norm: ‖V1‖, rest_norm: ‖e‖, scaled_norm: ‖v/σ‖ (floats: the data's largest; (m,)
    tensors for queries).
    """

    high: Tensor
    low: Tensor
    scale: float | Tensor
    low_norm: float | Tensor
    rest_norm: float | Tensor
    scaled_norm: float | Tensor


def _split(scaled: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(V0, V1, e, ‖V1‖ per row) of values already divided by σ (|v| ≤ 127); `scaled`
    becomes e."""
    high = scaled.round()
    rest = scaled.sub_(high)
    low = (rest * BASE).round_()
    rest.add_(low, alpha=-1 / BASE)
    return high.to(torch.int8), low.to(torch.int8), rest, torch.linalg.vector_norm(low, dim=1)


def data_digits(points: Tensor, block: int = 2048) -> Digits:
    """The digits of training points (n, d), transposed to (d, n), one σ for all."""
    n, dim = points.shape
    largest = 0.0
    for i in range(0, n, block):
        largest = max(largest, float(points[i:i + block].abs().max()))
    scale = largest / DIGIT_MAX if largest > 0 else 1.0
    high = torch.empty(dim, n, dtype=torch.int8, device=points.device)
    low = torch.empty(dim, n, dtype=torch.int8, device=points.device)
    low_norm = rest_norm = scaled_norm = 0.0
    for i in range(0, n, block):
        scaled = points[i:i + block].to(torch.float64) / scale
        scaled_norm = max(scaled_norm, float(torch.linalg.vector_norm(scaled, dim=1).max()))
        v0, v1, rest, v1_norm = _split(scaled)
        high[:, i:i + block] = v0.T
        low[:, i:i + block] = v1.T
        low_norm = max(low_norm, float(v1_norm.max()))
        rest_norm = max(rest_norm, float(torch.linalg.vector_norm(rest, dim=1).max()))
    return Digits(high, low, scale, low_norm, rest_norm, scaled_norm)


def query_digits(x64: Tensor) -> Digits:
    """The digits of float64 queries (B, d), one σ per query.

    The split runs in float32 (half the bytes of float64): v = fl32(x/σ) is within
    |x/σ|·2^-24 ≤ 127·2^-24 of x/σ, and v - V0 and the remainder of v are exact or err by
    u·|remainder|, so the true remainder's norm exceeds the computed one by at most
    √d·129·2^-24, which rest_norm adds."""
    largest = x64.abs().amax(dim=1)
    scale = torch.where(largest > 0, largest / DIGIT_MAX, torch.ones_like(largest))
    scaled = (x64 / scale[:, None]).to(torch.float32)
    scaled_norm = torch.linalg.vector_norm(scaled, dim=1, dtype=torch.float64)
    v0, v1, rest, v1_norm = _split(scaled)
    slack = math.sqrt(x64.shape[1]) * (DIGIT_MAX + 2) * FLOAT32_ROUNDOFF
    rest_norm = torch.linalg.vector_norm(rest, dim=1, dtype=torch.float64) + slack
    return Digits(v0, v1, scale, v1_norm.to(torch.float64), rest_norm,
                  scaled_norm * (1 + 2 * FLOAT32_ROUNDOFF) + slack)


def dot_error(query: Digits, data: Digits) -> Tensor:
    """Per query, a proven bound on |⟨x, p⟩ - σ_x·σ_p·(X0·P0 + (X0·P1 + X1·P0)/β)| over
    every training point p (float64, (B,))."""
    rounded_norm = query.scaled_norm + query.rest_norm  # ‖x̂‖ ≤ ‖x/σ_x‖ + ‖e_x‖
    terms = (query.low_norm * data.low_norm / BASE**2 + rounded_norm * data.rest_norm
             + query.rest_norm * data.scaled_norm)
    return 1.0001 * query.scale * data.scale * terms


class IntScreen:
    """The screened logits 2st⟨x, x_j⟩ - st²‖x_j‖² of a batch of queries, chunk by chunk,
    from digits, with `proven`: per query a bound in nats on their error (the digits'
    bound above plus the float32 steps' rounding)."""

    def __init__(self, x64: Tensor, t: Tensor, s: Tensor, data: Digits, max_norm: float):
        self.query = query_digits(x64)
        self.stacked = torch.cat([self.query.high, self.query.low])
        self.row_scale = (2 * s * t * self.query.scale * data.scale).to(torch.float32)
        self.b = (s * t * t).to(torch.float32)
        a_term = 2 * s * t * x64.norm(dim=1) * max_norm
        b_term = s * t * t * max_norm**2
        self.proven = (2 * s * t * dot_error(self.query, data)
                       + FLOAT_STEPS * FLOAT32_ROUNDOFF * (a_term + b_term))
        self.data = data

    def __call__(self, start: int, stop: int, sq: Tensor, rows: Tensor | None = None) -> Tensor:
        """(B', m) float32 screened logits over training points start..stop (sq: their
        float32 squared norms); rows: the queries to screen (all when None)."""
        high = self.data.high[:, start:stop]
        low = self.data.low[:, start:stop]
        if rows is None:
            stacked, first, scale, b = self.stacked, self.query.high, self.row_scale, self.b
        else:
            batch = self.query.high.shape[0]
            stacked = self.stacked[torch.cat([rows, rows + batch])]
            first, scale, b = self.query.high[rows], self.row_scale[rows], self.b[rows]
        count = first.shape[0]
        both = torch._int_mm(stacked, high)  # X0·P0 over X1·P0
        cross = torch._int_mm(first, low).add_(both[count:])  # X0·P1 + X1·P0, exact
        logits = both[:count].to(torch.float32).add_(cross.to(torch.float32), alpha=1 / BASE)
        return logits.mul_(scale[:, None]).sub_(torch.outer(b, sq))


# --------------------------------------------------------------------------- availability


# The int8 GEMM of 3B rows against the float32 GEMM of B rows (the same d and points), as a
# ratio of times, below which each int8 path pays: the int8 pass's three digit products
# (3B rows in all) replace one float32 GEMM, and over a grid (grid_digits) the dense rows'
# two 3B-row products replace two, with a few passes over the B × m weights on top.
SCREEN_RATIO_MAX = 0.6
GRID_RATIO_MAX = 0.85
# What CPUs with AMX int8 units measure (cpu-2: 0.33), taken there without a timing so
# that every process on such a machine makes the same choice.
AMX_RATIO = 0.33

_RATIOS: dict[str, float] = {}
# The probe's shapes (8 queries, 128 points: ~20 MFLOP) and the ratio above which it decides
# alone: far past both thresholds, beyond what small shapes' overheads add on fast kernels.
PROBE_SHAPE = {"batch": 8, "points": 128}
PROBE_SLOW = 4.0


def int8_gemm_ratio(device: torch.device) -> float:
    """The time of an int8 GEMM of 3B rows over that of a float32 GEMM of B rows here: AMX_RATIO
    on CPUs whose /proc/cpuinfo has amx_int8, else timed once per process: a probe of
    PROBE_SHAPE, then, unless it is above PROBE_SLOW, the engine's shapes (256 queries, 2048
    points, d = 3072; ~0.2 s where int8 GEMMs are fast); inf on GPUs (not measured there) and
    where torch has no int8 GEMM."""
    key = device.type
    if key not in _RATIOS:
        flags = cpu_flags()
        if device.type != "cpu" or not hasattr(torch, "_int_mm"):
            _RATIOS[key] = math.inf
        elif flags is not None and "amx_int8" in flags:
            _RATIOS[key] = AMX_RATIO
        else:
            # A small probe first: where int8 GEMMs have no fast kernel (AMD Zen 1 and 2 run
            # them ~200× slower than float32), the full timing would take minutes.
            probe = _measured_ratio(device, **PROBE_SHAPE)
            _RATIOS[key] = probe if probe > PROBE_SLOW else _measured_ratio(device)
    return _RATIOS[key]


def int_screen_available(device: torch.device, dim: int) -> bool:
    """Whether the int8 screen runs here and is faster than the float32 screen (off for
    dimensions whose int32 sums could overflow)."""
    return dim <= MAX_DIM and int8_gemm_ratio(device) < SCREEN_RATIO_MAX


def grid_gemms_available(device: torch.device) -> bool:
    """Whether the int8 GEMMs over an 8-bit grid (grid_digits) are faster here than the
    float32 GEMMs they replace."""
    return int8_gemm_ratio(device) < GRID_RATIO_MAX


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _measured_ratio(device: torch.device, batch: int = 256, dim: int = 3072,
                    points: int = 2048) -> float:
    """Time one int8 GEMM of 3B rows against one float32 GEMM of B rows (the fastest of 5
    after a warm-up: other processes only ever add time, and a call of 0.1 ms can lose a
    scheduler slice); inf where torch has no int8 GEMM kernel for the device or build."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a8 = torch.randint(-127, 128, (3 * batch, dim), generator=gen, dtype=torch.int8,
                           device=device)
        b8 = torch.randint(-127, 128, (dim, points), generator=gen, dtype=torch.int8,
                           device=device)
        a32, b32 = a8[:batch].to(torch.float32), b8.to(torch.float32)
        return (_fastest_time(lambda: torch._int_mm(a8, b8))
                / _fastest_time(lambda: torch.mm(a32, b32)))
    except RuntimeError:
        return math.inf


def _fastest_time(fn, repeats: int = 5, warm_calls: int = 20,
                  warm_seconds: float = 0.1) -> float:
    """The fastest of `repeats` timed calls, after a warm-up of `warm_calls` calls or
    `warm_seconds`, whichever ends first: on AMD Zen 5 the first ~15 int8 GEMMs of a process
    run 2-6× slower than the rest, and a probe timed among them reads above PROBE_SLOW, which
    would keep the int8 paths off for the whole process."""
    start = time.perf_counter()
    for _ in range(warm_calls):
        fn()
        if time.perf_counter() - start > warm_seconds:
            break
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
