"""Evaluation of chosen (query, training point) pairs in bounded memory, grouped per query in
padded blocks: exact float64 logits -s‖x - t·x_j‖² from the difference or, where it is exact
enough, the dot form ‖x‖² - 2t⟨x, x_j⟩ + t²‖x_j‖² (ExactPairs); dot products and squared
distances per pair (pair_dots, pair_sq_distances). The certified kNN path, the top-k
truncation, EFM and the exact engine's head corrections weigh their pairs here; the sketch
scans and the exact k-NN searches (prune.py) measure theirs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from knnflow.rounding import FLOAT32_ROUNDOFF, FLOAT64_ROUNDOFF, matmul_input_roundoff
from knnflow.softmax import SoftmaxState

# The dot form of exact distances is used while its rounding stays below this many nats.
DOT_FORM_NATS = 1e-9
# Float64 elements per block of exact pair recomputation (4 MB): bounded memory, and small
# enough that the allocator reuses it instead of mapping fresh pages (page faults are slow).
# GPUs take 64× larger blocks (256 MB), so a block is not one kernel launch per 170 pairs.
PAIR_BLOCK_ELEMENTS = 1 << 19
GPU_PAIR_BLOCK_ELEMENTS = 1 << 25
# ExactPairs.add_grouped_: queries with at least this many pairs take per-query products.
GROUP_MIN_PAIRS = 8
# add_grouped_ drops pairs whose weight is provably below e^-(LIVE_NATS + log K) of the best
# (by default; callers that account for the dropped mass may pass less).
LIVE_NATS = 40.0
# Values of width d per padded block of row_groups (16 MB of float64).
GROUP_BLOCK_ELEMENTS = 1 << 21


def row_sq_norms(points: Tensor, chunk: int = 1024, sums: Tensor | None = None) -> Tensor:
    """float64 ‖p‖² of every row of `points` (any float dtype), a chunk of rows at a time
    through one reused float64 buffer (a fresh chunk per step left the allocator's heap
    growing by about a chunk a step: 2.4 GB over 10^5 rows of 3,072, out of memory at 10^6).
    sums: a float64 (d,) tensor that also receives Σ_j p_j, in the same pass."""
    n, dim = points.shape
    f64 = dict(dtype=torch.float64, device=points.device)
    norms = torch.empty(n, **f64)
    buffer = torch.empty(min(chunk, n), dim, **f64)
    for i in range(0, n, chunk):
        part = buffer[:min(chunk, n - i)].copy_(points[i:i + chunk])
        if sums is not None:
            sums += part.sum(0)
        torch.sum(part.square_(), dim=1, out=norms[i:i + chunk])
    return norms


def DOT32_ERROR(dim: int, input_roundoff: float = 0.0) -> float:  # noqa: N802
    """c with |float32 ⟨fl(x), p⟩ - ⟨x, p⟩| ≤ c·‖x‖·‖p‖ for float64 x rounded to float32 and
    float32 p of length dim, in any summation order: each term is off by a factor
    (1 + u)(1 + u_in)²(1 + γ_d) at most, γ_d = d·u/(1 - d·u), where u_in is the matmul's own
    rounding of its inputs (TF32 or bf16 settings: matmul_input_roundoff; 0 in full float32)."""
    u = FLOAT32_ROUNDOFF
    gamma = dim * u / (1 - dim * u)
    return (1 + u) * (1 + input_roundoff) ** 2 * (1 + gamma) - 1


def batched_dots(points: Tensor, queries: Tensor) -> Tensor:
    """(g, K) ⟨queries[i], points[i, k]⟩ for points (g, K, d) and queries (g, d).

    Taken as (g, 1, d) @ (g, d, K): on the CPU, MKL's batched product in the other
    orientation, (g, K, d) @ (g, d, 1), is 8× slower for d = 3072 (g = 5, K = 133).
    """
    return torch.bmm(queries[:, None, :], points.transpose(1, 2)).squeeze(1)


def row_groups(rows: Tensor, batch: int, min_pairs: int, dim: int,
               max_elements: int | None = None):
    """The pairs of every query row with at least `min_pairs` pairs, in padded blocks.

    Yields (group, pos): group (g,) query rows, pos (g, K) positions into `rows` of each
    row's pairs, padded with -1. Rows go in order of size, so a block pads little, and a
    block holds at most max_elements (default GROUP_BLOCK_ELEMENTS) values of width `dim`:
    a row with more pairs than that comes in pieces, each its own block (the same row in
    several blocks).
    """
    if max_elements is None:
        max_elements = GROUP_BLOCK_ELEMENTS
    counts = torch.bincount(rows, minlength=batch)
    heavy = (counts >= min_pairs).nonzero().squeeze(1)
    if heavy.numel() == 0:
        return
    heavy = heavy[torch.argsort(counts[heavy], stable=True)]
    order = torch.argsort(rows, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sizes = counts[heavy].tolist()
    cap = max(1, max_elements // dim)
    first = 0
    while first < len(sizes) and sizes[first] <= cap:
        last = first
        while (last + 1 < len(sizes) and sizes[last + 1] <= cap
               and (last + 2 - first) * sizes[last + 1] * dim <= max_elements):
            last += 1
        group, width = heavy[first:last + 1], sizes[last]
        offsets = torch.arange(width)
        valid = offsets[None] < counts[group][:, None]
        pos = order[(starts[group][:, None] + offsets[None]).clamp(max=len(order) - 1)]
        yield group, torch.where(valid, pos, -1)
        first = last + 1
    for i in range(first, len(sizes)):
        row, begin = heavy[i:i + 1], int(starts[heavy[i]])
        for piece in range(0, sizes[i], cap):
            stop = begin + min(sizes[i], piece + cap)
            yield row, order[begin + piece:stop][None]


def dot_form_sq(x_sq: Tensor, dots: Tensor, t: Tensor | float, p_sq: Tensor) -> Tensor:
    """‖x - t·p‖² from its dot form ‖x‖² - 2t⟨x, p⟩ + t²‖p‖²; the arguments broadcast
    (x_sq and t per query, p_sq per point, dots per pair). Exact to float64 rounding only
    where the terms do not cancel: callers use it where `dot_form_holds`, or as a screen
    whose rounding they bound."""
    return x_sq - 2 * t * dots + t * t * p_sq


def difference_sq(x: Tensor, t: Tensor | float, p: Tensor) -> Tensor:
    """‖x - t·p‖² from the difference itself, summed over the last dimension (the arguments
    broadcast): no cancellation, one pass more over the points than the dot form. One
    temporary: fresh ones of 128 KB and more are often page-faulted in on every call."""
    diff = torch.addcmul(x, t, p, value=-1.0) if torch.is_tensor(t) else torch.add(x, p, alpha=-t)
    return diff.square_().sum(dim=-1)


def dot_form_holds(x_norm: Tensor, t: Tensor, max_norm: float, s: Tensor) -> Tensor:
    """Per query: whether the float64 dot form of -s‖x - t·x_j‖² is exact enough for every
    point, its rounding about 4u·(‖x‖ + t·max‖x_j‖)²·s nats staying below DOT_FORM_NATS."""
    reach = x_norm + t * max_norm
    return 4 * FLOAT64_ROUNDOFF * reach.square() * s <= DOT_FORM_NATS


def pair_block(device: torch.device, width: int) -> int:
    """Pairs per block of pair recomputation for values of this width on `device`."""
    elements = GPU_PAIR_BLOCK_ELEMENTS if device.type == "cuda" else PAIR_BLOCK_ELEMENTS
    return max(1, elements // max(1, width))


@dataclass
class PaddedPairs:
    """row_groups' blocks for the pairs (rows, cols): per block the query rows, the pairs'
    positions into rows (-1 pads) and their point ids (0 at pads); `grouped` marks the pairs
    that are in a block, `largest` is the largest block's size (one reused buffer)."""

    blocks: list[tuple[Tensor, Tensor, Tensor]]
    grouped: Tensor
    largest: int


def padded_pairs(rows: Tensor, cols: Tensor, batch: int, min_pairs: int,
                 dim: int) -> PaddedPairs:
    blocks, grouped = [], torch.zeros(rows.numel(), dtype=torch.bool)
    for group, pos in row_groups(rows, batch, min_pairs, dim):
        valid = pos >= 0
        grouped[pos[valid]] = True
        blocks.append((group, pos, torch.where(valid, cols[pos.clamp(min=0)], 0)))
    return PaddedPairs(blocks, grouped, max((idx.numel() for *_, idx in blocks), default=0))


def pair_dots(queries: Tensor, points: Tensor, rows: Tensor, cols: Tensor,
              group_min: int = 32, block_values: int = PAIR_BLOCK_ELEMENTS,
              dtype: torch.dtype = torch.float64) -> Tensor:
    """⟨queries[row], points[col]⟩ per pair (queries float64, points any dtype), computed in
    `dtype` (float32: the queries rounded to it, the points read as they are stored) and
    returned as float64.

    Rows with at least `group_min` pairs go in padded blocks (padded_pairs): their points are
    read once into a reused buffer and multiplied by the queries as one batched product. The
    other pairs go in blocks that copy their query row per pair. On a GPU every pair takes
    those blocks, 64× larger (one kernel per block, no host loop).
    """
    out = torch.empty(rows.numel(), dtype=torch.float64, device=rows.device)
    if rows.numel() == 0:
        return out
    width = points.shape[1]
    queries = queries.to(dtype)
    if rows.device.type != "cpu":
        block = pair_block(rows.device, width)
        for i in range(0, rows.numel(), block):
            r, c = rows[i:i + block], cols[i:i + block]
            out[i:i + block] = (queries[r] * points[c].to(dtype)).sum(1).to(torch.float64)
        return out
    plan = padded_pairs(rows, cols, queries.shape[0], group_min, width)
    single = (~plan.grouped).nonzero().squeeze(1)
    block = max(1, block_values // max(1, width))
    for i in range(0, single.numel(), block):
        pick = single[i:i + block]
        r, c = rows[pick], cols[pick]
        out[pick] = (queries[r] * points[c].to(dtype)).sum(1).to(torch.float64)
    buffer = torch.empty(plan.largest, width, dtype=points.dtype)
    converted = buffer if points.dtype == dtype else torch.empty(plan.largest, width,
                                                                  dtype=dtype)
    for group, pos, idx in plan.blocks:
        size = idx.numel()
        found = torch.index_select(points, 0, idx.reshape(-1), out=buffer[:size])
        if converted is not buffer:
            found = converted[:size].copy_(found)
        dots = batched_dots(found.view(*pos.shape, width), queries[group])
        out[pos[pos >= 0]] = dots[pos >= 0].to(torch.float64)
    return out


def pair_sq_distances(q64: Tensor, points: Tensor, rows: Tensor, cols: Tensor,
                      sq_norms: Tensor | None = None,
                      block_values: int = PAIR_BLOCK_ELEMENTS) -> Tensor:
    """‖q_row - x_col‖² in float64.

    With the points' float64 sq_norms, rows with several pairs take the dot form
    ‖q‖² - 2⟨q, x⟩ + ‖x‖² (dot_form_sq at t = 1) in padded per-row blocks (padded_pairs:
    each point read once, one batched product; 3× faster here), and every pair whose value
    lies within 10^6 times that form's rounding (4u·(‖q‖ + ‖x‖)²) of zero, a near copy, is
    taken again from differences, so small distances keep their full relative accuracy (a
    copy gives 0). Otherwise explicit differences, in small blocks (~4 MB of float64, which
    the allocator reuses: fresh allocations of ~100 MB cost page faults, 4× slower). The
    difference form sums each pair's squares in one order whatever its position (as Index's
    reranking does), so copies of a point get bit-equal distances, and so do pairs whose
    dot-form values lie within its rounding of each other (_near_ties), whose order the dot
    form cannot settle.
    """
    out = torch.empty(rows.numel(), dtype=torch.float64)
    if sq_norms is not None and rows.numel() and rows.device.type == "cpu":
        dim = q64.shape[1]
        q_sq = q64.square().sum(dim=1)
        plan = padded_pairs(rows, cols, q64.shape[0], 4, dim)
        buffer = torch.empty(plan.largest, dim, dtype=points.dtype)
        buffer64 = buffer if points.dtype == torch.float64 else torch.empty(
            plan.largest, dim, dtype=torch.float64)
        for group, pos, idx in plan.blocks:
            size = idx.numel()
            found = torch.index_select(points, 0, idx.reshape(-1), out=buffer[:size])
            found = found if found.dtype == torch.float64 else buffer64[:size].copy_(found)
            dots = batched_dots(found.view(*idx.shape, dim), q64[group])
            valid = pos >= 0
            out[pos[valid]] = dot_form_sq(q_sq[group, None], dots, 1.0, sq_norms[idx])[valid]
        scale = (q_sq[rows].sqrt() + sq_norms[cols].sqrt()).square()
        near = plan.grouped & (out <= 4e6 * FLOAT64_ROUNDOFF * scale)
        near |= _near_ties(rows, out, (dim + 2) * FLOAT64_ROUNDOFF * scale, plan.grouped)
        again = (~plan.grouped | near).nonzero().squeeze(1)
        if again.numel():
            out[again] = pair_sq_distances(q64, points, rows[again], cols[again])
        return out
    block = max(1, block_values // max(1, q64.shape[1]))
    for i in range(0, rows.numel(), block):
        diff = points[cols[i:i + block]].to(torch.float64)
        diff -= q64[rows[i:i + block]]
        out[i:i + block] = diff.square_().sum(dim=1)
    return out


def _near_ties(rows: Tensor, values: Tensor, error: Tensor, among: Tensor) -> Tensor:
    """The pairs of `among` whose value lies within the two rounding bounds (`error`, each
    pair's) of another pair of the same row: their order is not settled by these values.

    The dot form's rounding depends on where a point sits in its padded block, so two copies
    of one image can come out a few ulps of ‖q‖² apart; recomputed from differences they
    are equal, and the lower id comes first.
    """
    out = torch.zeros(rows.numel(), dtype=torch.bool)
    pick = among.nonzero().squeeze(1)
    if pick.numel() < 2:
        return out
    order = pick[torch.argsort(values[pick], stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    r, v, e = rows[order], values[order], error[order]
    close = (r[1:] == r[:-1]) & (v[1:] - v[:-1] <= e[1:] + e[:-1])
    out[order[1:][close]] = True
    out[order[:-1][close]] = True
    return out


class ExactPairs:
    """Exact float64 logits ℓ = -s‖x - t·x_j‖² for (query, point) pairs, in bounded blocks.

    Where float64 allows it, ‖x - t·x_j‖² is taken as ‖x‖² - 2t⟨x, x_j⟩ + t²‖x_j‖² (one pass
    over the gathered points instead of four); its rounding, about 4u·(‖x‖ + t‖x_j‖)²·s nats,
    must stay below DOT_FORM_NATS. Near t = 1 (s large) the difference form is used.
    """

    def __init__(self, x64: Tensor, t: Tensor, s: Tensor, max_norm: float):
        self.x64, self.t, self.s = x64, t, s
        self.block = pair_block(x64.device, x64.shape[1])
        self.x_sq = x64.square().sum(dim=1)
        self.x_norm, self.max_norm = x64.norm(dim=1), max_norm
        self.dot_form = dot_form_holds(self.x_norm, t, max_norm, s)

    def _blocks(self, rows: Tensor, chunk: Tensor, cols: Tensor):
        for i in range(0, rows.numel(), self.block):
            r, c = rows[i:i + self.block], cols[i:i + self.block]
            points = chunk[c].to(torch.float64)
            t = self.t[r]
            if bool(self.dot_form[r].all()):
                dots = (self.x64[r] * points).sum(dim=1)
                sq = dot_form_sq(self.x_sq[r], dots, t, points.square().sum(dim=1))
            else:
                sq = difference_sq(self.x64[r], t[:, None], points)
            yield i, r, points, -self.s[r] * sq

    def add_(self, state: SoftmaxState, rows: Tensor, chunk: Tensor, cols: Tensor) -> None:
        """Add the pairs' exact weights to the state."""
        for _, r, points, logits in self._blocks(rows, chunk, cols):
            state.add_points_(r, logits, points)

    def add_grouped_(self, state: SoftmaxState, rows: Tensor, chunk: Tensor, cols: Tensor,
                     sq_norms: Tensor | None = None, screen: bool = True,
                     live_nats: float | Tensor = LIVE_NATS) -> None:
        """`add_` for many pairs per query (the certified kNN set, top-k).

        On the CPU, queries with at least GROUP_MIN_PAIRS pairs go in padded blocks of similar
        sizes (row_groups), their points read once into a reused buffer. For float32 points
        with known sq_norms, a float32 screen (batched_dots) bounds every logit within
        `slack` = 2·s·t·DOT32_ERROR(d)·‖x‖·max‖x_j‖ nats, and only the pairs within
        live_nats + log K + 2·slack (+ float64 rounding) of the best in their block get exact
        float64 weights, in a second pass (screen=False); K is the row's pair count, so the
        others weigh below e^-live_nats of the total (default LIVE_NATS = 40: under float64
        resolution; the certified path passes less, per query row as a (B,) tensor, and adds
        e^-live_nats to its bound).
        Otherwise the block's logits and weighted sums are batched float64 products: 2-4×
        faster on the synthetic set's certified pairs than `add_` on every pair (which copies
        the query once per pair and makes ~8 passes over float64 blocks). Other pairs, and
        other devices, take `add_`. sq_norms: float64 ‖x_j‖² of the chunk's points.
        """
        if chunk.device.type != "cpu":
            self.add_(state, rows, chunk, cols)
            return
        if rows.numel() == 0:
            return
        batch, dim = state.z.shape[0], chunk.shape[1]
        plan = padded_pairs(rows, cols, batch, GROUP_MIN_PAIRS, dim)
        totals = torch.bincount(rows, minlength=batch)
        single = (rows[~plan.grouped], cols[~plan.grouped])
        live = []
        buffer = torch.empty(plan.largest, dim, dtype=chunk.dtype)
        buffer64 = buffer if chunk.dtype == torch.float64 else torch.empty(
            plan.largest, dim, dtype=torch.float64)
        screen = screen and chunk.dtype == torch.float32 and sq_norms is not None
        if screen:
            live_nats = torch.as_tensor(live_nats, dtype=torch.float64,
                                        device=rows.device).expand(batch)
            # Every point's norm, rounded up: max_norm came from a float64 square root.
            reach = max(self.max_norm, float(sq_norms.max()) ** 0.5) * (1 + 1e-12)
            dot_error = DOT32_ERROR(dim, matmul_input_roundoff(torch.float32, chunk.device))
        for group, pos, idx in plan.blocks:
            valid = pos >= 0
            size = idx.numel()
            points = torch.index_select(chunk, 0, idx.reshape(-1), out=buffer[:size])
            x, t, s = self.x64[group], self.t[group, None], self.s[group, None]
            dot_form = bool(self.dot_form[group].all())
            sq_p = sq_norms[idx] if dot_form and sq_norms is not None else None
            if screen and dot_form:
                dots = batched_dots(points.view(*idx.shape, dim), x.to(torch.float32))
                logits = -s * dot_form_sq(self.x_sq[group, None], dots.to(torch.float64), t,
                                          sq_p)
                logits = logits.masked_fill(~valid, -math.inf)
                slack = 2 * s * t * dot_error * self.x_norm[group, None] * reach
                # log of the row's whole pair count (a long row comes in several blocks), and
                # the float64 rounding of the logits themselves (dot form: ≤ DOT_FORM_NATS).
                margin = (live_nats[group, None] + totals[group, None].to(torch.float64).log()
                          + 2 * slack + 2 * DOT_FORM_NATS)
                keep = logits >= logits.max(dim=1, keepdim=True).values - margin
                which, k = keep.nonzero().unbind(1)
                live.append((group[which], idx[which, k]))
                continue
            if points.dtype != torch.float64:
                points = buffer64[:size].copy_(points)
            points = points.view(*idx.shape, dim)
            if dot_form:
                if sq_p is None:
                    sq_p = torch.einsum("gkd,gkd->gk", points, points)
                sq = dot_form_sq(self.x_sq[group, None], batched_dots(points, x), t, sq_p)
            else:
                sq = difference_sq(x[:, None, :], t[:, :, None], points)
            logits = (-s * sq).masked_fill(~valid, -math.inf)
            ref = logits.max(dim=1).values
            weights = torch.exp(logits - ref[:, None])
            sums = torch.bmm(weights[:, None, :], points).squeeze(1)
            part = SoftmaxState(state.ref[group], state.z[group], state.s[group])
            part.merge_(SoftmaxState(ref, weights.sum(dim=1), sums))
            state.ref[group], state.z[group], state.s[group] = part.ref, part.z, part.s
        if single[0].numel():
            self.add_(state, single[0], chunk, single[1])
        if live:
            self.add_grouped_(state, torch.cat([r for r, _ in live]), chunk,
                              torch.cat([c for _, c in live]), sq_norms, screen=False)
