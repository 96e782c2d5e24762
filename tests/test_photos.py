"""The photos data set: the recipe's counts and splits, its cache (read, replaced when
damaged, skipped where the folder is read-only) and one-line errors without scikit-image."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from test_cli import run
from test_image_files import _unit

from knnflow import photos
from knnflow.data import dataset_infos, load_dataset
from knnflow.errors import InputError, MissingFileError
from knnflow.photos import PHOTO_COUNTS, PHOTO_SIZES


@pytest.fixture(scope="module")
def photos_data(tmp_path_factory):
    """A data folder (for $KNNFLOW_DATA) whose photos/ holds both sizes, each cut once here
    (about 9 s and 5 s): every other photos test reads these caches."""
    base = tmp_path_factory.mktemp("data")
    for size in PHOTO_SIZES:
        load_dataset("photos", root=base / "photos", size=size, limit=1)
    return base


def _cached(base, size: int) -> np.ndarray:
    return np.load(base / "photos" / f"photos-{size}.npy", mmap_mode="r")


def _no_cutting(*args):
    raise AssertionError("the patches were cut again instead of read from the cache")


@pytest.mark.parametrize("size, count, n_train", [(32, 50_442, 45_000), (64, 11_781, 10_500)])
def test_photos_recipe_counts_splits_and_range(photos_data, monkeypatch, size, count, n_train):
    cached = _cached(photos_data, size)
    assert cached.shape == (count, 3, size, size) and cached.dtype == np.uint8
    assert PHOTO_COUNTS[size] == count and PHOTO_SIZES[size][1] == n_train
    monkeypatch.setattr(photos, "photo_patches", _no_cutting)  # a second load reads the cache
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
    monkeypatch.setattr(photos, "photo_patches", _no_cutting)
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

    monkeypatch.setattr(photos, "photo_patches", cut)
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
        monkeypatch.setattr(photos, "open", refuse, raising=False)
    else:
        monkeypatch.setattr(photos.os, "replace", refuse)
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
    monkeypatch.setattr(photos, "_photos_folder", lambda: tmp_path / "skimage-data")
    with pytest.raises(MissingFileError, match="astronaut") as info:
        load_dataset("photos", root=tmp_path / "cache")
    assert str(tmp_path / "skimage-data") in str(info.value) and "\n" not in str(info.value)


def test_build_index_photos_64_records_the_size(photos_data, tmp_path):
    result = run("build-index", "photos", "--size", "64", "--limit", "40", cwd=tmp_path,
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


def _small_photographs() -> list[np.ndarray]:
    """Two seeded uint8 (H, W, 3) 'photographs' with a flat band, small enough to cut here."""
    rng = np.random.default_rng(5)
    first = rng.integers(0, 256, (110, 75, 3), dtype=np.uint8)
    first[:, 40:] = 128  # windows inside this band are flat and must be dropped
    return [first, rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)]


def _window_places(photographs: list[np.ndarray]) -> dict[bytes, tuple[int, int, int]]:
    """Every 32×32 window of every photograph, as (3, 32, 32) bytes → (photograph, row,
    column); random photographs have no two windows alike."""
    places = {}
    for k, photo in enumerate(photographs):
        for y in range(photo.shape[0] - 31):
            for x in range(photo.shape[1] - 31):
                window = np.ascontiguousarray(photo[y:y + 32, x:x + 32].transpose(2, 0, 1))
                places.setdefault(window.tobytes(), []).append((k, y, x))
    return {key: spots[0] for key, spots in places.items() if len(spots) == 1}


def test_photos_dense_split_shares_no_pixel_and_keeps_every_window(monkeypatch, tmp_path):
    photographs = _small_photographs()
    monkeypatch.setattr(photos, "_scaled_photos", lambda: iter(photographs))
    # The expected windows, enumerated independently: left columns on the 3-pixel grid,
    # not flat; train rows on the grid from 0 ending above the strip, test rows on the grid
    # from the strip's first row.
    expected = {"train": set(), "test": set()}
    for k, photo in enumerate(photographs):
        height, width = photo.shape[:2]
        strip = max(32, height // 10)
        for y in range(height - 31):
            for x in range(0, width - 31, 3):
                if photo[y:y + 32, x:x + 32].std() <= photos.PHOTO_MIN_STD:
                    continue
                if y % 3 == 0 and y + 32 <= height - strip:
                    expected["train"].add((k, y, x))
                elif y >= height - strip and (y - (height - strip)) % 3 == 0:
                    expected["test"].add((k, y, x))
    monkeypatch.setattr(photos, "DENSE_COUNTS", (len(expected["train"]), len(expected["test"])))
    assert expected["train"] and expected["test"]
    where, found = _window_places(photographs), {}
    for split in ("train", "test"):
        patches, _ = photos.load_photos_dense(tmp_path, split, None)
        places = {where[np.ascontiguousarray(patch).tobytes()] for patch in patches}
        assert len(places) == len(patches)  # no window twice
        found[split] = places
    assert found == expected
    # No pixel row of a photograph lies in both splits.
    for k in range(len(photographs)):
        train_rows = {y + r for j, y, _ in found["train"] if j == k for r in range(32)}
        test_rows = {y + r for j, y, _ in found["test"] if j == k for r in range(32)}
        assert not train_rows & test_rows
    # The cache holds train then test, and a second load reads it instead of cutting again.
    monkeypatch.setattr(photos, "_scaled_photos", _no_cutting)
    again, _ = photos.load_photos_dense(tmp_path, "test", 4)
    cached = np.load(tmp_path / "photos-dense-32.npy")
    assert np.array_equal(again, cached[len(expected["train"]):][:4])
    info = next(info for info in dataset_infos() if info.name == "photos-dense")
    assert "3×32×32" in info.shape
