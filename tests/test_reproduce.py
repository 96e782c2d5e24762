"""knnflow reproduce: the whole pipeline at a tiny budget (its table against the analyses
recomputed from the outputs it saved; a second call that reuses every finished stage and
resumes an interrupted run), the verdict rules on hand-made numbers, and one-line errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_cli import assert_one_line_error, run
from threadpoolctl import threadpool_limits

from knnflow.analysis.features import feature_extractor
from knnflow.analysis.fid import (
    bootstrap_fid,
    feature_statistics,
    fid,
    frechet_distance,
    frechet_distance_psd,
    psd_sqrt,
)
from knnflow.analysis.hybrid import copy_onset, hybrid_of_run
from knnflow.analysis.reproduce import (
    BUDGETS,
    DATASETS,
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    Comparison,
    Estimate,
    TargetSpec,
    claim_collapse,
    claim_copy_onset,
    claim_knn_vs_cfm,
    combine,
    default_work_folder,
    difference_verdict,
    final_loss,
    get_budget,
    prepare_work_folder,
    reproduce,
    run_config,
)
from knnflow.analysis.velocity_error import velocity_error_of_run
from knnflow.data import load_dataset
from knnflow.errors import InputError
from knnflow.index import Index
from knnflow.nearest import nearest_training
from knnflow.runs import load_run_model
from knnflow.samples import load_samples
from knnflow.sampling import sample_model
from knnflow.trainer import train

LIMIT = 150
SHAPE = (1, 8, 8)
LABELS = ["cfm", "ot-cfm", "efm-128", f"efm-{LIMIT}", "knn-efm"]


@pytest.fixture(scope="module")
def budget():
    # The mlp preset keeps it fast; 256 samples keep the bootstrap's covariances of 128
    # features non-singular.
    return replace(BUDGETS["digits"]["small"], name="test", preset="mlp", steps=20,
                   batch_size=16,
                   log_every=5, checkpoint_every=10, samples=256, sample_steps=5,
                   velocity_bins=2, velocity_n=16, hybrid_n=8, hybrid_steps=5, taus="0,0.9,1",
                   classifier_epochs=1, collapse_pairs=16, collapse_grid="0:0.9:0.3",
                   collapse_sides=None, bootstrap=8, limit=LIMIT)


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory, budget):
    """Three calls' worth of state: cfm interrupted at step 10, the first full call, then a
    second call after the hybrid output of knn-efm was lost."""
    base = tmp_path_factory.mktemp("reproduce")
    work, md = base / "work", base / "docs" / "digits.md"
    prepare_work_folder(work, "digits", budget, overwrite=False)
    partial = run_config("digits", replace(budget, steps=10), TargetSpec("cfm", "cfm"), 0,
                         work / "index")
    train(partial, work / "runs" / "cfm-seed0")
    first = reproduce("digits", budget, work=work, out_md=md)
    checkpoints = sorted(work.glob("runs/*/checkpoints/*"))
    before = {path: path.stat().st_mtime_ns for path in
              [*checkpoints, *work.glob("runs/*/samples/samples.npz")]}
    lost = work / "runs" / "knn-efm-seed0" / "hybrid"
    for file in lost.iterdir():
        file.unlink()
    lost.rmdir()
    second = reproduce("digits", budget, work=work, out_md=md)
    return {"work": work, "md": md, "first": first, "second": second, "before": before}


@pytest.fixture
def one_blas_thread():
    # scipy's sqrtm (FID) on 128×128 covariances is 200× slower with two OpenBLAS threads when
    # the cores are shared; reproduce() limits them the same way.
    with threadpool_limits(limits=1):
        yield


def test_table_matches_the_analyses_recomputed_from_saved_outputs(reproduction, budget,
                                                                  one_blas_thread):
    first, work = reproduction["first"], reproduction["work"]
    index = Index.load(work / "index")
    assert [row.label for row in first.rows] == LABELS
    reference = load_dataset("digits", split="test")
    extractor = feature_extractor(f"classifier:{work / 'classifier'}")
    for row in first.rows:
        folder = first.runs[f"{row.label}-seed0"]
        samples = load_samples(folder / "samples", SHAPE)
        assert len(samples) == budget.samples
        assert row.fid.value == pytest.approx(fid(samples, reference, extractor).fid, rel=1e-9)
        assert row.fid.se > 0
        saved = json.loads((folder / "memorization" / "summary.json").read_text())
        assert row.memorized == saved["memorized"]["fraction"]
        assert row.d1 == saved["d1"]["mean"]
        scores = nearest_training(index, samples)
        assert row.memorized == float((scores.ratio < 1 / 3).double().mean())
        assert row.d1 == pytest.approx(float(scores.distances[:, 0].mean()), rel=1e-12)
        result, _ = velocity_error_of_run(folder, weights=("ema",), t_bins=2, n=16, seed=0)
        assert row.velocity_error.value == pytest.approx(float(result.errors["ema"].mean()),
                                                         rel=1e-9)
        hybrid = json.loads((folder / "hybrid" / "summary.json").read_text())
        fractions = [r["memorized_fraction"] for r in hybrid["per_tau"]]
        assert row.copy_tau == [copy_onset(hybrid["taus"], np.array(fractions))]
        logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text()
                  .splitlines()]
        tail = [m["loss"] for m in logged if m["step"] > 0.9 * budget.steps]
        assert row.loss.value == pytest.approx(float(np.mean(tail)), rel=1e-12)
    # The samples are those of sample_model (same noises, Euler steps and EMA weights), and
    # hybrid sampling run again gives the recorded curve.
    folder = first.runs["knn-efm-seed0"]
    model, _ = load_run_model(folder)
    saved = torch.from_numpy(np.load(folder / "samples" / "samples.npz")["samples"])
    assert torch.equal(saved, sample_model(model, budget.samples, SHAPE, seed=0, steps=5))
    again, _ = hybrid_of_run(folder, taus=budget.taus, n=8, seed=0, steps=5)
    assert again.memorized_fraction.tolist() == \
        first.records["hybrid-knn-efm-seed0"]["result"]["memorized_fraction"]


def test_markdown_holds_table_verdicts_figures_and_setup(reproduction):
    first, md = reproduction["first"], reproduction["md"]
    text = md.read_text()
    assert "| target | final training loss | ms / step | FID (classifier features) |" in text
    for label in LABELS:
        assert f"\n| {label} | " in text
    assert text.count("**Verdict: ") == 3
    for verdict in first.verdicts:
        assert verdict.verdict in (HELD, NOT_HELD, INCONCLUSIVE)
        assert f"**Verdict: {verdict.verdict}.**" in text
    for key in ("Command:", "Date:", "Machine:", "torch", "Budget `test`", "20 steps", "mlp",
                "wall time", "small experiment", "collapse time T = "):
        assert key in text
    for name in ("samples", "loss", "velocity_error", "hybrid", "collapse"):
        figure = md.parent / "digits" / f"{name}.png"
        assert figure.is_file() and figure.stat().st_size < 300_000
        assert f"](digits/{name}.png)" in text


def test_second_call_reuses_finished_stages_and_resumes_interrupted_training(reproduction):
    first, second = reproduction["first"], reproduction["second"]
    assert first.records["train-cfm-seed0"]["result"]["resumed_from"] == 10
    assert first.records["train-efm-128-seed0"]["result"]["resumed_from"] is None
    computed = [stage.name for stage in second.stages if not stage.reused]
    assert computed == ["hybrid-knn-efm-seed0"]
    assert len(second.stages) == len(first.stages) == 4 + 6 * len(LABELS)
    for path, mtime in reproduction["before"].items():
        assert path.stat().st_mtime_ns == mtime, path
    assert [r.fid for r in second.rows] == [r.fid for r in first.rows]
    assert [r.copy_tau for r in second.rows] == [r.copy_tau for r in first.rows]


def test_difference_verdict_from_hand_made_numbers():
    assert difference_verdict(Estimate(5.0, 1.0))[0] == HELD
    assert difference_verdict(Estimate(-5.0, 1.0))[0] == NOT_HELD
    verdict, reason = difference_verdict(Estimate(1.5, 1.0))
    assert verdict == INCONCLUSIVE and "within" in reason
    assert difference_verdict(Estimate(1.0, float("nan")))[0] == INCONCLUSIVE
    assert difference_verdict(Estimate(0.5, 0.0))[0] == HELD


def _cmp(baseline: float, candidate: float, se: float) -> Comparison:
    return Comparison.independent(Estimate(baseline, se), Estimate(candidate, se))


def test_knn_vs_cfm_verdict_from_hand_made_numbers():
    better, same, worse = _cmp(30, 20, 1), _cmp(30, 29, 1), _cmp(20, 30, 1)
    loss = _cmp(0.5, 0.3, 0.01)
    assert claim_knn_vs_cfm(better, same, loss).verdict == HELD
    assert claim_knn_vs_cfm(better, better, loss).verdict == HELD
    verdict = claim_knn_vs_cfm(same, better, loss)
    assert verdict.verdict == INCONCLUSIVE and "closer to û*" in verdict.reason
    assert claim_knn_vs_cfm(worse, better, loss).verdict == NOT_HELD
    assert claim_knn_vs_cfm(better, worse, loss).verdict == NOT_HELD
    # The loss is reported but does not decide.
    assert claim_knn_vs_cfm(same, same, _cmp(0.3, 0.5, 0.01)).verdict == INCONCLUSIVE
    assert any("cfm 30 ± 1" in line for line in claim_knn_vs_cfm(better, same, loss).measured)


def test_collapse_verdict_from_hand_made_numbers():
    sizes = [{"size": "8x8", "d": 64, "collapse_time": 0.3}]
    assert claim_collapse(sizes, "8x8").verdict == HELD
    late = [{"size": "8x8", "d": 64, "collapse_time": 0.71},
            {"size": "16x16", "d": 256, "collapse_time": 0.59},
            {"size": "32x32", "d": 1024, "collapse_time": 0.42}]
    verdict = claim_collapse(late, "8x8")
    assert verdict.verdict == NOT_HELD
    assert "0.71" in verdict.reason and "collapse earlier as d grows" in verdict.reason
    flat = [late[0], {"size": "32x32", "d": 1024, "collapse_time": 0.8}]
    assert "do not collapse earlier" in claim_collapse(flat, "8x8").reason
    assert claim_collapse([{"size": "8x8", "d": 64, "collapse_time": None}],
                          "8x8").verdict == NOT_HELD


def test_copy_onset_verdict_from_hand_made_numbers():
    curve = {0.0: 0.0, 0.5: 0.2, 0.8: 0.95, 0.9: 0.97, 1.0: 1.0}
    held = claim_copy_onset({"cfm": 0.8, "knn-efm": 0.8}, {"cfm": curve, "knn-efm": curve},
                            n=128, collapse_t=0.71)
    assert held.verdict == HELD and "τ = 0.8" in held.reason and "0.71" in held.reason
    never = {0.0: 0.0, 0.9: 0.2, 1.0: 1.0}
    failed = claim_copy_onset({"cfm": 0.8, "knn-efm": 1.0}, {"cfm": curve, "knn-efm": never},
                              n=128, collapse_t=0.71)
    assert failed.verdict == NOT_HELD and "knn-efm (20% at τ = 0.9)" in failed.reason
    near_copies = claim_copy_onset({"cfm": 1.0}, {"cfm": never}, n=128, collapse_t=0.71,
                                   distances={"cfm": {0.0: 2.4, 0.9: 0.6, 1.0: 0.0}},
                                   reference=2.0)
    assert "distance of 0.6 to the nearest training image, 30% of" in near_copies.reason
    assert "shrinks at every step of τ" in near_copies.reason
    assert any("0.9: 20% (0.6)" in line for line in near_copies.measured)
    near = {0.0: 0.0, 0.9: 0.88, 1.0: 1.0}
    assert claim_copy_onset({"cfm": 1.0}, {"cfm": near}, n=128,
                            collapse_t=0.71).verdict == INCONCLUSIVE
    # The same 88% over 4096 noises is far from the copy level.
    assert claim_copy_onset({"cfm": 1.0}, {"cfm": near}, n=4096,
                            collapse_t=0.71).verdict == NOT_HELD


def test_combine_and_final_loss(tmp_path):
    one = combine([Estimate(2.0, 0.5)])
    assert (one.value, one.se) == (2.0, 0.5)
    two = combine([Estimate(1.0, 0.1), Estimate(3.0, 0.1)])
    assert two.value == 2.0 and two.se == pytest.approx(math.sqrt(2) / math.sqrt(2))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": loss}) + "\n"
                               for s, loss in ((50, 9.0), (90, 1.0), (95, 2.0), (100, 3.0))))
    loss = final_loss(metrics, 100)
    assert loss.value == 2.5 and loss.se == pytest.approx(0.5)


def test_symmetric_frechet_distance_equals_fid_module():
    gen = np.random.default_rng(3)
    a, b = gen.normal(size=(500, 6)), gen.normal(size=(400, 6)) @ gen.normal(size=(6, 6))
    mu1, sigma1 = feature_statistics(a)
    mu2, sigma2 = feature_statistics(b)
    assert frechet_distance_psd(mu1, sigma1, mu2, psd_sqrt(sigma2)) == \
        pytest.approx(frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-9)


def test_bootstrap_resamples_the_reference_once_per_replicate():
    gen = np.random.default_rng(0)
    features = {"a": gen.normal(size=(4000, 4)), "b": gen.normal(size=(4000, 4)) + 0.1}
    reference = gen.normal(size=(40, 4))
    replicates = bootstrap_fid(features, reference, replicates=30, seed=1)
    again = bootstrap_fid(features, reference, replicates=30, seed=1)
    assert np.array_equal(replicates["a"], again["a"])
    # Few reference images, many samples: the shared reference draw dominates each FID's
    # spread, and cancels in the paired difference.
    assert replicates["a"].std() > 0
    assert (replicates["a"] - replicates["b"]).std() < 0.5 * replicates["a"].std()


def test_budgets_and_work_folders():
    small = get_budget("digits", "small")
    assert small.steps == 800 and small.preset == "tiny" and small.threads == 1
    assert get_budget("digits", "full").seeds == (0, 1)
    cifar = get_budget("cifar10", "full")
    assert (cifar.preset, cifar.batch_size, cifar.steps, cifar.flip) == ("cifar", 128, 500_000,
                                                                         True)
    assert str(default_work_folder("digits", small)) == "runs/reproduce-digits-small"
    assert str(default_work_folder("digits", get_budget("digits", "small", steps=100,
                                                        limit=300))) \
        == "runs/reproduce-digits-small-steps100-limit300"
    with pytest.raises(InputError, match="digits, mnist, cifar10"):
        get_budget("celeba", "small")
    with pytest.raises(InputError, match="small, full"):
        get_budget("digits", "huge")
    with pytest.raises(InputError, match="steps"):
        get_budget("digits", "small", steps=0)


def test_refuses_a_folder_that_is_not_a_work_folder(tmp_path, budget):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a knnflow reproduce work folder"):
        prepare_work_folder(tmp_path, "digits", budget, overwrite=True)
    assert (tmp_path / "notes.txt").is_file()


def test_cli_bad_input_is_one_line_with_exit_status_2(tmp_path):
    result = run("reproduce", "celeba", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "celeba", "digits, mnist, cifar10")
    result = run("reproduce", "mnist", cwd=tmp_path)  # no MNIST files where they belong
    assert_one_line_error(result, "train-images-idx3-ubyte", "data/mnist")
    result = run("reproduce", "digits", "--budget", "bad", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "--budget", "'bad'", "small", "full")
    result = run("reproduce", "cifar10", "--root", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "nowhere")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "docs").exists()


def test_the_page_never_replaces_a_folder_it_did_not_make(tmp_path):
    """The figures go to the page's path without .md: a folder there that this command did
    not make, or one that holds the work folder, is refused; trial settings get their own
    page."""
    from knnflow.analysis.reproduce.budgets import (
        BUDGETS,
        FIGURES_MARK,
        check_page_paths,
        default_page,
    )
    from knnflow.errors import InputError

    (tmp_path / "mine").mkdir()
    with pytest.raises(InputError, match="holds no figures"):
        check_page_paths(tmp_path / "mine.md", tmp_path / "work")
    (tmp_path / "mine" / FIGURES_MARK).write_text("")
    check_page_paths(tmp_path / "mine.md", tmp_path / "work")
    with pytest.raises(InputError, match="would hold the work folder"):
        check_page_paths(tmp_path / "wk.md", tmp_path / "wk" / "inner")
    with pytest.raises(InputError, match=".md"):
        check_page_paths(tmp_path / "page.txt", tmp_path / "work")
    small = BUDGETS["digits"]["small"]
    assert default_page("digits", small).name == "digits.md"
    assert default_page("digits", replace(small, steps=50, limit=200)).name == \
        "digits-steps50-limit200.md"


def _fake_mnist(root, count: dict[str, int]) -> None:
    """An MNIST tree in torchvision's raw layout: digits upscaled 3× and padded to 28×28,
    with their labels, as idx files."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_dataset("digits", split=split, limit=count[split],
                                      with_labels=True)
        pixels = np.round((images[:, 0].numpy() + 1) * 127.5).astype(np.uint8)
        big = np.pad(np.kron(pixels, np.ones((3, 3), np.uint8)), ((0, 0), (2, 2), (2, 2)))
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", *big.shape) + big.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", len(labels))
            + labels.numpy().astype(np.uint8).tobytes())


def test_reproduce_mnist_end_to_end_on_an_mnist_tree(tmp_path, budget):
    """`knnflow reproduce mnist --root R`: the whole comparison on MNIST's files (here a
    small tree of 28×28 images made from digits), at a tiny budget."""
    _fake_mnist(tmp_path / "mnist", {"train": 200, "test": 120})
    assert "mnist" in DATASETS and {"small", "full"} <= set(BUDGETS["mnist"])
    small = replace(BUDGETS["mnist"]["small"], name="test", preset="mlp", steps=4,
                    batch_size=16, log_every=2, checkpoint_every=4, samples=160,
                    sample_steps=3, velocity_bins=2, velocity_n=8, hybrid_n=4, hybrid_steps=3,
                    taus="0,1", classifier_epochs=1, collapse_pairs=8, collapse_grid="0:0.9:0.45",
                    collapse_sides=None, bootstrap=4, limit=150, threads=1)
    md = tmp_path / "docs" / "mnist.md"
    result = reproduce("mnist", small, root=tmp_path / "mnist", work=tmp_path / "work",
                       out_md=md)
    text = md.read_text()
    assert text.startswith("# Reproducing the paper's claims on mnist")
    assert "on 150 1×28×28 images (d = 784)" in text
    assert [row.label for row in result.rows] == ["cfm", "ot-cfm", "efm-128", "efm-150",
                                                  "knn-efm"]
    assert all(math.isfinite(row.fid.value) for row in result.rows)
    missing = run("reproduce", "mnist", "--root", str(tmp_path / "none"), "--steps", "1",
                  cwd=tmp_path)
    assert_one_line_error(missing, "mnist", str(tmp_path / "none"))
