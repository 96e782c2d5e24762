"""Band sketches: the transform is orthonormal and sketch distances never exceed true ones."""

from __future__ import annotations

import pytest
import torch

from knnflow.sketch import Sketches, Transform, dct_matrix, geometric_edges
from knnflow.synthetic import synthetic_images


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
