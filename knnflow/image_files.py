"""Images from the user's own files: folders of image files, .npy and .npz arrays, and the map
of their values to float32 in [-1, 1].

A folder is read recursively in sorted order, so the first N images are always the same; an
.npz names its images and labels by key, with train/test arrays for a split. Every mistake is
one line that names the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from knnflow.errors import InputError, MissingFileError, OptionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ARRAY_KEYS = ("images", "x", "data", "arr_0", "samples")
LABEL_KEYS = ("labels", "y", "label", "targets")


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in sorted order."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, size: int | None, channels: int | None) -> np.ndarray:
    """One image as uint8 (C, H, W); with `size`, center-cropped to a square and resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = "L" if (channels == 1 or (channels is None and im.mode in ("1", "L", "I;16"))) \
                else "RGB"
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                w, h = im.size
                side = min(w, h)
                im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side,
                              (h - side) // 2 + side)).resize((size, size), Image.BICUBIC)
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read image {path}: {err.__class__.__name__}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


class LazyImages:
    """An array-like of N images read on demand: len, shape and dtype as an array's, a slice
    is a view that reads nothing, and np.asarray(view) reads it. `read(start, stop)` returns
    images start..stop as an array; build-index streams large data sets through it."""

    def __init__(self, n: int, item_shape: tuple[int, ...], dtype, read, offset: int = 0):
        self.n, self.item_shape, self.dtype = n, tuple(item_shape), np.dtype(dtype)
        self._read, self._offset = read, offset

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.item_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.item_shape)

    def __getitem__(self, key: slice) -> LazyImages:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("lazy images take contiguous slices only")
        start, stop, _ = key.indices(self.n)
        return LazyImages(max(0, stop - start), self.item_shape, self.dtype, self._read,
                          self._offset + start)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._read(self._offset, self._offset + self.n)
        return array if dtype is None else array.astype(dtype)


def read_folder(path: Path, split: str, limit: int | None, size: int | None
                ) -> tuple[LazyImages, None]:
    """The first `limit` images of a folder as uint8 (N, C, H, W), read when used: PATH/train
    or PATH/test where present (a folder without test/ has no test split), else every image
    under PATH. All must share the first image's shape, or be resized to size×size; no
    labels."""
    if not path.is_dir():
        raise MissingFileError(f"folder: expected a folder of images at {path}")
    split_dir = path / split
    if split_dir.is_dir():
        path = split_dir
    elif split == "test":
        raise InputError(f"folder {path} has no test/ subfolder, so it has no test split")
    files = list_images(path)[:limit]
    if not files:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    first = read_image(files[0], size, None)

    def read(start: int, stop: int) -> np.ndarray:
        images = np.empty((stop - start, *first.shape), dtype=np.uint8)
        for i, file in enumerate(files[start:stop]):
            image = read_image(file, size, first.shape[0])
            if image.shape != first.shape:
                raise OptionError(f"{file} has shape {image.shape} but {files[0]} has "
                                  f"{first.shape}; pass {{size}} to resize all images", "size")
            images[i] = image
        return images

    return LazyImages(len(files), first.shape, np.uint8, read), None


def read_array(path: Path, split: str | None = None) -> np.ndarray:
    """Images from an .npy or .npz file. An .npz may hold a `train`/`test` split."""
    return read_array_and_labels(path, split)[0]


def read_array_and_labels(path: Path, split: str | None = None
                          ) -> tuple[np.ndarray, np.ndarray | None]:
    """Images from an .npy or .npz file, and the integer class labels an .npz holds beside
    them (None without): the split's own (y_train, train_labels, labels_train) beside split
    arrays, else the first of LABEL_KEYS; there must be one per image."""
    if not path.is_file():
        raise MissingFileError(f"expected an array file at {path}")
    try:  # an .npy is memory-mapped: build-index reads it in batches
        loaded = np.load(path, allow_pickle=False,
                         mmap_mode="r" if path.suffix.lower() == ".npy" else None)
    except (ValueError, OSError) as err:
        raise InputError(f"cannot read {path} as a numpy array: {err}") from None
    if isinstance(loaded, np.ndarray):
        if split == "test":
            raise InputError(f"{path} holds one array, so it has no test split")
        return loaded, None
    with loaded:
        keys = list(loaded.keys())
        image_key = _image_key(path, keys, split)
        images = loaded[image_key]
        names = ((f"y_{split}", f"{split}_labels", f"labels_{split}")
                 if split is not None and image_key in _split_keys(split) else LABEL_KEYS)
        key = next((name for name in names if name in keys), None)
        if key is None:
            return images, None
        labels = loaded[key]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{path}: labels {key!r} must be one integer per image, got "
                         f"{labels.dtype} of shape {labels.shape}")
    if len(labels) != len(images):
        raise InputError(f"{path}: {len(labels)} labels in {key!r} for {len(images)} images")
    return images, labels


def has_test_array(path: Path) -> bool:
    """Whether the .npz at `path` holds a test array (test, x_test or test_images); False
    for a missing or unreadable file."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as loaded:
            keys = list(loaded.keys())
    except (ValueError, OSError):
        return False
    return any(key in keys for key in _split_keys("test"))


def _split_keys(split: str) -> tuple[str, ...]:
    return (split, f"x_{split}", f"{split}_images")


def _image_key(path: Path, keys: list[str], split: str | None) -> str:
    """The key of an .npz's images: the split's own (train, x_train, train_images), else the
    first of ARRAY_KEYS, else its only array."""
    if split is not None:
        for key in _split_keys(split):
            if key in keys:
                return key
        if split == "test":
            raise InputError(f"{path} has no test array (keys: {', '.join(keys)})")
    for key in ARRAY_KEYS:
        if key in keys:
            return key
    unlabelled = [key for key in keys if key not in LABEL_KEYS]
    if len(unlabelled) == 1:
        return unlabelled[0]
    raise InputError(f"{path} holds several arrays ({', '.join(keys)}); name one of them "
                     f"{', '.join(ARRAY_KEYS)}")


def to_unit_range(array: np.ndarray, source: str) -> tuple[np.ndarray, str]:
    """Images as float32 in [-1, 1], with N×C×H×W layout, and a word on what was detected.

    uint8 is read as 0..255. Floats must already lie in [-1, 1]; channels-last (N, H, W, C) with
    C in {1, 3} and 2-D (N, H, W) arrays are accepted too.
    """
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4:
        raise InputError(f"{source} has shape {array.shape}; expected N×C×H×W images")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 127.5 - 1.0, "uint8 0..255"
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{source} has dtype {array.dtype}; expected uint8 or floating point")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{source} contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
        raise InputError(f"{source} has float values in [{low:.3g}, {high:.3g}]; expected [-1, 1] "
                         "(or uint8 0..255)")
    return np.clip(array, -1.0, 1.0), "float in [-1, 1]"
