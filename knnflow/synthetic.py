"""The synthetic data set: seeded CIFAR-like images with a natural-image spectrum, made on the
fly, so scaling benchmarks can ask for any number of training images without files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the images are made (the catalogue stays light)
    import torch
    from torch import Tensor

SYNTHETIC_SIZES = {"train": 50_000, "test": 10_000}


# Images per generator: block b of a seed draws from its own generator (seed·2^20 + b), so
# any range of images is made without the ones before it (build-index streams a million).
BLOCK = 4096


def synthetic_images(n: int, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0,
                     clusters: int = 500, start: int = 0) -> Tensor:
    """Structured images in [-1, 1] with a natural-image-like spectrum, seeded: images
    start..start+n of the sequence of `seed`.

    Each image is tanh(c_k + f4 + f8 + f16 + 0.04·ε): one of `clusters` cluster centres c_k (random
    fields at 1/8 and 1/4 resolution, amplitudes 0.55 and 0.25), its own fields at 1/8, 1/4 and
    1/2 resolution (amplitudes 0.25, 0.2, 0.12) and white noise ε. Fields are Gaussian noise
    upsampled bicubically. The centres are the same for every seed, so seeds give train and
    held-out sets of one distribution. On 3×32×32 this gives CIFAR-10-like statistics: pixel
    standard deviation 0.48, 90% of the variance in the top 100 principal components, nearest
    training image of a held-out one at about 0.43 of the typical distance. Images are made in
    blocks of BLOCK, each from a generator seeded by seed·2^20 + block.
    """
    import torch

    channels, spatial = shape[0], shape[1:]
    mode = "bicubic" if len(spatial) == 2 else "linear"

    def fields(count: int, divisor: int, amplitude: float, gen: torch.Generator) -> Tensor:
        coarse = tuple(max(2, size // divisor) for size in spatial)
        noise = torch.randn(count, channels, *coarse, generator=gen)
        smooth = torch.nn.functional.interpolate(noise, size=spatial, mode=mode,
                                                 align_corners=False)
        return amplitude * smooth.reshape(count, -1)

    center_gen = torch.Generator().manual_seed(1234)
    centers = fields(clusters, 8, 0.55, center_gen) + fields(clusters, 4, 0.25, center_gen)
    out = torch.empty(n, centers.shape[1])
    stop = start + n
    for block in range(start // BLOCK, -(-stop // BLOCK)):
        # torch's CPU generator keeps 32 bits of a seed: seeds < 4096 and blocks < 2^20
        # (4·10^9 images) give distinct streams.
        gen = torch.Generator().manual_seed((seed * 2**20 + block) % 2**32)
        label = torch.randint(clusters, (BLOCK,), generator=gen)
        image = (centers[label] + fields(BLOCK, 8, 0.25, gen) + fields(BLOCK, 4, 0.2, gen)
                 + fields(BLOCK, 2, 0.12, gen) + 0.04 * torch.randn(BLOCK, centers.shape[1],
                                                                    generator=gen))
        first, last = max(start, block * BLOCK), min(stop, (block + 1) * BLOCK)
        out[first - start:last - start] = torch.tanh(image[first - block * BLOCK:
                                                           last - block * BLOCK])
    return out.reshape(n, *shape)


def load_synthetic(root: Path | None, split: str, limit: int | None):
    """The synthetic split as float images in [-1, 1], made when read (LazyImages); root
    is not used."""
    from knnflow.image_files import LazyImages

    # The train split grows with the limit beyond its default size (for scaling benchmarks).
    count = SYNTHETIC_SIZES[split] if limit is None else (
        limit if split == "train" else min(limit, SYNTHETIC_SIZES[split]))
    # Train and test draw from the same mixture with different seeds.
    seed = 0 if split == "train" else 1
    shape = (3, 32, 32)

    def read(start: int, stop: int):
        return synthetic_images(stop - start, shape, seed=seed, start=start).numpy()

    return LazyImages(count, shape, "float32", read), None
