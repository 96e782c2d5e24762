"""Shared references and data for the tests: float64 brute force by explicit differences."""

from __future__ import annotations

import pytest
import torch

from knnflow.data import load_dataset


def brute_force_denoiser(x: torch.Tensor, t, points: torch.Tensor) -> torch.Tensor:
    """E[x1 | x_t = x] in float64 from explicit differences x - t·x_j, one query at a time.

    Independent of the engine: no GEMM form, no chunking, torch.softmax over all n logits.
    """
    x64 = x.reshape(x.shape[0], -1).to(torch.float64)
    p64 = points.reshape(points.shape[0], -1).to(torch.float64)
    t64 = torch.as_tensor(t, dtype=torch.float64).expand(x64.shape[0])
    out = torch.empty_like(x64)
    for i in range(x64.shape[0]):
        sq = (x64[i] - t64[i] * p64).square().sum(dim=1)
        weights = torch.softmax(-sq / (2 * (1 - t64[i]) ** 2), dim=0)
        out[i] = weights @ p64
    return out


def brute_force_velocity(x: torch.Tensor, t, points: torch.Tensor) -> torch.Tensor:
    x64 = x.reshape(x.shape[0], -1).to(torch.float64)
    t64 = torch.as_tensor(t, dtype=torch.float64).expand(x64.shape[0])
    return (brute_force_denoiser(x, t, points) - x64) / (1 - t64)[:, None]


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    estimate = estimate.reshape(estimate.shape[0], -1).to(torch.float64)
    reference = reference.reshape(reference.shape[0], -1).to(torch.float64)
    return (estimate - reference).norm(dim=1) / reference.norm(dim=1)


def flow_queries(points: torch.Tensor, t, count: int, seed: int = 0,
                 jitter: float = 0.05) -> torch.Tensor:
    """x_t = (1-t)·x0 + t·x1 with x1 a (slightly perturbed) data point, as training builds them."""
    gen = torch.Generator().manual_seed(seed)
    flat = points.reshape(points.shape[0], -1)
    x1 = flat[torch.randint(flat.shape[0], (count,), generator=gen)]
    x1 = x1 + jitter * torch.randn(x1.shape, generator=gen)
    t = torch.as_tensor(t, dtype=torch.float32).expand(count)[:, None]
    return ((1 - t) * torch.randn(x1.shape, generator=gen) + t * x1).to(torch.float32)


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    return load_dataset("digits").reshape(-1, 64)


@pytest.fixture(scope="session")
def random_points() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(2000, 48, generator=gen) * 2 - 1


def brute_force_knn(queries: torch.Tensor, points: torch.Tensor, k: int):
    q64 = queries.reshape(queries.shape[0], -1).to(torch.float64)
    p64 = points.reshape(points.shape[0], -1).to(torch.float64)
    sq = (q64[:, None, :] - p64[None]).square().sum(-1)
    values, ids = sq.sort(dim=1, stable=True)
    return values[:, :k], ids[:, :k]


@pytest.fixture(scope="session")
def sketch_index():
    """Image-like data large enough for the sketches (d = 768), with exact duplicates."""
    from knnflow.synthetic import synthetic_images

    points = synthetic_images(3000, (3, 16, 16), seed=3)
    points[2990:] = points[:10]  # ten duplicated training images: ties at distance 0
    from knnflow.index import Index

    return Index.build(points), points
