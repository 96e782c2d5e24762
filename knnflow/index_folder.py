"""An index folder on disk and its checks: manifest.json (what was indexed, how, and the
sha256 of every file), data.npy (the points), index.faiss (IVF only: a flat index is a copy
of data.npy, built from it on first use) and the sketches' files. Before an Index is loaded,
each file must be present, match its checksum and agree with the manifest, so a changed or
partial folder is refused in one line instead of giving wrong neighbours.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from knnflow.errors import IndexMismatchError, MissingFileError
from knnflow.files import sha256_file

FORMAT_VERSION = 1
MANIFEST, DATA_FILE, INDEX_FILE = "manifest.json", "data.npy", "index.faiss"


def read_manifest(folder: Path) -> dict:
    """The manifest of an index folder, checked for a known format version."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise MissingFileError(f"no index folder at {folder} (build one with knnflow build-index)")
    if not path.is_file():
        raise MissingFileError(f"{folder} is not an index folder: expected {path}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IndexMismatchError(f"{path} is not valid JSON ({err.msg})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexMismatchError(f"{folder}: index format version {version}, this knnflow reads "
                                 f"version {FORMAT_VERSION}; rebuild it with knnflow build-index")
    missing = [key for key in ("n", "d", "image_shape", "dtype", "index") if key not in manifest]
    if missing:
        raise IndexMismatchError(f"{path} lacks {', '.join(missing)}")
    return manifest


def check_files(folder: Path, manifest: dict, verify: bool = True) -> None:
    """Every file the manifest names is in the folder and (verify) matches its checksum."""
    index_file = manifest.get("index_file")
    files = {DATA_FILE: ("the indexed data", manifest.get("data_sha256"))}
    if index_file:
        files[index_file] = ("the FAISS index", manifest.get("index_sha256"))
    for name, checksum in manifest.get("sketch_sha256", {}).items():
        files[name] = ("the certified-search sketch", checksum)
    for name, (what, _) in files.items():
        if not (folder / name).is_file():
            raise MissingFileError(f"{folder}: expected {name} ({what})")
    if verify:
        for name, (_, checksum) in files.items():
            if sha256_file(folder / name) != checksum:
                raise IndexMismatchError(f"{folder}: {name} does not match the checksum in "
                                         "manifest.json (the file changed since the build)")


def check_points(folder: Path, manifest: dict, points: np.ndarray) -> None:
    """data.npy's points have the manifest's shape, dtype and image shape."""
    expected = (manifest["n"], manifest["d"])
    if points.shape != expected:
        raise IndexMismatchError(f"{folder}: data.npy has shape {points.shape}, manifest says "
                                 f"{expected}")
    if str(points.dtype) != manifest["dtype"]:
        raise IndexMismatchError(f"{folder}: data.npy has dtype {points.dtype}, manifest says "
                                 f"{manifest['dtype']}")
    if math.prod(manifest["image_shape"]) != manifest["d"]:
        raise IndexMismatchError(f"{folder}: image shape {manifest['image_shape']} does not "
                                 f"have d={manifest['d']} values")


def check_faiss_index(folder: Path, manifest: dict, index) -> None:
    """The FAISS index holds the manifest's n points of dimension d."""
    if index.ntotal != manifest["n"] or index.d != manifest["d"]:
        raise IndexMismatchError(f"{folder}: index.faiss holds {index.ntotal} points of "
                                 f"d={index.d}, manifest says {manifest['n']} of "
                                 f"d={manifest['d']}")


def points_sha256(points: np.ndarray) -> str:
    """Checksum of the raw point values (C order), independent of any file header."""
    return hashlib.sha256(np.ascontiguousarray(points).data).hexdigest()


class ManifestView:
    """What an opened index (index.Index, sharded_index.ShardedIndex: each holds `manifest`)
    reads from its manifest: n, d, image shape, kind, and the check of data passed to it."""

    @property
    def n(self) -> int:
        return self.manifest["n"]

    @property
    def dim(self) -> int:
        return self.manifest["d"]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["image_shape"])

    @property
    def kind(self) -> str:
        return self.manifest["index"]["kind"]

    def verify_points(self, points) -> None:
        """Refuse, in one line, training points (a tensor or an array) that are not the ones
        this index was built on."""
        if hasattr(points, "detach"):  # a torch tensor
            points = points.detach().cpu().numpy()
        array = np.asarray(points)
        array = np.ascontiguousarray(array.reshape(array.shape[0], -1),
                                     dtype=np.dtype(self.manifest["dtype"]))
        if array.shape != (self.n, self.dim):
            raise IndexMismatchError(f"the index holds {self.n} points of d={self.dim}, the data "
                                     f"passed has shape {array.shape}")
        if points_sha256(array) != self.manifest.get("points_sha256"):
            raise IndexMismatchError("the index was built on other data than the data passed "
                                     "(points checksum differs); rebuild it with build-index")
