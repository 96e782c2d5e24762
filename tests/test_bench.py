"""The benchmark's baselines and measurements are themselves correct."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import brute_force_velocity, flow_queries, relative_error

from knnflow.bench import bench_exact, float64_velocity, image_shape_for, naive_velocity
from knnflow.errors import InputError


def test_reference_forms_match_brute_force(digits):
    for t in (0.2, 0.9, 0.9999):
        x = flow_queries(digits, t, 16)
        reference = brute_force_velocity(x, t, digits)
        assert relative_error(float64_velocity(x, t, digits), reference).max() < 1e-9
    x = flow_queries(digits, 0.2, 16)
    assert relative_error(naive_velocity(x, 0.2, digits), brute_force_velocity(x, 0.2, digits)) \
        .max() < 1e-3


def test_bench_exact_on_small_synthetic_data():
    """--dataset synthetic keeps --n/--d for scale; every grid t gets a row, then U[0,1)."""
    result = bench_exact(dataset="synthetic", n=3000, dim=192, batch=32, ts=(0.1, 0.9),
                         repeats=1)
    assert result.config["d"] == 192 and result.config["n"] == 3000
    assert [(row.label, row.t) for row in result.rows] == [("0.1", 0.1), ("0.9", 0.9),
                                                          ("U[0,1)", None)]
    for row in result.rows:
        assert row.engine_qps > 0 and row.naive_qps > 0
        assert row.engine_error_max < 1e-4
    assert result.limit_qps > 0


def test_per_query_t_references_match_brute_force(digits):
    """The U[0,1) row's three forms take one t per query: the float64 reference and the
    naive form against conftest's explicit-difference brute force, t up to 0.9995."""
    t = torch.tensor([0.0, 0.3, 0.7, 0.95, 0.9995] * 3, dtype=torch.float32)
    x = flow_queries(digits, t, len(t))
    reference = brute_force_velocity(x, t, digits)
    assert relative_error(float64_velocity(x, t, digits), reference).max() < 1e-9
    near_one = t > 0.99  # float32 logits of thousands of nats: the naive form's known failure
    naive = naive_velocity(x, t, digits)
    assert relative_error(naive[~near_one], reference[~near_one]).max() < 1e-3
    one_t = float64_velocity(x, 0.7, digits)
    assert relative_error(one_t, brute_force_velocity(x, 0.7, digits)).max() < 1e-9


def test_t_grid_takes_a_comma_list_or_start_stop_step():
    from knnflow.bench import DEFAULT_T_GRID, parse_t_grid

    default = parse_t_grid(DEFAULT_T_GRID)
    assert len(default) == 20 and default[0] == 0.0 and default[-1] == 0.95
    assert default[7] == 0.35  # rounded onto the grid, not 0.35000000000000003
    assert parse_t_grid("0.1,0.5,0.9") == (0.1, 0.5, 0.9)
    assert parse_t_grid("0.9, 0.1") == (0.1, 0.9)
    assert parse_t_grid("0.1:0.6:0.2") == (0.1, 0.3, 0.5)  # 0.6 is off the grid
    assert parse_t_grid("0.5") == (0.5,)
    for bad, message in (("0:1:0.25", "t = 1 is invalid"), ("0.5,1.2", r"\[0, 1\)"),
                         ("-0.1,0.5", r"\[0, 1\)"), ("abc", "not a number"),
                         ("0.2:0.5", "start:stop:step"), ("", "start:stop:step"),
                         ("0.1,,0.5", "start:stop:step"), ("0:0.9:0", "step must be positive"),
                         ("nan", "not a finite")):
        with pytest.raises(InputError, match=message):
            parse_t_grid(bad)
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        bench_exact(dataset="digits", ts=(0.5, 1.0))


def test_bench_exact_defaults_to_photos_and_refuses_d_there():
    result = bench_exact(n=400, batch=8, ts=(0.5,), uniform=False, repeats=1)
    c = result.config
    assert (c["data"], c["n"], c["d"], c["size"]) == ("photos", 400, 3072, None)
    assert c["threads"] >= 1 and c["t_grid"] == [0.5] and len(result.rows) == 1
    with pytest.raises(InputError, match="dim applies to dataset synthetic only"):
        bench_exact(n=400, dim=192, ts=(0.5,))
    with pytest.raises(InputError, match="size"):
        bench_exact(dataset="synthetic", n=400, size=64, ts=(0.5,))


def test_oracle_counts_match_an_independent_float64_count():
    """The points within 20 + ln n nats of each query's best logit, streamed in chunks of 7,
    against explicit differences over all points at once; one t per query, t = 0 included."""
    from knnflow.bench import oracle_counts, oracle_window

    gen = torch.Generator().manual_seed(3)
    points = torch.rand(200, 8, generator=gen) * 2 - 1
    points[17] = points[3]  # a duplicate: both count
    t = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.8, 0.95, 0.99, 0.9999])
    x = ((1 - t)[:, None] * torch.randn(len(t), 8, generator=gen)
         + t[:, None] * points[torch.arange(len(t)) * 11]).to(torch.float32)
    window = oracle_window(200)
    assert window == pytest.approx(20 + 5.2983, abs=1e-4)
    x64, p64, t64 = x.double(), points.double(), t.double()
    logits = -(x64[:, None] - t64[:, None, None] * p64[None]).square().sum(-1) \
        / (2 * (1 - t64[:, None]) ** 2)
    expected = (logits >= logits.max(1, keepdim=True).values - window).sum(1)
    assert expected[0] == 200 and expected[-1] < 200
    assert torch.equal(oracle_counts(x, t, points, chunk=7), expected)
    assert torch.equal(oracle_counts(x, t, points), expected)
    narrow = (logits >= logits.max(1, keepdim=True).values - 2.0).sum(1)
    assert torch.equal(oracle_counts(x, t, points, window=2.0, chunk=7), narrow)
    assert torch.equal(oracle_counts(x[:2], 0.0, points), torch.full((2,), 200))


def test_float64_knn_is_exact_with_ties_to_the_lower_id():
    from knnflow.bench import float64_knn, id_mismatches

    gen = torch.Generator().manual_seed(4)
    points = torch.rand(300, 16, generator=gen) * 2 - 1
    points[250] = points[40]  # exact duplicates: a tie the lower id wins
    queries = torch.cat([points[[40, 7]] + 1e-3, torch.randn(30, 16, generator=gen)])
    dist, ids = float64_knn(queries, points, 3, block=8, chunk=50, extra=2)
    full = (queries.double()[:, None] - points.double()[None]).square().sum(-1)
    order = full.argsort(dim=1, stable=True)[:, :3]
    assert torch.equal(ids, order) and torch.equal(dist, full.gather(1, order))
    assert ids[0, :2].tolist() == [40, 250]
    swapped = ids.clone()
    swapped[0, :2] = torch.tensor([250, 40])  # a tie in the other order agrees
    assert id_mismatches(swapped, queries, points, (dist, ids)) == 0
    swapped[5, 0] = ids[5, 2]
    assert id_mismatches(swapped, queries, points, (dist, ids)) == 1


def test_image_shape_for():
    assert image_shape_for(3072) == (3, 32, 32)
    assert image_shape_for(784) == (1, 28, 28)
    assert image_shape_for(100) == (1, 10, 10)
    assert image_shape_for(7) == (1, 7)


def test_bench_on_a_dataset_uses_its_test_split_for_queries():
    result = bench_exact(dataset="digits", batch=16, ts=(0.5,), repeats=1, uniform=False)
    assert result.config["n"] == 1498 and result.config["data"] == "digits"


def test_bench_memorization_baseline_and_ours_agree_with_float64():
    """On digits (n < 4096) Index.search takes its FAISS route for every sample: the fallback
    count is all of them; every id agrees with float64 brute force."""
    from knnflow.bench import bench_memorization

    result = bench_memorization(dataset="digits", samples=64, repeats=1)
    assert result.config["noise"] == 0.05 and result.config["samples"] == 64
    assert [row.method[:3] for row in result.rows] == ["(a)", "(b)", "(c)"]
    assert all(row.samples_per_s > 0 for row in result.rows)
    assert result.rows[0].d1_rel_error_max < 1e-3  # float32 cdist, near copies at σ = 0.05
    assert result.rows[2].d1_rel_error_max < 1e-12
    # float32 cdist may break a near tie the other way; the exact routes may not.
    assert result.rows[0].id_mismatches <= 2
    assert result.rows[1].id_mismatches == 0 and result.rows[2].id_mismatches == 0
    assert result.rows[1].d1_rel_error_max < 1e-12  # float64 exact
    assert result.rows[1].fallback == 64 and result.config["fallback"] == 64
    assert result.rows[0].fallback is None and result.t_rows == []


def test_bench_memorization_on_photos_with_t_rows():
    """Sketch-pruned search (photos, n = 4096, d = 3072): 0 id mismatches against float64 on
    the samples and on x_t/t; at t = 0.05, x_t/t is mostly noise and takes the brute force."""
    from knnflow.bench import bench_memorization

    result = bench_memorization(limit=4096, samples=32, repeats=1, ts=(0.05, 0.9))
    c = result.config
    assert (c["data"], c["n"], c["d"], c["search"]) == ("photos", 4096, 3072, "sketch")
    ours = result.rows[1]
    assert ours.id_mismatches == 0 and result.rows[2].id_mismatches == 0
    assert ours.fallback == c["fallback"] and 0 <= ours.fallback <= 32
    assert [row.t for row in result.t_rows] == [0.05, 0.9]
    for row in result.t_rows:
        assert row.search_mismatches == 0 and row.search_per_s > 0 and row.cdist_per_s > 0
        assert 0 <= row.fallback <= 32
    assert result.t_rows[0].fallback > result.t_rows[1].fallback
    with pytest.raises(InputError, match=r"\(0, 1\)"):
        bench_memorization(dataset="digits", ts=(0.0, 0.5))


def test_bench_targets_orders_the_targets_by_error():
    from knnflow.bench import bench_targets

    result = bench_targets(dataset="digits", batch=32, bins=4)
    assert len(result.bins) == 4 and set(result.error) >= {"cfm", "efm-128", "knn-efm"}
    for i in range(4):
        assert result.error["knn-efm"][i] <= 1e-6 * max(result.error["cfm"][i], 1e-12) + 1e-10
    assert sum(result.error["efm-1000"]) < sum(result.error["efm-128"]) < sum(result.error["cfm"])
    assert all(ms >= 0 for ms in result.ms_per_batch.values())
    # Below the digits' calibrated floor (0.7) every knn-efm row falls back; none is routed.
    assert result.fallback[:2] == [1.0, 1.0] and result.routed[:2] == [0.0, 0.0]
    assert all(0 <= f + r <= 1 for f, r in zip(result.fallback, result.routed, strict=True))


def test_bench_train_steps_every_target_like_the_trainer():
    """Every target named gets a row with its step time, the target's share of it and, for
    knn-efm, the fallback and routed fractions; target names are parsed or refused in one line."""
    from knnflow.bench import bench_train, parse_target_label

    result = bench_train(dataset="digits", limit=300, targets=("cfm", "efm-n-shared", "knn-efm"),
                         batch=16, steps=2, warmup=1)
    assert [row.target for row in result.rows] == ["cfm", "efm-n-shared", "knn-efm"]
    assert result.rows[0].ratio == 1.0
    assert all(row.ms_step > row.ms_target >= 0 for row in result.rows)
    knn = result.rows[2]
    assert knn.fallback is not None and knn.routed is not None
    assert 0 <= knn.fallback + knn.routed <= 1
    assert result.rows[0].routed is None and result.rows[0].fallback is None
    assert parse_target_label("efm-n", 300) == {"name": "efm", "m": 300, "pool": "independent"}
    with pytest.raises(InputError, match="unknown target"):
        parse_target_label("efm-0", 300)


def test_bench_with_an_index_takes_its_data_set(tmp_path):
    """With --index the data set and limit are the index's (held-out queries from its test
    split); a --dataset or --limit that contradicts them is refused in one line."""
    from test_cli import assert_one_line_error, run

    from knnflow.bench import bench_knn
    from knnflow.data import load_dataset
    from knnflow.index import Index

    Index.build(load_dataset("digits", limit=300),
                dataset={"name": "digits", "limit": 300}).save(tmp_path / "ix")
    result = bench_knn(index_folder=tmp_path / "ix", ts=(0.0, 0.9), batch=16, repeats=1)
    assert result.config["data"] == "digits" and result.config["n"] == 300
    assert [row.label for row in result.rows] == ["0", "0.9", "U[0,1)"]
    assert all(row.violations == 0 for row in result.rows)
    # the oracle: at t = 0 every logit is equal; at 0.9 a few points matter
    assert result.rows[0].oracle_median == result.rows[0].oracle_p90 == 300
    assert 1 <= result.rows[1].oracle_median <= result.rows[1].oracle_p90 < 300
    assert result.config["oracle_window"] == pytest.approx(20 + math.log(300))
    agreeing = bench_knn(dataset="digits", limit=300, index_folder=tmp_path / "ix", ts=(0.9,),
                         batch=8, repeats=1)
    assert agreeing.config["n"] == 300
    with pytest.raises(InputError, match="contradicts the index, built on digits"):
        bench_knn(dataset="synthetic", index_folder=tmp_path / "ix")
    with pytest.raises(InputError, match="the first 300 images"):
        bench_knn(limit=100, index_folder=tmp_path / "ix")
    assert_one_line_error(run("bench", "train", "--index", "ix", "--limit", "50", cwd=tmp_path),
                          "--limit 50 contradicts the index")
    with pytest.raises(InputError, match="size 16 contradicts the index, built on images at"):
        bench_knn(size=16, index_folder=tmp_path / "ix")


def test_bench_with_an_index_takes_its_size(tmp_path):
    """The size recorded in the manifest's dataset record (build-index photos --size 64) is the
    one the held-out images are loaded at; a --size that contradicts it is refused."""
    from knnflow.bench import bench_index
    from knnflow.index import Index

    images = torch.rand(20, 3, 64, 64) * 2 - 1
    Index.build(images, dataset={"name": "photos", "size": 64}).save(tmp_path / "ix64")
    source = bench_index(None, None, None, tmp_path / "ix64", None)
    assert (source.name, source.size, source.index.dim) == ("photos", 64, 3 * 64 * 64)
    assert bench_index(None, None, None, tmp_path / "ix64", None, size=64).size == 64
    with pytest.raises(InputError, match="size 32 contradicts the index, built on size 64"):
        bench_index(None, None, None, tmp_path / "ix64", None, size=32)
    # an index from before the size was recorded: its image shape tells
    Index.build(images[:, :, :32, :32], dataset={"name": "photos"}).save(tmp_path / "ix32")
    assert bench_index(None, None, None, tmp_path / "ix32", None).size == 32


def test_target_labels_name_the_knn_route():
    from knnflow.bench import parse_target_label

    assert parse_target_label("knn-efm", 10) == {"name": "knn-efm"}
    assert parse_target_label("knn-efm-faster", 10) == {"name": "knn-efm",
                                                         "knn_route": "faster"}
    assert parse_target_label("knn-efm-certify", 10)["knn_route"] == "certify"
    assert parse_target_label("efm-n-shared", 10) == {"name": "efm", "m": 10, "pool": "shared"}
    with pytest.raises(InputError, match="knn-efm-certify"):
        parse_target_label("knn-efm-fastest", 10)


def test_bench_scale_on_a_real_set_takes_mirror_images_past_its_size(tmp_path):
    """bench scale on a named array: the first n training images (n = 200), then the 300
    images and their mirror images (n = 600); queries from its test split; 0 violations
    and exact ids against float64; an n the set cannot give is one line."""
    import numpy as np

    from knnflow.bench.scale import bench_scale
    from knnflow.index import Index

    rng = np.random.default_rng(3)
    path = tmp_path / "small.npz"
    train = rng.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)
    np.savez(path, train=train, test=rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8))
    dataset, work = f"npz:{path}", tmp_path / "work"
    result = bench_scale(ns=(200, 600), ts=(0.5, 0.9), batch=16, repeats=1, work=work,
                         dataset=dataset)
    assert result.config["data"] == dataset and result.config["d"] == 192
    assert [(row.n, row.label) for row in result.rows] == [
        (n, label) for n in (200, 600) for label in ("0.5", "0.9", "U[0,1)")]
    assert all(row.violations == 0 for row in result.rows)
    assert [(row.n, row.id_mismatches) for row in result.search] == [(200, 0), (600, 0)]
    unit = torch.from_numpy(train).float() / 127.5 - 1
    mirrored = torch.cat([unit, unit.flip(-1)]).reshape(600, -1)
    points = Index.load(work / "npz-small-600-float16", verify=False).points
    assert torch.equal(points.float(), mirrored.half().float())
    assert torch.equal(Index.load(work / "npz-small-200-float16", verify=False).points.float(),
                       unit[:200].reshape(200, -1).half().float())
    for n in (601, 700):  # odd past the split; more than twice the split
        with pytest.raises(InputError, match="300 training images") as info:
            bench_scale(ns=(n,), ts=(0.5,), batch=16, repeats=1,
                        work=work, dataset=dataset, uniform=False)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="test split has 40 images"):
        bench_scale(ns=(200,), ts=(0.5,), batch=64, work=work, dataset=dataset)
