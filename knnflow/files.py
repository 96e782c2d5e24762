"""Folders written atomically: a crash or a kill never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from knnflow.errors import InputError

# A folder holding one of these was written by knnflow (index, run, samples, reports,
# classifier): --overwrite replaces only such folders, or empty ones.
OUTPUT_MARKERS = ("manifest.json", "config.json", "sampling.json", "samples.npz",
                  "summary.json", "classifier.json", "checkpoints")


def _writable_ancestor(path: Path) -> None:
    """Refuse, in one line, a path that cannot be created: its nearest existing ancestor is
    a file, or no folder can be made in it (probed, so read-only and special file systems
    are caught before any work is done)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create {path}: {ancestor} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".knnflow-probe-", dir=ancestor))
    except OSError as err:
        raise InputError(f"cannot write in {ancestor}: {err.strerror}") from None


def check_output_folder(folder: str | Path, overwrite: bool,
                        inputs: Iterable[str | Path | None] = (), option: str = "--out") -> Path:
    """Check, before any work, that `folder` can be written: it does not exist, or it does and
    overwrite is set, it is a folder knnflow wrote (or an empty one), and it neither is nor
    holds one of the command's `inputs` (which --overwrite would delete)."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise InputError(f"{folder} is a file; {option} needs a folder path")
        if not overwrite:
            raise InputError(f"{folder} already exists; pass --overwrite to replace it")
        target = folder.resolve()
        for item in inputs:
            if item is None:
                continue
            source = Path(item).resolve()
            if source == target or target in source.parents:
                raise InputError(f"{folder} holds the input {item}; --overwrite would delete "
                                 f"it: choose another {option}")
        if any(folder.iterdir()) and not any((folder / m).exists() for m in OUTPUT_MARKERS):
            raise InputError(f"{folder} is not a folder knnflow wrote (none of "
                             f"{', '.join(OUTPUT_MARKERS)}); remove it yourself or choose "
                             f"another {option}")
    _writable_ancestor(folder)
    return folder


def check_output_file(path: str | Path | None, option: str) -> Path | None:
    """Check, before any work, that a single output file can be written."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file path")
    _writable_ancestor(path)
    return path


@contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `folder` to write into. When the block ends normally, the
    temporary folder is renamed to `folder` (an existing one is replaced only with
    overwrite=True, and only then); when it raises, the temporary folder is removed."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise InputError(f"{folder} already exists; pass --overwrite to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
