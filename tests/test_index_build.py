"""The streaming index build (index_build.write_index, data.image_source): the same folder as
an in-memory build, from data read in batches; refused before any work when it cannot fit;
nothing that loads after a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import brute_force_velocity, flow_queries, relative_error
from test_cli import assert_one_line_error, run

import knnflow
from knnflow import index_build
from knnflow.data import image_source, load_dataset
from knnflow.errors import InputError
from knnflow.image_files import LazyImages
from knnflow.images import with_flips
from knnflow.index import Index
from knnflow.index_build import write_index
from knnflow.synthetic import synthetic_images


def images_npy(tmp_path, n: int = 700, seed: int = 0) -> tuple[str, np.ndarray]:
    """uint8 images (n, 3, 8, 8) saved as .npy; returns (dataset name, the images)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    path = tmp_path / "images.npy"
    np.save(path, images)
    return f"npy:{path}", images


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_build_equals_the_in_memory_build(tmp_path, dtype, monkeypatch):
    name, _ = images_npy(tmp_path)
    monkeypatch.setattr("knnflow.data.SOURCE_BATCH", 128)  # several batches, a partial last
    source = image_source(name)
    manifest = write_index(source, tmp_path / "idx", dtype=dtype)
    memory = Index.build(load_dataset(name), dtype=dtype)
    assert manifest["points_sha256"] == memory.manifest["points_sha256"]
    loaded = Index.load(tmp_path / "idx")
    assert torch.equal(loaded.points, memory.points)
    assert loaded.sketches.max_radius == memory.sketches.max_radius
    assert torch.equal(loaded.sketches.coarse_points, memory.sketches.coarse_points)


def test_streamed_flips_follow_with_flips(tmp_path, monkeypatch):
    name, _ = images_npy(tmp_path, n=300)
    monkeypatch.setattr("knnflow.data.SOURCE_BATCH", 64)
    write_index(image_source(name, flip=True), tmp_path / "idx")
    expected = with_flips(load_dataset(name)).reshape(600, -1)
    assert torch.equal(Index.load(tmp_path / "idx").points, expected)


def test_npy_is_memory_mapped_and_folders_read_per_batch(tmp_path):
    name, images = images_npy(tmp_path, n=50)
    source = image_source(name)
    assert isinstance(source.raw, np.memmap)
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(images[i].transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    lazy = image_source(f"folder:{folder}")
    assert isinstance(lazy.raw, LazyImages)
    batches = list(lazy.batches(size=6))
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    assert np.array_equal(np.concatenate(batches), load_dataset(f"folder:{folder}").numpy())
    assert np.allclose(np.concatenate(batches)[:, 0], images[:20, 0] / 127.5 - 1.0, atol=1e-6)


def test_synthetic_images_are_made_per_range():
    whole = synthetic_images(9000, seed=3)
    assert torch.equal(whole[4000:8500], synthetic_images(4500, seed=3, start=4000))
    train = synthetic_images(9000, seed=0)  # the train split's seed
    assert torch.equal(load_dataset("synthetic", limit=9000).reshape(9000, -1)[5000:5100],
                       train.reshape(9000, -1)[5000:5100])


def test_float16_index_serves_the_engine_exactly(tmp_path):
    """float16 storage: the training set is the stored points (float16 → float32 is exact),
    and the engine meets its contract against a float64 brute force over them."""
    name, _ = images_npy(tmp_path, n=900)
    write_index(image_source(name), tmp_path / "idx", dtype="float16")
    index = Index.load(tmp_path / "idx")
    assert index.points.dtype == torch.float16
    # the manifest states how far storage moved the images (float64, from the float32 images)
    images = load_dataset(name).reshape(900, -1).double()
    moved = (images - index.points.double()).norm(dim=1).max()
    assert index.manifest["storage_rounding"] == pytest.approx(float(moved), rel=1e-12)
    assert 0 < index.manifest["storage_rounding"] < 2.0**-11 * float(images.norm(dim=1).max())
    points = index.points.to(torch.float64)
    x = flow_queries(points.float(), 0.7, 32, seed=1)
    velocity = knnflow.ExactVelocity(index)(x, 0.7).velocity
    errors = relative_error(velocity, brute_force_velocity(x, 0.7, points))
    assert float(errors.median()) <= 1e-5 and float(errors.max()) <= 1e-4
    x = flow_queries(points.float(), 0.9, 32, seed=2)
    result = knnflow.KNNVelocity(index, tol=1e-3, route="certify")(x, 0.9)
    truth = brute_force_velocity(x, 0.9, points)
    error = (result.velocity.double() - truth).norm(dim=1)
    certified = ~result.fallback & ~result.routed
    assert bool(certified.any())
    assert bool((error[certified] <= result.error_bound[certified]).all())
    assert bool((error[~certified] <= 1e-4 * truth[~certified].norm(dim=1)).all())


def test_a_build_that_fails_midway_leaves_nothing(tmp_path):
    name, _ = images_npy(tmp_path, n=400)
    source = image_source(name)

    class Failing:
        n, image_shape, name = source.n, source.image_shape, "failing"

        def batches(self):
            batches = source.batches(size=100)
            yield next(batches)
            raise KeyboardInterrupt  # as a kill would, between two batches

    with pytest.raises(KeyboardInterrupt):
        write_index(Failing(), tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npy"]


def test_not_enough_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    name, _ = images_npy(tmp_path, n=400)

    class Usage:
        free = 1000

    monkeypatch.setattr(index_build.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(InputError, match="not enough disk .* float16 halves"):
        write_index(image_source(name), tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_not_enough_memory_is_refused(tmp_path, monkeypatch):
    name, _ = images_npy(tmp_path, n=400)
    monkeypatch.setattr(index_build, "available_memory", lambda: 1000)
    with pytest.raises(InputError, match="not enough memory"):
        write_index(image_source(name), tmp_path / "idx")


def test_build_bytes_count_data_sketches_and_ivf():
    disk32, _ = index_build.build_bytes(1000, 3072, "float32", "flat")
    disk16, _ = index_build.build_bytes(1000, 3072, "float16", "flat")
    assert disk32 - disk16 == 1000 * 3072 * 2
    ivf, memory = index_build.build_bytes(1000, 3072, "float16", "ivf")
    assert ivf - disk16 == 1000 * 3072 * 4 and memory > 1000 * 3072 * 4


def test_cli_refuses_an_index_too_large_for_the_disk(tmp_path):
    """synthetic at 10^9 images of 3×32×32 would need terabytes: one line, nothing written."""
    result = run("build-index", "synthetic", "--limit", "1000000000", "--out",
                 str(tmp_path / "idx"))
    assert_one_line_error(result, "not enough")
    assert not (tmp_path / "idx").exists()
