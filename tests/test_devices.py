"""resolve_device: the device values every command takes."""

from __future__ import annotations

import pytest
import torch

from knnflow.devices import resolve_device
from knnflow.errors import InputError


def test_auto_is_cuda_only_when_torch_sees_a_gpu():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


def test_bad_devices_are_one_line():
    with pytest.raises(InputError, match="unknown device 'tpu'; choose auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="choose cpu or cuda"):
        resolve_device("auto", allow_auto=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")
