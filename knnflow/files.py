"""Folders written atomically: a crash or a kill never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from knnflow.errors import InputError


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
