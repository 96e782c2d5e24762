"""The photos data set: patches cut from the photographs scikit-image ships, so a data set of
real images is there without a download.

The recipe is fixed (scales, stride, flatness threshold, seeded order), and the patch counts
it must give are checked, so every install cuts the same patches. They are cut once and kept
as ROOT/photos-SIZE.npy, written atomically and memory-mapped when read.
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


def _photos_folder() -> Path:
    try:
        import skimage
    except ImportError:
        raise MissingFileError("photos needs scikit-image (pip install scikit-image): its "
                               "photographs are the data") from None
    return Path(skimage.__file__).parent / "data"


def photo_patches(size: int = 32) -> np.ndarray:
    """Every photos patch of side `size`, uint8 (N, 3, size, size), in the seeded order.

    Each photograph is taken at scales 1, 1/2 and 1/4 (skimage.transform.rescale with
    anti-aliasing, rounded back to 0..255) and cut into size×size windows every stride pixels
    (12 for 32, 24 for 64); windows with a pixel standard deviation ≤ 4 are dropped and the
    rest permuted by numpy's default_rng(0): 50,442 patches of 32×32, 11,781 of 64×64.
    """
    if size not in PHOTO_SIZES:
        raise OptionError(f"photos comes in {{size}} {' or '.join(map(str, PHOTO_SIZES))}, "
                          f"got {size}", "size")
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
    stride = PHOTO_SIZES[size][0]
    patches = []
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
            scaled = photo if scale == 1 else np.clip(np.round(rescale(
                photo, scale, anti_aliasing=True, channel_axis=2) * 255), 0, 255).astype(np.uint8)
            height, width = scaled.shape[:2]
            for y in range(0, height - size + 1, stride):
                for x in range(0, width - size + 1, stride):
                    patch = scaled[y:y + size, x:x + size]
                    if patch.std() > PHOTO_MIN_STD:
                        patches.append(patch.transpose(2, 0, 1))
    stacked = np.stack(patches)
    if len(stacked) != PHOTO_COUNTS[size]:
        raise InputError(f"photos: cut {len(stacked)} patches of {size}×{size} from the "
                         f"photographs in {folder}, expected {PHOTO_COUNTS[size]} (another "
                         "scikit-image's photographs?)")
    return stacked[np.random.default_rng(0).permutation(len(stacked))]


def photos_cache(root: Path, size: int) -> Path:
    """Where the patches of side `size` are kept: ROOT/photos-SIZE.npy (knnflow.data's
    default root is data/photos, or $KNNFLOW_DATA/photos)."""
    return root / f"photos-{size}.npy"


def _read_photos_cache(cache: Path, size: int) -> np.ndarray | None:
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
            or patches.shape != (PHOTO_COUNTS[size], 3, size, size)):
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


def load_photos(root: Path, split: str, limit: int | None, size: int | None = None):
    """The photos split of side `size` (default 32) as uint8 patches: the first
    PHOTO_SIZES[size][1] of the seeded order are train, the rest test."""
    size = size or next(iter(PHOTO_SIZES))
    # Cut once, then read from the data folder (the recipe takes seconds, the file none).
    cache = photos_cache(root, size)
    patches = _read_photos_cache(cache, size) if cache.is_file() else None
    if patches is None:
        patches = photo_patches(size)
        _write_photos_cache(cache, patches)
    train = PHOTO_SIZES[size][1]
    chosen = patches[:train] if split == "train" else patches[train:]
    return np.asarray(chosen[:limit]), None
