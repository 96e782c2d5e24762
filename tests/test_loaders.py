"""Readers of the distributed layouts: digits, MNIST idx files, CIFAR-10 batches and CelebA,
each on files the test writes."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from test_image_files import _images, _unit

from knnflow.data import load_dataset
from knnflow.errors import InputError


def test_digits_is_embedded_with_a_fixed_split():
    train, labels = load_dataset("digits", with_labels=True)
    test = load_dataset("digits", split="test")
    assert train.shape == (1498, 1, 8, 8) and test.shape == (299, 1, 8, 8)
    assert train.dtype == torch.float32 and labels.shape == (1498,)
    assert train.min() == -1 and train.max() == 1
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 8 - 1
    assert torch.equal(torch.cat([train, test]).sort(0).values, raw[:, None].sort(0).values)


def _write_idx(path, images: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", *images.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + images.tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files(tmp_path, compress):
    images = _images(5, 1, 28)[:, 0]
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    _write_idx(tmp_path / name, images, compress)
    loaded = load_dataset("mnist", root=tmp_path)
    assert torch.equal(loaded, _unit(images[:, None]))


def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = _images(3, 1, 28, seed=2)[:, 0]
    _write_idx(raw / "t10k-images-idx3-ubyte", images, False)
    assert load_dataset("mnist", root=tmp_path, split="test").shape == (3, 1, 28, 28)


@pytest.mark.parametrize("name", ["mnist-t10k-images-idx3-ubyte.gz", "t10k-images.idx3-ubyte"])
def test_mnist_files_with_a_prefix_or_dots(tmp_path, name):
    # Copies renamed by other mirrors and archives: a prefix, or dots for the dashes.
    images = _images(4, 1, 28, seed=3)[:, 0]
    _write_idx(tmp_path / name, images, name.endswith(".gz"))
    loaded = load_dataset("mnist", root=tmp_path, split="test")
    assert torch.equal(loaded, _unit(images[:, None]))
    if name.startswith("mnist-"):  # two prefixed copies: which one is meant is unclear
        _write_idx(tmp_path / ("other-" + name), images, True)
        with pytest.raises(InputError, match="several files"):
            load_dataset("mnist", root=tmp_path, split="test")


def test_cifar10_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for i in range(1, 6):
        images = _images(4, 3, 32, seed=i)
        batches.append(images)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": images.reshape(4, -1), b"labels": [i] * 4}, f)
    loaded, labels = load_dataset("cifar10", root=tmp_path, with_labels=True)
    assert torch.equal(loaded, _unit(np.concatenate(batches)))
    assert labels.tolist() == [i for i in range(1, 6) for _ in range(4)]
    assert load_dataset("cifar10", root=tmp_path, limit=6).shape == (6, 3, 32, 32)


def fake_celeba(root, count: int = 3) -> None:
    """A small CelebA tree in torchvision's layout under root: aligned 178×218 JPEGs and
    the official partition file (the last image in the test split)."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    lines = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "img_align_celeba" / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg {0 if i < count - 1 else 2}")
    (base / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_celeba_crops_and_resizes(tmp_path):
    fake_celeba(tmp_path)
    train = load_dataset("celeba", root=tmp_path)
    test = load_dataset("celeba", root=tmp_path, split="test")
    assert train.shape == (2, 3, 64, 64) and test.shape == (1, 3, 64, 64)
    assert train.min() >= -1 and train.max() <= 1
    assert torch.equal(load_dataset("celeba64", root=tmp_path), train)  # the alias
    assert load_dataset("celeba", root=tmp_path, size=32).shape == (2, 3, 32, 32)
    with pytest.raises(InputError, match="celeba comes in size 64 or 32 or 128"):
        load_dataset("celeba", root=tmp_path, size=100)


def test_build_index_celeba_as_typed(tmp_path):
    """`knnflow build-index celeba`, as typed, on a small fake CelebA tree where the default
    root expects it (data/celeba/celeba/...): 64×64 images in indices/celeba-train. Without
    the tree, one line naming the folder and torchvision's layout."""
    from test_cli import assert_one_line_error, run

    missing = run("build-index", "celeba", cwd=tmp_path)
    assert_one_line_error(missing, "data/celeba/img_align_celeba", "torchvision's layout")
    fake_celeba(tmp_path / "data" / "celeba", count=5)
    built = run("build-index", "celeba", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    manifest = json.loads((tmp_path / "indices" / "celeba-train" / "manifest.json").read_text())
    assert manifest["n"] == 4 and manifest["image_shape"] == [3, 64, 64]
    assert_one_line_error(run("build-index", "celeba", "--size", "0", cwd=tmp_path),
                          "--size must be at least 1")
    assert_one_line_error(run("build-index", "celeba", "--size", "100", cwd=tmp_path),
                          "64 or 32 or 128")
