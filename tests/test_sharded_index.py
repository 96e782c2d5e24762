"""build-index --shards: shard folders under one top manifest, exact merged search, refusal
of shards that disagree, and memorization over a sharded index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import brute_force_knn, brute_force_velocity, flow_queries, relative_error
from test_cli import assert_one_line_error, run

import knnflow
from knnflow import distributed
from knnflow.data import image_source
from knnflow.errors import IndexMismatchError, InputError, OptionError
from knnflow.index import Index
from knnflow.index_build import write_index
from knnflow.sharded_index import ShardedIndex


def with_duplicates(tmp_path, n: int = 900) -> str:
    """uint8 images (n, 1, 16, 16) as .npy, where images 0..49 repeat at n-50..n-1: exact
    ties across shard boundaries."""
    images = np.random.default_rng(0).integers(0, 256, (n, 1, 16, 16), dtype=np.uint8)
    images[-50:] = images[:50]
    np.save(tmp_path / "images.npy", images)
    return f"npy:{tmp_path / 'images.npy'}"


@pytest.fixture
def built(tmp_path):
    name = with_duplicates(tmp_path)
    write_index(image_source(name), tmp_path / "one")
    write_index(image_source(name), tmp_path / "three", shards=3)
    return Index.load(tmp_path / "one"), Index.load(tmp_path / "three")


def test_shards_cover_the_ranks_ranges_and_the_same_points(built):
    whole, sharded = built
    assert isinstance(sharded, ShardedIndex) and len(sharded.shards) == 3
    assert [shard.n for shard in sharded.shards] == [300, 300, 300]
    assert sharded.manifest["points_sha256"] == whole.manifest["points_sha256"]
    ids = torch.tensor([0, 299, 300, 599, 600, 899, 5])
    assert torch.equal(sharded.points[ids], whole.points[ids])
    assert torch.equal(sharded.points[450], whole.points[450])
    assert torch.equal(sharded.points[290:310], whole.points[290:310])


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("rounding", ["native", "by-position"])
def test_merged_search_is_exact_with_lower_ids_first(built, k, rounding, monkeypatch):
    """by-position: the batched product rounds each dot one ulp more per position in its
    block, as some CPUs' kernels do (AMD EPYC's bmm): copies in other blocks or shards still
    tie, and the lower id wins."""
    if rounding == "by-position":
        import knnflow.pairs as pairs

        real = pairs.batched_dots
        monkeypatch.setattr(pairs, "batched_dots", lambda points, queries: real(
            points, queries) * (1 + torch.finfo(torch.float64).eps * torch.arange(
                points.shape[1], dtype=torch.float64)))
    whole, sharded = built
    points = whole.points.to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    queries = torch.cat([points[:20] + 0.01 * torch.randn(20, points.shape[1], generator=gen),
                         points[:10],  # duplicated images: the tie goes to the lower id
                         torch.rand(20, points.shape[1], generator=gen) * 2 - 1]).float()
    merged, single = sharded.search(queries, k), whole.search(queries, k)
    assert torch.equal(merged.ids, single.ids)
    assert torch.allclose(merged.sq_distances, single.sq_distances, rtol=1e-12, atol=1e-12)
    distances, ids = brute_force_knn(queries, points, k)
    assert torch.equal(merged.ids, ids)
    assert torch.allclose(merged.sq_distances, distances, rtol=1e-9, atol=1e-9)
    assert bool((merged.ids[20:30, 0] < 50).all())  # image j, not its copy at n - 50 + j


def test_exact_velocity_over_the_shards(built):
    whole, sharded = built
    x = flow_queries(whole.points.float(), 0.6, 16, seed=2)
    velocity = knnflow.ExactVelocity(sharded)(x, 0.6).velocity
    truth = brute_force_velocity(x, 0.6, whole.points)
    assert float(relative_error(velocity, truth).max()) <= 1e-4


def test_a_process_per_shard_opens_its_own(built, monkeypatch):
    _, sharded = built
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 3)
    for rank in range(3):
        monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None, r=rank: r)
        assert distributed.shard_of(sharded) is sharded.shards[rank].points
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None: 1)
    assert torch.equal(distributed.shard_of(sharded), sharded.points[450:900])


def test_a_shard_that_disagrees_is_refused_by_name(tmp_path):
    name = with_duplicates(tmp_path)
    write_index(image_source(name), tmp_path / "three", shards=3)
    # Replace shard-001 by a complete, self-consistent index of other points.
    other = np.random.default_rng(5).integers(0, 256, (300, 1, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "other.npy", other)
    write_index(image_source(f"npy:{tmp_path / 'other.npy'}"), tmp_path / "three" / "shard-001",
                overwrite=True)
    with pytest.raises(IndexMismatchError, match="shard-001"):
        Index.load(tmp_path / "three")
    write_index(image_source(name, limit=10), tmp_path / "three" / "shard-001", overwrite=True)
    with pytest.raises(IndexMismatchError, match="shard-001"):
        Index.load(tmp_path / "three")


def test_shard_counts_are_checked(tmp_path):
    name = with_duplicates(tmp_path, n=100)
    with pytest.raises(OptionError, match="exceeds the 100 images"):
        write_index(image_source(name), tmp_path / "x", shards=101)
    with pytest.raises(OptionError, match="at least 1"):
        write_index(image_source(name), tmp_path / "x", shards=0)
    assert not (tmp_path / "x").exists()


def test_the_certified_estimator_names_the_sharded_folder(built):
    _, sharded = built
    with pytest.raises(InputError, match="sharded"):
        knnflow.KNNVelocity(sharded)


def test_cli_memorization_over_shards_matches_one_index(tmp_path):
    name = with_duplicates(tmp_path, n=600)
    for folder, shards in (("one", "1"), ("two", "2")):
        built = run("build-index", name, "--shards", shards, "--out", str(tmp_path / folder),
                    "--json")
        assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["shards"][1]["start"] == 300
    samples = np.load(tmp_path / "images.npy")[::7].astype(np.float32) / 127.5 - 1
    np.save(tmp_path / "s.npy", samples)
    reports = {}
    for folder in ("one", "two"):
        result = run("memorization", str(tmp_path / "s.npy"), "--index", str(tmp_path / folder),
                     "--json", "--out", str(tmp_path / f"out-{folder}"))
        assert result.returncode == 0, result.stderr
        reports[folder] = json.loads(result.stdout)
    assert reports["one"]["d1"] == reports["two"]["d1"]
    assert reports["one"]["d1_over_d2"] == reports["two"]["d1_over_d2"]
    assert_one_line_error(run("build-index", name, "--shards", "0", "--out",
                              str(tmp_path / "bad")), "--shards")
    assert_one_line_error(run("build-index", name, "--shards", "601", "--out",
                              str(tmp_path / "bad")), "--shards", "600")
