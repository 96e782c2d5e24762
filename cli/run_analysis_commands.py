"""knnflow velocity-error and knnflow hybrid: analyses of a trained run against û*."""

from __future__ import annotations

from knnflow.errors import InputError


def velocity_error() -> None:
    """E‖u_θ - û*‖² per t bin for a trained run (paper Figure 2, left)."""
    raise InputError("knnflow velocity-error is not implemented yet")


def hybrid() -> None:
    """Follow û* on [0, τ], then the network on [τ, 1] (paper Figure 3)."""
    raise InputError("knnflow hybrid is not implemented yet")
