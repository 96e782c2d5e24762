"""The photos data sets: patches cut from the photographs scikit-image ships, so real images
are there without a download. photos: 32×32 windows every 12 pixels (64×64 every 24);
photos-dense: 32×32 windows every 3 pixels, split by place, for scale (10⁵-10⁶).

The recipes are fixed (scales, stride, flatness threshold, seeded order), and the patch counts
they must give are checked, so every install cuts the same patches. They are cut once and kept
as ROOT/photos-SIZE.npy and ROOT/photos-dense-32.npy, written atomically and memory-mapped
when read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import numpy as np

from knnflow.errors import InputError, MissingFileError, OptionError
from knnflow.image_files import IMAGE_SUFFIXES

# The photographs scikit-image ships in skimage/data (file stems); greyscale ones are repeated
# to three channels.
PHOTO_FILES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
               "motorcycle_left", "motorcycle_right", "ihc", "color", "camera", "brick",
               "grass", "gravel", "moon", "coins", "page", "text", "clock_motion",
               "microaneurysms", "cell")
PHOTO_SCALES = (1.0, 0.5, 0.25)
# Patch side → (window stride, training images); the rest of the patches are the test split.
# The first side is the default.
PHOTO_SIZES = {32: (12, 45_000), 64: (24, 10_500)}
# Patches whose pixel standard deviation is at most this (of 255) are flat and dropped.
PHOTO_MIN_STD = 4.0
PHOTO_COUNTS = {32: 50_442, 64: 11_781}
# "train / test" counts per side, as `knnflow datasets` shows them.
PHOTO_SPLITS = {side: f"{train} / {PHOTO_COUNTS[side] - train}"
                for side, (_, train) in PHOTO_SIZES.items()}
# photos-dense (see dense_patches): the side, the stride, and the (train, test) counts.
DENSE_SIZE, DENSE_STRIDE = 32, 3
DENSE_COUNTS = (705_515, 30_718)


def _photos_folder() -> Path:
    try:
        import skimage
    except ImportError:
        raise MissingFileError("photos needs scikit-image (pip install scikit-image): its "
                               "photographs are the data") from None
    return Path(skimage.__file__).parent / "data"


def _scaled_photos():
    """Each photograph at scales 1, 1/2 and 1/4 (skimage.transform.rescale with
    anti-aliasing, rounded back to 0..255), uint8 (H, W, 3), in PHOTO_FILES order."""
    folder = _photos_folder()
    try:
        from skimage.transform import rescale
    except ImportError as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise MissingFileError(f"photos needs scikit-image's skimage.transform, which does not "
                               f"import ({first}); reinstall scikit-image") from None
    from PIL import Image, UnidentifiedImageError

    found = {path.stem: path for path in folder.iterdir()
             if path.suffix.lower() in IMAGE_SUFFIXES} if folder.is_dir() else {}
    for stem in PHOTO_FILES:
        if stem not in found:
            raise MissingFileError(f"photos: expected the photograph {stem} (.png or .jpg) "
                                   f"in {folder}, scikit-image's data folder")
        try:
            with Image.open(found[stem]) as im:
                photo = np.asarray(im)
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"photos: cannot read the photograph {found[stem]}: "
                             f"{err.__class__.__name__}") from None
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        photo = photo[..., :3]
        for scale in PHOTO_SCALES:
            yield photo if scale == 1 else np.clip(np.round(rescale(
                photo, scale, anti_aliasing=True, channel_axis=2) * 255), 0, 255).astype(np.uint8)


def _windows(scaled: np.ndarray, size: int, stride: int, rows: range) -> list[np.ndarray]:
    """The size×size windows of `scaled` whose top rows are `rows` and whose left columns
    are 0, stride, 2·stride, ..., as (3, size, size) views, row by row, the flat ones
    (pixel standard deviation ≤ PHOTO_MIN_STD) left out."""
    kept = []
    for y in rows:
        for x in range(0, scaled.shape[1] - size + 1, stride):
            patch = scaled[y:y + size, x:x + size]
            if patch.std() > PHOTO_MIN_STD:
                kept.append(patch.transpose(2, 0, 1))
    return kept


def _checked(patches: list[np.ndarray], expected: int, what: str,
             out: np.ndarray | None = None) -> np.ndarray:
    """The patches permuted by numpy's default_rng(0) and stacked (into `out` where given: one
    copy of the views, not a stack and a permuted copy of it), once their count is the
    recipe's."""
    if len(patches) != expected:
        raise InputError(f"photos: cut {len(patches)} {what} from the photographs in "
                         f"{_photos_folder()}, expected {expected} (another scikit-image's "
                         "photographs?)")
    order = np.random.default_rng(0).permutation(len(patches))
    return np.stack([patches[i] for i in order], out=out)


def photo_patches(size: int = 32) -> np.ndarray:
    """Every photos patch of side `size`, uint8 (N, 3, size, size), in the seeded order.

    Each photograph is taken at scales 1, 1/2 and 1/4 and cut into size×size windows every
    stride pixels (12 for 32, 24 for 64); windows with a pixel standard deviation ≤ 4 are
    dropped and the rest permuted by numpy's default_rng(0): 50,442 patches of 32×32,
    11,781 of 64×64.
    """
    if size not in PHOTO_SIZES:
        raise OptionError(f"photos comes in {{size}} {' or '.join(map(str, PHOTO_SIZES))}, "
                          f"got {size}", "size")
    stride = PHOTO_SIZES[size][0]
    patches = []
    for scaled in _scaled_photos():
        patches += _windows(scaled, size, stride, range(0, scaled.shape[0] - size + 1, stride))
    return _checked(patches, PHOTO_COUNTS[size], f"patches of {size}×{size}")


def dense_strip(height: int) -> int:
    """The rows at the bottom of a scaled photograph of `height` rows that photos-dense
    keeps for its test split: a tenth of them, at least one window's side."""
    return max(DENSE_SIZE, height // 10)


def dense_patches() -> np.ndarray:
    """photos-dense, uint8 (N, 3, 32, 32): the train patches, then the test patches, each
    in their own seeded order.

    The photographs are scaled as for photos and cut into 32×32 windows every 3 pixels (16×
    as many as photos). Overlapping windows share pixels, so the split is by place: in each
    scaled photograph, windows starting in its last dense_strip(H) rows are the test split,
    and the training windows end above that strip, so within a scaled photograph no pixel is
    in both (another scale of the photograph may show the same region). Flat windows are
    dropped as for photos: 705,515 train and 30,718 test patches.
    """
    size, stride = DENSE_SIZE, DENSE_STRIDE
    train, test = [], []
    for scaled in _scaled_photos():
        cut = scaled.shape[0] - dense_strip(scaled.shape[0])
        train += _windows(scaled, size, stride, range(0, cut - size + 1, stride))
        test += _windows(scaled, size, stride, range(cut, scaled.shape[0] - size + 1, stride))
    patches = np.empty((sum(DENSE_COUNTS), 3, size, size), dtype=np.uint8)
    _checked(train, DENSE_COUNTS[0], "photos-dense training patches",
             out=patches[:DENSE_COUNTS[0]])
    _checked(test, DENSE_COUNTS[1], "photos-dense test patches", out=patches[DENSE_COUNTS[0]:])
    return patches


def photos_cache(root: Path, size: int) -> Path:
    """Where the patches of side `size` are kept: ROOT/photos-SIZE.npy (knnflow.data's
    default root is data/photos, or $KNNFLOW_DATA/photos)."""
    return root / f"photos-{size}.npy"


def _read_photos_cache(cache: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached patches, memory-mapped, or None where the file is missing, unreadable,
    truncated or of another shape or dtype (then they are cut again)."""
    try:
        patches = np.load(cache, mmap_mode="r", allow_pickle=False)
        if not isinstance(patches, np.memmap):  # an .npz archive under this name
            patches.close()
            return None
        complete = patches.offset + patches.nbytes == cache.stat().st_size
    except (ValueError, OSError, EOFError):
        return None
    if (not complete or patches.dtype != np.uint8 or not patches.flags.c_contiguous
            or patches.shape != shape):
        return None
    return patches


def _write_photos_cache(cache: Path, patches: np.ndarray) -> None:
    """Write through a temporary sibling, flushed, then renamed: readers see the old file or
    the complete new one. Where the folder is not writable nothing is left behind."""
    partial = cache.with_name(f".{cache.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            np.save(f, patches)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, cache)
    except OSError:  # a read-only data folder: cut again next time
        pass
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def _cached_patches(cache: Path, shape: tuple[int, ...], cut) -> np.ndarray:
    """The patches kept in `cache` (memory-mapped), or cut by `cut()` and kept there: the
    recipe takes seconds, the file none."""
    patches = _read_photos_cache(cache, shape) if cache.is_file() else None
    if patches is None:
        patches = cut()
        _write_photos_cache(cache, patches)
    return patches


def _split(patches: np.ndarray, train: int, split: str, limit: int | None):
    """The first `train` patches (split "train") or the rest, the first `limit` of them, and
    no labels."""
    chosen = patches[:train] if split == "train" else patches[train:]
    return np.asarray(chosen[:limit]), None


def load_photos(root: Path, split: str, limit: int | None, size: int | None = None):
    """The photos split of side `size` (default 32) as uint8 patches: the first
    PHOTO_SIZES[size][1] of the seeded order are train, the rest test."""
    size = size or next(iter(PHOTO_SIZES))
    patches = _cached_patches(photos_cache(root, size), (PHOTO_COUNTS[size], 3, size, size),
                              lambda: photo_patches(size))
    return _split(patches, PHOTO_SIZES[size][1], split, limit)


def load_photos_dense(root: Path, split: str, limit: int | None):
    """The photos-dense split as uint8 patches, memory-mapped from ROOT/photos-dense-32.npy
    (2.3 GB, cut on first use in under a minute)."""
    shape = (sum(DENSE_COUNTS), 3, DENSE_SIZE, DENSE_SIZE)
    patches = _cached_patches(root / f"photos-dense-{DENSE_SIZE}.npy", shape, dense_patches)
    return _split(patches, DENSE_COUNTS[0], split, limit)
