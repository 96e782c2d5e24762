"""Proven pruning with the index's band sketches: which training points can lie within a
distance of a query, found without reading them in full dimension.

`SketchScanner` holds the sketched training points in the layout the scans need and runs the
three stages that both the certified velocity (estimators.py) and the exact nearest-neighbour
search (`sketch_knn`, used by `Index.search` and `knnflow memorization`) are built from:

1. seeds: the points of smallest distance over the first 32 sketch coordinates, good
   candidates for the nearest neighbours, found with one thin GEMM (no proof needed);
2. coarse scan: every point whose coarse-sketch lower bound (~128 numbers) is ≤ a threshold,
   as one float32 GEMM per chunk over augmented vectors, with the float32 rounding bounded;
3. fine filter: the coarse survivors screened again with the fine sketch (~512 numbers).

A point left out by stage 2 or 3 provably lies farther than the threshold (sketch.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from knnflow.closed_form import row_groups
from knnflow.sketch import Sketches

SEED_WIDTH = 32
SCAN_CHUNK = 8192


def augment_points(points: Tensor) -> Tensor:
    """[b, 1, ‖b‖²] in float32, so that one GEMM with [-2a, ‖a‖², 1] gives ‖a - b‖²."""
    ones = torch.ones(points.shape[0], 1, dtype=torch.float64)
    return torch.cat([points, ones, points.square().sum(1, keepdim=True)], 1).to(torch.float32)


def augment_queries(queries: Tensor) -> Tensor:
    ones = torch.ones(queries.shape[0], 1, dtype=torch.float64)
    return torch.cat([-2 * queries, queries.square().sum(1, keepdim=True), ones],
                     1).to(torch.float32)


@dataclass
class SketchedQueries:
    """A batch of queries q (float64, B×d) in sketch space."""

    q: Tensor
    norms: Tensor
    coords: Tensor
    coarse: Tensor
    coarse_norm: Tensor


class SketchScanner:
    """The sketched training points of one index, ready for scans."""

    def __init__(self, sketches: Sketches, scan_chunk: int = SCAN_CHUNK):
        self.sketches = sketches
        self.scan_chunk = scan_chunk
        coarse = sketches.coarse_points.to(torch.float64)
        self.n = coarse.shape[0]
        self.coarse32 = augment_points(coarse)
        # Seeds need no proof, only good candidates: the leading coordinates suffice.
        self.seed32 = augment_points(coarse[:, :SEED_WIDTH])
        self.fine_sq = (sketches.fine_points.to(torch.float64).square().sum(1)
                        if sketches.fine is not None else None)

    def sketch(self, q: Tensor) -> SketchedQueries:
        """Transform and sketch float64 queries (B, d)."""
        coords = self.sketches.transform.apply(q)
        coarse = self.sketches.coarse.embed(coords)
        return SketchedQueries(q, q.norm(dim=1), coords, coarse, coarse.norm(dim=1))

    def _chunk_distances(self, points: Tensor, query: Tensor, start: int) -> Tensor:
        """float32 ‖a‖² + ‖b‖² - 2⟨a, b⟩ between queries and one chunk of sketched points, as
        one GEMM over augmented vectors [-2a, ‖a‖², 1]·[b, 1, ‖b‖²]."""
        return query @ points[start:start + self.scan_chunk].T

    def seeds(self, queries: SketchedQueries, count: int) -> Tensor:
        """(B, ≥ count) ids: the points of smallest prefix-sketch distance in each chunk."""
        seed_query = augment_queries(queries.coarse[:, :SEED_WIDTH])
        chunks = range(0, self.n, self.scan_chunk)
        per_chunk = max(1, math.ceil(count / len(chunks)))
        found = []
        for start in chunks:
            dist = self._chunk_distances(self.seed32, seed_query, start)
            found.append(dist.topk(min(per_chunk, dist.shape[1]), dim=1, largest=False).indices
                         + start)
        return torch.cat(found, dim=1)

    def coarse_scan(self, queries: SketchedQueries, threshold: Tensor,
                    budget: int) -> tuple[Tensor, Tensor, Tensor]:
        """(query row, point) pairs whose coarse lower bound is ≤ threshold (true distance²),
        and the rows with more than `budget` such points (those rows keep no pairs)."""
        sk = self.sketches
        limit = sk.screened_threshold(threshold, queries.coarse_norm, queries.norms,
                                      sk.coarse.width + 2)
        limit32 = limit.to(torch.float32)
        query32 = augment_queries(queries.coarse)
        batch = len(threshold)
        counts = torch.zeros(batch, dtype=torch.int64)
        active = torch.arange(batch)
        found_rows, found_cols = [], []
        for start in range(0, self.n, self.scan_chunk):
            # Rows over budget leave the scan.
            dist = self._chunk_distances(self.coarse32, query32[active], start)
            hits = dist <= limit32[active, None]
            counts[active] += torch.count_nonzero(hits, dim=1)
            within = counts[active] <= budget
            r, c = hits[within].nonzero().unbind(1)
            found_rows.append(active[within][r])
            found_cols.append(c + start)
            active = active[within]
            if active.numel() == 0:
                break
        over = counts > budget
        rows, cols = torch.cat(found_rows), torch.cat(found_cols)
        keep = ~over[rows]
        return rows[keep], cols[keep], over

    def fine_filter(self, queries: SketchedQueries, rows: Tensor, cols: Tensor,
                    threshold: Tensor) -> tuple[Tensor, Tensor]:
        """The pairs whose fine-sketch lower bound is ≤ threshold[row] (all, without a fine
        sketch)."""
        sk = self.sketches
        if sk.fine is None or rows.numel() == 0:
            return rows, cols
        fine_q = sk.fine.embed(queries.coords)
        fine_norm = fine_q.norm(dim=1)
        slack = sk.query_slack(fine_norm, queries.norms)
        dot = pair_dots(fine_q, sk.fine_points, rows, cols)
        sq = fine_norm[rows].square() + self.fine_sq[cols] - 2 * dot
        bound = sk.lower_bound(sq, slack[rows], fine_norm[rows], sk.fine.width)
        keep = bound <= threshold[rows]
        return rows[keep], cols[keep]


def pair_dots(queries: Tensor, points: Tensor, rows: Tensor, cols: Tensor,
              group_min: int = 32, block_values: int = 1 << 19) -> Tensor:
    """float64 ⟨queries[row], points[col]⟩ per pair (queries float64, points any dtype).

    Rows with at least `group_min` pairs go in padded blocks (closed_form.row_groups): their
    points are read once into a reused buffer and multiplied by the queries as one batched
    float64 product. The other pairs go in blocks that copy their query row per pair.
    """
    out = torch.empty(rows.numel(), dtype=torch.float64)
    if rows.numel() == 0:
        return out
    width = points.shape[1]
    groups = list(row_groups(rows, queries.shape[0], group_min, width))
    grouped = torch.zeros(rows.numel(), dtype=torch.bool)
    for _, pos in groups:
        grouped[pos[pos >= 0]] = True
    single = (~grouped).nonzero().squeeze(1)
    block = max(1, block_values // max(1, width))
    for i in range(0, single.numel(), block):
        pick = single[i:i + block]
        r, c = rows[pick], cols[pick]
        out[pick] = (queries[r] * points[c].to(torch.float64)).sum(1)
    if groups:
        largest = max(pos.numel() for _, pos in groups)
        buffer = torch.empty(largest, width, dtype=points.dtype)
        buffer64 = torch.empty(largest, width, dtype=torch.float64)
        for group, pos in groups:
            valid = pos >= 0
            idx = torch.where(valid, cols[pos.clamp(min=0)], 0).reshape(-1)
            found = torch.index_select(points, 0, idx, out=buffer[:idx.numel()])
            found = buffer64[:idx.numel()].copy_(found).view(*pos.shape, width)
            dots = torch.bmm(found, queries[group][:, :, None]).squeeze(2)
            out[pos[valid]] = dots[valid]
    return out


def pair_sq_distances(q64: Tensor, points: Tensor, rows: Tensor, cols: Tensor,
                      block_values: int = 1 << 19) -> Tensor:
    """‖q_row - x_col‖² in float64 from explicit differences.

    Small blocks (~4 MB of float64) keep the buffers in the allocator's cache: fresh
    allocations of ~100 MB cost page faults that made this 4× slower.
    """
    out = torch.empty(rows.numel(), dtype=torch.float64)
    block = max(1, block_values // max(1, q64.shape[1]))
    for i in range(0, rows.numel(), block):
        diff = points[cols[i:i + block]].to(torch.float64)
        diff -= q64[rows[i:i + block]]
        out[i:i + block] = torch.einsum("ij,ij->i", diff, diff)
    return out


@dataclass
class PrunedSearch:
    """k nearest neighbours per query, exact; `done` marks the rows the sketches settled
    (the others exceeded the budget and need another method); `evaluated` counts the
    points read in full dimension per row."""

    sq_distances: Tensor
    ids: Tensor
    done: Tensor
    evaluated: Tensor


def sketch_knn(scanner: SketchScanner, points: Tensor, q64: Tensor, k: int,
               budget: int, seeds: int = 8) -> PrunedSearch:
    """The exact k nearest training points of each float64 query, read in full dimension
    only where the sketches cannot rule them out.

    The k-th smallest exact distance among the seeds is a threshold no k-th neighbour can
    exceed. Every point left out has a proven lower bound above it, so the exact top k of the
    survivors (which include those seeds) is the exact top k of all points.
    """
    batch = q64.shape[0]
    queries = scanner.sketch(q64)
    seed_ids = scanner.seeds(queries, max(seeds, k))
    seed_rows = torch.arange(batch).repeat_interleave(seed_ids.shape[1])
    seed_sq = pair_sq_distances(q64, points, seed_rows, seed_ids.reshape(-1)).reshape(
        seed_ids.shape)
    kth = seed_sq.kthvalue(k, dim=1).values
    # A margin over float64 rounding of the seeds' distances keeps them inside the threshold.
    threshold = kth * (1 + 1e-9) + 1e-12
    rows, cols, over = scanner.coarse_scan(queries, threshold, budget)
    rows, cols = scanner.fine_filter(queries, rows, cols, threshold)
    counts = torch.bincount(rows, minlength=batch)
    done = ~over & (counts >= k)
    keep = done[rows]
    rows, cols = rows[keep], cols[keep]
    sq = pair_sq_distances(q64, points, rows, cols)
    # Per-row top k: sort by (row, distance, id) and take each row's first k entries.
    order = torch.argsort(cols, stable=True)
    order = order[torch.argsort(sq[order], stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols, sq = rows[order], cols[order], sq[order]
    counts = torch.bincount(rows, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    out_d = torch.full((batch, k), math.inf, dtype=torch.float64)
    out_i = torch.full((batch, k), -1, dtype=torch.int64)
    done_rows = done.nonzero().squeeze(1)
    if done_rows.numel():
        take = starts[done_rows, None] + torch.arange(k)[None]
        out_d[done_rows], out_i[done_rows] = sq[take], cols[take]
    return PrunedSearch(out_d, out_i, done, counts + seed_ids.shape[1])
