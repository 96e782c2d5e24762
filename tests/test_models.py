"""Model presets: each builds, starts at velocity 0, and has the size its record says."""

from __future__ import annotations

import pytest
import torch

from knnflow.errors import InputError
from knnflow.models import PRESETS, build_model, count_parameters


def test_presets_build_and_start_at_zero_velocity():
    for preset, shape in (("tiny", (1, 8, 8)), ("tiny", (1, 28, 28)), ("mlp", (1, 8, 8))):
        model = build_model(preset, shape)
        out = model(torch.randn(3, *shape), torch.rand(3))
        assert out.shape == (3, *shape) and torch.equal(out, torch.zeros_like(out))
    # The paper's CIFAR-10 network: 128 channels, mult 1,2,2,2, 2 blocks, attention at 16.
    assert 34e6 < count_parameters(build_model("cifar", (3, 32, 32))) < 37e6
    with pytest.raises(InputError, match="choose one of: tiny, cifar, celeba64, mlp"):
        build_model("huge", (1, 8, 8))
    with pytest.raises(InputError, match="divisible"):
        build_model("cifar", (3, 28, 28))


def test_every_preset_record_has_its_training_defaults_and_help():
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.summary
        assert preset.lr > 0 and preset.warmup >= 0 and 0 <= preset.ema_decay < 1
        assert (preset.unet is None) == (name == "mlp")
