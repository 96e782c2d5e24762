"""The sketch scanner and its helpers, the pruned exact k-NN search and the screened brute
force, against float64 brute force and plain torch."""

from __future__ import annotations

import pytest
import torch
from conftest import brute_force_knn


@pytest.mark.parametrize("scan_chunk, scan_values", [(2995, 1 << 24), (1024, 1)])
def test_sketch_knn_with_short_chunks_and_recomputed_scans(sketch_index, monkeypatch,
                                                           scan_chunk, scan_values):
    """k above what a short last chunk gives (2995 + 5 columns, k = 16: the seeds must still
    number k), and the two-pass scan that recomputes the GEMMs when distances cannot be kept
    (SCAN_VALUES tiny): both exact against float64 brute force."""
    from knnflow import prune

    index, points = sketch_index
    monkeypatch.setattr(prune, "SCAN_VALUES", scan_values)
    flat = points.reshape(points.shape[0], -1)
    gen = torch.Generator().manual_seed(1)
    queries = flat[300:330] + 0.05 * torch.randn(30, flat.shape[1], generator=gen)
    scanner = prune.SketchScanner(index.sketches, scan_chunk=scan_chunk)
    found = prune.sketch_knn(scanner, index.training_set().points, queries.double(), k=16,
                             budget=1500)
    distances, ids = brute_force_knn(queries, points, 16)
    assert bool(found.done.all())
    assert torch.allclose(found.sq_distances, distances, rtol=1e-12, atol=1e-12)
    assert torch.equal(found.ids, ids)


@pytest.mark.parametrize("chunk", [512, 8192])
def test_screened_brute_force_matches_float64(sketch_index, chunk):
    """The GEMM brute force that settles what the sketches cannot: float32 screen, proven
    margin, float64 distances. Several chunks (the running k-th distance prunes what earlier
    chunks kept), duplicated points (ties in id order) and exact copies (distance 0)."""
    from knnflow.prune import screened_knn

    index, points = sketch_index
    flat = points.reshape(points.shape[0], -1)
    gen = torch.Generator().manual_seed(2)
    queries = torch.cat([flat[:10], flat[500:520] + 0.05 * torch.randn(20, flat.shape[1],
                                                                      generator=gen),
                         2 * torch.randn(10, flat.shape[1], generator=gen)]).double()
    train = index.training_set()
    found_d, found_i = screened_knn(train.points, train.sq_norms, queries, k=3, chunk=chunk)
    distances, ids = brute_force_knn(queries, points, 3)
    assert torch.allclose(found_d, distances, rtol=1e-12, atol=1e-12)
    assert torch.equal(found_i, ids)
    assert torch.equal(found_d[:10, :2], torch.zeros(10, 2, dtype=torch.float64))


def test_dense_fine_filter_keeps_what_the_pairwise_one_keeps(sketch_index, monkeypatch):
    """Rows with many coarse survivors get their fine distances from one GEMM: with every
    row taking it (FINE_DENSE_SHARE = 0), the kept pairs and the k-NN equal the pairwise
    filter's (FINE_DENSE_SHARE = 2: no row)."""
    from knnflow import prune

    index, points = sketch_index
    flat = points.reshape(points.shape[0], -1)
    gen = torch.Generator().manual_seed(3)
    queries = (flat[700:740] + 0.2 * torch.randn(40, flat.shape[1], generator=gen)).double()
    scanner = prune.SketchScanner(index.sketches)
    sketched = scanner.sketch(queries)
    threshold = torch.full((40,), float(brute_force_knn(queries, points, 8)[0][:, -1].max()),
                           dtype=torch.float64)
    rows = torch.arange(40).repeat_interleave(index.n)
    cols = torch.arange(index.n).repeat(40)
    kept = {}
    for share in (0.0, 2.0):
        monkeypatch.setattr(prune, "FINE_DENSE_SHARE", share)
        kept[share] = scanner.fine_filter(sketched, rows, cols, threshold)
    assert torch.equal(kept[0.0][0], kept[2.0][0]) and torch.equal(kept[0.0][1], kept[2.0][1])
    # Every point within the threshold survives (the fine bound is a lower bound).
    true_sq = (queries[:, None, :] - flat.double()[None]).square().sum(-1)
    inside = (true_sq <= threshold[:, None]).nonzero().unbind(1)
    survivors = set(zip(kept[0.0][0].tolist(), kept[0.0][1].tolist(), strict=True))
    assert set(zip(inside[0].tolist(), inside[1].tolist(), strict=True)) <= survivors


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
