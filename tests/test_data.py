"""Loaders: each format round-trips images written by the test, and bad input fails in one line."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from knnflow import data
from knnflow.data import PHOTO_COUNTS, PHOTO_SIZES, dataset_infos, load_dataset, synthetic_images
from knnflow.errors import InputError, MissingFileError
from knnflow.training_sets import default_index_folder


def _images(count: int, channels: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, channels, side, side),
                                                dtype=np.uint8)


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1)


def test_digits_is_embedded_with_a_fixed_split():
    train, labels = load_dataset("digits", with_labels=True)
    test = load_dataset("digits", split="test")
    assert train.shape == (1498, 1, 8, 8) and test.shape == (299, 1, 8, 8)
    assert train.dtype == torch.float32 and labels.shape == (1498,)
    assert train.min() == -1 and train.max() == 1
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 8 - 1
    assert torch.equal(torch.cat([train, test]).sort(0).values, raw[:, None].sort(0).values)


def test_limit_keeps_the_first_images():
    assert torch.equal(load_dataset("digits", limit=10), load_dataset("digits")[:10])


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


def test_npz_labels_beside_the_images(tmp_path):
    images = _images(6, 1, 8, seed=4)
    np.savez(tmp_path / "one.npz", images=images, labels=np.arange(6) % 3)
    loaded, labels = load_dataset(f"npz:{tmp_path / 'one.npz'}", with_labels=True)
    assert torch.equal(loaded, _unit(images)) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    np.savez(tmp_path / "split.npz", x_train=images[:4], y_train=np.array([1, 1, 0, 0]),
             x_test=images[4:], y_test=np.array([0, 1]))
    _, test_labels = load_dataset(f"npz:{tmp_path / 'split.npz'}", split="test",
                                  with_labels=True)
    assert test_labels.tolist() == [0, 1]
    np.savez(tmp_path / "short.npz", images=images, labels=np.arange(5))
    with pytest.raises(InputError, match="5 labels in 'labels' for 6 images"):
        load_dataset(f"npz:{tmp_path / 'short.npz'}", with_labels=True)


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
    with pytest.raises(InputError, match="celeba comes in --size 64 or 32 or 128"):
        load_dataset("celeba", root=tmp_path, size=100)


def test_folder_npz_and_npy_give_the_same_images(tmp_path):
    images = _images(6, 3, 16)
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:02d}.png")
    np.save(tmp_path / "a.npy", images)
    np.savez(tmp_path / "b.npz", images=_unit(images).numpy())
    from_folder = load_dataset(f"folder:{tmp_path / 'imgs'}")
    from_npy = load_dataset(f"npy:{tmp_path / 'a.npy'}")
    from_npz = load_dataset(f"npz:{tmp_path / 'b.npz'}")
    assert torch.equal(from_folder, _unit(images))
    assert torch.equal(from_npy, from_folder)
    assert torch.allclose(from_npz, from_folder)


def test_folder_size_resizes_and_grayscale_stays_one_channel(tmp_path):
    for i in range(2):
        Image.fromarray(_images(1, 1, 20, seed=i)[0, 0]).save(tmp_path / f"{i}.png")
    loaded = load_dataset(f"folder:{tmp_path}", size=8)
    assert loaded.shape == (2, 1, 8, 8)


def test_folder_of_mixed_sizes_asks_for_size(tmp_path):
    Image.fromarray(_images(1, 3, 8)[0].transpose(1, 2, 0)).save(tmp_path / "a.png")
    Image.fromarray(_images(1, 3, 9)[0].transpose(1, 2, 0)).save(tmp_path / "b.png")
    with pytest.raises(InputError, match="--size"):
        load_dataset(f"folder:{tmp_path}")


def test_npz_with_splits(tmp_path):
    np.savez(tmp_path / "s.npz", train=_images(4, 1, 8), test=_images(2, 1, 8, seed=1))
    assert load_dataset(f"npz:{tmp_path / 's.npz'}").shape == (4, 1, 8, 8)
    assert load_dataset(f"npz:{tmp_path / 's.npz'}", split="test").shape == (2, 1, 8, 8)


def test_channels_last_arrays_are_transposed(tmp_path):
    images = _images(3, 3, 8)
    np.save(tmp_path / "hwc.npy", images.transpose(0, 2, 3, 1))
    assert torch.equal(load_dataset(f"npy:{tmp_path / 'hwc.npy'}"), _unit(images))


def test_synthetic_is_seeded_and_in_range():
    a = synthetic_images(100, (3, 32, 32), seed=0)
    assert torch.equal(a, synthetic_images(100, (3, 32, 32), seed=0))
    assert a.shape == (100, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, synthetic_images(100, (3, 32, 32), seed=1))
    assert load_dataset("synthetic", limit=7).shape == (7, 3, 32, 32)


def test_every_listed_dataset_has_a_shape_and_a_location():
    names = {info.name for info in dataset_infos()}
    expected = {"digits", "mnist", "cifar10", "celeba", "celeba64", "folder:PATH", "npz:PATH",
                "npy:PATH"}
    assert expected <= names
    assert all(info.shape and info.location for info in dataset_infos())


@pytest.mark.parametrize("name, expected", [
    ("mnist", "train-images-idx3-ubyte"),
    ("cifar10", "data_batch_1"),
    ("celeba64", "img_align_celeba"),
    ("celeba", "list_eval_partition.txt"),
])
def test_missing_files_name_the_expected_path(tmp_path, name, expected):
    with pytest.raises(MissingFileError, match=expected) as info:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(InputError, match="digits.*mnist.*cifar10"):
        load_dataset("imagenet")


def test_bad_split_and_limit():
    with pytest.raises(InputError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(InputError, match="limit"):
        load_dataset("digits", limit=0)


def test_arrays_outside_the_unit_range_and_nan_are_refused(tmp_path):
    np.save(tmp_path / "big.npy", np.full((2, 1, 4, 4), 3.0, dtype=np.float32))
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        load_dataset(f"npy:{tmp_path / 'big.npy'}")
    bad = np.zeros((2, 1, 4, 4), dtype=np.float32)
    bad[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match="NaN"):
        load_dataset(f"npy:{tmp_path / 'nan.npy'}")


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="broken.png"):
        load_dataset(f"folder:{tmp_path}")


# --------------------------------------------------------------------------- photos


@pytest.fixture(scope="module")
def photos_data(tmp_path_factory):
    """A data folder (for $KNNFLOW_DATA) whose photos/ holds both sizes, each cut once here
    (about 9 s and 5 s): every other photos test reads these caches."""
    base = tmp_path_factory.mktemp("data")
    for size in PHOTO_SIZES:
        load_dataset("photos", root=base / "photos", size=size, limit=1)
    return base


def _knnflow(*args: str, cwd, **env_vars: str) -> subprocess.CompletedProcess:
    """The command line as a user runs it (as tests/test_cli.py does; errors one line)."""
    env = {k: v for k, v in os.environ.items() if k != "KNNFLOW_DEBUG"}
    env.update(COLUMNS="200", **env_vars)
    return subprocess.run([sys.executable, "-m", "knnflow.cli.main", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def _cached(base, size: int) -> np.ndarray:
    return np.load(base / "photos" / f"photos-{size}.npy", mmap_mode="r")


def _no_cutting(*args):
    raise AssertionError("the patches were cut again instead of read from the cache")


@pytest.mark.parametrize("size, count, n_train", [(32, 50_442, 45_000), (64, 11_781, 10_500)])
def test_photos_recipe_counts_splits_and_range(photos_data, monkeypatch, size, count, n_train):
    cached = _cached(photos_data, size)
    assert cached.shape == (count, 3, size, size) and cached.dtype == np.uint8
    assert PHOTO_COUNTS[size] == count and PHOTO_SIZES[size][1] == n_train
    monkeypatch.setattr(data, "photo_patches", _no_cutting)  # a second load reads the cache
    root = photos_data / "photos"
    train = load_dataset("photos", root=root, size=size)
    test = load_dataset("photos", root=root, size=size, split="test")
    assert train.shape == (n_train, 3, size, size)
    assert test.shape == (count - n_train, 3, size, size)
    assert train.dtype == torch.float32 and test.dtype == torch.float32
    assert train.min() == -1 and train.max() == 1 and test.min() >= -1 and test.max() <= 1
    # The splits are the cached patches in order, mapped 0..255 -> [-1, 1].
    assert torch.equal(train[:50], _unit(np.asarray(cached[:50])))
    assert torch.equal(test[-50:], _unit(np.asarray(cached[-50:])))
    # Flat windows (pixel standard deviation ≤ 4 of 255) were dropped.
    assert (train[:2000].flatten(1).std(dim=1) > 4 / 127.5).all()
    info = next(info for info in dataset_infos() if info.name == "photos")
    assert f"{n_train} / {count - n_train}" in info.size


def test_photos_default_size_is_32_and_other_sizes_are_refused(photos_data, monkeypatch):
    monkeypatch.setattr(data, "photo_patches", _no_cutting)
    root = photos_data / "photos"
    assert torch.equal(load_dataset("photos", root=root, size=32, limit=4),
                       load_dataset("photos", root=root, limit=4))
    with pytest.raises(InputError, match="32 or 64, got 48"):
        load_dataset("photos", root=root, size=48)
    with pytest.raises(InputError, match="folder:PATH and photos, celeba only"):
        load_dataset("digits", size=8)


def _count_cuts(monkeypatch, base) -> list[int]:
    """Replace the recipe by the module's cached patches; returns the sizes it was asked for."""
    calls = []

    def cut(size: int = 32):
        calls.append(size)
        return np.asarray(_cached(base, size))

    monkeypatch.setattr(data, "photo_patches", cut)
    return calls


@pytest.mark.parametrize("damage", ["empty", "truncated", "another shape", "an npz archive"])
def test_photos_corrupt_cache_is_cut_again_and_replaced(photos_data, monkeypatch, tmp_path,
                                                        damage):
    good = photos_data / "photos" / "photos-32.npy"
    cache = tmp_path / "photos-32.npy"
    if damage == "empty":
        cache.write_bytes(b"")
    elif damage == "truncated":  # header intact, data cut short, as by an interrupted copy
        with open(good, "rb") as f:
            cache.write_bytes(f.read(1 << 20))
    elif damage == "another shape":
        np.save(cache, np.zeros((10, 3, 32, 32), dtype=np.uint8))
    else:
        with open(cache, "wb") as f:
            np.savez(f, images=np.zeros((2, 3, 32, 32), dtype=np.uint8))
    calls = _count_cuts(monkeypatch, photos_data)
    loaded = load_dataset("photos", root=tmp_path, split="test", limit=5)
    assert calls == [32]
    assert torch.equal(loaded, _unit(np.asarray(_cached(photos_data, 32)[45_000:45_005])))
    assert [p.name for p in tmp_path.iterdir()] == ["photos-32.npy"]  # no temporary left
    assert cache.stat().st_size == good.stat().st_size
    load_dataset("photos", root=tmp_path, limit=1)
    assert calls == [32]  # the replaced cache is read


@pytest.mark.parametrize("failing", ["open", "replace"])
def test_photos_read_only_data_folder_cuts_each_time(photos_data, monkeypatch, tmp_path,
                                                     failing):
    """Root runs these tests, for whom chmod does not stop writes: the write fails instead,
    where a read-only folder (open) or a full disk (the rename after writing) makes it fail."""
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    if failing == "open":
        monkeypatch.setattr(data, "open", refuse, raising=False)
    else:
        monkeypatch.setattr(data.os, "replace", refuse)
    calls = _count_cuts(monkeypatch, photos_data)
    for _ in range(2):
        loaded = load_dataset("photos", root=tmp_path, size=64, limit=3)
        assert loaded.shape == (3, 3, 64, 64)
    assert calls == [64, 64]
    assert list(tmp_path.iterdir()) == []


def test_photos_without_scikit_image_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage raises ImportError
    with pytest.raises(MissingFileError, match="scikit-image") as info:
        load_dataset("photos", root=tmp_path)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_photos_missing_photograph_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_photos_folder", lambda: tmp_path / "skimage-data")
    with pytest.raises(MissingFileError, match="astronaut") as info:
        load_dataset("photos", root=tmp_path / "cache")
    assert str(tmp_path / "skimage-data") in str(info.value) and "\n" not in str(info.value)


def test_index_folders_of_the_two_photo_sizes_differ():
    assert default_index_folder("photos", "train") == default_index_folder("photos", "train", 32)
    assert str(default_index_folder("photos", "train")) == "indices/photos-train"
    assert str(default_index_folder("photos", "train", 64)) == "indices/photos64-train"
    assert str(default_index_folder("folder:a/imgs", "test", 16)) == "indices/folder-imgs16-test"
    assert str(default_index_folder("folder:b/cifar10", "train", 16)) \
        == "indices/folder-cifar10-16-train"


def test_build_index_photos_64_records_the_size(photos_data, tmp_path):
    result = _knnflow("build-index", "photos", "--size", "64", "--limit", "40", cwd=tmp_path,
                 KNNFLOW_DATA=str(photos_data))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "indices" / "photos64-train" / "manifest.json").read_text())
    described = manifest["dataset"]
    assert described["size"] == 64 and manifest["image_shape"] == [3, 64, 64]
    assert not (tmp_path / "indices" / "photos-train").exists()
    # What the manifest records loads the same images again.
    again = load_dataset(described["name"], root=photos_data / "photos", split=described["split"],
                         limit=described["limit"], size=described["size"])
    assert again.shape == (40, 3, 64, 64)


@pytest.mark.parametrize("args, fragments", [
    (("photos", "--size", "48"), ("photos comes in --size 32 or 64, got 48",)),
    (("digits", "--size", "8"), ("--size applies to folder:PATH and photos, celeba only",
                                 "digits")),
])
def test_build_index_size_mistakes_are_one_line_before_any_work(tmp_path, args, fragments):
    result = _knnflow("build-index", *args, cwd=tmp_path, KNNFLOW_DATA=str(tmp_path / "data"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments)
    assert list(tmp_path.iterdir()) == []


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
