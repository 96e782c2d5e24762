"""Band sketches: the transform is orthonormal and sketch distances never exceed true ones."""

from __future__ import annotations

import pytest
import torch

from knnflow.data import synthetic_images
from knnflow.sketch import Sketches, Transform, dct_matrix, geometric_edges


def test_dct_matrix_is_orthonormal():
    d = dct_matrix(17)
    assert torch.allclose(d @ d.T, torch.eye(17, dtype=torch.float64), atol=1e-13)


@pytest.mark.parametrize("shape", [(64,), (3, 24, 24)])
def test_transform_preserves_distances(shape):
    points = synthetic_images(300, (3, 24, 24), seed=0).reshape(300, -1)
    if shape == (64,):
        points = points[:, :64]
    transform = Transform.fit(points, shape)
    assert transform.kind == ("pca" if shape == (64,) else "dct")
    a, b = transform.apply(points[:20]), transform.apply(points[20:40])
    true = (points[:20].double() - points[20:40].double()).norm(dim=1)
    assert torch.allclose((a - b).norm(dim=1), true, rtol=1e-12)


def test_geometric_edges_cover_the_tail():
    edges = geometric_edges(96, 32, 3072)
    assert edges[0] == 96 and edges[-1] == 3072
    assert all(b > a for a, b in zip(edges, edges[1:], strict=False))


def test_sketch_lower_bounds_hold_for_noisy_flow_queries():
    """The proven bounds (with all rounding terms) never exceed the float64 distance."""
    points = synthetic_images(2000, (3, 32, 32), seed=0).reshape(2000, -1)
    sketches = Sketches.build(points, (3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    for t in (0.2, 0.5, 0.9, 0.999):
        x = (1 - t) * torch.randn(32, 3072, generator=gen) + t * points[:32]
        q = (x / t).to(torch.float64)
        true_sq = torch.cdist(q, points.to(torch.float64)).square()
        coords = sketches.transform.apply(q)
        for sketch, stored in ((sketches.coarse, sketches.coarse_points),
                               (sketches.fine, sketches.fine_points)):
            sq_q = sketch.embed(coords)
            sketch_sq = torch.cdist(sq_q, stored.to(torch.float64)).square()
            slack = sketches.query_slack(sq_q.norm(dim=1), q.norm(dim=1))
            bound = sketches.lower_bound(sketch_sq, slack[:, None], sq_q.norm(dim=1)[:, None],
                                         sketch.width)
            assert (bound <= true_sq).all()
            # and they are not vacuous: most points are bounded well away from zero
            assert (bound > 0.5 * true_sq).double().mean() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_dots_match_float64_products(dtype):
    """pair_dots (padded blocks for rows with many pairs, per-pair blocks for the rest) returns
    ⟨q_row, x_col⟩ in the pairs' own order."""
    from knnflow.prune import pair_dots

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


@pytest.mark.parametrize("shape", [(7, 8192), (3, 4096), (5, 846), (4, 64)])
def test_scan_helpers_match_plain_torch(shape):
    """chunk_seeds' blocked argmin picks the columns a plain argmin of each slice picks;
    sparse_nonzero lists the True entries of a mask as nonzero() does, in the same order."""
    from knnflow.prune import chunk_seeds, sparse_nonzero

    gen = torch.Generator().manual_seed(shape[1])
    dist = torch.randn(shape, generator=gen)
    for count in (1, 2):
        width = shape[1] // count
        slices = dist[:, :width * count].reshape(shape[0], count, width)
        expected = slices.argmin(dim=2) + torch.arange(count) * width
        assert torch.equal(chunk_seeds(dist, count), expected)
    nearest = chunk_seeds(dist, 5)
    assert torch.equal(dist.gather(1, nearest).sort(1).values, dist.sort(1).values[:, :5])
    for level in (-3.0, -1.0, 0.5):
        mask = dist <= level
        rows, cols = sparse_nonzero(mask)
        expected = mask.nonzero()
        assert torch.equal(rows, expected[:, 0]) and torch.equal(cols, expected[:, 1])
    assert sparse_nonzero(torch.zeros(shape, dtype=torch.bool))[0].numel() == 0


def test_sparse_nonzero_on_a_view_with_an_odd_offset():
    from knnflow.prune import sparse_nonzero

    big = torch.rand(4, 40, generator=torch.Generator().manual_seed(0)) < 0.2
    view = big[1:2, 3:11]
    assert view.is_contiguous() and view.storage_offset() % 8
    rows, cols = sparse_nonzero(view)
    expected = view.nonzero()
    assert torch.equal(rows, expected[:, 0]) and torch.equal(cols, expected[:, 1])
