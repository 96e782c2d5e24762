"""Image batch operations against hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnflow.errors import InputError
from knnflow.images import LUMA, resize_images, with_flips


def test_with_flips_appends_the_mirror_images():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    doubled = with_flips(images)
    assert doubled.shape == (4, 1, 2, 3)
    assert torch.equal(doubled[:2], images)
    assert doubled[2, 0, 0].tolist() == [2.0, 1.0, 0.0]  # columns reversed, rows kept
    assert torch.equal(with_flips(doubled[2:])[2:], images)  # flipping twice is the identity


def test_resize_converts_channels_and_keeps_constant_images():
    grey = np.full((2, 1, 4, 4), 0.25, np.float32)
    rgb = resize_images(grey, (3, 8, 8))
    assert rgb.shape == (2, 3, 8, 8) and np.allclose(rgb, 0.25, atol=1e-6)
    colour = np.stack([np.full((4, 4), v, np.float32) for v in (0.9, -0.3, 0.1)])[None]
    luma = resize_images(colour, (1, 4, 4))
    expected = 0.299 * 0.9 + 0.587 * -0.3 + 0.114 * 0.1  # Rec. 601 luma of the colour
    assert LUMA == (0.299, 0.587, 0.114) and np.allclose(luma, expected, atol=1e-6)
    assert resize_images(np.full((1, 1, 4, 4), 1.0, np.float32), (1, 2, 2)).max() <= 1.0
    with pytest.raises(InputError, match="cannot convert 2 channels to 3"):
        resize_images(np.zeros((1, 2, 4, 4), np.float32), (3, 4, 4))
