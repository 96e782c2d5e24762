"""Image batch operations against hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnflow.errors import InputError
from knnflow.images import LUMA, displayable, flip_images, resize_images, shape_text, with_flips


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


def test_flip_images_of_flattened_rows_is_the_image_flip():
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flat = flip_images(images.reshape(2, -1), (3, 4, 5))
    assert torch.equal(flat, images.flip(-1).reshape(2, -1))
    assert torch.equal(flip_images(flat, (3, 4, 5)), images.reshape(2, -1))  # an involution


def test_displayable_maps_the_unit_range_to_imshow_layout():
    grey = np.array([[[-1.0, 0.0], [1.0, 2.0]]])  # 1×2×2, one value outside [-1, 1]
    assert np.array_equal(displayable(grey), np.array([[0.0, 0.5], [1.0, 1.0]]))
    rgb = np.stack([np.full((2, 3), -1.0), np.zeros((2, 3)), np.ones((2, 3))])  # 3×2×3
    shown = displayable(rgb)
    assert shown.shape == (2, 3, 3) and np.array_equal(shown[0, 0], [0.0, 0.5, 1.0])
    assert shape_text((1, 8, 8)) == "1×8×8"
