"""The benchmark's baselines and measurements are themselves correct."""

from __future__ import annotations

import pytest

from knnflow.bench import bench_exact, float64_velocity, image_shape_for, naive_velocity
from knnflow.errors import InputError
from tests.conftest import brute_force_velocity, flow_queries, relative_error


def test_reference_forms_match_brute_force(digits):
    for t in (0.2, 0.9, 0.9999):
        x = flow_queries(digits, t, 16)
        reference = brute_force_velocity(x, t, digits)
        assert relative_error(float64_velocity(x, t, digits), reference).max() < 1e-9
    x = flow_queries(digits, 0.2, 16)
    assert relative_error(naive_velocity(x, 0.2, digits), brute_force_velocity(x, 0.2, digits)) \
        .max() < 1e-3


def test_bench_exact_on_small_synthetic_data():
    result = bench_exact(n=3000, dim=192, batch=32, ts=(0.1, 0.9), repeats=1)
    assert result.config["d"] == 192 and len(result.rows) == 2
    for row in result.rows:
        assert row.engine_qps > 0 and row.naive_qps > 0
        assert row.engine_error_max < 1e-4
    assert result.limit_qps > 0


def test_image_shape_for():
    assert image_shape_for(3072) == (3, 32, 32)
    assert image_shape_for(784) == (1, 28, 28)
    assert image_shape_for(100) == (1, 10, 10)
    assert image_shape_for(7) == (1, 7)


def test_bench_on_a_dataset_uses_its_test_split_for_queries():
    result = bench_exact(dataset="digits", batch=16, ts=(0.5,), repeats=1)
    assert result.config["n"] == 1498 and result.config["data"] == "digits"


def test_bench_memorization_baseline_and_ours_agree_with_float64():
    from knnflow.bench import bench_memorization

    result = bench_memorization(dataset="digits", samples=64, repeats=1)
    assert [row.method[:3] for row in result.rows] == ["(a)", "(b)", "(c)"]
    for row in result.rows:
        assert row.samples_per_s > 0 and row.d1_rel_error_max < 1e-4
    # float32 cdist may break an exact tie the other way; the exact routes agree exactly.
    assert result.rows[0].ids_differ <= 2
    assert result.rows[1].ids_differ == 0 and result.rows[2].ids_differ == 0
    assert result.rows[1].d1_rel_error_max < 1e-12  # float64 exact


def test_bench_targets_orders_the_targets_by_error():
    from knnflow.bench import bench_targets

    result = bench_targets(dataset="digits", batch=32, bins=4)
    assert len(result.bins) == 4 and set(result.error) >= {"cfm", "efm-128", "knn-efm"}
    for i in range(4):
        assert result.error["knn-efm"][i] <= 1e-6 * max(result.error["cfm"][i], 1e-12) + 1e-10
    assert sum(result.error["efm-1000"]) < sum(result.error["efm-128"]) < sum(result.error["cfm"])
    assert all(ms >= 0 for ms in result.ms_per_batch.values())


def test_bench_train_steps_every_target_like_the_trainer():
    """Every target named gets a row with its step time, the target's share of it and, for
    knn-efm, the fallback fraction; target names are parsed or refused in one line."""
    from knnflow.bench import bench_train, parse_target_label

    result = bench_train(dataset="digits", limit=300, targets=("cfm", "efm-n-shared", "knn-efm"),
                         batch=16, steps=2, warmup=1)
    assert [row.target for row in result.rows] == ["cfm", "efm-n-shared", "knn-efm"]
    assert result.rows[0].ratio == 1.0
    assert all(row.ms_step > row.ms_target >= 0 for row in result.rows)
    assert result.rows[2].fallback is not None and 0 <= result.rows[2].fallback <= 1
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
    result = bench_knn(index_folder=tmp_path / "ix", ts=(0.9,), batch=16, repeats=1)
    assert result.config["data"] == "digits" and result.config["n"] == 300
    assert result.rows[-1].violations == 0
    agreeing = bench_knn(dataset="digits", limit=300, index_folder=tmp_path / "ix", ts=(0.9,),
                         batch=8, repeats=1)
    assert agreeing.config["n"] == 300
    with pytest.raises(InputError, match="contradicts the index, built on digits"):
        bench_knn(dataset="synthetic", index_folder=tmp_path / "ix")
    with pytest.raises(InputError, match="the first 300 images"):
        bench_knn(limit=100, index_folder=tmp_path / "ix")
    assert_one_line_error(run("bench", "train", "--index", "ix", "--limit", "50", cwd=tmp_path),
                          "--limit 50 contradicts the index")


def test_target_labels_name_the_knn_route():
    from knnflow.bench import parse_target_label

    assert parse_target_label("knn-efm", 10) == {"name": "knn-efm"}
    assert parse_target_label("knn-efm-faster", 10) == {"name": "knn-efm",
                                                         "knn_route": "faster"}
    assert parse_target_label("knn-efm-certify", 10)["knn_route"] == "certify"
    assert parse_target_label("efm-n-shared", 10) == {"name": "efm", "m": 10, "pool": "shared"}
    with pytest.raises(InputError, match="knn-efm-certify"):
        parse_target_label("knn-efm-fastest", 10)
