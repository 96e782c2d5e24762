"""A small in-domain classifier whose penultimate features give an offline Fréchet distance.

The paper measured MNIST samples with the features of a classifier trained on MNIST, not with
Inception (trained on ImageNet photographs, it sees digits as out-of-domain blobs). This is
that classifier: a few 3×3 convolutions, trained with Adam on the train split, tested on the
test split. Its features are the spatial mean of its last convolution (after ReLU), like
Inception's pool features; the linear layer on top gives the class logits.

A classifier folder holds classifier.safetensors (the weights) and classifier.json (the
architecture, image shape, data set, accuracies and the weights' sha256), written atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from knnflow.choices import SMALL_DATASET
from knnflow.data import has_test_split, load_dataset
from knnflow.errors import InputError, MissingFileError, OptionError
from knnflow.files import atomic_folder, sha256_file

Progress = Callable[[str, int, int], None]
FORMAT_VERSION = 1
WEIGHTS_FILE = "classifier.safetensors"
RECORD_FILE = "classifier.json"
EPOCHS_SMALL, EPOCHS_LARGE = 10, 3
HELD_OUT_DIVISOR = 10


class ClassifierNet(nn.Module):
    """Per level: two 3×3 convolutions (each with batch norm and ReLU) and a 2×2 max pool,
    width doubling per level; then a 3×3 convolution to feature_dim channels (batch norm,
    ReLU), averaged over space (the features); then a linear layer to the class logits.

    Levels: halve the image until it is 2 to 3 pixels across, at most 3 times (8 → 2;
    28 → 3; 32 → 4).
    """

    def __init__(self, image_shape: tuple[int, ...], classes: int, width: int = 16,
                 feature_dim: int = 128):
        super().__init__()
        if len(image_shape) != 3:
            raise InputError(f"the classifier needs C×H×W images, got shape {image_shape}")
        self.image_shape, self.classes = tuple(image_shape), classes
        self.levels = classifier_levels(self.image_shape)
        layers: list[nn.Module] = []
        channels = image_shape[0]
        for level in range(self.levels):
            out = width * 2 ** level
            layers += [*_conv(channels, out), *_conv(out, out), nn.MaxPool2d(2)]
            channels = out
        layers += _conv(channels, feature_dim)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] → (B, feature_dim), the input of the last layer."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv(channels: int, out: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]


def classifier_levels(image_shape: tuple[int, ...]) -> int:
    side = min(image_shape[1:])
    if side < 4:
        raise InputError(f"images of {'×'.join(map(str, image_shape))} are too small for the "
                         "classifier (at least 4×4)")
    return min(3, int(math.log2(side)) - 1)


def build_classifier(architecture: dict) -> ClassifierNet:
    """The network described by a classifier.json's architecture."""
    if architecture.get("kind") != "cnn":
        raise InputError(f"unknown classifier architecture {architecture.get('kind')!r}")
    return ClassifierNet(tuple(architecture["image_shape"]), architecture["classes"],
                         architecture["width"], architecture["feature_dim"])


def _labelled(dataset: str, root, split: str, limit: int | None) -> tuple[Tensor, Tensor]:
    images, labels = load_dataset(dataset, root, split, limit, with_labels=True)
    if labels is None:
        raise InputError(f"{dataset} ({split}) has no class labels; train-classifier needs a "
                         "labelled data set: digits, mnist (with its label files), cifar10, "
                         "or npz:PATH with a labels array")
    return images, labels.to(torch.int64)


def shift_augment(images: Tensor, shift: int, gen: torch.Generator) -> Tensor:
    """Each image moved by a random (dy, dx) in [-shift, shift]², edges replicated."""
    count, _, height, width = images.shape
    padded = nn.functional.pad(images, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, count, 1), generator=gen)
    rows = (torch.arange(height) + dy)[:, :, None]
    cols = (torch.arange(width) + dx)[:, None, :]
    return padded[torch.arange(count)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(images)


def check_training_options(*, limit: int | None = None, epochs: int | None = None,
                           batch_size: int = 64, lr: float = 3e-3, width: int = 16,
                           feature_dim: int = 128, shift: int = 1) -> None:
    """A one-line InputError unless train_classifier's options are valid (before any work)."""
    for name, value in (("batch_size", batch_size), ("width", width),
                        ("feature_dim", feature_dim), ("limit", limit), ("epochs", epochs)):
        if value is not None and value < 1:
            raise OptionError(f"must be at least 1, got {value}", name)
    if not lr > 0 or not math.isfinite(lr):
        raise OptionError(f"must be a positive number, got {lr}", "lr")
    if shift < 0:
        raise OptionError(f"must be at least 0, got {shift}", "shift")


def train_classifier(dataset: str = "digits", root: str | Path | None = None,
                     limit: int | None = None, epochs: int | None = None, batch_size: int = 64,
                     lr: float = 3e-3, width: int = 16, feature_dim: int = 128, shift: int = 1,
                     seed: int = 0, device: str = "cpu",
                     progress: Progress | None = None) -> tuple[ClassifierNet, dict]:
    """Train on the train split (first `limit` images), test on the whole test split; a
    data set with no test split (an .npz of images and labels) holds out its last tenth.

    Adam with a cosine decay of the learning rate to 0, random shifts of up to `shift` pixels
    (edges replicated); epochs default to 10 for data sets under 10,000 training images and 3
    otherwise. Seeded: the initial weights come from torch.manual_seed(seed), the batch order
    and shifts from a generator seeded with seed + 1.
    Returns the model (in eval mode) and the record that classifier.json holds.
    """
    check_training_options(limit=limit, epochs=epochs, batch_size=batch_size, lr=lr,
                           width=width, feature_dim=feature_dim, shift=shift)
    if has_test_split(dataset):
        train_x, train_y = _labelled(dataset, root, "train", limit)
        test_x, test_y = _labelled(dataset, root, "test", None)
        tested_on = "the test split"
    else:  # an array or folder with no test split: its last tenth is held out
        images, labels = _labelled(dataset, root, "train", None)
        held = max(1, len(images) // HELD_OUT_DIVISOR)
        if len(images) - held < 1:
            raise InputError(f"{dataset} has {len(images)} image(s): too few to hold out a "
                             "test set")
        train_x, train_y = images[:-held][:limit], labels[:-held][:limit]
        test_x, test_y = images[-held:], labels[-held:]
        tested_on = f"its last {held} images (no test split)"
    if epochs is None:
        epochs = EPOCHS_SMALL if len(train_x) < SMALL_DATASET else EPOCHS_LARGE
    classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(seed)
    model = ClassifierNet(tuple(train_x.shape[1:]), classes, width, feature_dim).to(device)
    order_gen = torch.Generator().manual_seed(seed + 1)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    start, step = time.perf_counter(), 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=order_gen)
        for first in range(0, len(train_x), batch_size):
            ids = order[first:first + batch_size]
            batch = shift_augment(train_x[ids], shift, order_gen) if shift else train_x[ids]
            loss = nn.functional.cross_entropy(model(batch.to(device)),
                                               train_y[ids].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if progress is not None:
                progress("training", step, total)
    train_seconds = time.perf_counter() - start
    model.eval()
    record = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "image_shape": list(train_x.shape[1:]),
        "architecture": {"kind": "cnn", "image_shape": list(train_x.shape[1:]),
                         "classes": classes, "width": width, "feature_dim": feature_dim,
                         "levels": model.levels},
        "parameters": sum(p.numel() for p in model.parameters()),
        "n_train": len(train_x), "n_test": len(test_x), "tested_on": tested_on,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "shift": shift, "seed": seed,
        "train_seconds": round(train_seconds, 3),
        "final_loss": float(loss.detach()),
        "train_accuracy": accuracy(model, train_x, train_y),
        "test_accuracy": accuracy(model, test_x, test_y),
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    return model, record


def save_classifier(folder: str | Path, model: ClassifierNet, record: dict,
                    overwrite: bool = False) -> Path:
    """Write FOLDER/classifier.safetensors and classifier.json (with the weights' sha256) to a
    temporary sibling, then rename it to FOLDER."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite, kind="classifier") as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(weights))
        record = {**record, "sha256": sha256_file(weights)}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def load_classifier(folder: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[ClassifierNet, dict]:
    """The classifier saved in FOLDER (in eval mode) and its record; refuses weights whose
    sha256 differs from the record's."""
    from safetensors.torch import load_file

    folder = Path(folder)
    record_path, weights = folder / RECORD_FILE, folder / WEIGHTS_FILE
    if not record_path.is_file() or not weights.is_file():
        raise MissingFileError(f"no classifier at {folder}: expected {RECORD_FILE} and "
                               f"{WEIGHTS_FILE} (make one with knnflow train-classifier "
                               "DATASET)")
    try:
        record = json.loads(record_path.read_text())
        architecture, expected = record["architecture"], record["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{record_path} is not a classifier record: "
                         f"{err.__class__.__name__}") from None
    if record.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{record_path} has format version {record.get('format_version')}; "
                         f"this knnflow reads version {FORMAT_VERSION}")
    if sha256_file(weights) != expected:
        raise InputError(f"{weights} does not match the sha256 in {record_path}; retrain with "
                         "knnflow train-classifier")
    model = build_classifier(architecture)
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval(), record
