"""How close generated samples lie to the training set: nearest-neighbour distances, the ratio
test, a train-to-train reference, and a report folder (csv, json, two pictures).

For each sample x: d1 and d2, its L2 distances (pixels in [-1, 1]) to the nearest and
second-nearest training images, found exactly by `Index.search` (float64 distances from the
raw data). A sample is memorized when d1/d2 < threshold (1/3 by default: the ratio test of
Carlini et al. and Somepalli et al.). The reference line is the mean distance from a training
image to its nearest *other* training image (leave-one-out), over a seeded sample of at most
10,000 training images. Gu et al. divide distances by √d; the summary gives both.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from knnflow.choices import MEMORIZATION_REFERENCE as REFERENCE_SIZE
from knnflow.data import IMAGE_SUFFIXES, read_array, to_unit_range
from knnflow.errors import InputError, MissingFileError
from knnflow.files import atomic_folder
from knnflow.images import resize_images
from knnflow.index import Index

Progress = Callable[[str, int, int], None]
SAMPLE_ARRAYS = ("samples.npz", "samples.npy")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
NEAREST_PAIRS = 16


# --------------------------------------------------------------------------- reading samples


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
                    raise InputError(f"{file} has shape {_shape_text(image.shape)} but the "
                                     f"index holds {_shape_text(self.shape)} images; pass "
                                     "--resize to resize them")
                images.append(image)
            values = np.stack(images).astype(np.float32) / 127.5 - 1.0
        if self._target is not None and tuple(values.shape[1:]) != self._target:
            values = resize_images(values, self._target)
        return values

    def take(self, ids: list[int]) -> np.ndarray:
        return np.concatenate([self.batch(i, i + 1) for i in ids]) if ids else np.empty(0)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


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
            raise InputError(f"{path} is a colour image among greyscale samples; pass --resize "
                             "to convert colour to grey")
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
            raise InputError(f"samples have shape {_shape_text(samples.shape)} (from "
                             f"{samples.names[0]}) but the index holds "
                             f"{_shape_text(target)} images; pass --resize to resize them")
        if samples.shape[0] != target[0] and {samples.shape[0], target[0]} != {1, 3}:
            raise InputError(f"cannot convert samples of {samples.shape[0]} channels to "
                             f"{target[0]} (index images are {_shape_text(target)})")
    samples._target, samples._resize = target, resize
    return samples


# --------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """Per sample: ids (N, k) of the nearest training images and distances (N, k), L2."""

    ids: Tensor
    distances: Tensor
    exact: bool
    search: str
    evaluated_median: float | None = None

    @property
    def ratio(self) -> Tensor:
        """d1/d2, with 0/0 (a copy of a duplicated training image) read as 0."""
        d1, d2 = self.distances[:, 0], self.distances[:, 1]
        return torch.where(d2 > 0, d1 / d2.clamp(min=1e-300), torch.zeros_like(d1))


def nearest_training(index: Index, samples: Samples, k: int = 2, approximate: bool = False,
                     batch_size: int = 256, progress: Progress | None = None) -> Scores:
    """The k nearest training images of every sample, in batches (never an N×n matrix)."""
    if k < 2:
        raise InputError(f"--k must be at least 2 (the ratio test needs d2), got {k}")
    if k > index.n:
        raise InputError(f"--k {k} exceeds the {index.n} training images of the index")
    n = len(samples)
    ids = torch.empty(n, k, dtype=torch.int64)
    dist = torch.empty(n, k, dtype=torch.float64)
    exact, methods, evaluated = True, set(), []
    for start in range(0, n, batch_size):
        values = samples.batch(start, start + batch_size)
        found = index.search(torch.from_numpy(values).reshape(len(values), -1), k,
                             approximate=approximate)
        ids[start:start + len(values)] = found.ids
        dist[start:start + len(values)] = found.sq_distances.clamp(min=0).sqrt()
        exact &= found.exact
        methods.add(index.last_stats.get("method", "faiss"))
        if "evaluated_median" in index.last_stats:
            evaluated.append(index.last_stats["evaluated_median"])
        if progress:
            progress("nearest training images", min(start + batch_size, n), n)
    search = "+".join(sorted(methods))
    return Scores(ids, dist, exact, search,
                  float(np.median(evaluated)) if evaluated else None)


def train_reference(index: Index, size: int = REFERENCE_SIZE, seed: int = 0,
                    approximate: bool = False, batch_size: int = 256,
                    progress: Progress | None = None) -> tuple[Tensor, Tensor]:
    """Leave-one-out: for a seeded sample of min(size, n) training images, the distance to
    the nearest *other* training image. Returns (sampled ids, distances)."""
    n = index.n
    if n < 2:
        raise InputError("the index holds one training image; the train-to-train reference "
                         "needs two")
    count = min(size, n)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort()[0]
    out = torch.empty(count, dtype=torch.float64)
    for start in range(0, count, batch_size):
        ids = chosen[start:start + batch_size]
        found = index.search(index.points[ids].to(torch.float32), 2, approximate=approximate)
        # The image itself is one of the two unless duplicates tie with it at distance 0.
        self_first = found.ids[:, 0] == ids
        other = torch.where(self_first, found.sq_distances[:, 1], found.sq_distances[:, 0])
        out[start:start + len(ids)] = other.clamp(min=0).sqrt()
        if progress:
            progress("train-to-train reference", min(start + batch_size, count), count)
    return chosen, out


def _stats(values: Tensor) -> dict[str, float]:
    v = values.to(torch.float64)
    out = {"mean": float(v.mean()), "median": float(v.median()), "min": float(v.min()),
           "max": float(v.max())}
    qs = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64))
    out.update({f"q{round(q * 100):02d}": float(x) for q, x in zip(QUANTILES, qs, strict=True)})
    return out


def summarize(samples: Samples, index: Index, scores: Scores, reference: Tensor,
              threshold: float, seconds: float) -> dict:
    d1 = scores.distances[:, 0]
    ratio = scores.ratio
    memorized = ratio < threshold
    root_d = math.sqrt(index.dim)
    return {
        "n_samples": len(samples),
        "samples": str(samples.source),
        "input": samples.detected,
        "skipped_files": len(samples.skipped),
        "skipped_grids": [str(p) for p in samples.grids],
        "index": str(index.folder) if index.folder else None,
        "dataset": index.manifest.get("dataset"),
        "n_train": index.n,
        "image_shape": list(index.image_shape),
        "d": index.dim,
        "k": scores.ids.shape[1],
        "threshold": threshold,
        "d1": _stats(d1),
        "d1_over_sqrt_d": _stats(d1 / root_d),
        "d1_over_d2": _stats(ratio),
        "reference": {
            "what": "L2 distance from a training image to its nearest other training image "
                    "(leave-one-out), over a seeded sample",
            "train_images": len(reference),
            "of": index.n,
            "mean": float(reference.mean()),
            "median": float(reference.median()),
            "mean_over_sqrt_d": float(reference.mean()) / root_d,
            "median_over_sqrt_d": float(reference.median()) / root_d,
        },
        "d1_mean_over_reference_mean": float(d1.mean()) / max(float(reference.mean()), 1e-300),
        "memorized": {"count": int(memorized.sum()),
                      "fraction": float(memorized.double().mean()),
                      "rule": f"d1/d2 < {threshold_text(threshold)}"},
        "exact": scores.exact,
        "search": scores.search,
        "seconds": round(seconds, 3),
    }


# --------------------------------------------------------------------------- report


def _unit(image: np.ndarray) -> np.ndarray:
    """C×H×W in [-1, 1] → H×W(×3) in [0, 1] for imshow."""
    image = (np.clip(image, -1, 1) + 1) / 2
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def threshold_text(threshold: float) -> str:
    """1/3 rather than 0.333333: a simple fraction where the value is one, else 4 digits."""
    from fractions import Fraction

    simple = Fraction(threshold).limit_denominator(12)
    if simple.denominator > 1 and abs(float(simple) - threshold) <= 1e-12:
        return f"{simple.numerator}/{simple.denominator}"
    return f"{threshold:.4g}"


def plot_histogram(path: Path, d1: Tensor, reference: Tensor, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    values = torch.cat([d1, reference]).numpy()
    bins = np.linspace(0, max(float(values.max()), 1e-9) * 1.02, 60)
    ax.hist(d1.numpy(), bins=bins, density=True, alpha=0.6, color="tab:blue",
            label=f"samples → nearest training image (n={len(d1)})")
    ax.hist(reference.numpy(), bins=bins, density=True, alpha=0.45, color="tab:orange",
            label=f"training → nearest other training image (n={len(reference)})")
    ax.axvline(float(reference.mean()), color="tab:red", linestyle="--",
               label=f"reference mean {float(reference.mean()):.3g}")
    ax.set_xlabel("L2 distance to the nearest training image (pixels in [-1, 1])")
    ax.set_ylabel("density (each histogram has area 1)")
    ax.set_title(f"Memorization: d1 against the train-to-train reference "
                 f"(d1/d2 < {threshold_text(threshold)} flagged)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def nearest_title(memorized: int, shown: int, threshold: float) -> str:
    """nearest.png's title: it shows memorized samples only when there are some."""
    rule = f"d1/d2 < {threshold_text(threshold)}"
    if memorized == 0:
        return (f"No sample is memorized ({rule}): the {shown} samples of smallest d1/d2, "
                "beside their nearest and second-nearest training images")
    which = (f"the {memorized} memorized samples" if memorized <= shown else
             f"{shown} of the {memorized} memorized samples, those of smallest d1/d2")
    return (f"{which.capitalize()} ({rule}) beside their nearest and second-nearest "
            "training images")


def nearest_figure(samples: Samples, index: Index, scores: Scores, threshold: float,
                   count: int = NEAREST_PAIRS):
    """The figure of nearest.png and the samples it shows: the `count` samples of smallest
    d1/d2, each beside its nearest and second-nearest training images (d1, d2 under them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = scores.ratio
    order = torch.argsort(ratio, stable=True)[:count].tolist()
    cols = 4
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(3 * cols * 1.05, rows * 1.6 + 0.4),
                             dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    pictures = samples.take(order)
    shape = index.image_shape
    cmap = "gray" if shape[0] == 1 else None
    for slot, sample in enumerate(order):
        r, c = divmod(slot, cols)
        panels = axes[r, 3 * c:3 * c + 3]
        panels[0].imshow(_unit(pictures[slot]), cmap=cmap, vmin=0, vmax=1,
                         interpolation="nearest")
        panels[0].set_title(f"sample {sample}", fontsize=6)
        panels[0].text(0.5, -0.06, f"d1/d2={float(ratio[sample]):.3f}",
                       transform=panels[0].transAxes, ha="center", va="top", fontsize=6)
        for rank, ax in enumerate(panels[1:]):
            train_id = int(scores.ids[sample, rank])
            train = index.points[train_id].to(torch.float32).reshape(shape).numpy()
            ax.imshow(_unit(train), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{('1st', '2nd')[rank]}: train {train_id}", fontsize=6)
            ax.text(0.5, -0.06, f"d{rank + 1}={float(scores.distances[sample, rank]):.3g}",
                    transform=ax.transAxes, ha="center", va="top", fontsize=6)
    memorized = int((ratio < threshold).sum())
    fig.suptitle("\n".join(textwrap.wrap(nearest_title(memorized, len(order), threshold), 110,
                                          break_on_hyphens=False)),
                 fontsize=8)
    fig.tight_layout()
    return fig, order


def plot_nearest(path: Path, samples: Samples, index: Index, scores: Scores, threshold: float,
                 count: int = NEAREST_PAIRS) -> list[int]:
    """nearest.png (nearest_figure); the samples it shows."""
    import matplotlib.pyplot as plt

    fig, order = nearest_figure(samples, index, scores, threshold, count)
    fig.savefig(path)
    plt.close(fig)
    return order


def write_csv(path: Path, samples: Samples, scores: Scores, threshold: float) -> None:
    k = scores.ids.shape[1]
    ratio = scores.ratio
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "nearest_train_id", "d1", "d2", "d1_over_d2", "memorized",
                         *[f"d{j}" for j in range(3, k + 1)]])
        for i, name in enumerate(samples.names):
            d = scores.distances[i].tolist()
            writer.writerow([name, int(scores.ids[i, 0]), f"{d[0]:.9g}", f"{d[1]:.9g}",
                             f"{float(ratio[i]):.9g}", int(bool(ratio[i] < threshold)),
                             *[f"{x:.9g}" for x in d[2:]]])


def write_report(out: Path, samples: Samples, index: Index, scores: Scores,
                 reference: Tensor, summary: dict, overwrite: bool = False) -> Path:
    """Write the report folder atomically: everything goes into a temporary folder that is
    renamed to `out` once complete, so a crash leaves no half-written report."""
    with atomic_folder(out, overwrite, kind="memorization") as tmp:
        write_csv(tmp / "memorization.csv", samples, scores, summary["threshold"])
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_histogram(tmp / "histogram.png", scores.distances[:, 0], reference,
                       summary["threshold"])
        plot_nearest(tmp / "nearest.png", samples, index, scores, summary["threshold"])
    return out


def default_out(samples_path: str | Path) -> Path:
    """<folder>-memorization beside a samples folder; <stem>-memorization beside a file."""
    path = Path(samples_path).expanduser().resolve()
    name = path.name if path.is_dir() else path.stem
    return path.parent / f"{name}-memorization"


def parse_threshold(text: str | float) -> float:
    """A number or a fraction such as 1/3, in (0, 1]."""
    raw = str(text).strip()
    try:
        if "/" in raw:
            num, den = raw.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"--threshold takes a number or a fraction like 1/3, got {raw!r}") \
            from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise InputError(f"--threshold must lie in (0, 1], got {raw}")
    return value


def run_memorization(samples_path: str | Path, index: Index, *, threshold: float = 1 / 3,
                     k: int = 2, out: str | Path | None = None, approximate: bool = False,
                     resize: bool = False, reference_size: int = REFERENCE_SIZE,
                     batch_size: int = 256, overwrite: bool = False,
                     progress: Progress | None = None) -> tuple[dict, Path]:
    """Score samples against an index and write the report folder; returns (summary, out)."""
    threshold = parse_threshold(threshold)
    if reference_size < 1:
        raise InputError(f"--reference-size must be at least 1, got {reference_size}")
    out_path = Path(out) if out is not None else default_out(samples_path)
    if out_path.exists() and not overwrite:
        raise InputError(f"{out_path} already exists; pass --overwrite to replace it")
    samples = load_samples(samples_path, index.image_shape, resize)
    began = time.perf_counter()
    scores = nearest_training(index, samples, k=k, approximate=approximate,
                              batch_size=batch_size, progress=progress)
    _, reference = train_reference(index, reference_size, approximate=approximate,
                                   batch_size=batch_size, progress=progress)
    summary = summarize(samples, index, scores, reference, threshold,
                        time.perf_counter() - began)
    write_report(out_path, samples, index, scores, reference, summary, overwrite)
    return summary, out_path
