"""The data-set catalogue and load_dataset: data sets as float32 tensors in [-1, 1] of shape
(N, C, H, W), read from files already on disk.

Nothing is downloaded. Each named set has a reader (knnflow.loaders, photos, synthetic) that
reads the layout its data set is usually distributed in and fails with one line naming the
file it expected; folder:PATH, npz:PATH and npy:PATH read the user's own files
(knnflow.image_files). A limit of N keeps the first N images of the split, so results are
reproducible. The catalogue (names, sizes, where files are expected) imports neither torch nor
the readers' libraries, so it serves the command line's help.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from knnflow.errors import InputError, OptionError
from knnflow.image_files import has_test_array, read_array_and_labels, read_folder, to_unit_range
from knnflow.loaders import (
    CELEBA_SIZES,
    load_celeba,
    load_celeba64,
    load_cifar10,
    load_digits,
    load_mnist,
)
from knnflow.photos import (
    DENSE_COUNTS,
    PHOTO_SIZES,
    PHOTO_SPLITS,
    load_photos,
    load_photos_dense,
)
from knnflow.synthetic import load_synthetic

if TYPE_CHECKING:  # torch is imported where tensors are made: the catalogue (names, sizes,
    # where files are expected) serves the command line's help without it.
    from torch import Tensor

SPLITS = ("train", "test")
DATA_ROOT_ENV = "KNNFLOW_DATA"


@dataclass(frozen=True)
class DatasetInfo:
    """What `knnflow datasets` shows about one data set."""

    name: str
    shape: str
    size: str
    location: str


@dataclass(frozen=True)
class _Loader:
    """A named data set: what the catalogue shows, its reader (root, split, limit[, size]) →
    (images, labels or None), and the folder under the data root its files sit in (None
    for sets that read no files)."""

    info: DatasetInfo
    load: Callable[..., tuple[np.ndarray, np.ndarray | None]]
    folder: str | None


def default_root(name: str) -> Path:
    """Where a data set's files are looked for when no root is given: $KNNFLOW_DATA/NAME
    (data/NAME without it)."""
    return Path(os.environ.get(DATA_ROOT_ENV, "data")) / name


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


_LOADERS: dict[str, _Loader] = {
    "digits": _Loader(DatasetInfo("digits", "1×8×8", "1498 / 299",
                                  "embedded in scikit-learn (the default)"), load_digits, None),
    "mnist": _Loader(DatasetInfo("mnist", "1×28×28", "60000 / 10000",
                                 "data/mnist/{train,t10k}-images-idx3-ubyte[.gz]"),
                     load_mnist, "mnist"),
    "cifar10": _Loader(DatasetInfo("cifar10", "3×32×32", "50000 / 10000",
                                   "data/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}"),
                       load_cifar10, "cifar10"),
    "celeba": _Loader(DatasetInfo("celeba", "3×64×64 (--size 32 or 128: 3×S×S)",
                                  "162770 / 19962",
                                  "data/celeba/celeba/img_align_celeba/*.jpg and "
                                  "data/celeba/celeba/list_eval_partition.txt"),
                      load_celeba, "celeba"),
    "celeba64": _Loader(DatasetInfo("celeba64", "3×64×64 (celeba at 64)", "162770 / 19962",
                                    "as celeba"),
                        load_celeba64, "celeba"),
    "photos": _Loader(DatasetInfo(
        "photos", "3×32×32 (--size 64: 3×64×64)",
        f"{PHOTO_SPLITS[32]} (64: {PHOTO_SPLITS[64]})",
        "cut on first use from the photographs scikit-image ships (installed with knnflow); "
        "cached as data/photos/photos-{32,64}.npy"), load_photos, "photos"),
    "photos-dense": _Loader(DatasetInfo(
        "photos-dense", "3×32×32", f"{DENSE_COUNTS[0]} / {DENSE_COUNTS[1]}",
        "photos cut every 3 pixels, for scale on real images (the test split is each "
        "photograph's bottom strip); cached as data/photos/photos-dense-32.npy (2.3 GB)"),
        load_photos_dense, "photos"),
    "synthetic": _Loader(DatasetInfo("synthetic", "3×32×32", "50000 / 10000",
                                     "generated: seeded CIFAR-like mixture of smooth random "
                                     "images; --limit N makes N training images, also "
                                     "beyond 50000"),
                         load_synthetic, None),
}
# Loaders that take a size, and the sizes they come in (the first is the default).
SIZED_LOADERS: dict[str, tuple[int, ...]] = {"photos": tuple(PHOTO_SIZES),
                                             "celeba": CELEBA_SIZES}
_PATH_KINDS = {
    "folder": DatasetInfo("folder:PATH", "C×S×S (--size S)", "all / PATH/test",
                          "PATH/**/*.{png,jpg,...}; PATH/train and PATH/test if present"),
    "npz": DatasetInfo("npz:PATH", "from the array", "all / key test",
                       "PATH.npz, N×C×H×W uint8 or [-1, 1]; keys train and test if present"),
    "npy": DatasetInfo("npy:PATH", "from the array", "all / none",
                       "PATH.npy, N×C×H×W uint8 or [-1, 1]"),
}


def dataset_infos() -> list[DatasetInfo]:
    """Every data set knnflow can load, for `knnflow datasets`."""
    return [loader.info for loader in _LOADERS.values()] + list(_PATH_KINDS.values())


def dataset_names() -> list[str]:
    return list(_LOADERS) + [f"{kind}:PATH" for kind in _PATH_KINDS]


def dataset_sources(name: str | None, root: str | Path | None = None) -> list[Path]:
    """The files or folders a data set is read from, where the user named them (PATH of
    folder:/npz:/npy:PATH, or root): outputs must never replace them."""
    kind, _, path = (name or "").partition(":")
    sources = [Path(path).expanduser()] if kind in _PATH_KINDS and path else []
    return sources + ([Path(root).expanduser()] if root is not None else [])


def _unknown_dataset(name: str) -> InputError:
    return InputError(f"unknown data set {name!r}; valid: {', '.join(dataset_names())}")


def has_test_split(name: str) -> bool:
    """Whether data set `name` has a test split: the named sets do; folder:PATH when it has
    PATH/test, npz:PATH when it holds a test array, npy:PATH never."""
    kind, _, path = name.partition(":")
    if not (kind in _PATH_KINDS and path):
        return True
    location = Path(path).expanduser()
    if kind == "folder":
        return (location / "test").is_dir()
    return kind == "npz" and has_test_array(location)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise OptionError(f"must be at least 1, got {limit}", "limit")


def check_size(name: str, size: int | None) -> int | None:
    """The size to load data set `name` with, checked before any work: any side ≥ 1 for
    folder:PATH, one of SIZED_LOADERS[name] for photos and celeba (the default becomes None,
    so one data set has one description), and None for the rest. Otherwise a one-line
    OptionError naming size (or an InputError for an unknown data set)."""
    if size is None:
        return None
    if size < 1:
        raise OptionError(f"must be at least 1, got {size}", "size")
    kind, _, path = name.partition(":")
    if kind == "folder" and path:
        return size
    if name in SIZED_LOADERS:
        sizes = SIZED_LOADERS[name]
        if size not in sizes:
            raise OptionError(f"{name} comes in {{size}} {' or '.join(map(str, sizes))}, "
                              f"got {size}", "size")
        return None if size == sizes[0] else size
    if not (kind in _PATH_KINDS and path) and name not in _LOADERS:
        raise _unknown_dataset(name)
    raise OptionError(f"{{size}} applies to folder:PATH and {', '.join(SIZED_LOADERS)} only, "
                      f"not to {name}", "size")


def _raw_images(name: str, root: str | Path | None, split: str, limit: int | None,
                size: int | None) -> tuple[object, np.ndarray | None]:
    """The first `limit` images of a split as the reader gives them (uint8 or float, an
    array, a memory map or LazyImages) and their labels, checked to be non-empty."""
    root_path = Path(root).expanduser() if root is not None else None
    kind, _, path = name.partition(":")
    if kind in _PATH_KINDS and path:
        path_obj = Path(path).expanduser()
        if kind == "folder":
            raw, labels = read_folder(path_obj, split, limit, size)
        else:
            raw, labels = read_array_and_labels(path_obj, split)
    elif name in _LOADERS:
        loader = _LOADERS[name]
        folder = root_path or (default_root(loader.folder) if loader.folder else None)
        if name in SIZED_LOADERS:
            raw, labels = loader.load(folder, split, limit, size)
        else:
            raw, labels = loader.load(folder, split, limit)
    else:
        raise _unknown_dataset(name)
    raw = raw[:limit]
    if len(raw) == 0:
        raise InputError(f"data set {name!r} ({split}) has no images")
    return raw, labels


def load_dataset(name: str, root: str | Path | None = None, split: str = "train",
                 limit: int | None = None, size: int | None = None,
                 with_labels: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
    """Images of a data set as a float32 (N, C, H, W) tensor in [-1, 1].

    name: digits, mnist, cifar10, celeba (celeba64), photos, photos-dense, synthetic,
    folder:PATH, npz:PATH or npy:PATH.
    root: the folder holding the data set's files (default data/NAME, or $KNNFLOW_DATA/NAME).
    size: resize folder images to size×size; photos: the patch side (32 or 64); celeba: the
    side (64, 32 or 128).
    with_labels: also return the labels (or None).
    """
    split = check_split(split)
    check_limit(limit)
    size = check_size(name, size)
    raw, labels = _raw_images(name, root, split, limit, size)
    images, _ = to_unit_range(np.asarray(raw), name)
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if with_labels:
        return tensor, None if labels is None else torch.as_tensor(np.array(labels)[:limit])
    return tensor


# Images per batch when a data set is streamed (build-index): 4096 × 3×64×64 float32 is 200 MB.
SOURCE_BATCH = 4096


@dataclass(frozen=True)
class ImageSource:
    """A data set read in batches instead of at once: `batches()` yields float32
    (b, C, H, W) arrays in [-1, 1], in load_dataset's order (with flip: every image, then
    every image flipped horizontally, as images.with_flips orders them)."""

    name: str
    raw: object
    image_shape: tuple[int, ...]
    flip: bool = False

    @property
    def n(self) -> int:
        return len(self.raw) * (2 if self.flip else 1)

    def batches(self, size: int = SOURCE_BATCH) -> Iterator[np.ndarray]:
        for flipped in ((False, True) if self.flip else (False,)):
            for start in range(0, len(self.raw), size):
                images, _ = to_unit_range(np.asarray(self.raw[start:start + size]), self.name)
                yield np.ascontiguousarray(images[..., ::-1]) if flipped else images


def image_source(name: str, root: str | Path | None = None, split: str = "train",
                 limit: int | None = None, size: int | None = None,
                 flip: bool = False) -> ImageSource:
    """A data set as load_dataset would give it (with flip: with_flips of it), read in
    batches: npy files are memory-mapped, folders and synthetic images read or made per
    batch, so the float32 images never exist all at once."""
    split = check_split(split)
    check_limit(limit)
    size = check_size(name, size)
    raw, _ = _raw_images(name, root, split, limit, size)
    first, _ = to_unit_range(np.asarray(raw[:1]), name)
    return ImageSource(name, raw, tuple(first.shape[1:]), flip)
