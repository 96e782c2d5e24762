"""Which index stands for a training set.

A data set named by the user (digits, photos at size 64, npz:PATH) has a cached index under
indices/: indices/<dataset>-train, with -limitN, -flip and -ivf for part of it, both flips or
an IVF index. It is built on first use, and a cached one is used only when its points'
checksum matches the data. Generated samples record where they came from (a run's samples
folder knows its run, the run its data set and index), so `knnflow memorization samples/`
finds the training set by itself.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from knnflow.choices import DEFAULT_DATASET
from knnflow.data import check_size, image_source, load_dataset
from knnflow.errors import IndexMismatchError, OptionError
from knnflow.images import with_flips
from knnflow.index import Index

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


def _quiet(stage: str, done: int, total: int) -> None:
    """No progress display."""


def dataset_slug(dataset: str, size: int | None = None) -> str:
    """A folder-name form of a data set: its name, or for folder:/npz:/npy: paths the kind and
    the file's stem; a size other than the data set's default is appended (photos64,
    folder-imgs48; a dash goes between two numbers: folder-cifar10-48)."""
    kind, _, path = dataset.partition(":")
    name = f"{kind}-{Path(path).stem}" if path else dataset
    size = check_size(dataset, size)
    if size is not None:
        name += f"-{size}" if name[-1:].isdigit() else str(size)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def default_index_folder(dataset: str, split: str, size: int | None = None) -> Path:
    """indices/<dataset>-<split>, such as indices/photos-train, or indices/photos64-train
    for photos at size 64."""
    return Path("indices") / f"{dataset_slug(dataset, size)}-{split}"


def cached_index_folder(dataset: str, limit: int | None = None, flip: bool = False,
                        approximate: bool = False) -> Path:
    """Where train and memorization cache a data set's index when none is given:
    indices/<dataset>-train, with -limitN (its first N images), -flip (both flips) and -ivf
    (an IVF index, for approximate search)."""
    split = "train" + (f"-limit{limit}" if limit else "") + ("-flip" if flip else "")
    folder = default_index_folder(dataset, split)
    return folder.with_name(folder.name + "-ivf") if approximate else folder


def build_dataset_index(dataset: str, folder: Path, progress: Progress | None = None, *,
                        root: Path | None = None, split: str = "train", limit: int | None = None,
                        size: int | None = None, flip: bool = False, kind: str = "flat",
                        device: str = "auto", dtype: str = "float32", nlist: int | None = None,
                        nprobe: int | None = None, overwrite: bool = False,
                        shards: int = 1) -> Index:
    """Index a data set (with both flips if asked) into `folder`, reading it in batches
    (index_build.write_index: the float32 images never sit in memory at once), and open the
    index written."""
    from knnflow.devices import resolve_device
    from knnflow.index import check_build_options
    from knnflow.index_build import write_index

    progress = progress or _quiet
    size = check_size(dataset, size)
    check_build_options(kind, dtype, nlist, nprobe)
    device = resolve_device(device)
    progress(f"opening {dataset}", 0, 1)
    source = image_source(dataset, root=root, split=split, limit=limit, size=size, flip=flip)
    progress(f"opening {dataset}", 1, 1)
    described = {"name": dataset, "split": split, "limit": limit, "size": size,
                 "root": str(root) if root else None, "flip": flip}
    write_index(source, folder, kind=kind, device=device, dtype=dtype, nlist=nlist,
                nprobe=nprobe, dataset=described, progress=progress, overwrite=overwrite,
                shards=shards)
    return Index.load(folder, device=device, verify=False)


def recorded_training_set(samples: Path) -> dict:
    """What the samples' own records say they came from: {"index": DIR} for closed-form
    samples or a run trained with an index, else the run's {"dataset", "root", "limit",
    "flip"}; {} for samples with no record (a plain folder or array)."""
    folder = samples if samples.is_dir() else samples.parent
    sampling = folder / "sampling.json"
    try:
        meta = json.loads(sampling.read_text()) if sampling.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    if meta.get("closed_form"):
        return {"index": meta["closed_form"], "from": "the closed-form samples' index"}
    run = Path(meta["run"]) if meta.get("run") else folder.parent
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or "dataset" not in config:
        return {}
    index = (config.get("target_options") or {}).get("index")
    if index:
        return {"index": index, "from": f"the index run {run} trained with"}
    return {"dataset": config["dataset"], "root": config.get("root"),
            "limit": config.get("limit"), "flip": bool(config.get("flip")),
            "from": f"the training set of run {run}"}


def open_recorded_index(record: dict, approximate: bool = False, progress: Progress | None = None,
                        log: Log | None = None) -> tuple[Index, str]:
    """The index for samples given with neither an index nor a data set, and what it is."""
    if not record:
        return (open_cached_index(DEFAULT_DATASET, None, progress, approximate=approximate,
                                  log=log),
                f"{DEFAULT_DATASET}, the default data set (the samples carry no record of "
                "their training set)")
    if "index" in record:
        folder = Path(record["index"])
        if not (folder / "manifest.json").is_file():
            raise OptionError(f"the samples were made with the index {folder} "
                              f"({record['from']}), which is gone: pass {{index}} DIR or "
                              "{dataset} NAME", "index", "dataset")
        return Index.load(folder), f"{folder}, {record['from']}"
    root = Path(record["root"]) if record["root"] else None
    index = open_cached_index(record["dataset"], root, progress, limit=record["limit"],
                              flip=record["flip"], approximate=approximate, log=log)
    where = index.folder if record["limit"] or record["flip"] else record["dataset"]
    return index, f"{where}, {record['from']}"


def open_index(index: Path | None, dataset: str | None, root: Path | None = None,
               approximate: bool = False, progress: Progress | None = None,
               log: Log | None = None) -> Index:
    """The index folder `index`, or the cached index of data set `dataset` under indices/,
    built on first use."""
    if index is not None and dataset is not None:
        raise OptionError("pass one of {index} DIR or {dataset} NAME, not both", "index",
                          "dataset")
    if index is not None:
        return Index.load(index)
    return open_cached_index(dataset, root, progress, approximate=approximate, log=log)


def open_cached_index(dataset: str, root: Path | None = None, progress: Progress | None = None,
                      *, limit: int | None = None, flip: bool = False,
                      approximate: bool = False, log: Log | None = None) -> Index:
    """The cached index of a data set's training images (its first `limit`, with both flips
    for `flip`), built on first use. A cached one must hold exactly those images: its
    manifest's limit and flips, then the points' checksum decide (not the recorded root: the
    same files may sit elsewhere, and other files under the same name must not pass)."""
    progress = progress or _quiet
    folder = cached_index_folder(dataset, limit, flip, approximate)
    if not folder.exists():
        build_dataset_index(dataset, folder, progress, root=root, limit=limit, flip=flip,
                            kind="ivf" if approximate else "flat")
        if log:
            log(f"built and cached the index of {dataset} at {folder}")
        return Index.load(folder)
    cached = Index.load(folder)
    made = cached.manifest.get("dataset") or {}
    # The advice names a whole command line; only `index` is an option of the caller.
    rebuild = (f"pass {{index}}, or rebuild it with knnflow build-index {dataset} "
               + (f"--root {root} " if root is not None else "")
               + (f"--limit {limit} " if limit else "") + ("--flip " if flip else "")
               + f"--out {folder} --overwrite")
    if made.get("limit") != limit or bool(made.get("flip")) != flip:
        which = (f"the first {made['limit']}" if made.get("limit") else "other")
        wanted = ("its whole training set" if not limit and not flip else
                  (f"its first {limit}" if limit else "its training set")
                  + (" with both flips" if flip else ""))
        raise OptionError(f"the cached index {folder} holds {which} images of {dataset}, "
                          f"not {wanted}: {rebuild}", "index")
    progress(f"checking {folder} against {dataset}", 0, 1)
    images = load_dataset(dataset, root=root, split="train", limit=limit)
    try:
        cached.verify_points(with_flips(images) if flip else images)
    except IndexMismatchError:
        built = made.get("root") or "the default place"
        raise OptionError(
            f"the cached index {folder} was built from other images than {dataset} at "
            f"{root or 'the default place'} (points checksum differs; it was built from "
            f"{built}): {rebuild}", "index") from None
    progress(f"checking {folder} against {dataset}", 1, 1)
    return cached


def default_knn_index(dataset: str, root: Path | None = None, limit: int | None = None,
                      flip: bool = False, progress: Progress | None = None,
                      log: Log | None = None) -> Path:
    """knn-efm's index when none is given: indices/<dataset>-train (-limitN for a limit,
    -flip for flip), built on first use with its progress bar and one line."""
    folder = cached_index_folder(dataset, limit, flip)
    if folder.exists():
        return folder  # the target checks its points against the training data
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OptionError(f"{{target}} knn-efm: no index at {folder}; build it before "
                          f"torchrun with knnflow build-index {dataset} --out {folder}"
                          + (f" --limit {limit}" if limit else "") + (" --flip" if flip else ""),
                          "target")
    build_dataset_index(dataset, folder, progress, root=root, limit=limit, flip=flip)
    if log:
        log(f"built the index of {dataset} for knn-efm at {folder}")
    return folder
