"""Image features for Fréchet distances, from offline weights (nothing is downloaded).

- inception: torchvision's Inception v3 (ImageNet weights inception_v3_google-0cc3c7bd.pth),
  the 2048-d pool features. This is not the TensorFlow Inception of the original FID code, so
  its numbers are not comparable with published FIDs; compare runs with each other.
- dinov2: a TorchScript export of a DINOv2 backbone (torchvision has none), its CLS output.
- classifier:PATH: a small in-domain CNN from `knnflow train-classifier` (classifier.py), its
  penultimate features; trained offline in seconds on digits.

`feature_extractor` opens one of them; `extract_features` runs one over a set of images in
batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from knnflow.analysis.classifier import load_classifier
from knnflow.choices import DINOV2_FILE, INCEPTION_FILE
from knnflow.errors import InputError, MissingFileError, OptionError
from knnflow.images import shape_text

Progress = Callable[[str, int, int], None]
FEATURES = ("inception", "dinov2", "classifier:PATH")
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(MissingFileError, OptionError):
    """A weights file that is not where it was looked for: a missing file whose remedy is the
    `weights` option, so the command line names its flag."""


@dataclass
class FeatureExtractor:
    """images (B, C, H, W) float in [-1, 1] → features (B, D) float64 on the CPU.

    name: inception, dinov2 or classifier; source: the weights file or classifier folder;
    image_shape: the only input shape accepted (the classifier's), or None for any.
    """

    name: str
    source: str
    network: Callable[[Tensor], Tensor]
    prepare: Callable[[Tensor], Tensor]
    device: torch.device
    image_shape: tuple[int, ...] | None = None

    @torch.no_grad()
    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        images = torch.as_tensor(images, dtype=torch.float32).to(self.device)
        if self.image_shape is not None and tuple(images.shape[1:]) != self.image_shape:
            raise InputError(f"{self.name} features of {self.source} take "
                             f"{shape_text(self.image_shape)} images, got "
                             f"{shape_text(images.shape[1:])}")
        out = self.network(self.prepare(images))
        if not isinstance(out, Tensor) or out.ndim != 2 or len(out) != len(images):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(f"{self.source} returned {shape} for {len(images)} images; "
                             "expected a (batch, features) tensor")
        return out.to(torch.float64).cpu()


def default_weights(features: str) -> Path:
    """Where inception and dinov2 weights are looked for without `weights`: torch's hub cache
    ($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints by default), where torchvision
    keeps the Inception file it downloads."""
    name = INCEPTION_FILE if features == "inception" else DINOV2_FILE
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _to_rgb(images: Tensor) -> Tensor:
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise InputError(f"ImageNet features need 1 or 3 channels, got {images.shape[1]}")
    return images


def _inception(path: Path, device: torch.device) -> FeatureExtractor:
    from torchvision.models import Inception3

    if not path.is_file():
        raise MissingWeightsError(f"inception features need torchvision's Inception v3 "
                                  f"weights: get {INCEPTION_URL} and put it at {path}, or pass "
                                  "{weights} FILE", "weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds on a file that is not a checkpoint
        raise InputError(f"cannot read {path} as a torch state dict: "
                         f"{err.__class__.__name__}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path} holds a {type(state).__name__}, not a state dict")
    # aux_logits=True: the file holds the auxiliary head too. Every tensor comes from the file,
    # so the model is built on the meta device (initialising it on the CPU takes seconds) and
    # the file's tensors are assigned; a missing one is refused below.
    with torch.device("meta"):
        model = Inception3(aux_logits=True, transform_input=False, init_weights=False)
    expected = model.state_dict()
    wrong = [key for key in expected.keys() & state.keys()
             if getattr(state[key], "shape", None) != expected[key].shape]
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected or wrong:
        raise InputError(f"{path} is not an Inception v3 state dict: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected and {len(wrong)} mis-shaped tensors")
    model.load_state_dict(state, assign=True)
    model.fc = nn.Identity()  # the 2048-d pool features, as in FID
    model.eval().to(device)

    def prepare(images: Tensor) -> Tensor:
        # torchvision's weights expect ImageNet normalisation followed by transform_input,
        # which together map [0, 1] pixels to [-1, 1]: our images already are in [-1, 1].
        return nn.functional.interpolate(_to_rgb(images), size=(299, 299), mode="bilinear",
                                         align_corners=False)

    return FeatureExtractor("inception", str(path), model, prepare, device)


def _dinov2(path: Path, device: torch.device) -> FeatureExtractor:
    if not path.is_file():
        raise MissingWeightsError(
            f"dinov2 features need a TorchScript export of a DINOv2 backbone at {path} (or pass "
            "{weights} FILE); make one where the hub is reachable: torch.jit.trace(torch.hub."
            "load('facebookresearch/dinov2', 'dinov2_vitl14').eval(), torch.zeros(1, 3, 224, "
            f"224)).save('{DINOV2_FILE}')", "weights")
    try:
        with warnings.catch_warnings():
            # Recent torch releases mark TorchScript deprecated; its files still load, and it is the
            # self-contained format a DINOv2 backbone exports to with a dynamic batch size.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device)
    except Exception as err:  # TorchScript reports a bad file as RuntimeError or ValueError
        raise InputError(f"cannot read {path} as a TorchScript module: "
                         f"{err.__class__.__name__}") from None
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]

    def prepare(images: Tensor) -> Tensor:
        # DINOv2's evaluation transform: bicubic resize to 224 (16 patches of 14), ImageNet
        # normalisation of [0, 1] pixels.
        resized = nn.functional.interpolate(_to_rgb(images), size=(224, 224), mode="bicubic",
                                            align_corners=False, antialias=True)
        return ((resized.clamp(-1, 1) + 1) / 2 - mean) / std

    return FeatureExtractor("dinov2", str(path), model, prepare, device)


def _classifier(folder: Path, device: torch.device) -> FeatureExtractor:

    model, record = load_classifier(folder, device)
    accuracy, classes = record.get("test_accuracy"), record["architecture"]["classes"]
    if accuracy is not None and accuracy < max(0.5, 2 / classes):
        warnings.warn(f"the classifier {folder} reaches only {accuracy:.0%} test accuracy "
                      f"(chance: {1 / classes:.0%}): its features barely tell images apart, so "
                      "a Fréchet distance on them means little; train it longer "
                      "(knnflow train-classifier --epochs)", stacklevel=2)
    return FeatureExtractor("classifier", str(folder), model.features, lambda x: x, device,
                            tuple(record["image_shape"]))


def feature_extractor(features: str, weights: str | Path | None = None,
                      device: str | torch.device = "cpu") -> FeatureExtractor:
    """inception, dinov2 (weights: a file, default under torch's hub cache) or
    classifier:PATH (a folder written by train_classifier)."""
    device = torch.device(device)
    kind, _, path = features.partition(":")
    if kind == "classifier" and path:
        if weights is not None:
            raise OptionError("{weights} is for inception and dinov2; classifier:PATH names "
                              "the classifier folder", "weights")
        return _classifier(Path(path).expanduser(), device)
    if features in ("inception", "dinov2"):
        file = Path(weights).expanduser() if weights is not None else default_weights(features)
        return (_inception if features == "inception" else _dinov2)(file, device)
    raise InputError(f"unknown features {features!r}; choose one of: {', '.join(FEATURES)}")


def _batches(images, batch_size: int) -> Iterator[tuple[int, np.ndarray | Tensor]]:
    """(stop, batch) over a tensor, an array, or anything with batch(start, stop) and len(),
    such as samples.Samples (read lazily)."""
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        if hasattr(images, "batch"):
            yield stop, images.batch(start, stop)
        else:
            yield stop, images[start:stop]


def extract_features(images, extractor: Callable[[Tensor], Tensor], batch_size: int = 64,
                     progress: Progress | None = None, stage: str = "features") -> np.ndarray:
    """Features (N, D) float64 of images: a tensor, an array or a Samples, N×C×H×W in [-1, 1]."""
    if batch_size < 1:
        raise OptionError(f"must be at least 1, got {batch_size}", "batch_size")
    parts = []
    for stop, batch in _batches(images, batch_size):
        out = extractor(torch.as_tensor(batch, dtype=torch.float32))
        parts.append(torch.as_tensor(out).detach().to(torch.float64).cpu().numpy())
        if progress is not None:
            progress(stage, stop, len(images))
    if not parts:
        raise InputError("no images to compute features of")
    return np.concatenate(parts)
