"""Fréchet distance between the feature statistics of two image sets.

FD = ‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2(Σ1Σ2)^½), the Fréchet (2-Wasserstein) distance between the
Gaussians N(μ1, Σ1) and N(μ2, Σ2) fitted to the features of samples and reference images.
Means and covariances are taken in float64 with numpy; the matrix square root is scipy's
(scipy.linalg.sqrtm), or one symmetric eigenvalue problem in the bootstrap. The features come
from features.py (inception, dinov2 or an in-domain classifier, all offline).

FID depends on the number of images (it is biased upwards for small n), so compare values
computed with the same n.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from torch import Tensor

from knnflow.analysis.features import extract_features
from knnflow.data import SPLITS, dataset_names, has_test_split
from knnflow.errors import InputError, OptionError
from knnflow.images import shape_text

Progress = Callable[[str, int, int], None]
BOOTSTRAP_REPLICATES, BOOTSTRAP_REPLICATES_WIDE, BOOTSTRAP_WIDE = 100, 20, 512
REFERENCE_SPLIT = "test"


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
        raise OptionError(f"must be at least 0, got {bootstrap}", "bootstrap")


def default_bootstrap(feature_dim: int) -> int:
    """Replicates of the FID bootstrap: 100, or 20 above 512 features (each replicate is an
    eigenvalue problem of feature_dim²: about 1.5 s at Inception's 2048 on 2 cores)."""
    return BOOTSTRAP_REPLICATES if feature_dim <= BOOTSTRAP_WIDE else BOOTSTRAP_REPLICATES_WIDE


def _image_shape(images) -> tuple[int, ...]:
    return tuple(images.shape) if hasattr(images, "batch") else tuple(images.shape[1:])


def fid(samples, reference, extractor: Callable[[Tensor], Tensor], batch_size: int = 64,
        progress: Progress | None = None, bootstrap: int | None = 0,
        seed: int = 0) -> FIDResult:
    """Fréchet distance between the features of samples and of reference images.

    samples, reference: N×C×H×W in [-1, 1] (tensors, arrays, or samples.Samples) of one
    image shape. extractor: a features.FeatureExtractor, or any images → (B, D) callable.
    bootstrap: replicates of the standard error (bootstrap_fid, seeded by `seed`); None:
    default_bootstrap(features); 0: none.
    """
    check_bootstrap(bootstrap)
    shape, ref_shape = _image_shape(samples), _image_shape(reference)
    if shape != ref_shape:
        raise InputError(f"samples are {shape_text(shape)} images but the reference images "
                         f"are {shape_text(ref_shape)}")
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
