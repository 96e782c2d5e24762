"""Index folders: round trips, exact search against float64 brute force, refusal of mismatches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import brute_force_knn

from knnflow.errors import IndexMismatchError, InputError, MissingFileError
from knnflow.index import Index


@pytest.fixture(scope="module")
def digit_images():
    from knnflow.data import load_dataset

    return load_dataset("digits")


def test_build_save_load_round_trip(tmp_path, digit_images):
    index = Index.build(digit_images, dataset={"name": "digits", "split": "train"})
    folder = index.save(tmp_path / "digits-train")
    loaded = Index.load(folder)
    assert loaded.n == 1498 and loaded.dim == 64 and loaded.image_shape == (1, 8, 8)
    assert torch.equal(loaded.points, digit_images.reshape(1498, 64))
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("format_version", "dataset", "n", "d", "image_shape", "dtype", "index",
                "faiss_version", "data_sha256"):
        assert key in manifest
    assert manifest["dataset"]["name"] == "digits"


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_search_is_exact_against_float64_brute_force(tmp_path, digit_images, kind):
    index = Index.load(Index.build(digit_images, kind=kind).save(tmp_path / kind))
    gen = torch.Generator().manual_seed(0)
    queries = digit_images[:50].reshape(50, -1) + 0.3 * torch.randn(50, 64, generator=gen)
    result = index.search(queries, k=5)
    distances, ids = brute_force_knn(queries, digit_images, 5)
    assert result.exact
    assert torch.allclose(result.sq_distances, distances, rtol=1e-12, atol=1e-12)
    assert torch.equal(result.ids, ids)


@pytest.fixture
def faiss_blas_distances():
    """Make FAISS use its GEMM distance form (as it does for large batches) at any size."""
    import faiss

    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    yield
    faiss.cvar.distance_compute_blas_threshold = saved


def test_search_resolves_near_ties_that_float32_gets_wrong(faiss_blas_distances):
    """40 points at distances 1e-2 + k·1e-6 from the query: FAISS's float32 GEMM distances
    (‖q‖² + ‖x‖² - 2⟨q,x⟩, error ~1e-5) cannot order them; the recomputed ones do."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1, 512, generator=gen) * 2 - 1
    directions = torch.randn(40, 512, generator=gen)
    radii = 1e-2 + 1e-6 * torch.arange(40.0)
    near = base + radii[:, None] * directions / directions.norm(dim=1, keepdim=True)
    points = torch.cat([near, torch.rand(200, 512, generator=gen) * 2 - 1])
    points = points[torch.randperm(points.shape[0], generator=gen)]
    index = Index.build(points)
    queries = base.repeat(32, 1)
    _, faiss_ids = index.faiss().search(queries.numpy(), 10)
    distances, ids = brute_force_knn(queries, points, 10)
    assert not np.array_equal(faiss_ids, ids.numpy())  # the trap is real
    result = index.search(queries, k=10)
    assert torch.equal(result.ids, ids)
    assert torch.allclose(result.sq_distances, distances, rtol=1e-12)


def test_approximate_ivf_is_flagged_and_recomputed(digit_images):
    index = Index.build(digit_images, kind="ivf", nlist=16, nprobe=1)
    result = index.search(digit_images[:20], k=3, approximate=True)
    assert not result.exact
    exact = (digit_images.reshape(-1, 64)[result.ids].double()
             - digit_images[:20].reshape(20, 1, 64).double()).square().sum(-1)
    assert torch.allclose(result.sq_distances, exact)


def test_float16_storage(tmp_path, digit_images):
    index = Index.load(Index.build(digit_images, dtype="float16").save(tmp_path / "h"))
    assert index.points.dtype == torch.float16
    result = index.search(digit_images[:5], k=1)
    assert torch.equal(result.ids[:, 0], torch.arange(5))


def test_query_shape_mismatch_names_both(digit_images):
    index = Index.build(digit_images)
    with pytest.raises(InputError, match=r"\(3, 10\).*d=64"):
        index.search(torch.zeros(3, 10), k=1)


def test_existing_folder_needs_overwrite(tmp_path, digit_images):
    index = Index.build(digit_images[:10])
    index.save(tmp_path / "x")
    with pytest.raises(InputError, match="overwrite"):
        index.save(tmp_path / "x")
    Index.build(digit_images[:20]).save(tmp_path / "x", overwrite=True)
    assert Index.load(tmp_path / "x").n == 20


def test_checksum_mismatch_is_refused(tmp_path, digit_images):
    folder = Index.build(digit_images[:10]).save(tmp_path / "x")
    data = np.load(folder / "data.npy")
    data[0, 0] = 0.5
    np.save(folder / "data.npy", data)
    with pytest.raises(IndexMismatchError, match="data.npy.*checksum"):
        Index.load(folder)


@pytest.mark.parametrize("key, value, message", [
    ("n", 11, r"\(10, 64\).*\(11, 64\)"),
    ("format_version", 99, "version 99"),
    ("dtype", "float16", "dtype float32.*float16"),
])
def test_manifest_mismatch_is_refused(tmp_path, digit_images, key, value, message):
    folder = Index.build(digit_images[:10]).save(tmp_path / "x")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match=message):
        Index.load(folder)


def test_missing_folder_and_files(tmp_path, digit_images):
    with pytest.raises(MissingFileError, match="no index folder"):
        Index.load(tmp_path / "nothing")
    folder = Index.build(digit_images[:100], kind="ivf", nlist=2).save(tmp_path / "x")
    (folder / "index.faiss").unlink()
    with pytest.raises(MissingFileError, match="index.faiss"):
        Index.load(folder)
    flat = Index.build(digit_images[:10]).save(tmp_path / "flat")
    assert not (flat / "index.faiss").exists()  # a flat index is rebuilt from data.npy
    (flat / "sketch_coarse.npy").unlink()
    with pytest.raises(MissingFileError, match="sketch_coarse.npy"):
        Index.load(flat)


def test_a_failed_save_leaves_no_folder(tmp_path, digit_images, monkeypatch):
    index = Index.build(digit_images[:10])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("knnflow.index_build.sha256_file", crash)
    with pytest.raises(KeyboardInterrupt):
        index.save(tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_unknown_kind_and_dtype(digit_images):
    with pytest.raises(InputError, match="flat, ivf"):
        Index.build(digit_images, kind="hnsw")
    with pytest.raises(InputError, match="float16"):
        Index.build(digit_images, dtype="int8")


def test_sketch_search_matches_float64_brute_force(sketch_index):
    from knnflow.synthetic import synthetic_images

    index, points = sketch_index
    flat = points.reshape(points.shape[0], -1)
    gen = torch.Generator().manual_seed(0)
    queries = torch.cat([
        synthetic_images(40, (3, 16, 16), seed=4).reshape(40, -1),   # held out
        flat[100:120],                                                 # exact copies
        flat[200:220] + 0.05 * torch.randn(20, flat.shape[1], generator=gen),  # near copies
        3 * torch.randn(8, flat.shape[1], generator=gen),              # far: budget overflow
    ])
    result = index.search(queries, k=3, method="sketch")
    distances, ids = brute_force_knn(queries, points, 3)
    assert result.exact
    assert torch.allclose(result.sq_distances, distances, rtol=1e-12, atol=1e-12)
    assert torch.equal(result.ids, ids)  # ties broken by the lower id, as a stable sort does
    stats = index.last_stats
    assert stats["method"] == "sketch"
    # Far queries overflow the budget and take the brute force; the others read few points.
    assert 1 <= stats["fallback"] < len(queries)
    assert stats["evaluated_median"] < 0.05 * index.n


def test_sketch_search_handles_duplicated_training_points(sketch_index):
    index, points = sketch_index
    result = index.search(points[:10], k=2, method="sketch")
    assert torch.equal(result.sq_distances, torch.zeros(10, 2, dtype=torch.float64))
    assert torch.equal(result.ids, torch.stack([torch.arange(10), torch.arange(2990, 3000)], 1))


def test_search_method_is_checked(sketch_index, digit_images):
    index, _ = sketch_index
    with pytest.raises(InputError, match="unknown search method"):
        index.search(torch.zeros(1, index.dim), k=1, method="fast")
    no_sketch = Index.build(digit_images)
    no_sketch.sketches = None
    with pytest.raises(InputError, match="no sketches"):
        no_sketch.search(digit_images[:1], k=1, method="sketch")


def test_a_flat_faiss_index_is_built_on_first_use_only(tmp_path, digit_images):
    """Building, saving and loading a flat index hold the points once: its FAISS copy exists
    only after a search that uses FAISS, and that search agrees with float64 brute force."""
    index = Index.build(digit_images)
    assert index.faiss_index is None
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.faiss_index is None
    queries = digit_images[:20].reshape(20, -1) + 0.01
    sketched = loaded.search(queries, k=3)
    assert loaded.faiss_index is None  # the sketch-pruned search needs no FAISS copy
    with_faiss = loaded.search(queries, k=3, method="faiss")
    assert loaded.faiss_index is not None and loaded.faiss_index.ntotal == loaded.n
    _, expected = brute_force_knn(queries, digit_images.reshape(len(digit_images), -1), 3)
    assert torch.equal(with_faiss.ids, expected) and torch.equal(sketched.ids, expected)
