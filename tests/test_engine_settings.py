"""The exact engine's settings: one record per device kind, row limits scaled with the chunk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from knnflow.engine_settings import CPU_SETTINGS, CUDA_SETTINGS, engine_settings


def test_each_device_kind_has_its_record():
    assert engine_settings(torch.device("cpu")) is CPU_SETTINGS
    assert engine_settings(torch.device("cuda", 0)) is CUDA_SETTINGS
    assert (CPU_SETTINGS.chunk, CUDA_SETTINGS.chunk) == (8192, 16384)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CPU_SETTINGS.chunk = 1024


def test_row_limits_and_flushes_scale_with_the_chunk_streamed():
    settings = CPU_SETTINGS
    assert settings.sparse_limit(settings.row_limit_columns) == settings.sparse_row_limit
    assert settings.sparse_limit(8192) == 4 * settings.sparse_row_limit
    assert settings.exact_limit(1024) == settings.exact_row_limit // 2
    assert settings.flush_every(1024) == settings.flush_terms // 1024
    assert settings.flush_every(4 * settings.flush_terms) == 1
