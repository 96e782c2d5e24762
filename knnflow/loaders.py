"""Readers of the named data sets in the layouts they are distributed in: scikit-learn's
embedded digits, MNIST's idx files, CIFAR-10's python pickle batches and CelebA's aligned JPEGs.

Each reader takes the folder holding the files (knnflow.data chooses the default), the split
and a limit, and returns uint8 or float images (N, C, H, W) with their labels (None where the
set has none). A missing file is one line naming where it was expected.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from knnflow.errors import InputError, MissingFileError

# CelebA's sides: 64 (the paper's setting, the default), 32 and 128; from 178×178 crops.
CELEBA_SIZES = (64, 32, 128)


def load_digits(root: Path | None, split: str, limit: int | None):
    """scikit-learn's 8×8 digits, mapped from 0..16 to [-1, 1]; root is not used."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16
    # A fixed split: every sixth image is held out (299 test, 1498 train), classes stay balanced.
    held_out = np.arange(len(images)) % 6 == 5
    keep = held_out if split == "test" else ~held_out
    return images[keep][:, None], bunch.target[keep]


# --------------------------------------------------------------------------- MNIST


def _find_file(root: Path, names: list[str], dirs: list[str], what: str) -> Path:
    """The first of `names` in root/<dir> for each of `dirs`; else one file whose name ends
    with "-NAME", "_NAME" or ".NAME" (a prefixed copy such as mnist-t10k-images-idx3-ubyte.gz)."""
    for sub in dirs:
        for name in names:
            path = root / sub / name
            if path.is_file():
                return path
    for sub in dirs:
        folder = root / sub
        if not folder.is_dir():
            continue
        found = sorted({path for name in names for sep in "-_." for path in
                        folder.glob(f"*{sep}{name}") if path.is_file()})
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(f"{what}: several files in {folder} could be {names[0]}: "
                             f"{', '.join(path.name for path in found)}")
    raise MissingFileError(f"{what}: expected {names[0]} (or {names[-1]}) in {root}")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise InputError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path} is truncated: expected {int(np.prod(dims))} values")
    return body.reshape(dims)


def load_mnist(root: Path, split: str, limit: int | None):
    """MNIST's idx files (plain or .gz) in root, root/MNIST/raw, root/raw or root/mnist;
    labels where their file is present."""
    prefix = "train" if split == "train" else "t10k"
    dirs = ["", "MNIST/raw", "raw", "mnist"]
    # torchvision's names, and the dotted ones of other mirrors (t10k-images.idx3-ubyte).
    image_names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte",
                   f"{prefix}-images-idx3-ubyte.gz"]
    label_names = [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte",
                   f"{prefix}-labels-idx1-ubyte.gz"]
    images = _read_idx(_find_file(root, image_names, dirs, "mnist"))
    try:
        labels = _read_idx(_find_file(root, label_names, dirs, "mnist"))
    except MissingFileError:
        labels = None
    return images[:limit, None], None if labels is None else labels[:limit]


# --------------------------------------------------------------------------- CIFAR-10


def load_cifar10(root: Path, split: str, limit: int | None):
    """CIFAR-10's python batches in root/cifar-10-batches-py (or root), read only as far as
    `limit` needs."""
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels, count = [], [], 0
    for name in names:
        path = folder / name
        if not path.is_file():
            raise MissingFileError(
                f"cifar10: expected {path} (the python pickle batches of cifar-10-python.tar.gz)")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"]))
        count += len(images[-1])
        if limit is not None and count >= limit:
            break
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


# --------------------------------------------------------------------------- CelebA


def _celeba_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    # The usual 64×64 CelebA: a 178×178 center crop of the aligned 178×218 image, then resize.
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        left, top = (w - 178) // 2, (h - 178) // 2
        im = im.crop((left, top, left + 178, top + 178)).resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def load_celeba(root: Path, split: str, limit: int | None, size: int | None = None,
                name: str = "celeba"):
    """CelebA in torchvision's layout (root/celeba/img_align_celeba and the official
    list_eval_partition.txt), each image cropped and resized to size×size (default 64)."""
    size = size or CELEBA_SIZES[0]
    base = root / "celeba" if (root / "celeba").is_dir() else root
    folder, partition = base / "img_align_celeba", base / "list_eval_partition.txt"
    layout = ("torchvision's layout: ROOT/celeba/img_align_celeba/*.jpg and "
              "ROOT/celeba/list_eval_partition.txt")
    if not folder.is_dir():
        raise MissingFileError(f"{name}: expected the aligned images in {folder} ({layout})")
    if not partition.is_file():
        raise MissingFileError(f"{name}: expected {partition}, the official split ({layout})")
    wanted = "0" if split == "train" else "2"
    names = [line.split()[0] for line in partition.read_text().splitlines()
             if len(line.split()) == 2 and line.split()[1] == wanted][:limit]
    images = np.stack([_celeba_image(_image_path(folder / name), size) for name in names])
    return images, None


def load_celeba64(root: Path, split: str, limit: int | None):
    """celeba at 64×64, under its own name."""
    return load_celeba(root, split, limit, 64, name="celeba64")


def _image_path(path: Path) -> Path:
    if not path.is_file():
        raise MissingFileError(f"expected the image file {path}")
    return path
