"""knnflow: the closed-form optimal velocity of a training set, fast and with a stated error.

The names below load on first use (PEP 562), so `import knnflow.errors` or the command
line's help does not wait for torch and faiss.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {
    "knnflow.api": ("TrainResult", "memorization", "sample", "train"),
    "knnflow.softmax": ("SoftmaxState",),
    "knnflow.closed_form": ("TrainingSet", "closed_form_denoiser",
                            "closed_form_state", "closed_form_velocity", "denoiser_from_score",
                            "denoiser_from_velocity", "score_from_denoiser",
                            "score_from_velocity", "velocity_from_denoiser",
                            "velocity_from_score"),
    "knnflow.data": ("load_dataset",),
    "knnflow.errors": ("IndexMismatchError", "InputError", "KnnflowError", "MissingFileError",
                       "OptionError"),
    "knnflow.estimators": ("ExactVelocity", "KNNVelocity", "SearchBudgets", "VelocityOutput"),
    "knnflow.index": ("Index",),
    "knnflow.target_base": ("TargetBatch",),
    "knnflow.targets": ("make_target",),
    "knnflow.topk": ("TopKVelocity",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME_OF])


__all__ = sorted(_HOME_OF)
