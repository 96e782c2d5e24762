"""knnflow velocity-error and knnflow hybrid: the numbers against exact and analytic references,
the endpoints of hybrid sampling (τ = 0 is network sampling, τ = 1 the closed-form flow), the
outputs, and one-line errors."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import brute_force_velocity
from test_cli import assert_one_line_error, run

from knnflow.analysis.hybrid import (
    copy_onset,
    hybrid_of_run,
    hybrid_sample,
    parse_taus,
    run_hybrid,
    segment_steps,
)
from knnflow.analysis.velocity_error import (
    T_MAX,
    estimator_velocity,
    plot_title,
    stratified_draws,
    velocity_error,
    velocity_error_figure,
    velocity_error_of_run,
)
from knnflow.data import load_dataset
from knnflow.errors import InputError
from knnflow.estimators import ExactVelocity
from knnflow.index import Index
from knnflow.runs import TrainConfig, load_run_model
from knnflow.sampling import CLOSED_FORM_T_END, integrate, model_velocity, sample_model
from knnflow.trainer import train

LIMIT = 200


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_dataset("digits", limit=LIMIT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "r"
    train(TrainConfig(preset="mlp", limit=LIMIT, batch_size=8, steps=10, checkpoint_every=10,
                      log_every=10), folder)
    return folder


def _zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def _brute(images):
    def velocity(x, t):
        return brute_force_velocity(x, t, images).reshape(x.shape)

    return velocity


# --------------------------------------------------------------------------- velocity error


def test_draws_are_stratified_and_seeded(images):
    draws = list(stratified_draws(images, 4, 50, seed=2))
    edges = np.linspace(0, T_MAX, 5)
    for b, draw in enumerate(draws):
        assert draw.bin == b and draw.x.shape == (50, 1, 8, 8) and draw.x.dtype == torch.float32
        t = draw.t.double().numpy()
        assert (t >= edges[b] - 1e-7).all() and (t <= edges[b + 1] + 1e-7).all()
    again = list(stratified_draws(images, 4, 50, seed=2))
    for a, b in zip(draws, again, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t) and torch.equal(a.ids, b.ids)


def test_velocity_error_of_the_exact_velocity_is_zero(images):
    exact = estimator_velocity(ExactVelocity(images))
    result = velocity_error({"exact": exact, "brute": _brute(images)}, images, exact,
                            t_bins=5, n=12, seed=1, batch_size=7)
    assert (result.errors["exact"] == 0).all() and (result.stderr["exact"] == 0).all()
    # The engine against float64 brute force by explicit differences: within its 1e-5
    # relative tolerance in norm (test_closed_form), so 1e-10 of E‖û*‖² squared.
    assert (result.errors["brute"] <= 1e-10 * result.target_sq).all()
    assert (result.target_sq > 0).all()


def test_zero_network_error_is_the_mean_square_of_u_star(images):
    result = velocity_error({"zero": _zero}, images, estimator_velocity(ExactVelocity(images)),
                            t_bins=4, n=20, seed=3)
    brute = _brute(images)
    for draw in stratified_draws(images, 4, 20, seed=3):
        sq = brute(draw.x, draw.t.double()).flatten(1).square().sum(1)
        b = draw.bin
        # Within the engine's 1e-5 relative tolerance (squared: 2e-5) of the brute force.
        assert result.errors["zero"][b] == pytest.approx(float(sq.mean()), rel=2e-5)
        assert result.stderr["zero"][b] == pytest.approx(
            float(sq.std(correction=1)) / math.sqrt(20), rel=1e-3)
        assert result.t_mean[b] == pytest.approx(float(draw.t.double().mean()))
    assert np.allclose(result.errors["zero"], result.target_sq, rtol=1e-12)


def test_one_training_image_has_an_analytic_error():
    # With one training image x1, û*(x_t, t) = (x1 - x_t)/(1-t) = x1 - x0 on the flow, so a
    # zero network's error is E‖x1 - x0‖² = ‖x1‖² + d in every bin, with variance
    # 2d + 4‖x1‖² per query.
    image = load_dataset("digits", limit=1)
    d, norm_sq = 64, float(image.double().square().sum())
    n = 400
    result = velocity_error({"zero": _zero}, image, estimator_velocity(ExactVelocity(image)),
                            t_bins=4, n=n, seed=0)
    sigma = math.sqrt(2 * d + 4 * norm_sq)
    assert np.all(np.abs(result.errors["zero"] - (norm_sq + d)) < 5 * sigma / math.sqrt(n))
    assert np.allclose(result.stderr["zero"], sigma / math.sqrt(n), rtol=0.25)
    peak = result.peak("zero")
    assert peak["bin"] == int(np.argmax(result.errors["zero"]))
    assert peak["t_range"][0] <= peak["t"] <= peak["t_range"][1]


# --------------------------------------------------------------------------- hybrid


def test_parse_taus():
    assert parse_taus("0:1:11") == [round(i / 10, 12) for i in range(11)]
    assert parse_taus(" 1, 0,0.5,0.5") == [0.0, 0.5, 1.0]
    for bad, fragment in (("0,1.5", "[0, 1]"), ("-0.1", "[0, 1]"), ("a,b", "taus"),
                          ("", "taus"), ("0:1", "taus"), ("0:1:0", "taus"),
                          ("nan", "[0, 1]"), ("0,,1", "taus")):
        with pytest.raises(InputError, match=fragment.replace("[", r"\[")):
            parse_taus(bad)


def test_segment_steps_split_one_grid():
    assert segment_steps(0.0, 100) == (0, 100)
    assert segment_steps(0.3, 100) == (30, 70)
    assert segment_steps(1.0, 100) == (100, 0)
    assert segment_steps(0.9995, 100) == (100, 0)  # past 1 - 1e-3: closed form + denoiser
    assert segment_steps(0.25, 10) == (3, 8)
    with pytest.raises(InputError, match="steps"):
        segment_steps(0.5, 0)


def test_copy_onset_is_where_the_fraction_stays_high():
    taus = [0, 0.2, 0.4, 0.6, 0.8, 1]
    assert copy_onset(taus, np.array([0, 0.2, 0.95, 0.8, 0.9, 1.0])) == 0.8
    assert copy_onset(taus, np.array([0, 0.9, 0.95, 0.92, 0.9, 1.0])) == 0.2
    assert copy_onset(taus, np.array([0, 0, 0, 0, 0.95, 0.5])) is None
    assert copy_onset(taus, np.ones(6)) == 0


def test_hybrid_endpoints(tiny_run, images):
    model, record = load_run_model(tiny_run)
    shape = tuple(record["image_shape"])
    index = Index.build(images)
    exact = ExactVelocity(index.training_set())
    result = run_hybrid(model_velocity(model), exact, index, shape, [0.0, 0.5, 1.0], n=12,
                        seed=5, solver="heun", steps=10, reference_size=50)
    # τ = 0 is plain network sampling from the same noises and time grid (and the same
    # batches: 256, sample_model's).
    plain = sample_model(model, 12, shape, seed=5, solver="heun", steps=10)
    assert torch.equal(result.samples[0], plain)
    # τ = 1 is the closed-form flow from those noises (float64 to 1 - 1e-3, then the
    # denoiser), and every sample is a training image.
    noise = torch.randn(12, *shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(result.noise, noise)

    def u_star(x, t):
        return exact(x.to(torch.float32), t.to(torch.float64)).velocity.to(x.dtype)

    end = integrate(u_star, noise.double(), "heun", 10, t_end=CLOSED_FORM_T_END)
    closed = exact.denoiser(end.reshape(12, -1).float(), CLOSED_FORM_T_END).float()
    assert torch.equal(result.samples[2], closed.clamp(-1, 1).reshape(12, *shape))
    assert torch.equal(result.closed_form, result.samples[2])
    assert result.memorized_fraction[2] == 1.0
    assert float(result.d1[2].max()) < 1e-3
    assert result.to_closed_form[2].abs().max() == 0
    # A 10-step MLP makes blobs far from every digit: nothing memorized at τ = 0.
    assert result.memorized_fraction[0] == 0.0
    assert result.copy_tau in (0.5, 1.0)
    rows = result.rows()
    assert [r["closed_form_steps"] for r in rows] == [0, 5, 10]
    assert [r["network_steps"] for r in rows] == [10, 5, 0]
    # The distance to the τ = 1 sample, recomputed.
    expect = (result.samples[1].double() - closed.double().reshape(12, *shape)).flatten(1)
    assert torch.allclose(result.to_closed_form[1], expect.norm(dim=1))


def test_hybrid_sample_with_the_closed_form_as_network_switches_seamlessly(images):
    # If the "network" is û* itself, switching at τ changes nothing before 1 - 1e-3: the two
    # parts lie on one grid (euler, 20 steps, τ = 0.5 on a grid point).
    exact = ExactVelocity(images)

    def network(x, t):
        return exact(x, t.to(torch.float64)).velocity

    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    half = hybrid_sample(network, exact, noise, 0.5, "euler", 20)
    whole = hybrid_sample(network, exact, noise, 0.0, "euler", 20)
    assert torch.allclose(half, whole, atol=1e-4)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        hybrid_sample(network, exact, noise, 1.5)


# --------------------------------------------------------------------------- command line


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The knnflow command in this process (as the console script runs it): exit status,
    stdout, stderr."""
    from knnflow.cli.main import run as main

    monkeypatch.setattr(sys, "argv", ["knnflow", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_commands_write_plots_csv_and_summaries(tiny_run, monkeypatch, capsys):
    # velocity-error as a user runs it (a subprocess); hybrid in this process (faster).
    result = run("velocity-error", str(tiny_run), "--t-bins", "4", "--n", "16")
    assert result.returncode == 0, result.stderr
    out = tiny_run / "velocity-error"
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "velocity_error.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and (out / "velocity_error.png").stat().st_size > 10_000
    for name in ("ema", "raw"):
        errors = [float(row[f"error_{name}"]) for row in table]
        peak = summary["weights"][name]["peak"]
        assert peak["bin"] == int(np.argmax(errors))
        assert peak["error"] == pytest.approx(errors[peak["bin"]], rel=1e-8)
        assert float(table[peak["bin"]]["t_low"]) <= peak["t"] <= float(
            table[peak["bin"]]["t_high"])
    assert "peak at t" in result.stdout
    assert_one_line_error(run("velocity-error", str(tiny_run)), "already exists")

    code, stdout, err = _main(monkeypatch, capsys, "hybrid", tiny_run, "--taus", "0,0.5,1",
                              "--n", "10", "--steps", "10", "--rows", "3", "--json")
    assert code == 0, err
    out = tiny_run / "hybrid"
    summary = json.loads(stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["taus"] == [0.0, 0.5, 1.0]
    assert summary["per_tau"][-1]["memorized_fraction"] == 1.0
    assert summary["per_tau"][-1]["to_closed_form_mean"] == 0.0
    assert summary["copy_tau"] is not None and "copy_rule" in summary
    with np.load(out / "samples.npz") as arrays:
        assert arrays["samples"].shape == (3, 10, 1, 8, 8)
        assert np.allclose(arrays["d1"].mean(1), [r["d1_mean"] for r in summary["per_tau"]])
    for name in ("hybrid.png", "grid.png"):
        assert (out / name).stat().st_size > 10_000
    with open(out / "hybrid.csv") as f:
        assert [float(r["tau"]) for r in csv.DictReader(f)] == [0.0, 0.5, 1.0]
    code, stdout, err = _main(monkeypatch, capsys, "hybrid", tiny_run, "--n", "4")
    assert code == 2 and err.strip().splitlines() == [
        f"error: {out} already exists; pass --overwrite to replace it"]


def test_index_gives_the_certified_u_star(tiny_run, images, tmp_path):
    Index.build(images).save(tmp_path / "index")
    exact, _ = velocity_error_of_run(tiny_run, weights=("ema",), t_bins=3, n=8)
    knn, summary = velocity_error_of_run(tiny_run, weights=("ema",), t_bins=3, n=8,
                                         index=tmp_path / "index")
    assert "KNNVelocity" in summary["reference"]
    assert np.allclose(knn.errors["ema"], exact.errors["ema"], rtol=1e-3)
    result, summary = hybrid_of_run(tiny_run, taus=[1.0], n=6, steps=10,
                                    index=tmp_path / "index", reference_size=20)
    assert result.memorized_fraction[0] == 1.0 and "KNNVelocity" in summary["closed_form"]
    Index.build(images[:100]).save(tmp_path / "other")
    with pytest.raises(Exception, match="other data|holds 100 points"):
        velocity_error_of_run(tiny_run, t_bins=2, n=2, index=tmp_path / "other")


@pytest.mark.parametrize("args, fragment", [
    (("velocity-error", "{run}", "--t-bins", "0"), "--t-bins"),
    (("velocity-error", "{run}", "--n", "-3"), "--n"),
    (("velocity-error", "{run}", "--weights", "best"), "both, ema or raw"),
    (("hybrid", "{run}", "--n", "0"), "--n"),
    (("hybrid", "{run}", "--taus", "0,1.2"), "[0, 1]"),
    (("hybrid", "{run}", "--taus", "0;0.5"), "--taus"),
    (("hybrid", "{run}", "--taus", "0:1"), "start:stop:count"),
    (("hybrid", "{run}", "--copy-fraction", "0"), "--copy-fraction"),
    (("velocity-error", "{empty}"), "not a run folder"),
    (("hybrid", "{nocheckpoint}"), "no complete checkpoint"),
    (("hybrid", "{missing}"), "no run folder"),
])
def test_bad_input_is_one_line(tmp_path, tiny_run, monkeypatch, capsys, args, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nocheckpoint").mkdir()
    (tmp_path / "nocheckpoint" / "config.json").write_text(
        (tiny_run / "config.json").read_text())
    paths = {"run": tiny_run, "empty": tmp_path / "empty",
             "nocheckpoint": tmp_path / "nocheckpoint", "missing": tmp_path / "missing"}
    argv = [arg.format(**paths) for arg in args]
    code, _, err = _main(monkeypatch, capsys, *argv, "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()


def _inside(inner, outer, slack: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.x1 <= outer.x1 + slack
            and inner.y0 >= outer.y0 - slack and inner.y1 <= outer.y1 + slack)


def test_velocity_error_title_of_a_long_run_path_fits_the_figure(images):
    import matplotlib.pyplot as plt

    exact = estimator_velocity(ExactVelocity(images))
    result = velocity_error({"ema": exact}, images, exact, t_bins=3, n=4, seed=0)
    run_path = "runs/" + "a-long-experiment-folder-name/" * 4 + "digits-knn-efm"
    title = plot_title({"run": run_path, "checkpoint_step": 2000, "n_train": 1498,
                        "n_per_bin": 4})
    fig = velocity_error_figure(result, title)
    fig.canvas.draw()
    drawn = fig.axes[0].title
    assert "".join(drawn.get_text().split()) == "".join(title.split())  # every word kept
    assert _inside(drawn.get_window_extent(), fig.bbox)
    plt.close(fig)
