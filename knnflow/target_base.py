"""What every training target shares: the batch it returns, x_t, and the base class with its
options (each target names and checks its own, so a trainer passes them as one mapping)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from knnflow.closed_form import TrainingSet, check_t
from knnflow.distributed import rank_and_world
from knnflow.errors import InputError, OptionError


@dataclass
class TargetBatch:
    """x_t and the regression target (both shaped like x1, float32), with what it cost.

    fallback: fraction of the batch that knn-efm sent to its fallback (None for others).
    evaluated: mean number of training points read per row. seconds: time spent on the target.
    routed: fraction that knn-efm sent to the exact engine because it is faster at their t
    (KNNVelocity's route; None for other targets).
    """

    x_t: Tensor
    target: Tensor
    fallback: float | None
    evaluated: float
    seconds: float
    routed: float | None


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1-t)·x0 + t·x1 with t (B,) broadcast over the remaining dimensions."""
    tb = t.to(x1.dtype).reshape(-1, *([1] * (x1.dim() - 1)))
    return (1 - tb) * x0 + tb * x1


class Target:
    """Base: subclasses compute the velocity target from float64 x_t.

    Each target names the options it takes (OPTIONS: name → default) and checks its own
    (check_options), so that a trainer passes them through as one mapping without knowing
    them (make_target). None stands for an option's default.
    """

    name = "target"
    device = torch.device("cpu")
    OPTIONS: dict[str, object] = {}
    # The fewest rows a batch may have (ot-cfm pairs noise and images within the batch).
    MIN_BATCH = 1
    # The last batch's share of rows routed to the exact engine (knn-efm sets it).
    routed: float | None = None

    @classmethod
    def check_options(cls, options: Mapping) -> dict:
        """`options` with the defaults filled in; names the target does not take and bad
        values are refused (OptionError naming the option)."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(cls.OPTIONS))
        if unknown:
            name = unknown[0]
            users = [other.name for other in _target_classes(Target) if name in other.OPTIONS]
            takes = ", ".join(users) + (" takes it" if len(users) == 1 else " take it")
            raise OptionError(f"the {cls.name} target has no option {{{name}}} ("
                              + (takes if users else "no target takes it") + ")", name)
        checked = {**cls.OPTIONS, **given}
        cls.validate(checked)
        return checked

    @classmethod
    def validate(cls, options: dict) -> None:
        """Refuse bad option values (subclasses; the base takes no options)."""

    @classmethod
    def inputs(cls, options: dict) -> list[Path]:
        """The files or folders the options name, which a run must not overwrite."""
        return []

    @classmethod
    def from_options(cls, options: dict, *, data: Tensor | TrainingSet | None,
                     image_shape: tuple[int, ...] | None, device: torch.device) -> Target:
        """The target from checked options and the training data (flattened points)."""
        return cls(device)

    def __call__(self, x0: Tensor, x1: Tensor, t: Tensor,
                 generator: torch.Generator | None = None) -> TargetBatch:
        """x_t and the target, on the target's device. Random draws (EFM candidates) come
        from `generator` on the CPU, so a run draws the same numbers on any device."""
        if x0.shape != x1.shape:
            raise InputError(f"x0 has shape {tuple(x0.shape)} but x1 has {tuple(x1.shape)}")
        x0, x1 = x0.to(self.device), x1.to(self.device)
        x0 = self.couple(x0, x1)
        t = check_t(t, x1.shape[0], x1.device)
        x_t = interpolate(x0, x1, t)
        began = time.perf_counter()
        target, fallback, evaluated = self.velocity(x0, x1, x_t, t, generator)
        if self.device.type == "cuda":  # the time spent must include the queued GPU work
            torch.cuda.current_stream(self.device).synchronize()
        return TargetBatch(x_t, target.to(x1.dtype).reshape(x1.shape), fallback, evaluated,
                           time.perf_counter() - began, self.routed)

    def couple(self, x0: Tensor, x1: Tensor) -> Tensor:
        """The noise paired with each x1 (the batch's own x0 but for coupled targets)."""
        return x0

    def velocity(self, x0, x1, x_t, t, generator):
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run computes the same targets (JSON)."""
        return {}

    def restore(self, state: dict) -> None:
        """Take back what state() gave, from a checkpoint's JSON (other keys ignored)."""


def _target_classes(base: type[Target]) -> list[type[Target]]:
    """Every target class below `base`, depth first."""
    found = []
    for cls in base.__subclasses__():
        found += [cls, *_target_classes(cls)]
    return found


def needs_data(name: str, data: Tensor | TrainingSet | None) -> Tensor | TrainingSet:
    if data is None:
        raise InputError(f"the {name} target needs the training data")
    return data


def shard_group():
    """A process group of its own for a sharded target's all-reduces (with prefetch they run
    in a background thread while DDP's run in the main one)."""
    import torch.distributed as dist

    if rank_and_world()[1] < 2:
        raise OptionError("needs several processes: run under torchrun --nproc_per_node N",
                          "shard")
    return dist.new_group()
