"""knnflow fid and knnflow train-classifier."""

from __future__ import annotations

from knnflow.errors import InputError


def fid() -> None:
    """Fréchet distance between the feature statistics of samples and a reference data set."""
    raise InputError("knnflow fid is not implemented yet")


def train_classifier() -> None:
    """Train a small in-domain classifier whose features give an offline Fréchet distance."""
    raise InputError("knnflow train-classifier is not implemented yet")
