"""knnflow collapse: cosine(û*, x1 - x0) and max λ against float64 brute force, the
collapse-time rule on hand-made arrays, parsing, and the command as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from knnflow.analysis.collapse import (
    collapse_time,
    compute_collapse,
    draw_pairs,
    parse_sides,
    persistent_fraction,
)
from knnflow.errors import InputError, KnnflowError
from knnflow.t_grid import format_t


def brute_force_pairs(images: torch.Tensor, grid, pairs: int, seed: int = 0):
    """(cosine, max λ), each (T, P), in float64 by explicit differences and torch.softmax over
    all n logits: an independent reference for compute_collapse at the images' own size."""
    flat = images.reshape(images.shape[0], -1).to(torch.float64)
    ids, x0 = draw_pairs(flat.shape[0], flat.shape[1], pairs, seed, tuple(images.shape[2:]))
    x1 = flat[ids]
    cosines, weights = [], []
    for t in grid:
        x = (1 - t) * x0 + t * x1
        logits = -(x[:, None, :] - t * flat[None]).square().sum(-1) / (2 * (1 - t) ** 2)
        lam = torch.softmax(logits, dim=1)
        velocity = (lam @ flat - x) / (1 - t)
        cosines.append(torch.nn.functional.cosine_similarity(velocity, x1 - x0, dim=1))
        weights.append(lam.max(dim=1).values)
    return torch.stack(cosines).numpy(), torch.stack(weights).numpy()


GRID = [0.0, 0.0005, 0.05, 0.3, 0.6, 0.8, 0.95, 0.999]


@pytest.fixture(scope="module")
def small_digits(digits) -> torch.Tensor:
    return digits[:200].reshape(-1, 1, 8, 8)


@pytest.fixture(scope="module")
def reference(small_digits):
    return brute_force_pairs(small_digits, GRID, 24)


# --------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("estimator", ["exact", "knn"])
def test_one_point_data_set_gives_cosine_one_and_weight_one(estimator):
    # With one training point x1, û*(x_t, t) = (x1 - x_t)/(1 - t) = x1 - x0 at every t.
    image = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    result = compute_collapse(image, pairs=16, grid=GRID, estimator=estimator)
    assert result.cosine.shape == (1, len(GRID), 16)
    np.testing.assert_allclose(result.cosine, 1.0, atol=1e-12)
    np.testing.assert_allclose(result.max_weight, 1.0, atol=1e-12)
    assert result.collapse_time == 0.0


@pytest.mark.parametrize("compute_dtype, tolerance", [(torch.float64, 1e-10),
                                                      (torch.float32, 1e-5)])
def test_exact_engine_matches_float64_brute_force(small_digits, reference, compute_dtype,
                                                  tolerance):
    result = compute_collapse(small_digits, pairs=24, grid=GRID, estimator="exact",
                              compute_dtype=compute_dtype)
    cos, weight = reference
    np.testing.assert_allclose(result.cosine[0], cos, atol=tolerance)
    np.testing.assert_allclose(result.max_weight[0], weight, atol=tolerance)
    assert weight[0].max() == pytest.approx(1 / 200)  # t = 0: every weight is 1/n
    assert weight[-1].min() > 0.999 and weight[2].max() < 0.9  # collapsed at the end only


def test_knn_estimator_matches_float64_brute_force(small_digits, reference):
    result = compute_collapse(small_digits, pairs=24, grid=GRID, estimator="knn", tol=1e-6)
    cos, weight = reference
    assert result.estimators == ["knn"]
    # Late rows are certified from the nearest neighbours, not sent to the exact engine.
    assert result.exact_rows[0] < len(GRID) * 24
    np.testing.assert_allclose(result.cosine[0], cos, atol=1e-5)
    np.testing.assert_allclose(result.max_weight[0], weight, rtol=1e-8, atol=1e-5)


def test_sizes_share_the_training_images_and_keep_their_own_pairs(small_digits):
    both = compute_collapse(small_digits, pairs=8, grid=[0.2, 0.9], sides=[4, 8])
    alone = compute_collapse(small_digits, pairs=8, grid=[0.2, 0.9])
    assert both.labels == ["4x4", "8x8"] and both.dims == [16, 64] and both.headline == 1
    np.testing.assert_array_equal(both.cosine[1], alone.cosine[0])
    assert both.collapse_time == alone.collapse_time


# --------------------------------------------------------------------------- the rule


def test_collapse_time_rule_on_hand_made_arrays():
    grid = np.array([0.0, 0.25, 0.5, 0.75])
    weights = np.full((4, 10), 0.1)
    weights[1:, :9] = 0.95                      # 9 of 10 pairs collapse at 0.25 for good
    assert collapse_time(weights, grid) == 0.25
    churn = weights.copy()
    churn[1, 9] = 0.95                          # pair 9 above at 0.25 only ...
    churn[2, 0] = 0.5                           # ... while pair 0 drops at 0.5
    # At 0.25 all ten are above, but pair 0 does not keep it: 0.9 of pairs from 0.5 on? No,
    # pair 0 recovers at 0.75 and pair 9 is out, so only 8 kept through 0.5.
    np.testing.assert_allclose(persistent_fraction(churn, 0.9), [0.0, 0.8, 0.8, 0.9])
    assert (churn[1] > 0.9).mean() == 1.0       # per-t fraction alone would say 0.25
    assert collapse_time(churn, grid) == 0.75
    exactly = np.where(weights > 0.9, 0.9, weights)  # 0.9 itself is not above 0.9
    assert collapse_time(exactly, grid) is None
    assert collapse_time(np.ones((4, 10)), grid) == 0.0


# --------------------------------------------------------------------------- parsing


def test_parse_sides():
    assert parse_sides("8,16, 32,8") == [8, 16, 32]
    assert parse_sides(None) is None
    for bad in ("8,x", "0", "-4", "8.5", "8,,16", "4096"):
        with pytest.raises(InputError, match="dims"):
            parse_sides(bad)


# --------------------------------------------------------------------------- the command


def invoke(*args: str):
    from knnflow.cli.main import app

    return CliRunner().invoke(app, ["collapse", *args])


@pytest.mark.parametrize("args, fragment", [
    (("--t-grid", "0:1:0.5"), "t = 1 is invalid"),
    (("--t-grid", "0.2:0.5"), "--t-grid takes start:stop:step"),
    (("--dims", "8,sixteen"), "--dims"),
    (("--pairs", "0"), "--pairs must be at least 1"),
    (("--estimator", "fast"), "--estimator"),
    (("no-such-set",), "unknown data set"),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, fragment):
    result = invoke(*args, "--out", str(tmp_path / "out"))
    assert isinstance(result.exception, KnnflowError), result.output
    assert fragment in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_bad_t_grid_from_the_shell_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "knnflow.cli.main", "collapse", "--t-grid",
                             "0,0.5,1", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "[0, 1)" in lines[0]


def test_command_on_digits_writes_every_plotted_number(tmp_path):
    out = tmp_path / "report"
    grid = "0,0.3,0.6,0.75,0.9,0.99"
    result = invoke("digits", "--pairs", "32", "--t-grid", grid, "--dims", "4,8",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    line = [x for x in result.output.splitlines() if x.startswith("collapse time: ")]
    assert line == [f"collapse time: {format_t(summary['collapse_time'])}"]
    assert summary["n"] == 1498 and summary["pairs"] == 32 and summary["headline_size"] == "8x8"
    assert [s["d"] for s in summary["sizes"]] == [16, 64]
    assert summary["grid"] == [0, 0.3, 0.6, 0.75, 0.9, 0.99]

    with (out / "collapse.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 6
    for size in summary["sizes"]:
        mine = [r for r in rows if r["size"] == size["size"]]
        first = next((float(r["t"]) for r in mine
                      if float(r["frac_collapsed_for_good"]) >= 0.9), None)
        assert size["collapse_time"] == first
        assert all(float(r["frac_collapsed_for_good"]) <= float(r["frac_max_weight_gt_0.9"])
                   for r in mine)
    with (out / "collapse_histograms.csv").open() as handle:
        bins = list(csv.DictReader(handle))
    for size in ("4x4", "8x8"):
        for t in {r["t"] for r in bins if r["size"] == size}:
            assert sum(int(r["count"]) for r in bins if (r["size"], r["t"]) == (size, t)) == 32
    assert (out / "collapse.png").stat().st_size > 20_000

    again = invoke("digits", "--pairs", "32", "--t-grid", grid, "--out", str(out))
    assert isinstance(again.exception, InputError) and "--overwrite" in str(again.exception)
    as_json = invoke("digits", "--pairs", "4", "--t-grid", "0.5,0.999", "--out", str(out),
                     "--overwrite", "--json")
    assert as_json.exit_code == 0
    quick = json.loads(as_json.output)  # stdout holds the JSON summary and nothing else
    assert quick["pairs"] == 4 and quick["collapse_time"] in (0.5, 0.999)
    assert json.loads((out / "summary.json").read_text()) == quick


@pytest.mark.parametrize("estimator, words", [("exact", "the exact engine"),
                                              ("knn", "the certified kNN estimator")])
def test_the_figure_names_its_estimator_and_keeps_the_legend_off_the_bars(small_digits,
                                                                          estimator, words):
    import matplotlib.pyplot as plt

    from knnflow.analysis.collapse_report import collapse_figure

    result = compute_collapse(small_digits, pairs=16, grid=np.array(GRID), estimator=estimator)
    fig = collapse_figure(result, "digits")
    fig.canvas.draw()
    assert f"û* computed by {words}" in fig._suptitle.get_text()
    first = fig.axes[0]  # the t = 0 histogram
    assert first.get_title() == "t = 0.00"
    legend = first.get_legend().get_window_extent()
    assert legend.y0 >= first.get_window_extent().y1  # above the panel, not over its bars
    plt.close(fig)
