"""Proven pruning with the index's band sketches: which training points can lie within a
distance of a query, found without reading them in full dimension.

`SketchScanner` holds the sketched training points in the layout the scans need and runs the
three stages that both the certified velocity (estimators.py) and the exact nearest-neighbour
search (`sketch_knn`, used by `Index.search` and `knnflow memorization`) are built from:

1. seeds: the points of smallest coarse-sketch distance in each chunk, good candidates for
   the nearest neighbours (no proof needed); the caller turns them into a threshold;
2. coarse scan: every point whose coarse-sketch lower bound (~128 numbers) is ≤ that
   threshold, from the same float32 GEMMs (one per chunk, over augmented vectors, their
   rounding bounded), so seeds and scan read the sketches once;
3. fine filter: the coarse survivors screened again with the fine sketch (~512 numbers).

A point left out by stage 2 or 3 provably lies farther than the threshold (sketch.py).
`screened_knn`, the brute force that settles what the sketches cannot, prunes the same way
with a float32 screen of every distance and its proven margin. The per-pair products and
distances these read come from pairs.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from knnflow.pairs import DOT32_ERROR, pair_dots, pair_sq_distances, row_sq_norms
from knnflow.rounding import matmul_input_roundoff
from knnflow.sketch import Sketches

SCAN_CHUNK = 8192
# Float32 coarse distances kept per slice of queries (64 MB): seeds and survivors come from
# the same GEMMs.
SCAN_VALUES = 1 << 24
# Fewer query rows per slice than this make the scan's GEMMs thin (slow): then the GEMMs run
# twice instead of keeping distances.
MIN_SLICE_ROWS = 64
# fine_filter: a query whose coarse survivors number at least this share of n gets its fine
# distances from a GEMM over all points rather than pair by pair.
FINE_DENSE_SHARE = 0.02


def augment_points(points: Tensor) -> Tensor:
    """[b, 1, ‖b‖²] in float32, so that one GEMM with [-2a, ‖a‖², 1] gives ‖a - b‖²."""
    ones = torch.ones(points.shape[0], 1, dtype=torch.float64, device=points.device)
    return torch.cat([points, ones, points.square().sum(1, keepdim=True)], 1).to(torch.float32)


def augment_queries(queries: Tensor) -> Tensor:
    ones = torch.ones(queries.shape[0], 1, dtype=torch.float64, device=queries.device)
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


@dataclass
class ScanResult:
    """What `SketchScanner.seeded_scan` found: the (query row, point) pairs that survive the
    coarse sketch, the rows over budget (which keep no pairs), each row's threshold on the
    true distance² and its seeds."""

    rows: Tensor
    cols: Tensor
    over: Tensor
    threshold: Tensor
    seeds: Tensor


class SketchScanner:
    """The sketched training points of one index, ready for scans, on `device` (default: the
    CPU; queries passed to the scans must live there too)."""

    def __init__(self, sketches: Sketches, scan_chunk: int = SCAN_CHUNK,
                 device: torch.device | str | None = None, plan_n: int | None = None):
        self.sketches = sketches
        self.scan_chunk = scan_chunk
        self.device = torch.device(device or "cpu")
        coarse = sketches.coarse_points.to(torch.float64)
        self.n = coarse.shape[0]
        # The point count the batch's slicing is planned for: processes that scan shards of
        # one data set pass the same, so that they slice (and call threshold_of) alike.
        self.plan_n = plan_n or self.n
        self.coarse32 = augment_points(coarse).to(self.device)
        # Made on the CPU and copied: a kernel on the default stream here would race with a
        # first scan run on another stream (the trainer's prefetch).
        # float32, as fine_filter's error bound assumes (Sketches stores them so).
        self.fine_points = (sketches.fine_points.to(self.device, torch.float32)
                            if sketches.fine is not None else None)
        self.fine_sq = (row_sq_norms(sketches.fine_points, 1 << 14).to(self.device)
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

    def seeded_scan(self, queries: SketchedQueries, count: int, threshold_of,
                    budget: int) -> ScanResult:
        """Seeds, then every point whose coarse lower bound is ≤ the threshold.

        Seeds are `count` points per query of smallest coarse-sketch distance among a few
        candidates from each chunk: good candidates for the nearest neighbours (no proof
        needed). threshold_of(rows, seed_ids) turns a slice of query rows and their seeds into
        thresholds on the true distance², and the coarse distances are compared with them.
        When a slice of at least MIN_SLICE_ROWS queries (or the whole batch) fits in
        SCAN_VALUES stored distances (64 MB), the distances computed for the seeds are kept
        and the GEMMs run once; otherwise (large n) the whole batch goes at once and the
        GEMMs run a second time, so thin slices never make the GEMMs slow. Rows with more
        than `budget` survivors leave the scan, are marked `over` and keep no pairs.
        """
        sk = self.sketches
        batch = queries.q.shape[0]
        starts = list(range(0, self.n, self.scan_chunk))
        sizes = [min(self.scan_chunk, self.n - start) for start in starts]
        wanted = min(count, self.n)
        per_chunk = max(2, math.ceil(wanted / len(starts)))

        def candidates(per: int) -> int:
            return sum(min(per, size) for size in sizes)

        while candidates(per_chunk) < wanted:
            per_chunk += 1
        if min(sizes) < per_chunk:
            # A short chunk gives all its columns, near or not: take twice the seeds from the
            # others and keep the best by coarse distance.
            while candidates(per_chunk) < min(2 * wanted, self.n):
                per_chunk += 1
        step = SCAN_VALUES // self.plan_n
        keep = step >= min(batch, MIN_SLICE_ROWS)
        step = step if keep else batch
        found_rows, found_cols, overs, thresholds, all_seeds = [], [], [], [], []
        for first in range(0, batch, step):
            rows = slice(first, min(first + step, batch))
            query32 = augment_queries(queries.coarse[rows])
            dists, seeds, seed_dists = [], [], []
            for start in starts:
                dist = self._chunk_distances(self.coarse32, query32, start)
                if keep:
                    dists.append(dist)
                found = chunk_seeds(dist, per_chunk)
                seeds.append(found + start)
                seed_dists.append(dist.gather(1, found))
            seed_ids, seed_dists = torch.cat(seeds, dim=1), torch.cat(seed_dists, dim=1)
            if seed_ids.shape[1] > wanted:
                best = seed_dists.topk(wanted, dim=1, largest=False).indices
                seed_ids = seed_ids.gather(1, best)
            threshold = threshold_of(rows, seed_ids)
            limit = sk.screened_threshold(threshold, queries.coarse_norm[rows],
                                          queries.norms[rows], sk.coarse.width + 2)
            limit32 = limit.to(torch.float32)[:, None]
            size = query32.shape[0]
            counts = torch.zeros(size, dtype=torch.int64, device=self.device)
            active = torch.arange(size, device=self.device)
            for i, start in enumerate(starts):
                if active.numel() == 0:
                    break
                everyone = active.numel() == size
                if keep:
                    dist = dists[i] if everyone else dists[i][active]
                else:
                    dist = self._chunk_distances(self.coarse32, query32[active], start)
                hit = dist <= (limit32 if everyone else limit32[active])
                # int32 sums: an int64 sum of bytes first copies the chunk to int64 (4× slower).
                counts[active] += hit.view(torch.uint8).sum(dim=1, dtype=torch.int32)
                within = counts[active] <= budget
                if not bool(within.all()):
                    hit, active = hit[within], active[within]
                r, c = sparse_nonzero(hit)
                found_rows.append(active[r] + first)
                found_cols.append(c + start)
            overs.append(counts > budget)
            thresholds.append(threshold)
            all_seeds.append(seed_ids)
        over = torch.cat(overs)
        rows, cols = torch.cat(found_rows), torch.cat(found_cols)
        kept = ~over[rows]
        return ScanResult(rows[kept], cols[kept], over, torch.cat(thresholds),
                          torch.cat(all_seeds))

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
        # float32 products (half the bytes of float64 ones, no conversion); their error,
        # ≤ c·‖a‖·‖b‖ (pairs.DOT32_ERROR), comes off the distance before the bound.
        # Rows with many survivors take one GEMM over every fine-sketched point instead of
        # gathered pairs (it reads the fine sketches once: ~0.1 µs a point against ~0.4 µs a
        # gathered pair here).
        counts = torch.bincount(rows, minlength=fine_q.shape[0])
        heavy = counts >= max(1, int(FINE_DENSE_SHARE * self.n))
        if bool(heavy.any()):
            dot = torch.empty(rows.numel(), dtype=torch.float64, device=rows.device)
            dense = heavy[rows]
            local = torch.full_like(counts, -1)
            which = heavy.nonzero().squeeze(1)
            local[which] = torch.arange(which.numel(), device=rows.device)
            products = fine_q[which].to(torch.float32) @ self.fine_points.T
            dot[dense] = products[local[rows[dense]], cols[dense]].to(torch.float64)
            dot[~dense] = pair_dots(fine_q, self.fine_points, rows[~dense], cols[~dense],
                                    dtype=torch.float32)
        else:
            dot = pair_dots(fine_q, self.fine_points, rows, cols, dtype=torch.float32)
        # The CPU's padded blocks and the heavy rows' GEMM run through a matmul, whose
        # TF32/bf16 settings may round its inputs; on a GPU pair_dots takes elementwise
        # products.
        roundoff = (matmul_input_roundoff(torch.float32, rows.device)
                    if rows.device.type == "cpu" or bool(heavy.any()) else 0.0)
        c = DOT32_ERROR(sk.fine.width, roundoff)
        dot_error = 2 * c * fine_norm[rows] * self.fine_sq[cols].sqrt() * (1 + 1e-9)
        sq = fine_norm[rows].square() + self.fine_sq[cols] - 2 * dot - dot_error
        bound = sk.lower_bound(sq, slack[rows], fine_norm[rows], sk.fine.width)
        keep = bound <= threshold[rows]
        return rows[keep], cols[keep]


def chunk_seeds(dist: Tensor, count: int, block: int = 128) -> Tensor:
    """(B, count) columns of small distance per row; seeds need no proof. For count ≤ 2 (the
    certified velocity's seeds, k ≤ 2 searches) the argmin of each of `count` equal slices
    of the columns, cheaper than topk; for more (a k-NN search's k-th seed places its
    threshold, so the seeds should be the chunk's nearest) topk. All columns when there are
    fewer than `count`.

    torch's argmin over 8192 float32 columns takes 25× longer than amin on this CPU, so the
    argmin goes through blocks: amin per block of `block` columns, argmin over the blocks,
    then argmin inside the winning block (the same column as a plain argmin).
    """
    batch, columns = dist.shape
    if columns <= count:
        return torch.arange(columns, device=dist.device).expand(batch, columns)
    if count > 2:
        return dist.topk(count, dim=1, largest=False).indices
    width = columns // count
    slices = dist[:, :width * count].reshape(batch, count, width)
    offsets = torch.arange(count, device=dist.device) * width
    if width % block or width == block:
        return slices.argmin(dim=2) + offsets
    blocks = slices.reshape(batch, count, width // block, block)
    best = blocks.amin(dim=3).argmin(dim=2)
    inside = blocks.gather(2, best[:, :, None, None].expand(batch, count, 1, block))
    return best * block + inside.squeeze(2).argmin(dim=2) + offsets


def sparse_nonzero(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the True entries of a 2-D bool mask in row-major order, like
    mask.nonzero(), but fast when they are few: 8-byte words first, then the bytes of the
    nonzero words (1.5 ms → ~0.3 ms for a 256 × 8192 scan chunk here)."""
    batch, columns = mask.shape
    if (columns % 8 or not mask.is_contiguous() or mask.storage_offset() % 8
            or mask.numel() == 0):
        return mask.nonzero().unbind(1)
    as_bytes = mask.view(torch.uint8)
    r, w = (as_bytes.view(torch.int64) != 0).nonzero().unbind(1)
    i, k = as_bytes.view(batch, columns // 8, 8)[r, w].nonzero().unbind(1)
    return r[i], w[i] * 8 + k


@dataclass
class PrunedSearch:
    """k nearest neighbours per query, exact; `done` marks the rows the sketches settled
    (the others exceeded the budget and need another method); `evaluated` counts the
    points read in full dimension per row."""

    sq_distances: Tensor
    ids: Tensor
    done: Tensor
    evaluated: Tensor


def top_k_pairs(rows: Tensor, cols: Tensor, sq: Tensor, batch: int, k: int,
                done: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row, the k pairs of smallest sq (ties in id order), as (batch, k) distances and
    ids; rows not `done` (or with fewer than k pairs) get inf and -1."""
    order = torch.argsort(cols, stable=True)
    order = order[torch.argsort(sq[order], stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols, sq = rows[order], cols[order], sq[order]
    counts = torch.bincount(rows, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    out_d = torch.full((batch, k), math.inf, dtype=torch.float64)
    out_i = torch.full((batch, k), -1, dtype=torch.int64)
    ready = counts >= k if done is None else done & (counts >= k)
    ready_rows = ready.nonzero().squeeze(1)
    if ready_rows.numel():
        take = starts[ready_rows, None] + torch.arange(k)[None]
        out_d[ready_rows], out_i[ready_rows] = sq[take], cols[take]
    return out_d, out_i


def screened_knn(points: Tensor, sq_norms: Tensor, q64: Tensor, k: int,
                 chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """The exact k nearest points of each float64 query by brute force: float32 GEMMs screen
    every squared distance as ‖q‖² + ‖x‖² - 2⟨q, x⟩, whose rounding is at most E per query
    (index.l2_error_bound, any summation order); every point screened within 2E of the k-th
    smallest screened distance may be among the k nearest and gets its distance in float64.
    One GEMM pass over the data for the whole batch: ~1 ms a query for n = 45,000, d = 3072
    here, against FAISS's flat search plus reranking at ~10 ms."""
    from knnflow.index import l2_error_bound

    batch, n = q64.shape[0], points.shape[0]
    q_sq = q64.square().sum(dim=1)
    margin = 2 * l2_error_bound(q_sq, float(sq_norms.max()), q64.shape[1])
    q32, q_sq32 = q64.to(torch.float32), q_sq.to(torch.float32)[:, None]
    best = torch.full((batch, k), math.inf, dtype=torch.float32)
    found: list[tuple[Tensor, Tensor]] = []
    for start in range(0, n, chunk):
        block = points[start:start + chunk].to(torch.float32)
        norms = sq_norms[start:start + chunk].to(torch.float32)
        screened = torch.addmm(norms[None, :], q32, block.T, alpha=-2).add_(q_sq32)
        kept = min(k, screened.shape[1])
        best = torch.cat([best, screened.topk(kept, dim=1, largest=False).values],
                         dim=1).topk(k, dim=1, largest=False).values
        limit = (best[:, -1].to(torch.float64) + margin).to(torch.float32)
        r, c = (screened <= limit[:, None]).nonzero().unbind(1)
        found.append((r, c + start, screened[r, c]))
    rows, cols, values = (torch.cat(part) for part in zip(*found, strict=True))
    # The final k-th screened distance prunes what earlier chunks kept.
    limit = (best[:, -1].to(torch.float64) + margin).to(torch.float32)
    keep = values <= limit[rows]
    rows, cols = rows[keep], cols[keep]
    found = top_k_pairs(rows, cols, pair_sq_distances(q64, points, rows, cols, sq_norms), batch,
                        k)
    return settled(q64, points, *found)


def settled(q64: Tensor, points: Tensor, out_d: Tensor, out_i: Tensor) -> tuple[Tensor, Tensor]:
    """The returned k distances of each row taken again from differences: the same value for
    a point whichever block, shard or route found it, so merged results (ShardedIndex,
    FAISS's reranking) break ties between copies by id alone. The k are already in order:
    pairs the dot form left within its rounding of each other were recomputed the same way
    (pairs.pair_sq_distances)."""
    valid = out_i >= 0
    rows = torch.arange(out_i.shape[0]).repeat_interleave(valid.sum(1))
    out_d = out_d.clone()
    out_d[valid] = pair_sq_distances(q64, points, rows, out_i[valid])
    return out_d, out_i


def sketch_knn(scanner: SketchScanner, points: Tensor, q64: Tensor, k: int,
               budget: int, seeds: int = 8, sq_norms: Tensor | None = None) -> PrunedSearch:
    """The exact k nearest training points of each float64 query, read in full dimension
    only where the sketches cannot rule them out.

    The k-th smallest exact distance among the seeds is a threshold no k-th neighbour can
    exceed. Every point left out has a proven lower bound above it, so the exact top k of the
    survivors (which include those seeds) is the exact top k of all points.
    """
    batch = q64.shape[0]
    queries = scanner.sketch(q64)

    def threshold_of(rows: slice, seed_ids: Tensor) -> Tensor:
        query_rows = torch.arange(batch)[rows].repeat_interleave(seed_ids.shape[1])
        seed_sq = pair_sq_distances(q64, points, query_rows, seed_ids.reshape(-1),
                                    sq_norms).reshape(seed_ids.shape)
        kth = seed_sq.kthvalue(k, dim=1).values
        # A margin over float64 rounding of the seeds' distances keeps them inside.
        return kth * (1 + 1e-9) + 1e-12

    scan = scanner.seeded_scan(queries, max(seeds, k), threshold_of, budget)
    rows, cols, over, threshold = scan.rows, scan.cols, scan.over, scan.threshold
    rows, cols = scanner.fine_filter(queries, rows, cols, threshold)
    counts = torch.bincount(rows, minlength=batch)
    done = ~over & (counts >= k)
    keep = done[rows]
    rows, cols = rows[keep], cols[keep]
    sq = pair_sq_distances(q64, points, rows, cols, sq_norms)
    out_d, out_i = settled(q64, points, *top_k_pairs(rows, cols, sq, batch, k, done))
    counts = torch.bincount(rows, minlength=batch)
    return PrunedSearch(out_d, out_i, done, counts + scan.seeds.shape[1])
