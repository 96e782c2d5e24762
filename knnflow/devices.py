"""The device a command runs on: auto, cpu or cuda, checked against what torch sees."""

from __future__ import annotations

import torch

from knnflow.errors import OptionError


def resolve_device(device: str, option: str = "device", allow_auto: bool = True) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error
    (an OptionError naming `option`, the device's option). allow_auto=False: only cpu or cuda
    are accepted."""
    choices = ("auto", "cpu", "cuda") if allow_auto else ("cpu", "cuda")
    if device not in choices:
        raise OptionError(f"unknown {{{option}}} {device!r}; choose {', '.join(choices[:-1])} "
                          f"or {choices[-1]}", option)
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise OptionError(f"{{{option}}} cuda was asked for but torch sees no CUDA GPU", option)
    return "cuda" if device == "auto" and has_cuda else ("cpu" if device == "auto" else device)
