"""Pair evaluation (pairs.py): grouped exact weights and per-pair products against float64
computed pair by pair."""

from __future__ import annotations

import pytest
import torch

from knnflow.closed_form import TrainingSet
from knnflow.pairs import ExactPairs, difference_sq, dot_form_sq
from knnflow.softmax import SoftmaxState


@pytest.mark.parametrize("t", [0.3, 0.7, 0.9999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_norms", [True, False])
@pytest.mark.parametrize("block", [1 << 21, 40 * 50])
def test_grouped_pairs_match_float64_brute_force(t, dtype, with_norms, block, monkeypatch):
    """add_grouped_ (padded per-query blocks for rows with many pairs, add_ for the rest) gives
    each query's softmax over exactly its own pairs, as explicit float64 differences do.
    t = 0.9999 takes the difference form (dot_form false); block = 40·50 values splits rows
    of more than 50 pairs into pieces."""
    import knnflow.pairs as pairs

    monkeypatch.setattr(pairs, "GROUP_BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(3)
    points = torch.randn(300, 40, generator=gen).to(dtype)
    train = TrainingSet.from_points(points)
    batch = 6
    x = torch.randn(batch, 40, generator=gen, dtype=torch.float64)
    tt = torch.full((batch,), t, dtype=torch.float64)
    s = 0.5 / (1 - tt) ** 2
    # Rows with 0, 3, 31, 32, 150 and 300 pairs: both paths, and an empty row.
    sizes = [0, 3, 31, 32, 150, 300]
    rows = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    cols = torch.cat([torch.randperm(300, generator=gen)[:k] for k in sizes])
    shuffle = torch.randperm(rows.numel(), generator=gen)
    rows, cols = rows[shuffle], cols[shuffle]
    pairs = ExactPairs(x, tt, s, train.max_norm)
    assert bool(pairs.dot_form.all()) == (t < 0.999)
    state = SoftmaxState.empty(batch, 40)
    pairs.add_grouped_(state, rows, train.points, cols, train.sq_norms if with_norms else None)
    denoiser = state.denoiser()
    for i, k in enumerate(sizes):
        if k == 0:
            assert float(state.z[i]) == 0.0
            continue
        mine = points[cols[rows == i]].to(torch.float64)
        logits = -s[i] * (x[i] - tt[i] * mine).square().sum(1)
        expected = torch.softmax(logits, 0) @ mine
        assert torch.allclose(denoiser[i], expected, rtol=0, atol=1e-11), (i, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_dots_match_float64_products(dtype):
    """pair_dots (padded blocks for rows with many pairs, per-pair blocks for the rest) returns
    ⟨q_row, x_col⟩ in the pairs' own order."""
    from knnflow.pairs import pair_dots

    gen = torch.Generator().manual_seed(5)
    points = torch.randn(200, 24, generator=gen).to(dtype)
    queries = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    sizes = [0, 2, 40, 200, 33]
    rows = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    cols = torch.cat([torch.randint(200, (k,), generator=gen) for k in sizes])
    shuffle = torch.randperm(rows.numel(), generator=gen)
    rows, cols = rows[shuffle], cols[shuffle]
    expected = (queries[rows] * points[cols].to(torch.float64)).sum(1)
    got = pair_dots(queries, points, rows, cols, group_min=32)
    assert torch.allclose(got, expected, rtol=1e-13, atol=1e-12)
    if dtype == torch.float32:
        # In float32 (the fine filter's products) within the proven DOT32_ERROR bound.
        from knnflow.pairs import DOT32_ERROR

        got32 = pair_dots(queries, points, rows, cols, group_min=32, dtype=torch.float32)
        limit = DOT32_ERROR(24) * queries.norm(dim=1)[rows] * points.double().norm(dim=1)[cols]
        assert ((got32 - expected).abs() <= limit).all()
        assert not torch.equal(got32, expected)  # computed in float32 indeed


def test_dot_form_and_difference_agree():
    """‖x - t·p‖² in its two forms, broadcast per query, per point and per pair."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 10, generator=gen, dtype=torch.float64)
    p = torch.randn(3, 5, 10, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)[:, None]
    dots = (x * p).sum(-1)
    sq = dot_form_sq(x.square().sum(-1), dots, t, p.square().sum(-1))
    assert torch.allclose(sq, difference_sq(x, t[:, :, None], p), rtol=1e-12)
    assert torch.allclose(sq, ((x - t[:, :, None] * p) ** 2).sum(-1), rtol=1e-12)


def test_copies_of_a_point_get_equal_distances_wherever_the_product_puts_them(monkeypatch):
    """pair_sq_distances: a batched product may round a dot differently by where the point
    sits in its block (AMD EPYC's bmm does, by a few ulps of ‖q‖²). Copies of one point, and
    pairs whose dot-form values lie within its rounding of each other, are recomputed from
    differences: copies come out bit-equal, so the lower id wins the tie (issue 14 §5)."""
    import knnflow.pairs as pairs
    from knnflow.pairs import pair_sq_distances
    from knnflow.prune import top_k_pairs

    real = pairs.batched_dots

    def position_dependent(points, queries):  # one ulp more per position in the block
        dots = real(points, queries)
        steps = torch.arange(dots.shape[1], dtype=torch.float64)
        return dots + steps * torch.finfo(torch.float64).eps * dots.abs()

    monkeypatch.setattr(pairs, "batched_dots", position_dependent)
    gen = torch.Generator().manual_seed(6)
    points = torch.rand(60, 256, generator=gen) * 2 - 1
    points[50:] = points[:10]  # ten copies
    sq_norms = points.double().square().sum(1)
    queries = points[:4].double() + 0.01 * torch.randn(4, 256, generator=gen, dtype=torch.float64)
    rows = torch.arange(4).repeat_interleave(60)
    cols = torch.arange(60).repeat(4).flip(0)  # the copy (higher id) sits first in each block
    got = pair_sq_distances(queries, points, rows, cols, sq_norms)
    truth = (points.double()[cols] - queries[rows]).square().sum(1)
    assert torch.allclose(got, truth, rtol=1e-12)
    for j in range(4):
        assert got[(rows == j) & (cols == j)] == got[(rows == j) & (cols == 50 + j)]
    _, ids = top_k_pairs(rows, cols, got, 4, 2)
    assert torch.equal(ids, torch.tensor([[j, 50 + j] for j in range(4)]))
