"""Fréchet distance between the feature statistics of two image sets, with offline features.

FD = ‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2(Σ1Σ2)^½), the Fréchet (2-Wasserstein) distance between the
Gaussians N(μ1, Σ1) and N(μ2, Σ2) fitted to the features of samples and reference images.
Means and covariances are taken in float64 with numpy; the matrix square root is scipy's
(scipy.linalg.sqrtm). Features come from one of three extractors, none of which downloads
anything:

- inception: torchvision's Inception v3 (ImageNet weights inception_v3_google-0cc3c7bd.pth),
  the 2048-d pool features. This is not the TensorFlow Inception of the original FID code, so
  its numbers are not comparable with published FIDs; compare runs with each other.
- dinov2: a TorchScript export of a DINOv2 backbone (torchvision has none), its CLS output.
- classifier:PATH: a small in-domain CNN from `knnflow train-classifier` (classifier.py), its
  penultimate features; trained offline in seconds on digits.

FID depends on the number of images (it is biased upwards for small n), so compare values
computed with the same n.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from knnflow.analysis.classifier import load_classifier
from knnflow.choices import DINOV2_FILE, INCEPTION_FILE
from knnflow.data import SPLITS, dataset_names, has_test_split
from knnflow.errors import InputError, MissingFileError

Progress = Callable[[str, int, int], None]
FEATURES = ("inception", "dinov2", "classifier:PATH")
BOOTSTRAP_REPLICATES, BOOTSTRAP_REPLICATES_WIDE, BOOTSTRAP_WIDE = 100, 20, 512
REFERENCE_SPLIT = "test"
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    if isinstance(features, Tensor):
        features = features.detach().cpu().numpy()
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2:
        raise InputError(f"features have shape {values.shape}; expected (images, features)")
    if len(values) < 2:
        raise InputError(f"a covariance needs at least 2 images, got {len(values)}")
    if not np.isfinite(values).all():
        raise InputError("the features contain NaN or infinite values")
    return values.mean(axis=0), np.cov(values, rowvar=False).reshape(values.shape[1], -1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """‖μ1 - μ2‖² + tr(Σ1) + tr(Σ2) - 2·tr((Σ1Σ2)^½), in float64.

    The numerics follow the reference FID implementations (TTUR, pytorch-fid): when Σ1Σ2 is
    singular enough that sqrtm returns non-finite values, eps·I is added to both covariances;
    Σ1Σ2 is similar to the PSD Σ1^½Σ2Σ1^½, so its square root has real eigenvalues and sqrtm's
    imaginary parts are rounding noise, dropped after checking that those on the diagonal stay
    below 1e-3.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape,) * 2:
        raise InputError(f"statistics do not match: means {mu1.shape} and {mu2.shape}, "
                         f"covariances {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # sqrtm warns on singular products (n < D); the checks below handle them.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imaginary > 1e-3:
            raise InputError(f"the square root of Σ1Σ2 has imaginary parts up to {imaginary:.3g} "
                             "on its diagonal; the covariances are too poorly estimated (use "
                             "more images)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (negative rounding eigenvalues set to 0)."""
    values, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_psd(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                         root2: np.ndarray) -> float:
    """The Fréchet distance of fid.frechet_distance in its symmetric form: Σ1Σ2 is similar to
    Σ2^½Σ1Σ2^½, so tr((Σ1Σ2)^½) = Σ √λ_i(Σ2^½Σ1Σ2^½). root2 = psd_sqrt(Σ2). One symmetric
    eigenvalue problem instead of scipy's sqrtm, which took about a second per call on the
    ill-conditioned covariances of 128 classifier features (the bootstrap needs hundreds)."""
    diff = mu1 - mu2
    product = np.linalg.eigvalsh(root2 @ sigma1 @ root2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(root2 @ root2)
                 - 2 * np.sqrt(np.clip(product, 0, None)).sum())


def bootstrap_fid(features: dict[str, np.ndarray], reference: np.ndarray, replicates: int,
                  seed: int = 0, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """FID of each feature set against the reference features over `replicates` bootstrap
    draws: each replicate resamples the reference once (shared by every set, so differences
    between sets are paired) and each set independently, with replacement."""
    rng = np.random.default_rng(seed)
    names = sorted(features)
    out = {name: np.empty(replicates) for name in names}
    for b in range(replicates):
        mu_ref, sigma_ref = feature_statistics(
            reference[rng.integers(0, len(reference), len(reference))])
        root = psd_sqrt(sigma_ref)
        for name in names:
            values = features[name]
            pick = values[rng.integers(0, len(values), len(values))]
            out[name][b] = frechet_distance_psd(*feature_statistics(pick), mu_ref, root)
        if progress:
            progress("FID bootstrap", b + 1, replicates)
    return out


# --------------------------------------------------------------------------- feature extractors


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
                             f"{_shape_text(self.image_shape)} images, got "
                             f"{_shape_text(images.shape[1:])}")
        out = self.network(self.prepare(images))
        if not isinstance(out, Tensor) or out.ndim != 2 or len(out) != len(images):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(f"{self.source} returned {shape} for {len(images)} images; "
                             "expected a (batch, features) tensor")
        return out.to(torch.float64).cpu()


def _shape_text(shape) -> str:
    return "×".join(map(str, shape))


def default_weights(features: str) -> Path:
    """Where inception and dinov2 weights are looked for without --weights: torch's hub cache
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
        raise MissingFileError(f"inception features need torchvision's Inception v3 weights: get "
                               f"{INCEPTION_URL} and put it at {path}, or pass --weights FILE")
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
        raise MissingFileError(
            f"dinov2 features need a TorchScript export of a DINOv2 backbone at {path} (or pass "
            "--weights FILE); make one where the hub is reachable: torch.jit.trace(torch.hub."
            "load('facebookresearch/dinov2', 'dinov2_vitl14').eval(), torch.zeros(1, 3, 224, "
            f"224)).save('{DINOV2_FILE}')")
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
            raise InputError("--weights is for inception and dinov2; classifier:PATH names the "
                             "classifier folder")
        return _classifier(Path(path).expanduser(), device)
    if features in ("inception", "dinov2"):
        file = Path(weights).expanduser() if weights is not None else default_weights(features)
        return (_inception if features == "inception" else _dinov2)(file, device)
    raise InputError(f"unknown features {features!r}; choose one of: {', '.join(FEATURES)}")


# --------------------------------------------------------------------------- FID


@dataclass
class FIDResult:
    """fid: the distance; se: its bootstrap standard error over `bootstrap` replicates
    (samples and reference resampled; nan when bootstrap < 2)."""

    fid: float
    n_samples: int
    n_reference: int
    feature_dim: int
    features: str
    seconds: float
    se: float = float("nan")
    bootstrap: int = 0

    @property
    def underdetermined(self) -> bool:
        """Fewer images than features on either side: the covariance is singular and the
        distance is biased upwards by the small n."""
        return min(self.n_samples, self.n_reference) <= self.feature_dim


def check_bootstrap(bootstrap: int | None) -> None:
    if bootstrap is not None and bootstrap < 0:
        raise InputError(f"--bootstrap must be at least 0, got {bootstrap}")


def default_bootstrap(feature_dim: int) -> int:
    """Replicates of the FID bootstrap: 100, or 20 above 512 features (each replicate is an
    eigenvalue problem of feature_dim²: about 1.5 s at Inception's 2048 on 2 cores)."""
    return BOOTSTRAP_REPLICATES if feature_dim <= BOOTSTRAP_WIDE else BOOTSTRAP_REPLICATES_WIDE


def _batches(images, batch_size: int) -> Iterator[tuple[int, np.ndarray | Tensor]]:
    """(stop, batch) over a tensor, an array, or anything with batch(start, stop) and len(),
    such as memorization.Samples (read lazily)."""
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
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    parts = []
    for stop, batch in _batches(images, batch_size):
        out = extractor(torch.as_tensor(batch, dtype=torch.float32))
        parts.append(torch.as_tensor(out).detach().to(torch.float64).cpu().numpy())
        if progress is not None:
            progress(stage, stop, len(images))
    if not parts:
        raise InputError("no images to compute features of")
    return np.concatenate(parts)


def _image_shape(images) -> tuple[int, ...]:
    return tuple(images.shape) if hasattr(images, "batch") else tuple(images.shape[1:])


def fid(samples, reference, extractor: Callable[[Tensor], Tensor], batch_size: int = 64,
        progress: Progress | None = None, bootstrap: int | None = 0,
        seed: int = 0) -> FIDResult:
    """Fréchet distance between the features of samples and of reference images.

    samples, reference: N×C×H×W in [-1, 1] (tensors, arrays, or memorization.Samples) of one
    image shape. extractor: a FeatureExtractor, or any images → (B, D) callable.
    bootstrap: replicates of the standard error (bootstrap_fid, seeded by `seed`); None:
    default_bootstrap(features); 0: none.
    """
    check_bootstrap(bootstrap)
    shape, ref_shape = _image_shape(samples), _image_shape(reference)
    if shape != ref_shape:
        raise InputError(f"samples are {_shape_text(shape)} images but the reference images "
                         f"are {_shape_text(ref_shape)}")
    start = time.perf_counter()
    sample_features = extract_features(samples, extractor, batch_size, progress,
                                       "sample features")
    reference_features = extract_features(reference, extractor, batch_size, progress,
                                          "reference features")
    distance = frechet_distance(*feature_statistics(sample_features),
                                *feature_statistics(reference_features))
    dim = sample_features.shape[1]
    replicates = default_bootstrap(dim) if bootstrap is None else bootstrap
    se = float("nan")
    if replicates >= 2:
        values = bootstrap_fid({"samples": sample_features}, reference_features, replicates,
                               seed=seed, progress=progress)["samples"]
        finite = values[np.isfinite(values)]
        se = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
    return FIDResult(distance, len(sample_features), len(reference_features), dim,
                     getattr(extractor, "name", "custom"), time.perf_counter() - start,
                     se, replicates)


def parse_reference(text: str) -> tuple[str, str]:
    """DATASET or DATASET:SPLIT (train or test) → (dataset, split).

    With no split: test, except for an array or folder with no test split (npz:PATH with a
    single images array, npy:PATH, folder:PATH without PATH/test), whose images are the
    reference (train). Path data sets keep their colon: npz:PATH:train splits.
    """

    dataset, _, split = text.rpartition(":")
    if dataset and split in SPLITS:
        return dataset, split
    if dataset in dataset_names():
        raise InputError(f"unknown split {split!r} in {text!r}; choose one of: "
                         f"{', '.join(SPLITS)}")
    kind, _, path = text.partition(":")
    if text not in dataset_names() and not (f"{kind}:PATH" in dataset_names() and path):
        raise InputError(f"unknown reference data set {text!r}; valid: "
                         f"{', '.join(dataset_names())} (optionally :train or :test)")
    return text, REFERENCE_SPLIT if has_test_split(text) else "train"
