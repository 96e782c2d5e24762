"""knnflow fid and knnflow train-classifier."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from knnflow.choices import DINOV2_FILE, INCEPTION_FILE, SMALL_DATASET
from knnflow.data import dataset_sources, load_dataset
from knnflow.errors import InputError
from knnflow.files import check_output_folder

if TYPE_CHECKING:
    from knnflow.analysis.features import FeatureExtractor
    from knnflow.samples import Samples

from .console import console, err_console, key_value_table, progress_bar


def default_classifier_folder(dataset: str) -> Path:
    """classifiers/<dataset>."""
    from knnflow.training_sets import dataset_slug

    return Path("classifiers") / dataset_slug(dataset)


def _shape_text(shape) -> str:
    return "×".join(map(str, shape))


def _open_samples(path: Path, shape: tuple[int, ...], reference: str) -> Samples:
    """SAMPLES, which must have the reference's image shape."""
    from knnflow.samples import load_samples

    try:
        return load_samples(path, shape)
    except InputError:
        # Open again allowing any shape, only to name both shapes; other problems re-raise.
        found = load_samples(path, shape, resize=True).shape
        if found == shape:
            raise
        raise InputError(f"samples in {path} are {_shape_text(found)} images but the reference "
                         f"{reference} images are {_shape_text(shape)}") from None


def _extractor(features: str, weights: Optional[Path], dataset: str,
               device: str) -> FeatureExtractor:
    from knnflow.analysis.features import feature_extractor

    if features == "classifier":
        features = f"classifier:{default_classifier_folder(dataset)}"
    return feature_extractor(features, weights, device)


def fid(
    samples: Annotated[Path, typer.Argument(
        help="Generated samples: a folder of images, an .npz or .npy array N×C×H×W in [-1, 1] "
             "or uint8 0..255, or a run's samples folder (holding samples.npz).",
        show_default=False)],
    ref: Annotated[str, typer.Option(
        help="Reference images: DATASET or DATASET:SPLIT, SPLIT train or test, default test "
             "(held-out images, so copies of the training set do not score 0; published "
             "CIFAR-10 FIDs use train). Any data set of knnflow datasets, e.g. digits, "
             "mnist:train, npz:PATH:train.", show_default=False)],
    features: Annotated[str, typer.Option(
        help="inception (torchvision's Inception v3, 2048-d pool features; not the TF-FID "
             "network, so not comparable with published FIDs), dinov2 (a TorchScript DINOv2 "
             "backbone), classifier:PATH (a folder from knnflow train-classifier) or classifier "
             "(classifiers/<ref data set>).")] = "classifier",
    weights: Annotated[Optional[Path], typer.Option(
        help=f"inception: the state dict {INCEPTION_FILE}; dinov2: a TorchScript file "
             f"(default: {DINOV2_FILE}); both default to $TORCH_HOME/hub/checkpoints, "
             "i.e. ~/.cache/torch/hub/checkpoints. Nothing is downloaded.")] = None,
    root: Annotated[Optional[Path], typer.Option(
        help="Folder holding the reference data set's files (default: data/NAME).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Use the first N samples only (default: all).")] = None,
    ref_limit: Annotated[Optional[int], typer.Option(
        help="Use the first N reference images only (default: the whole split).")] = None,
    size: Annotated[Optional[int], typer.Option(
        help="The reference's --size, as in build-index: photos 32 or 64, celeba 64, 32 or "
             "128, folder:PATH any side.")] = None,
    bootstrap: Annotated[Optional[int], typer.Option(
        help="Bootstrap replicates of the ± standard error (samples and reference "
             "resampled; default 100, or 20 above 512 features; 0: none).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per feature batch.")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON on stdout, for scripts.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        help="Also write the result to OUT/summary.json (a folder, as for the other "
             "commands; default: print only).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Fréchet distance between the feature statistics (mean, covariance) of samples and of a
    reference data set, with a bootstrap standard error. FID grows as n shrinks: compare
    values at equal n."""
    from knnflow.analysis import fid as fid_analysis
    from knnflow.analysis.fid import check_bootstrap, parse_reference
    from knnflow.data import check_size
    from knnflow.devices import resolve_device
    from knnflow.files import atomic_folder

    for option, value in (("--limit", limit), ("--ref-limit", ref_limit),
                          ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be at least 1, got {value}")
    check_bootstrap(bootstrap)
    dataset, split = parse_reference(ref)
    size = check_size(dataset, size)
    device = resolve_device(device)
    extractor = _extractor(features, weights, dataset, device)
    if out is not None:
        out = check_output_folder(out, overwrite, "fid", [samples, root, extractor.source,
                                                         weights, *dataset_sources(dataset)])
    reference = load_dataset(dataset, root, split, ref_limit, size=size)
    shape = tuple(reference.shape[1:])
    opened = _open_samples(samples, shape, f"{dataset} ({split})")
    if extractor.image_shape is not None and extractor.image_shape != shape:
        raise InputError(f"the classifier {extractor.source} takes "
                         f"{_shape_text(extractor.image_shape)} images but the reference "
                         f"{dataset} is {_shape_text(shape)}")
    sample_images = opened if limit is None or limit >= len(opened) else opened.batch(0, limit)
    with progress_bar() as progress:
        result = fid_analysis.fid(sample_images, reference, extractor, batch_size, progress,
                                  bootstrap=bootstrap)
    warning = None
    if result.underdetermined:
        warning = (f"{min(result.n_samples, result.n_reference)} images for "
                   f"{result.feature_dim} features: the covariance is singular and the "
                   "distance is biased upwards by the small n; compare only at equal n")
    summary = {**asdict(result), "weights": extractor.source, "samples": str(samples),
               "samples_input": opened.detected, "reference": f"{dataset}:{split}",
               "image_shape": list(shape), "warning": warning}
    if math.isnan(summary["se"]):
        summary["se"] = None  # JSON has no NaN: no bootstrap, or too few finite replicates
    if out is not None:
        with atomic_folder(out, overwrite, "fid") as tmp:
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if warning is not None:
        err_console.print(f"warning: {warning}", soft_wrap=True)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    spread = (f" ± {result.se:.2g} (bootstrap, {result.bootstrap} replicates)"
              if not math.isnan(result.se) else "")
    rows = [("Fréchet distance", f"{result.fid:.6g}{spread}"),
            ("samples", f"{result.n_samples} ({samples}, {opened.detected})"),
            ("reference", f"{result.n_reference} ({dataset}, {split} split)"),
            ("image shape", _shape_text(shape)),
            ("features", f"{result.features}, {result.feature_dim}-d ({extractor.source})"),
            ("seconds", f"{result.seconds:.1f}")]
    if out is not None:
        rows.append(("written to", out / "summary.json"))
    console.print(key_value_table(f"FID ({result.features} features)", rows))


def train_classifier(
    dataset: Annotated[str, typer.Argument(
        help="Labelled data set: digits, mnist (with its label files), cifar10, or "
             "npz:PATH holding images and labels (keys images/labels, or x_train/y_train and "
             "x_test/y_test; with no test arrays its last tenth is held out).")] = "digits",
    root: Annotated[Optional[Path], typer.Option(
        help="Folder holding the data set's files (default: data/NAME).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Train on the first N training images only (the test split is always whole).")]
    = None,
    epochs: Annotated[Optional[int], typer.Option(
        help=f"Passes over the training images (default: 10 under {SMALL_DATASET:,} "
             "images, as for digits; 3 otherwise).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(
        help="Adam learning rate, decayed to 0 on a cosine.")] = 3e-3,
    width: Annotated[int, typer.Option(
        help="Channels of the first convolutions (doubled at each of the 2-3 levels).")] = 16,
    feature_dim: Annotated[int, typer.Option(
        help="Feature dimension: channels of the last convolution, averaged over space.")]
    = 128,
    shift: Annotated[int, typer.Option(
        help="Augmentation: random shifts of up to SHIFT pixels (0: none).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the weights, batch order and shifts.")]
    = 0,
    out: Annotated[Optional[Path], typer.Option(
        help="Classifier folder (default: classifiers/DATASET).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing classifier folder.")]
    = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the classifier's record as JSON on stdout, for scripts.")]
    = False,
) -> None:
    """Train a small in-domain CNN classifier (train split, tested on the test split) whose
    penultimate features give an offline Fréchet distance: knnflow fid --features
    classifier:FOLDER. Writes classifier.safetensors and classifier.json."""
    from knnflow.analysis.classifier import check_training_options, save_classifier
    from knnflow.analysis.classifier import train_classifier as train_classifier_model
    from knnflow.devices import resolve_device

    check_training_options(limit=limit, epochs=epochs, batch_size=batch_size, lr=lr,
                           width=width, feature_dim=feature_dim, shift=shift)
    device = resolve_device(device)
    folder = check_output_folder(out if out is not None else default_classifier_folder(dataset),
                                 overwrite, "classifier", dataset_sources(dataset, root))
    with progress_bar() as progress:
        model, record = train_classifier_model(
            dataset, root=root, limit=limit, epochs=epochs, batch_size=batch_size, lr=lr,
            width=width, feature_dim=feature_dim, shift=shift, seed=seed, device=device,
            progress=progress)
    save_classifier(folder, model, record, overwrite=overwrite)
    if as_json:
        print(json.dumps({**record, "folder": str(folder)}, indent=2))
        return
    console.print(key_value_table(f"Classifier of {dataset} written to {folder}", [
        ("image shape", _shape_text(record["image_shape"])),
        ("classes", record["architecture"]["classes"]),
        ("parameters", f"{record['parameters']:,}"),
        ("features", f"{record['architecture']['feature_dim']}-d"),
        ("training images", f"{record['n_train']} ({record['epochs']} epochs)"),
        ("train seconds", f"{record['train_seconds']:.1f}"),
        ("train accuracy", f"{record['train_accuracy']:.2%}"),
        ("test accuracy", f"{record['test_accuracy']:.2%} of {record['n_test']} "
                          f"({record['tested_on']})"),
        ("use it", f"knnflow fid SAMPLES --ref {dataset} --features classifier:{folder}")]))
