"""knnflow collapse (paper Figure 1)."""

from __future__ import annotations

from knnflow.errors import InputError


def collapse() -> None:
    """Cosine between û* and x1 - x0 over t, and when the softmax collapses onto one point."""
    raise InputError("knnflow collapse is not implemented yet")
