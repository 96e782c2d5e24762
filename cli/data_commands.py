"""knnflow datasets, build-index and index-info."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from knnflow.choices import DTYPE_NAMES, INDEX_KINDS
from knnflow.data import (
    SIZED_LOADERS,
    check_limit,
    check_size,
    check_split,
    dataset_infos,
    dataset_sources,
)
from knnflow.files import check_output_folder

from .console import console, human_bytes, key_value_table, progress_bar

RootOption = Annotated[Optional[Path], typer.Option(
    help="Folder holding the data set's files (default: data/NAME, or $KNNFLOW_DATA/NAME).")]
SplitOption = Annotated[str, typer.Option(help="Which split to load: train or test.")]
LimitOption = Annotated[Optional[int], typer.Option(
    help="Keep only the first N images of the split (default: all).")]
SizeOption = Annotated[Optional[int], typer.Option(
    help="folder:PATH: center-crop and resize every image to SIZE×SIZE; "
         + "; ".join(f"{name}: the side, {' or '.join(map(str, sizes))} "
                     f"(default {sizes[0]})" for name, sizes in SIZED_LOADERS.items())
         + ". Other data sets take no --size.")]


def datasets() -> None:
    """List the data sets knnflow can load, their shapes, and where it expects their files."""
    table = Table(title="Data sets: float32 images in [-1, 1], C×H×W", title_justify="left",
                  caption="--root DIR replaces data/NAME (or set $KNNFLOW_DATA to replace data/)",
                  caption_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("train / test", no_wrap=True)
    table.add_column("files expected at", overflow="fold")
    for info in dataset_infos():
        table.add_row(info.name, info.shape, info.size, info.location)
    console.print(table)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (shards included)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_index(
    dataset: Annotated[str, typer.Argument(
        help="Data set: digits, mnist, cifar10, celeba, photos, synthetic, folder:PATH, "
             "npz:PATH, npy:PATH.")] = "digits",
    root: RootOption = None,
    split: SplitOption = "train",
    limit: LimitOption = None,
    size: SizeOption = None,
    kind: Annotated[str, typer.Option(
        help=f"Index kind: {' or '.join(INDEX_KINDS)}. flat is exact brute force; ivf clusters the "
             "data (exact search still scans every list).")] = "flat",
    nlist: Annotated[Optional[int], typer.Option(
        help="ivf only: number of lists (default: about 4·√n).")] = None,
    nprobe: Annotated[Optional[int], typer.Option(
        help="ivf only: lists searched in approximate mode (default: nlist/16).")] = None,
    dtype: Annotated[str, typer.Option(
        help=f"Storage of the raw data: {' or '.join(DTYPE_NAMES)}.")] = "float32",
    out: Annotated[Optional[Path], typer.Option(
        help="Index folder to write (default: indices/<dataset>-<split>; a --size other "
             "than the default is part of <dataset>, as in photos64).")] = None,
    device: Annotated[str, typer.Option(
        help="Build on auto, cpu or cuda (cuda needs faiss-gpu).")] = "auto",
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing index folder at --out.")] = False,
    flip: Annotated[bool, typer.Option(
        help="Index every image and its horizontal flip (for knnflow train --flip).")] = False,
    shards: Annotated[int, typer.Option(
        help="Write N shard folders (shard-000, ...) of contiguous ranges under one top "
             "manifest: under torchrun with N processes each opens its own; memorization "
             "merges them exactly.")] = 1,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON on stdout, for scripts.")] = False,
) -> None:
    """Build and save an index folder: FAISS index, raw data and a manifest with checksums.
    The data set is read in batches, so it may be larger than memory."""
    from knnflow.devices import resolve_device
    from knnflow.index import check_build_options
    from knnflow.index_build import check_shards
    from knnflow.training_sets import build_dataset_index, default_index_folder

    check_build_options(kind, dtype, nlist, nprobe)  # options first, then the output folder
    check_shards(shards)
    check_limit(limit)
    check_split(split)
    resolve_device(device)
    size = check_size(dataset, size)
    folder = check_output_folder(
        out or default_index_folder(dataset, split + ("-flip" if flip else ""), size),
        overwrite, "index", dataset_sources(dataset, root))
    with progress_bar() as progress:
        index = build_dataset_index(dataset, folder, progress, root=root, split=split,
                                    limit=limit, size=size, flip=flip, kind=kind, device=device,
                                    dtype=dtype, nlist=nlist, nprobe=nprobe, overwrite=overwrite,
                                    shards=shards)
    m = index.manifest
    peak = peak_memory_bytes()
    if as_json:
        print(json.dumps({"folder": str(folder), "bytes": folder_bytes(folder),
                          "peak_memory_bytes": peak, **m}, indent=2))
        return
    console.print(key_value_table(f"Index written to {folder}", [
        ("n", m["n"]), ("d", m["d"]), ("image shape", "×".join(map(str, m["image_shape"]))),
        ("kind", m["index"]["kind"]), ("data dtype", m["dtype"]),
        *([("shards", len(m["shards"]))] if "shards" in m else []),
        *([("storage rounding", f"≤ {m['storage_rounding']:.2e} per image (L2)")]
          if m.get("storage_rounding") else []),
        ("bytes on disk", human_bytes(folder_bytes(folder))),
        ("build seconds", f"{m['build_seconds']:.2f}"),
        ("peak memory", human_bytes(peak)),
    ]))


def peak_memory_bytes() -> int | None:
    """This process's peak resident memory (None where the platform does not report it)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _flatten(prefix: str, value: object) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [row for key, sub in value.items() for row in _flatten(f"{prefix}{key}.", sub)]
    return [(prefix[:-1], value)]


def index_info(
    folder: Annotated[Path, typer.Argument(help="An index folder written by build-index.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print an index folder's manifest."""
    from knnflow.index import read_manifest

    manifest = read_manifest(folder)
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    console.print(key_value_table(f"Index {folder}", _flatten("", manifest)))
