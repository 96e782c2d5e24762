"""knnflow: the closed-form optimal velocity of a training set, fast and with a stated error."""

from knnflow.closed_form import (
    SoftmaxState,
    TrainingSet,
    closed_form_denoiser,
    closed_form_state,
    closed_form_velocity,
    denoiser_from_score,
    denoiser_from_velocity,
    score_from_denoiser,
    score_from_velocity,
    velocity_from_denoiser,
    velocity_from_score,
)
from knnflow.data import load_dataset
from knnflow.errors import IndexMismatchError, InputError, KnnflowError, MissingFileError
from knnflow.estimators import ExactVelocity, KNNVelocity, VelocityOutput
from knnflow.index import Index
from knnflow.targets import TargetBatch, make_target

__version__ = "0.1.0"

__all__ = [
    "ExactVelocity",
    "Index",
    "IndexMismatchError",
    "InputError",
    "KNNVelocity",
    "KnnflowError",
    "MissingFileError",
    "SoftmaxState",
    "TargetBatch",
    "TrainingSet",
    "VelocityOutput",
    "closed_form_denoiser",
    "closed_form_state",
    "closed_form_velocity",
    "denoiser_from_score",
    "denoiser_from_velocity",
    "load_dataset",
    "make_target",
    "score_from_denoiser",
    "score_from_velocity",
    "velocity_from_denoiser",
    "velocity_from_score",
]
