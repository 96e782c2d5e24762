"""Checkpoints of a training run: RUN/checkpoints/step_N.safetensors + step_N.json.

A checkpoint counts only when its JSON, written last, names the sha256 of its tensors, so a run
killed at any moment resumes from the newest complete checkpoint; the oldest beyond `keep` are
removed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from knnflow.files import sha256_file

CHECKPOINTS = "checkpoints"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(folder: Path, step: int, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, rng_states: dict[str, Tensor],
                    keep: int, extra: dict | None = None) -> Path:
    """checkpoints/step_N.safetensors (model, EMA, Adam moments, RNG states), then
    step_N.json naming its sha256 (plus `extra`, the target's state): the JSON is the commit
    mark."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
    opt_state = optimizer.state_dict()
    for pid, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors.update(rng_states)  # the batch stream's generators (BatchStream.next)
    if next(model.parameters()).is_cuda:  # dropout draws from the GPU's generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    weights = folder / f"step_{step}.safetensors"
    write_atomic(weights, lambda p: save_file(tensors, str(p)))
    meta = {**(extra or {}), "step": step, "sha256": sha256_file(weights),
            "param_groups": opt_state["param_groups"]}
    write_atomic(folder / f"step_{step}.json",
                  lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    for old in complete_checkpoints(folder)[:-keep]:
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return weights


def complete_checkpoints(folder: Path) -> list[Path]:
    """The JSON marks of checkpoints, oldest first (their tensors are checked on load)."""
    if not folder.is_dir():
        return []
    marks = [p for p in folder.glob("step_*.json") if p.stem[5:].isdigit()]
    return sorted(marks, key=lambda p: int(p.stem[5:]))


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, Tensor]] | None:
    """The newest checkpoint whose tensors match its JSON's sha256, or None; a damaged newer
    one is skipped with a warning naming it."""
    from safetensors.torch import load_file

    damaged = []
    for mark in reversed(complete_checkpoints(folder)):
        weights = mark.with_suffix(".safetensors")
        try:
            meta = json.loads(mark.read_text())
            if weights.is_file() and sha256_file(weights) == meta["sha256"]:
                if damaged:
                    warnings.warn(f"skipped damaged checkpoint(s) {', '.join(damaged)}; using "
                                  f"{weights.name} (step {meta['step']})", stacklevel=2)
                return meta, load_file(str(weights))
        except (json.JSONDecodeError, KeyError, OSError):
            pass
        damaged.append(weights.name)
    return None


def split_state(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                      param_groups: list[dict]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in split_state(tensors, "opt.").items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def newest_checkpoint_step(folder: Path) -> int | None:
    """The step of a run's newest complete checkpoint, or None."""
    marks = complete_checkpoints(folder / CHECKPOINTS) if (folder / CHECKPOINTS).is_dir() else []
    for mark in reversed(marks):
        try:
            return int(json.loads(mark.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
