"""A training run's configuration and its folder on disk.

TrainConfig is what config.json records: the data, the model preset, the optimiser's
schedule and the target, whose own options travel as one mapping (`target_options`) that
the target checks (targets.Target.check_options); the trainer never names them. A run folder
runs/NAME holds config.json, metrics.jsonl and checkpoints/ (trainer.py writes them).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from torch import nn

from knnflow.checkpoints import CHECKPOINTS, load_checkpoint, split_state
from knnflow.errors import InputError, OptionError
from knnflow.models.presets import PRESETS
from knnflow.models.unet import build_model
from knnflow.targets import target_class
from knnflow.training_sets import dataset_slug

# Fields that may differ when resuming: more steps, and how often things are written.
RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints"}


@dataclass
class TrainConfig:
    """A training run. target_options: the target's own options (make_target's; None or
    missing: its defaults), filled in and checked by `resolved`."""

    dataset: str = "digits"
    root: str | None = None
    limit: int | None = None
    target: str = "cfm"
    target_options: dict = field(default_factory=dict)
    flip: bool = False
    preset: str = "tiny"
    batch_size: int = 128
    steps: int = 2000
    lr: float | None = None
    warmup: int | None = None
    grad_clip: float = 1.0
    ema_decay: float | None = None
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 0
    keep_checkpoints: int = 2

    def resolved(self) -> TrainConfig:
        """Preset defaults and the target's option defaults filled in, and every value
        checked."""
        if self.preset not in PRESETS:
            raise OptionError(f"unknown {{preset}} {self.preset!r}; choose one of: "
                              f"{', '.join(PRESETS)}", "preset")
        if not isinstance(self.target_options, dict):
            raise InputError(f"target_options must be a mapping, got {self.target_options!r}")
        preset = PRESETS[self.preset]
        defaults = {"lr": preset.lr, "warmup": preset.warmup, "ema_decay": preset.ema_decay}
        values = asdict(self)
        values.update({k: v for k, v in defaults.items() if values[k] is None})
        target = target_class(self.target)
        values["target_options"] = target.check_options(self.target_options)
        config = TrainConfig(**values)
        for name in ("batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(config, name) < 1:
                raise OptionError(f"must be at least 1, got {getattr(config, name)}", name)
        for name in ("sample_every", "warmup"):
            if getattr(config, name) < 0:
                raise OptionError(f"must be at least 0, got {getattr(config, name)}", name)
        if config.batch_size < target.MIN_BATCH:
            raise OptionError(f"must be at least {target.MIN_BATCH} for the {config.target} "
                              f"target (it pairs noise with images within a batch), got "
                              f"{config.batch_size}", "batch_size")
        if not (config.lr > 0 and math.isfinite(config.lr)):
            raise OptionError(f"must be positive, got {config.lr}", "lr")
        if not 0 <= config.ema_decay < 1:
            raise OptionError(f"must lie in [0, 1), got {config.ema_decay}", "ema_decay")
        if not config.grad_clip > 0:
            raise OptionError(f"must be positive, got {config.grad_clip}", "grad_clip")
        return config

    @classmethod
    def resumed(cls, saved: dict, given: TrainConfig, explicit: set[str]) -> TrainConfig:
        """The config of a resumed run: the saved one, with the options in `explicit` (the
        names a user gave: fields, or the target's options) taken from `given`."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        values.update({k: getattr(given, k) for k in explicit if k in known - {"target_options"}})
        options = dict(saved.get("target_options") or {})
        options.update({k: v for k, v in given.target_options.items() if k in explicit})
        return cls(**{**values, "target_options": options})


def config_differences(saved: dict, current: TrainConfig) -> list[tuple[str, str]]:
    """The fields (other than RESUMABLE_CHANGES) and target options whose values differ:
    (name, "{name}: old → new"), the text an OptionError template; a field missing from the
    saved config counts as its default."""
    now, default = asdict(current), asdict(TrainConfig())
    differences = []
    for name in now:
        old = saved.get(name, default[name])
        if name == "target_options":
            if saved.get("target", default["target"]) != current.target:
                continue  # another target's options: the target's change says it all
            old = old if isinstance(old, dict) else {}
            differences += [(key, f"{{{key}}}: {old.get(key)!r} → {value!r}")
                            for key, value in now[name].items() if old.get(key) != value]
        elif name not in RESUMABLE_CHANGES and old != now[name]:
            differences.append((name, f"{{{name}}}: {old!r} → {now[name]!r}"))
    return differences


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr over `warmup` steps, then constant."""
    if config.warmup == 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup)


class Run:
    """A training run on disk: runs/NAME."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise InputError(f"{self.folder} is not a run folder: expected "
                             f"{self.config_path}")
        try:
            config = json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{self.config_path} is not valid JSON ({err}); the run's config "
                             "is damaged") from None
        if not isinstance(config, dict):
            raise InputError(f"{self.config_path} does not hold a run config")
        return config


def default_run_folder(dataset: str, target: str) -> Path:
    """runs/<dataset>-<target>."""
    return Path("runs") / f"{dataset_slug(dataset)}-{target}"


def load_run_model(folder: Path, use_ema: bool = True,
                   device: str = "cpu") -> tuple[nn.Module, dict]:
    """The network of a run's newest complete checkpoint (EMA weights by default)."""
    run = Run(folder)
    if not Path(folder).is_dir():
        raise InputError(f"no run folder at {folder}")
    record = run.read_config()
    checkpoint = load_checkpoint(Path(folder) / CHECKPOINTS)
    if checkpoint is None:
        raise InputError(f"{folder} has no complete checkpoint in {Path(folder) / CHECKPOINTS}")
    meta, tensors = checkpoint
    model = build_model(record["preset"], tuple(record["image_shape"])).to(device)
    model.load_state_dict(split_state(tensors, "ema." if use_ema else "model."))
    model.eval()
    return model, {**record, "checkpoint_step": meta["step"]}
