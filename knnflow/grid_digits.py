"""Training points on an 8-bit grid, and the exact engine's two GEMMs over them in int8.

Images stored as uint8 (CIFAR-10, MNIST, CelebA JPEGs, photos, the digits) keep one grid after
the map to [-1, 1]: x_j = c + h·P_j + e_j, with int8 codes P_j ∈ [-128, 127], one step h and
centre c for the whole set, and a remainder e_j of the storage's rounding only (a few units of
float32 roundoff). `grid_of` finds such a grid or says there is none (resized or generated
images, float16 storage).

Over a grid both GEMMs of the exact engine's dense rows become exact int32 GEMMs of int8
digits (torch._int_mm), each B×d·d×m product replaced by one int8 product of 3B rows:

- the screen: ⟨x, x_j⟩ = c·Σx + h·⟨x, P_j⟩ + ⟨x, e_j⟩, with each query written as
  σ_x·(X0 + X1/β + X2/β²) + e_x (k = 2 or 3 int8 digits, β = 254, σ_x = max|x|/127), so
  h·σ_x·(X0 + X1/β + X2/β²)·P_j errs by at most h·‖e_x‖·‖P_j‖ + ‖x‖·‖e_j‖ (Cauchy-Schwarz):
  `GridScreen`, with the proven bound and a typical error in nats per query;
- the weighted sums Σ_j w_j·x_j ≈ c·Σ_j ŵ_j + h·Σ_j ŵ_j·P_j, with the weights rounded to
  three int8 digits of a per-row scale, ŵ = σ_w·(W0 + W1/β + W2/β²) (|ŵ - w| ≤ ~2u of the
  row's largest weight): `grid_sums`, which also returns Σ_j (ŵ_j - w_j)², the measure of
  that rounding that the engine's error estimate counts.

On CPUs with int8 matrix units (AMX) the 3B-row int8 product takes about half the time of the
float32 GEMM it replaces, so the dense rows' two GEMMs cost about one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from knnflow.int_screen import BASE, DIGIT_MAX, FLOAT_STEPS
from knnflow.rounding import FLOAT32_ROUNDOFF, unit_roundoff

# Grid levels an int8 code holds (uint8 images: 256 values, 255 steps).
GRID_LEVELS = 255
# A point lies on the grid when every coordinate is within this many units of its storage
# dtype's roundoff (of the data's largest magnitude) of its grid value.
GRID_TOLERANCE_UNITS = 8
# Int32 sums of K products of an int8 digit (|·| ≤ 127) and a code (|·| ≤ 128) stay exact
# for K up to this (d for the screen, the chunk's points for the sums).
GRID_MAX_TERMS = (2**31 - 1) // (DIGIT_MAX * (DIGIT_MAX + 1))


@dataclass(frozen=True)
class Grid:
    """Training points x_j = center + step·codes_j + e_j. codes: (n, d) int8, row-major (the
    screen reads a chunk transposed, the sums as it is); rest_norm: the largest ‖e_j‖;
    code_norm: the largest ‖codes_j‖."""

    codes: Tensor = field(repr=False)
    step: float
    center: float
    rest_norm: float
    code_norm: float


def grid_of(points: Tensor, block: int = 1024) -> Grid | None:
    """The 8-bit grid the points (n, d) lie on, or None.

    Two steps are tried: the one of 255 levels between the smallest and largest value (uint8
    images), and the smallest gap between the distinct values of the first 256 points where
    those are at most 256 (fewer levels, such as the 17 of the digits). Costs one pass over
    the points in float64 blocks, and n·d bytes for the codes when a grid is found."""
    if points.dtype not in (torch.float32, torch.float64) or points.numel() == 0:
        return None
    n, dim = points.shape
    lo, hi = math.inf, -math.inf
    for i in range(0, n, 8 * block):
        low, high = torch.aminmax(points[i:i + 8 * block])
        lo, hi = min(lo, float(low)), max(hi, float(high))
    if not hi > lo:
        return None
    span = hi - lo
    levels_tried = [GRID_LEVELS]
    sample = torch.unique(points[:256].reshape(-1).to(torch.float64))
    if 2 <= sample.numel() <= GRID_LEVELS + 1:
        levels = round(span / float(sample.diff().min()))
        if 1 <= levels < GRID_LEVELS:
            levels_tried.insert(0, levels)
    tolerance = GRID_TOLERANCE_UNITS * unit_roundoff(points.dtype) * max(abs(lo), abs(hi))
    for levels in levels_tried:
        step = span / levels
        offset = (levels + 1) // 2  # codes in [-offset, levels - offset] ⊂ [-128, 127]
        found = _codes(points, lo + offset * step, step, tolerance, block)
        if found is not None:
            codes, rest_norm, code_norm = found
            return Grid(codes, step, lo + offset * step, rest_norm, code_norm)
    return None


def _codes(points: Tensor, center: float, step: float, tolerance: float,
           block: int) -> tuple[Tensor, float, float] | None:
    """(codes, largest ‖e_j‖, largest ‖code_j‖) when every point lies within `tolerance` of
    its grid value in every coordinate, else None (as soon as one does not)."""
    n, dim = points.shape
    codes = torch.empty(n, dim, dtype=torch.int8, device=points.device)
    rest_norm = code_norm = 0.0
    for i in range(0, n, block):
        values = points[i:i + block].to(torch.float64)
        code = values.sub(center).div_(step).round_()
        rest = values.sub_(code * step).sub_(center)
        if not float(rest.abs().max()) <= tolerance:
            return None
        codes[i:i + block] = code.to(torch.int8)
        rest_norm = max(rest_norm, float(torch.linalg.vector_norm(rest, dim=1).max()))
        code_norm = max(code_norm, float(torch.linalg.vector_norm(code, dim=1).max()))
    return codes, rest_norm, code_norm


def _split_digits(values: Tensor, count: int) -> Tensor:
    """`count` int8 digits of values already divided by their row's σ (|v| ≤ 127), stacked
    as (count·rows, columns), digit k of row i in row k·rows + i: v = Σ_k V_k/β^k + rest.
    `values` becomes the rest, in units of β^-(count-1)."""
    rows = values.shape[0]
    digits = torch.empty(count * rows, values.shape[1], dtype=torch.int8, device=values.device)
    for k in range(count):
        digit = values.round()
        digits[k * rows:(k + 1) * rows] = digit
        values.sub_(digit)
        if k < count - 1:
            values.mul_(BASE)
    return digits


def _query_digits(x64: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """(digits, σ, ‖e_x‖): `count` int8 digits per query stacked as (count·B, d), digit k of
    query i in row k·B + i, with x = σ·Σ_k X_k/β^k + e_x. The split runs in float64, where
    each step is exact to ~1e-16 of |x|."""
    largest = x64.abs().amax(dim=1)
    scale = torch.where(largest > 0, largest / DIGIT_MAX, torch.ones_like(largest))
    rest = x64 / scale[:, None]
    digits = _split_digits(rest, count)
    # rest is e_x / σ in units of β^-(count-1); float64 rounding of the steps adds ~1e-13.
    rest_norm = (torch.linalg.vector_norm(rest, dim=1) / BASE ** (count - 1)
                 + math.sqrt(x64.shape[1]) * 1e-13) * scale
    return digits, scale, rest_norm


class GridScreen:
    """The screened logits 2st⟨x, x_j⟩ - st²‖x_j‖² of a batch of queries over grid points,
    chunk by chunk, from `count` int8 digits per query (2 for the int8 pass's sparse rows, 3
    for the dense ones, as accurate as the float32 screen). proven: per query a bound in nats
    on their error; typical: its usual size (the remainders' products average over d, plus
    the float32 steps' rounding)."""

    def __init__(self, x64: Tensor, t: Tensor, s: Tensor, grid: Grid, max_norm: float,
                 count: int = 3):
        batch, dim = x64.shape
        self.grid, self.count, self.batch = grid, count, batch
        self.digits, scale, rest_norm = _query_digits(x64, count)
        st2 = 2 * s * t
        self.row_scale = (st2 * scale * grid.step).to(torch.float32)
        self.b = (s * t * t).to(torch.float32)
        # c·Σx·2st, the same for every j, keeps the logits in the engine's convention.
        self.shift = (st2 * grid.center * x64.sum(dim=1)).to(torch.float32)
        x_norm = x64.norm(dim=1)
        digit_error = st2 * (grid.step * rest_norm * grid.code_norm + x_norm * grid.rest_norm)
        # What the float32 steps round (conversions of the int32 products, the 1/β scaling,
        # the row scale, the bias and the shift): logits of magnitude up to these terms.
        reach = max_norm + 2 * math.sqrt(dim) * abs(grid.center)
        magnitude = st2 * x_norm * reach + s * t * t * max_norm**2
        self.proven = 1.0001 * digit_error + FLOAT_STEPS * FLOAT32_ROUNDOFF * magnitude
        self.typical = digit_error / math.sqrt(dim) + FLOAT32_ROUNDOFF * magnitude

    def __call__(self, start: int, stop: int, sq: Tensor, rows: Tensor | None = None) -> Tensor:
        """(B', m) float32 screened logits over training points start..stop (sq: their
        float32 squared norms); rows: the queries to screen (all when None)."""
        if rows is None:
            digits, scale, b, shift = self.digits, self.row_scale, self.b, self.shift
        else:
            picked = torch.cat([rows + k * self.batch for k in range(self.count)])
            digits, scale, b, shift = (self.digits[picked], self.row_scale[rows], self.b[rows],
                                       self.shift[rows])
        count = scale.shape[0]
        products = torch._int_mm(digits, self.grid.codes[start:stop].T)
        logits = products[:count].to(torch.float32)
        for k in range(1, self.count):
            logits.add_(products[k * count:(k + 1) * count].to(torch.float32),
                        alpha=BASE**-k)
        return logits.mul_(scale[:, None]).sub_(torch.outer(b, sq)).add_(shift[:, None])


def grid_sums(weights: Tensor, grid: Grid, start: int, stop: int
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(S, Z, E) in float64 for non-negative float32 weights (B', m) over training points
    start..stop: S = Σ_j ŵ_j·(c + h·P_j), Z = Σ_j ŵ_j and E = Σ_j (ŵ_j - w_j)², with ŵ the
    weights rounded to three int8 digits of a scale per row (the row's largest weight / 127).
    `weights` is overwritten.

    The digits come from float32 steps: v = w/σ rounds by up to u·v, each later step by up to
    127u/β (of σ), and the last remainder (|·| ≤ 1/(2β²) of σ) is what ŵ leaves out; E counts
    the remainder as computed and the rounding by its bound (the norms add, by the triangle
    inequality)."""
    count, points = weights.shape
    largest = weights.amax(dim=1)
    scale32 = torch.where(largest > 0, largest / DIGIT_MAX, torch.ones_like(largest))
    scale = scale32.to(torch.float64)
    values = weights.div_(scale32[:, None])
    value_norm = torch.linalg.vector_norm(values, dim=1, dtype=torch.float64)
    digits = _split_digits(values, 3)
    left_out = torch.linalg.vector_norm(values, dim=1, dtype=torch.float64) / BASE**2
    rounding = 1.01 * FLOAT32_ROUNDOFF * (value_norm + 2 * DIGIT_MAX / BASE * math.sqrt(points))
    error = ((left_out + rounding) * scale).square_()
    products = torch._int_mm(digits, grid.codes[start:stop]).to(torch.float64)
    counts = digits.sum(dim=1, dtype=torch.int32).to(torch.float64)
    combined = products[:count].add_(products[count:2 * count], alpha=1 / BASE).add_(
        products[2 * count:], alpha=BASE**-2)
    total = counts[:count] + counts[count:2 * count] / BASE + counts[2 * count:] / BASE**2
    sums = combined.mul_(grid.step).add_(total[:, None], alpha=grid.center)
    return sums.mul_(scale[:, None]), total.mul_(scale), error


def grid_fits(points: int, chunk: int) -> bool:
    """Whether the int32 sums of a grid's GEMMs stay exact for this many coordinates (d) or
    chunk points."""
    return points <= GRID_MAX_TERMS and chunk <= GRID_MAX_TERMS
