"""Folders written atomically: a crash or a kill never leaves a half-written one behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from knnflow.errors import InputError, OptionError

# Every folder knnflow writes holds this file, naming its kind (index, run, samples, ...):
# Overwriting replaces only a folder of the command's own kind, or an empty one.
MARKER = ".knnflow.json"


def folder_kind(folder: Path) -> str | None:
    """The kind of output knnflow wrote into `folder`, or None for any other folder."""
    try:
        return str(json.loads((folder / MARKER).read_text())["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_marker(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(json.dumps({"kind": kind}) + "\n")


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


def check_output_folder(folder: str | Path, overwrite: bool, kind: str,
                        inputs: Iterable[str | Path | None] = (), option: str = "out") -> Path:
    """Check, before any work, that `folder` can be written: it does not exist, or it does and
    overwrite is set, it holds knnflow's output of this `kind` (or nothing), it is no symbolic
    link, and it neither is nor holds one of the command's `inputs` (which overwriting would
    delete). Errors are OptionErrors naming `option`, the name of the folder's option."""
    folder = Path(folder)
    if folder.is_symlink():
        raise OptionError(f"{folder} is a symbolic link; give the folder it points to, or "
                          f"another {{{option}}}", option)
    if folder.exists():
        if not folder.is_dir():
            raise OptionError(f"{folder} is a file; {{{option}}} needs a folder path", option)
        if not overwrite:
            raise OptionError(f"{folder} already exists; pass {{overwrite}} to replace it",
                              "overwrite")
        refuse_inputs(folder, inputs, option)
        found = folder_kind(folder)
        if found is None and any(folder.iterdir()):
            raise OptionError(f"{folder} is not a folder knnflow wrote; remove it yourself or "
                              f"choose another {{{option}}}", option)
        if found is not None and found != kind:
            raise OptionError(f"{folder} holds a knnflow {found}, not {kind} output; "
                              f"choose another {{{option}}}", option)
    _writable_ancestor(folder)
    return folder


def refuse_inputs(target: Path, inputs: Iterable[str | Path | None], option: str,
                  inside: bool = False) -> None:
    """Refuse a target that is, or holds, one of the inputs (inside=True: or lies inside
    one), in an OptionError naming `option`."""
    resolved = target.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if source == resolved or resolved in source.parents:
            raise OptionError(f"{target} holds the input {item}; writing there would destroy "
                              f"it: choose another {{{option}}}", option)
        if inside and source in resolved.parents:
            raise OptionError(f"{{{option}}} {target} lies inside the input {item}; choose a "
                              "path outside it", option)


def check_output_file(path: str | Path | None, option: str,
                      inputs: Iterable[str | Path | None] = ()) -> Path | None:
    """Check, before any work, that a single output file can be written, and that it is not
    one of the command's inputs nor inside one (errors name `option`, the file's option)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{{{option}}} {path} is a folder; give a file path", option)
    # A file written into an input folder may replace one of its files.
    refuse_inputs(path, inputs, option, inside=True)
    _writable_ancestor(path)
    return path


@contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False,
                  kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `folder` to write into, marked as output of `kind`. When
    the block ends normally, the temporary folder is renamed to `folder` (an existing one is
    replaced only with overwrite=True, and only then); when it raises, the temporary folder
    is removed."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OptionError(f"{folder} already exists; pass {{overwrite}} to replace it",
                          "overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if kind is not None:
            write_marker(tmp, kind)
        yield tmp
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
            tmp.rename(folder)
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, block: int = 1 << 24) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def human_bytes(count: int | None) -> str:
    """A byte count as 512 B, 3.4 MB or 6.0 GB (n/a for None)."""
    if count is None:
        return "n/a"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
