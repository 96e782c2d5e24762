"""The synthetic data set: seeded, in range, any size."""

from __future__ import annotations

import torch

from knnflow.data import load_dataset
from knnflow.synthetic import synthetic_images


def test_synthetic_is_seeded_and_in_range():
    a = synthetic_images(100, (3, 32, 32), seed=0)
    assert torch.equal(a, synthetic_images(100, (3, 32, 32), seed=0))
    assert a.shape == (100, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, synthetic_images(100, (3, 32, 32), seed=1))
    assert load_dataset("synthetic", limit=7).shape == (7, 3, 32, 32)


def test_seeds_and_blocks_give_distinct_images():
    """Each block of 4,096 images has its own generator: no block of one seed repeats a block
    of another, or another block of its own seed."""
    from knnflow.synthetic import BLOCK

    first = synthetic_images(8, seed=0)
    for seed, start in ((1, 0), (2, 0), (0, BLOCK), (1, BLOCK)):
        other = synthetic_images(8, seed=seed, start=start)
        assert float((other - first).abs().max()) > 0.1
