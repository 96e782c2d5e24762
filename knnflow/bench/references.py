"""The baselines and float64 references the benchmarks compare with: the naive cdist form
of û*, float64 û* and nearest neighbours by explicit differences, the oracle count."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from knnflow.bench.common import per_query_t


def naive_velocity(x: Tensor, t: float | Tensor, points: Tensor) -> Tensor:
    """The form in published reference code: a full B×n distance matrix, softmax, matmul.
    One t: torch.cdist(x, t·points). One t per query (a (B,) tensor): the same squared
    distances in cdist's own matmul form, ‖x‖² - 2t⟨x, x_j⟩ + t²‖x_j‖², row by row."""
    if torch.is_tensor(t) and t.ndim == 1:
        tt = t.to(x)[:, None]
        sq = (x.square().sum(1, keepdim=True) - 2 * tt * (x @ points.T)
              + tt.square() * points.square().sum(1)).clamp(min=0)
        weights = torch.softmax(-sq / (2 * (1 - tt) ** 2), dim=1)
        return (weights @ points - x) / (1 - tt)
    t = float(t)
    sq = torch.cdist(x, t * points).square()
    weights = torch.softmax(-sq / (2 * (1 - t) ** 2), dim=1)
    return (weights @ points - x) / (1 - t)


def float64_velocity(x: Tensor, t: float | Tensor, points: Tensor,
                     query_block: int = 64) -> Tensor:
    """Brute force in float64, t one value or one per query. For t ≤ 0.999 the GEMM form is
    exact to < 1e-6 nats in float64; beyond, distances are taken from explicit differences,
    one query at a time."""
    x64, p64 = x.to(torch.float64), points.to(torch.float64)
    t64 = per_query_t(t, x64.shape[0]).to(x64.device)
    out = torch.empty_like(x64)
    p_norms = p64.square().sum(1)
    for i in range(0, x64.shape[0], query_block):
        q, tq = x64[i:i + query_block], t64[i:i + query_block]
        sq = (q.square().sum(1, keepdim=True) - 2 * tq[:, None] * (q @ p64.T)
              + tq[:, None].square() * p_norms)
        for row in (tq > 0.999).nonzero().squeeze(1).tolist():
            sq[row] = (q[row] - tq[row] * p64).square().sum(1)
        weights = torch.softmax(-sq * (0.5 / (1 - tq) ** 2)[:, None], dim=1)
        out[i:i + query_block] = (weights @ p64 - q) / (1 - tq)[:, None]
    return out


def oracle_window(n: int) -> float:
    """20 + ln n nats: the points further below the best logit than this carry together at
    most n·e^-(20 + ln n) = e^-20 ≈ 2e-9 of the best point's weight, so an ideal estimator
    weighs exactly the points inside the window."""
    return 20.0 + math.log(n)


def oracle_counts(x: Tensor, t: float | Tensor, points: Tensor, window: float | None = None,
                  chunk: int | None = None) -> Tensor:
    """Per query, how many training points have a logit ℓ_j = -‖x - t·x_j‖²/(2(1-t)²) within
    `window` nats (default oracle_window(n)) of its best, in float64.

    Two streaming passes over the data in chunks (the best logit, then the count), so memory
    is O(B·chunk + chunk·d), never B×n. ℓ_j + s‖x‖² = s·(2t⟨x, x_j⟩ - t²‖x_j‖²), s = 1/(2(1-t)²),
    is used: the left-out term is the same for every j and differences are what count. Its
    float64 rounding is ~d·2^-53·s·t·‖x‖·‖x_j‖, far below a nat for every t < 1 - 1e-4 on
    images. At t = 0 every logit is equal and the count is n."""
    n, dim = points.shape[0], points[0].numel()
    x64 = x.reshape(x.shape[0], -1).to(torch.float64)
    device = x64.device
    t64 = per_query_t(t, x64.shape[0]).to(device)
    window = oracle_window(n) if window is None else window
    if bool((t64 == 0).all()):
        return torch.full((x64.shape[0],), n, dtype=torch.int64)
    # ~32 MB of float64 points per chunk (the GEMM stays efficient, the memory small)
    chunk = chunk or max(64, min(16_384, (1 << 22) // dim))
    s = 0.5 / (1 - t64) ** 2
    dot_scale, norm_scale = (2 * s * t64)[:, None], (s * t64.square())[:, None]

    def shifted_logits() -> Iterator[Tensor]:
        for start in range(0, n, chunk):
            block = points[start:start + chunk].reshape(-1, dim).to(device, torch.float64)
            yield dot_scale * (x64 @ block.T) - norm_scale * block.square().sum(1)

    best = torch.full((x64.shape[0],), -math.inf, dtype=torch.float64, device=device)
    for logits in shifted_logits():
        best = torch.maximum(best, logits.max(dim=1).values)
    count = torch.zeros(x64.shape[0], dtype=torch.int64, device=device)
    for logits in shifted_logits():
        count += (logits >= (best - window)[:, None]).sum(dim=1)
    return count.cpu()


def cdist_topk(samples: Tensor, points: Tensor, k: int = 2,
               batch: int = 256) -> tuple[Tensor, Tensor]:
    """The published baseline: torch.cdist against the whole training set, then topk, per
    batch of samples. Returns (distances, ids), float32 distances."""
    dist, ids = [], []
    for start in range(0, samples.shape[0], batch):
        d = torch.cdist(samples[start:start + batch], points)
        values, index = d.topk(k, dim=1, largest=False)
        dist.append(values)
        ids.append(index)
    return torch.cat(dist), torch.cat(ids)


def exact_sq_distances(queries: Tensor, points: Tensor, ids: Tensor) -> Tensor:
    """‖q_i - x_ids[i, r]‖² in float64 from explicit differences, (B, k), gathered in blocks of
    ~4 MB (a B×k×d float64 copy would be hundreds of MB on photos)."""
    dim = points[0].numel()
    q64 = queries.reshape(queries.shape[0], -1).to(torch.float64)
    out = torch.empty(ids.shape, dtype=torch.float64)
    rows = max(1, (1 << 19) // max(1, ids.shape[1] * dim))
    for start in range(0, ids.shape[0], rows):
        block = ids[start:start + rows]
        chosen = points[block.reshape(-1)].reshape(*block.shape, dim).to(torch.float64)
        out[start:start + rows] = (chosen - q64[start:start + rows, None]).square().sum(-1)
    return out


def float64_knn(queries: Tensor, points: Tensor, k: int = 2, block: int = 256,
                chunk: int | None = None, extra: int = 16) -> tuple[Tensor, Tensor]:
    """The k nearest training points of each query in float64, ties to the lower id; squared
    distances and ids, (B, k). Independent of Index.search: the float64 GEMM form
    ‖q‖² - 2⟨q, x⟩ + ‖x‖², streamed over the data in chunks, keeps the k + extra closest; those
    are recomputed from explicit differences. Its rounding is below
    E = 2(d + 2)·2^-53·(‖q‖ + max‖x‖)², so when the last kept screened distance minus E clears
    the k-th exact one nothing was missed; other rows (ties there) are recomputed in full."""
    n, dim = points.shape[0], points[0].numel()
    k = min(k, n)
    keep = min(n, k + extra)
    chunk = chunk or max(64, min(16_384, (1 << 22) // dim))
    q64 = queries.reshape(queries.shape[0], -1).to(torch.float64)
    max_norm = max(float(points[s:s + chunk].reshape(-1, dim).to(torch.float64).norm(dim=1).max())
                   for s in range(0, n, chunk))
    out_d = torch.empty(q64.shape[0], k, dtype=torch.float64)
    out_i = torch.empty(q64.shape[0], k, dtype=torch.int64)
    for start in range(0, q64.shape[0], block):
        q = q64[start:start + block]
        q_sq = q.square().sum(1, keepdim=True)
        best_d = torch.full((q.shape[0], 0), math.inf, dtype=torch.float64)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.int64)
        for s in range(0, n, chunk):
            p = points[s:s + chunk].reshape(-1, dim).to(torch.float64)
            screened = q_sq - 2 * q @ p.T + p.square().sum(1)
            ids = torch.arange(s, s + p.shape[0]).expand(q.shape[0], -1)
            best_d, order = torch.cat([best_d, screened], 1).topk(
                min(keep, best_d.shape[1] + p.shape[0]), dim=1, largest=False)
            best_i = torch.cat([best_i, ids], 1).gather(1, order)
        exact = exact_sq_distances(q, points, best_i)
        by_id = best_i.argsort(dim=1)  # lower id first among equal distances
        order = by_id.gather(1, exact.gather(1, by_id).argsort(dim=1, stable=True))
        exact, ids = exact.gather(1, order)[:, :k], best_i.gather(1, order)[:, :k]
        margin = 2 * (dim + 2) * 2.0 ** -53 * (q.norm(dim=1) + max_norm) ** 2
        unsure = ~(best_d[:, -1] - margin > exact[:, -1]) if keep < n else torch.zeros(
            q.shape[0], dtype=torch.bool)
        for row in unsure.nonzero().squeeze(1).tolist():
            full = torch.cat([(points[s:s + chunk].reshape(-1, dim).to(torch.float64)
                               - q[row]).square().sum(1) for s in range(0, n, chunk)])
            top = full.argsort(stable=True)[:k]
            exact[row], ids[row] = full[top], top
        out_d[start:start + block], out_i[start:start + block] = exact, ids
    return out_d, out_i


def id_mismatches(ids: Tensor, queries: Tensor, points: Tensor, truth: tuple[Tensor, Tensor]
                  ) -> int:
    """Samples where some rank's id differs from the float64 brute force's and is not an exact
    tie (the same float64 distance, which may come in either order)."""
    true_d, true_i = truth
    ids = ids[:, :true_i.shape[1]].cpu()
    differ = ids != true_i
    if not bool(differ.any()):
        return 0
    wrong = differ & (exact_sq_distances(queries, points, ids) != true_d)
    return int(wrong.any(dim=1).sum())
