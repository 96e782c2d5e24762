"""knnflow reproduce: the paper's comparison on a data set, end to end."""

from __future__ import annotations

from knnflow.errors import InputError


def reproduce() -> None:
    """Train cfm, efm-128, efm-(n) and knn-efm with equal budgets and compare them."""
    raise InputError("knnflow reproduce is not implemented yet")
