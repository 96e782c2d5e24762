"""The work folder: stage records (key, result, wall time), atomic writes, and its
preparation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from knnflow.analysis.reproduce.budgets import Budget
from knnflow.analysis.reproduce.common import MARKER
from knnflow.checkpoints import CHECKPOINTS, complete_checkpoints
from knnflow.data import dataset_sources
from knnflow.errors import OptionError
from knnflow.files import refuse_inputs


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def now_text() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def newest_checkpoint(run: Path) -> dict | None:
    """The JSON mark of a run's newest complete checkpoint (step, sha256), or None."""

    for mark in reversed(complete_checkpoints(Path(run) / CHECKPOINTS)):
        meta = read_json(mark)
        if meta is not None and mark.with_suffix(".safetensors").is_file():
            return meta
    return None


def prepare_work_folder(work: Path, dataset: str, budget: Budget, overwrite: bool,
                        root: str | Path | None = None) -> None:
    """Create (or, with overwrite, empty) the work folder; refuse a folder that is not a
    reproduce work folder, one of another data set, or (with overwrite) one that holds the
    data set's files."""
    marker = work / MARKER
    if work.exists() and any(work.iterdir()):
        saved = read_json(marker)
        if saved is None:
            raise OptionError(f"{work} exists and is not a knnflow reproduce work folder (no "
                              f"{MARKER}); choose another {{work}}", "work")
        if overwrite:

            refuse_inputs(work, dataset_sources(dataset, root), "work")
            shutil.rmtree(work)
        elif saved.get("dataset") != dataset:
            raise OptionError(f"{work} holds a reproduction of {saved.get('dataset')}, not "
                              f"{dataset}; choose another {{work}} or pass {{overwrite}}", "work",
                              "overwrite")
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, json.dumps({"dataset": dataset, "budget": asdict(budget)}, indent=2)
                  + "\n")
