"""Folders of images, .npy and .npz arrays: each round-trips images written by the test, and
bad input fails in one line naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from knnflow.data import load_dataset
from knnflow.errors import InputError


def _images(count: int, channels: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, channels, side, side),
                                                dtype=np.uint8)


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1)


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
    with pytest.raises(InputError, match="size"):
        load_dataset(f"folder:{tmp_path}")


def test_npz_with_splits(tmp_path):
    np.savez(tmp_path / "s.npz", train=_images(4, 1, 8), test=_images(2, 1, 8, seed=1))
    assert load_dataset(f"npz:{tmp_path / 's.npz'}").shape == (4, 1, 8, 8)
    assert load_dataset(f"npz:{tmp_path / 's.npz'}", split="test").shape == (2, 1, 8, 8)


def test_channels_last_arrays_are_transposed(tmp_path):
    images = _images(3, 3, 8)
    np.save(tmp_path / "hwc.npy", images.transpose(0, 2, 3, 1))
    assert torch.equal(load_dataset(f"npy:{tmp_path / 'hwc.npy'}"), _unit(images))


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
