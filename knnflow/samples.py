"""Generated samples as the memorization and FID code read them: a folder of images (nested
folders allowed), an .npz/.npy array N×C×H×W, or a run's samples folder (samples.npz, the
exact values its PNGs round), opened lazily and served in batches as float32 in [-1, 1] in
the training set's image shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from knnflow.errors import InputError, MissingFileError, OptionError
from knnflow.image_files import IMAGE_SUFFIXES, read_array, to_unit_range
from knnflow.images import resize_images, shape_text

SAMPLE_ARRAYS = ("samples.npz", "samples.npy")


@dataclass
class Samples:
    """Generated samples, read lazily in batches as float32 N×C×H×W in [-1, 1].

    source: the path given; kind: 'images' or 'array'; detected: the value range found;
    skipped: files under a folder that are not images (by suffix).
    """

    source: Path
    kind: str
    names: list[str]
    shape: tuple[int, ...]
    detected: str
    skipped: list[Path] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)
    _array: np.ndarray | None = field(default=None, repr=False)
    _files: list[Path] = field(default_factory=list, repr=False)
    _target: tuple[int, ...] | None = field(default=None, repr=False)
    _resize: bool = field(default=False, repr=False)
    _grey_rgb: bool = field(default=False, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def batch(self, start: int, stop: int) -> np.ndarray:
        """Samples start..stop as float32 in [-1, 1], in the index's shape."""
        if self._array is not None:
            raw = np.asarray(self._array[start:stop])
            values, _ = to_unit_range(raw, str(self.source))
        else:
            images = []
            for file in self._files[start:stop]:
                image = _read_image(file, self._target if self._resize else None,
                                    self._grey_rgb)
                if image.shape != self.shape and not self._resize:
                    raise OptionError(f"{file} has shape {shape_text(image.shape)} but the "
                                      f"index holds {shape_text(self.shape)} images; pass "
                                      "{resize} to resize them", "resize")
                images.append(image)
            values = np.stack(images).astype(np.float32) / 127.5 - 1.0
        if self._target is not None and tuple(values.shape[1:]) != self._target:
            values = resize_images(values, self._target)
        return values

    def take(self, ids: list[int]) -> np.ndarray:
        return np.concatenate([self.batch(i, i + 1) for i in ids]) if ids else np.empty(0)


def _read_image(path: Path, target: tuple[int, ...] | None,
                grey_rgb: bool = False) -> np.ndarray:
    """uint8 (C, H, W). With a target shape: converted to its channel count and resized.
    grey_rgb: an RGB picture of greyscale data (R = G = B, as torchvision's save_image
    writes one-channel images) is read as its one channel; other pictures are refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            if target is not None:
                grey = target[0] == 1
            im = im.convert("L" if grey and not grey_rgb else "RGB")
            if target is not None and im.size != (target[2], target[1]):
                im = im.resize((target[2], target[1]), Image.BICUBIC)
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {err.__class__.__name__}") from None
    if grey_rgb and array.ndim == 3:
        if not (np.array_equal(array[..., 0], array[..., 1])
                and np.array_equal(array[..., 0], array[..., 2])):
            raise OptionError(f"{path} is a colour image among greyscale samples; pass {{resize}} "
                              "to convert colour to grey", "resize")
        array = array[..., 0]
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _is_grey_rgb(image: np.ndarray) -> bool:
    """A (3, H, W) picture whose three channels are equal."""
    return image.shape[0] == 3 and bool((image == image[:1]).all())


def _own_grids(images: list[Path]) -> list[Path]:
    """grid.png files that knnflow's `sample` wrote beside its sample_NNNNN.png files."""
    return [p for p in images if p.name == "grid.png" and (p.parent / "sample_00000.png").is_file()]


def _array_samples(path: Path) -> tuple[np.ndarray, str, tuple[int, ...]]:
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise InputError(f"cannot read {path} as a numpy array: {err}") from None
    else:
        array = read_array(path)
    if array.ndim not in (3, 4) or len(array) == 0:
        raise InputError(f"{path} holds an array of shape {array.shape}; expected N×C×H×W "
                         "images")
    # The first image gives the layout and value range; floats are checked whole for NaN and
    # range before any work.
    first, detected = to_unit_range(np.asarray(array[:1]), str(path))
    if np.issubdtype(array.dtype, np.floating):
        for start in range(0, len(array), 4096):
            to_unit_range(np.asarray(array[start:start + 4096]), str(path))
    return array, detected, tuple(first.shape[1:])


def check_samples_path(path: str | Path) -> Path:
    """SAMPLES as a path, refused in one line when nothing is there."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"no samples at {path} (expected a folder of images, an .npz or "
                               "an .npy file)")
    return path


def load_samples(path: str | Path, image_shape: tuple[int, ...],
                 resize: bool = False) -> Samples:
    """Open SAMPLES: a folder of images (nested folders allowed), an .npz/.npy array, or a
    run's samples folder (a folder holding samples.npz or samples.npy, read instead of its
    PNGs).

    The samples must have the index's image shape unless resize=True.
    """
    path = check_samples_path(path)
    if path.is_dir():
        # A run's samples folder: samples.npz holds the exact values its PNGs round.
        arrays = [path / name for name in SAMPLE_ARRAYS if (path / name).is_file()]
        if arrays:
            return load_samples(arrays[0], image_shape, resize)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise InputError(f"the samples folder {path} is empty")
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        grids = _own_grids(images)  # a picture of the samples, not a sample
        images = [p for p in images if p not in grids]
        if not images:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}: "
                             f"{len(skipped)} other files skipped (e.g. {skipped[0].name})")
        first = _read_image(images[0], None)
        grey_rgb = image_shape[0] == 1 and _is_grey_rgb(first)
        if grey_rgb:
            first = first[:1]
        detected = f"{len(images)} image files, uint8 0..255"
        samples = Samples(path, "images", [str(p.relative_to(path)) for p in images],
                          tuple(first.shape), detected, skipped, grids, _files=images,
                          _grey_rgb=grey_rgb)
    elif path.suffix in (".npz", ".npy"):
        array, detected, shape = _array_samples(path)
        samples = Samples(path, "array", [f"{path.name}[{i}]" for i in range(len(array))],
                          shape, f"{path.suffix[1:]} array, {detected}", _array=array)
    else:
        raise InputError(f"{path} is neither a folder of images nor an .npz/.npy file")
    target = tuple(image_shape)
    if samples.shape != target:
        if not resize:
            raise OptionError(f"samples have shape {shape_text(samples.shape)} (from "
                              f"{samples.names[0]}) but the index holds "
                              f"{shape_text(target)} images; pass {{resize}} to resize them",
                              "resize")
        if samples.shape[0] != target[0] and {samples.shape[0], target[0]} != {1, 3}:
            raise InputError(f"cannot convert samples of {samples.shape[0]} channels to "
                             f"{target[0]} (index images are {shape_text(target)})")
    samples._target, samples._resize = target, resize
    return samples
