"""Side-by-side speed and error measurements, each in one run on the same queries: one
module per benchmark (exact, knn, memorization, targets, train), with what they share in
common.py, measure.py (peak memory, errors) and references.py (the baselines and float64
references).

The speed targets are judged on real images (photos, the default data set of every bench,
and the embedded digits) over the whole t range training draws: a grid of t plus one row with
a seeded t ~ U[0,1) per query. `synthetic` stays for scale beyond real data.
"""

from knnflow.bench.common import (
    DEFAULT_DATASET,
    DEFAULT_T_GRID,
    UNIFORM_LABEL,
    bench_index,
    image_shape_for,
    parse_t_grid,
    save_json,
)
from knnflow.bench.exact import bench_exact
from knnflow.bench.knn import bench_knn
from knnflow.bench.memorization import bench_memorization
from knnflow.bench.references import (
    float64_knn,
    float64_velocity,
    id_mismatches,
    naive_velocity,
    oracle_counts,
    oracle_window,
)
from knnflow.bench.targets import bench_targets
from knnflow.bench.train import bench_train, parse_target_label

__all__ = ["DEFAULT_DATASET", "DEFAULT_T_GRID", "UNIFORM_LABEL", "bench_exact", "bench_index",
           "bench_knn", "bench_memorization", "bench_targets", "bench_train", "float64_knn",
           "float64_velocity", "id_mismatches", "image_shape_for", "naive_velocity",
           "oracle_counts", "oracle_window", "parse_t_grid", "parse_target_label",
           "save_json"]
