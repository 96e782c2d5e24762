"""Velocity models v(x, t) and their presets.

The presets (knnflow.models.presets) load without torch; the networks (knnflow.models.unet)
load on first use of one of their names.
"""

from __future__ import annotations

import importlib

from knnflow.models.presets import PRESETS, Preset, UNetConfig

_NETWORKS = ("MLP", "UNet", "build_model", "count_parameters")


def __getattr__(name: str):
    if name in _NETWORKS:
        return getattr(importlib.import_module("knnflow.models.unet"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MLP", "PRESETS", "Preset", "UNet", "UNetConfig", "build_model", "count_parameters"]
