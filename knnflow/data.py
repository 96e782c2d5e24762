"""Data sets as float32 tensors in [-1, 1] of shape (N, C, H, W), read from files already on disk.

Nothing is downloaded. Each loader reads the layout its data set is usually distributed in and
fails with one line naming the file it expected. `--limit N` keeps the first N images of the
split, so results are reproducible.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from knnflow.errors import InputError, MissingFileError

if TYPE_CHECKING:  # torch is imported where tensors are made: the catalogue (names, sizes,
    # where files are expected) serves the command line's help without it.
    import torch
    from torch import Tensor

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
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
    info: DatasetInfo
    load: Callable[[Path | None, str, int | None], tuple[np.ndarray, np.ndarray | None]]


def default_root(name: str) -> Path:
    """Where a data set's files are looked for when --root is not given: $KNNFLOW_DATA/NAME."""
    return Path(os.environ.get(DATA_ROOT_ENV, "data")) / name


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


# --------------------------------------------------------------------------- digits


def _load_digits(root: Path | None, split: str, limit: int | None):
    from sklearn.datasets import load_digits

    bunch = load_digits()
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


def _load_mnist(root: Path | None, split: str, limit: int | None):
    root = root or default_root("mnist")
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


def _load_cifar10(root: Path | None, split: str, limit: int | None):
    root = root or default_root("cifar10")
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

# CelebA's sides: 64 (the paper's setting, the default), 32 and 128; from 178×178 crops.
CELEBA_SIZES = (64, 32, 128)


def _celeba_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    # The usual 64×64 CelebA: a 178×178 center crop of the aligned 178×218 image, then resize.
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        left, top = (w - 178) // 2, (h - 178) // 2
        im = im.crop((left, top, left + 178, top + 178)).resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _load_celeba(root: Path | None, split: str, limit: int | None, size: int | None = None,
                 name: str = "celeba"):
    size = size or CELEBA_SIZES[0]
    root = root or default_root("celeba")
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


def _load_celeba64(root: Path | None, split: str, limit: int | None):
    return _load_celeba(root, split, limit, 64, name="celeba64")


def _image_path(path: Path) -> Path:
    if not path.is_file():
        raise MissingFileError(f"expected the image file {path}")
    return path


# --------------------------------------------------------------------------- folders and arrays


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


def _load_folder(path: Path, split: str, limit: int | None, size: int | None):
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
    images = np.empty((len(files), *first.shape), dtype=np.uint8)
    images[0] = first
    for i, file in enumerate(files[1:], start=1):
        image = read_image(file, size, first.shape[0])
        if image.shape != first.shape:
            raise InputError(f"{file} has shape {image.shape} but {files[0]} has {first.shape}; "
                             "pass --size to resize all images")
        images[i] = image
    return images, None


ARRAY_KEYS = ("images", "x", "data", "arr_0", "samples")


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
    try:
        loaded = np.load(path, allow_pickle=False)
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


LABEL_KEYS = ("labels", "y", "label", "targets")


def has_test_split(name: str) -> bool:
    """Whether data set `name` has a test split: the named sets do; folder:PATH when it has
    PATH/test, npz:PATH when it holds a test array, npy:PATH never."""
    kind, _, path = name.partition(":")
    if not (kind in _PATH_KINDS and path):
        return True
    location = Path(path).expanduser()
    if kind == "folder":
        return (location / "test").is_dir()
    if kind == "npy" or not location.is_file():
        return False
    try:
        with np.load(location, allow_pickle=False) as loaded:
            keys = list(loaded.keys())
    except (ValueError, OSError):
        return False
    return any(key in keys for key in _split_keys("test"))


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


def _load_array(path: Path, split: str, limit: int | None):
    images, labels = read_array_and_labels(path, split)
    return images[:limit], None if labels is None else labels[:limit]


# --------------------------------------------------------------------------- synthetic


def synthetic_images(n: int, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0,
                     clusters: int = 500) -> Tensor:
    """Structured images in [-1, 1] with a natural-image-like spectrum, seeded.

    Each image is tanh(c_k + f4 + f8 + f16 + 0.04·ε): one of `clusters` cluster centres c_k (random
    fields at 1/8 and 1/4 resolution, amplitudes 0.55 and 0.25), its own fields at 1/8, 1/4 and
    1/2 resolution (amplitudes 0.25, 0.2, 0.12) and white noise ε. Fields are Gaussian noise
    upsampled bicubically. The centres are the same for every seed, so seeds give train and
    held-out sets of one distribution. On 3×32×32 this gives CIFAR-10-like statistics: pixel
    standard deviation 0.48, 90% of the variance in the top 100 principal components, nearest
    training image of a held-out one at about 0.43 of the typical distance.
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
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, centers.shape[1])
    for start in range(0, n, 4096):
        count = min(4096, n - start)
        label = torch.randint(clusters, (count,), generator=gen)
        image = (centers[label] + fields(count, 8, 0.25, gen) + fields(count, 4, 0.2, gen)
                 + fields(count, 2, 0.12, gen) + 0.04 * torch.randn(count, centers.shape[1],
                                                                    generator=gen))
        out[start:start + count] = torch.tanh(image)
    return out.reshape(n, *shape)


SYNTHETIC_SIZES = {"train": 50_000, "test": 10_000}


def _load_synthetic(root: Path | None, split: str, limit: int | None):
    # The train split grows with --limit beyond its default size (for scaling benchmarks).
    count = SYNTHETIC_SIZES[split] if limit is None else (
        limit if split == "train" else min(limit, SYNTHETIC_SIZES[split]))
    # Train and test draw from the same mixture with different seeds.
    images = synthetic_images(count, (3, 32, 32), seed=0 if split == "train" else 1)
    return images.numpy(), None


# --------------------------------------------------------------------------- photos


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
_PHOTO_SPLITS = {side: f"{train} / {PHOTO_COUNTS[side] - train}"
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
    check_size("photos", size)
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


def photos_cache(root: Path | None, size: int) -> Path:
    """Where the patches of side `size` are kept: ROOT/photos-SIZE.npy (default root
    data/photos, or $KNNFLOW_DATA/photos)."""
    return (root or default_root("photos")) / f"photos-{size}.npy"


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


def _load_photos(root: Path | None, split: str, limit: int | None, size: int | None = None):
    size = check_size("photos", size) or SIZED_LOADERS["photos"][0]
    # Cut once, then read from the data folder (the recipe takes seconds, the file none).
    cache = photos_cache(root, size)
    patches = _read_photos_cache(cache, size) if cache.is_file() else None
    if patches is None:
        patches = photo_patches(size)
        _write_photos_cache(cache, patches)
    train = PHOTO_SIZES[size][1]
    chosen = patches[:train] if split == "train" else patches[train:]
    return np.asarray(chosen[:limit]), None


# --------------------------------------------------------------------------- registry


_LOADERS: dict[str, _Loader] = {
    "digits": _Loader(DatasetInfo("digits", "1×8×8", "1498 / 299",
                                  "embedded in scikit-learn (the default)"), _load_digits),
    "mnist": _Loader(DatasetInfo("mnist", "1×28×28", "60000 / 10000",
                                 "data/mnist/{train,t10k}-images-idx3-ubyte[.gz]"), _load_mnist),
    "cifar10": _Loader(DatasetInfo("cifar10", "3×32×32", "50000 / 10000",
                                   "data/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}"),
                       _load_cifar10),
    "celeba": _Loader(DatasetInfo("celeba", "3×64×64 (--size 32 or 128: 3×S×S)",
                                  "162770 / 19962",
                                  "data/celeba/celeba/img_align_celeba/*.jpg and "
                                  "data/celeba/celeba/list_eval_partition.txt"),
                      _load_celeba),
    "celeba64": _Loader(DatasetInfo("celeba64", "3×64×64 (celeba at 64)", "162770 / 19962",
                                    "as celeba"),
                        _load_celeba64),
    "photos": _Loader(DatasetInfo(
        "photos", "3×32×32 (--size 64: 3×64×64)",
        f"{_PHOTO_SPLITS[32]} (64: {_PHOTO_SPLITS[64]})",
        "cut on first use from the photographs scikit-image ships (installed with knnflow); "
        "cached as data/photos/photos-{32,64}.npy"), _load_photos),
    "synthetic": _Loader(DatasetInfo("synthetic", "3×32×32", "50000 / 10000",
                                     "generated: seeded CIFAR-like mixture of smooth random "
                                     "images; --limit N makes N training images, also "
                                     "beyond 50000"),
                         _load_synthetic),
}
# Loaders that take --size, and the sizes they come in (the first is the default).
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
    folder:/npz:/npy:PATH, or --root): outputs must never replace them."""
    kind, _, path = (name or "").partition(":")
    sources = [Path(path).expanduser()] if kind in _PATH_KINDS and path else []
    return sources + ([Path(root).expanduser()] if root is not None else [])


def _unknown_dataset(name: str) -> InputError:
    return InputError(f"unknown data set {name!r}; valid: {', '.join(dataset_names())}")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")


def check_size(name: str, size: int | None) -> int | None:
    """The --size to load data set `name` with, checked before any work: any side ≥ 1 for
    folder:PATH, one of SIZED_LOADERS[name] for photos (its default becomes None, so one
    data set has one description), and None for the rest. Otherwise a one-line InputError."""
    if size is None:
        return None
    if size < 1:
        raise InputError(f"--size must be at least 1, got {size}")
    kind, _, path = name.partition(":")
    if kind == "folder" and path:
        return size
    if name in SIZED_LOADERS:
        sizes = SIZED_LOADERS[name]
        if size not in sizes:
            raise InputError(f"{name} comes in --size {' or '.join(map(str, sizes))}, "
                             f"got {size}")
        return None if size == sizes[0] else size
    if not (kind in _PATH_KINDS and path) and name not in _LOADERS:
        raise _unknown_dataset(name)
    raise InputError(f"--size applies to folder:PATH and {', '.join(SIZED_LOADERS)} only, "
                     f"not to {name}")


def load_dataset(name: str, root: str | Path | None = None, split: str = "train",
                 limit: int | None = None, size: int | None = None,
                 with_labels: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
    """Images of a data set as a float32 (N, C, H, W) tensor in [-1, 1].

    name: digits, mnist, cifar10, celeba (celeba64), photos, synthetic, folder:PATH, npz:PATH or
    npy:PATH.
    root: the folder holding the data set's files (default data/NAME, or $KNNFLOW_DATA/NAME).
    size: resize folder images to size×size; photos: the patch side (32 or 64); celeba: the
    side (64, 32 or 128).
    with_labels: also return the labels (or None).
    """
    split = check_split(split)
    check_limit(limit)
    size = check_size(name, size)
    root_path = Path(root).expanduser() if root is not None else None
    kind, _, path = name.partition(":")
    if kind in _PATH_KINDS and path:
        path_obj = Path(path).expanduser()
        if kind == "folder":
            raw, labels = _load_folder(path_obj, split, limit, size)
        else:
            raw, labels = _load_array(path_obj, split, limit)
    elif name in _LOADERS:
        if name in SIZED_LOADERS:
            raw, labels = _LOADERS[name].load(root_path, split, limit, size)
        else:
            raw, labels = _LOADERS[name].load(root_path, split, limit)
    else:
        raise _unknown_dataset(name)
    raw = raw[:limit]
    if len(raw) == 0:
        raise InputError(f"data set {name!r} ({split}) has no images")
    images, _ = to_unit_range(np.asarray(raw), name)
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if with_labels:
        return tensor, None if labels is None else torch.as_tensor(np.array(labels)[:limit])
    return tensor
