"""Operations on batches of images (N, C, H, W) in [-1, 1]: horizontal flips, resizing with
channel conversion, and one image as matplotlib shows it."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from knnflow.errors import InputError

# Rec. 601 luma weights: RGB → grey.
LUMA = (0.299, 0.587, 0.114)


def with_flips(images: Tensor) -> Tensor:
    """The data set with every image also flipped horizontally: the training set that
    flip=True implies, for the index that knn-efm and exact targets use."""
    return torch.cat([images, images.flip(-1)])


def flip_images(flat: Tensor, image_shape: tuple[int, ...]) -> Tensor:
    """Horizontal flips of flattened images (B, d)."""
    return flat.reshape(-1, *image_shape).flip(-1).reshape(flat.shape[0], -1)


def shape_text(shape) -> str:
    """An image shape as printed: 1×8×8."""
    return "×".join(map(str, shape))


def displayable(image: np.ndarray) -> np.ndarray:
    """C×H×W in [-1, 1] → H×W(×3) in [0, 1] for imshow."""
    image = (np.clip(image, -1, 1) + 1) / 2
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def resize_images(values: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """float32 N×C×H×W → N×C'×H'×W': channels 1↔3 (repeat or luma), bicubic antialiased."""
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    channels = tensor.shape[1]
    if channels != target[0]:
        if channels == 1:
            tensor = tensor.expand(-1, target[0], -1, -1)
        elif channels == 3 and target[0] == 1:
            tensor = torch.einsum("nchw,c->nhw", tensor, torch.tensor(LUMA))[:, None]
        else:
            raise InputError(f"cannot convert {channels} channels to {target[0]}")
    if tuple(tensor.shape[2:]) != tuple(target[1:]):
        tensor = torch.nn.functional.interpolate(tensor, size=tuple(target[1:]), mode="bicubic",
                                                 antialias=True, align_corners=False)
    return tensor.clamp(-1, 1).numpy()
