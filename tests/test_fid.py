"""Fréchet distances checked against closed forms and numpy eigendecompositions; the digits
classifier; the feature extractors with small stand-in weights; the fid CLI's one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import numpy as np
import pytest
import torch

from knnflow.analysis.classifier import (
    load_classifier,
    save_classifier,
    shift_augment,
    train_classifier,
)
from knnflow.analysis.features import extract_features, feature_extractor
from knnflow.analysis.fid import (
    bootstrap_fid,
    feature_statistics,
    fid,
    frechet_distance,
    parse_reference,
)
from knnflow.data import load_dataset
from knnflow.errors import InputError, MissingFileError

KNNFLOW = [sys.executable, "-m", "knnflow.cli.main"]
NOISE_LEVELS = (0.05, 0.1, 0.2, 0.4, 0.8)


def run(*args: str) -> subprocess.CompletedProcess:
    """The knnflow command in a fresh process (one thread: see one_thread)."""
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    return subprocess.run([*KNNFLOW, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """knnflow.cli.main.run, the console script's entry point, in this process: the same
    argument parsing, output and one-line errors without a second start of torch."""
    from knnflow.cli.main import run as knnflow_main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err), \
            mock.patch.object(sys, "argv", ["knnflow", *args]):
        try:
            knnflow_main()
        except SystemExit as exit_:
            code = exit_.code or 0
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread: the small convolutions and 128×128 matrices here gain
    nothing from more, and on a busy machine spinning threads make them seconds slower."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    """The digits classifier, trained once through the CLI with its defaults."""
    folder = tmp_path_factory.mktemp("classifiers") / "digits"
    result = run_in_process("train-classifier", "digits", "--out", str(folder))
    assert result.returncode == 0, result.stderr
    for text in ("test accuracy", "train seconds", "1×8×8", "10 epochs"):
        assert text in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == [".knnflow.json", "classifier.json",
                                                        "classifier.safetensors"]
    return folder


@pytest.fixture(scope="module")
def digits_test() -> torch.Tensor:
    return load_dataset("digits", split="test")


def pixels(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(len(images), -1)


def noisy(images: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (images + level * torch.randn(images.shape, generator=gen)).clamp(-1, 1)


# --------------------------------------------------------------------------- the distance


@pytest.mark.parametrize("mu1, s1, mu2, s2", [(0.0, 1.0, 0.0, 1.0), (0.3, 1.0, -1.2, 2.5),
                                              (5.0, 0.01, 4.0, 3.0), (-2.0, 7.0, 2.0, 0.5)])
def test_frechet_distance_of_1d_gaussians(mu1, s1, mu2, s2):
    expected = (mu1 - mu2) ** 2 + s1 ** 2 + s2 ** 2 - 2 * s1 * s2
    got = frechet_distance(np.array([mu1]), np.array([[s1 ** 2]]), np.array([mu2]),
                           np.array([[s2 ** 2]]))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_distance_of_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = sum((mu1[i] - mu2[i]) ** 2 + v1[i] + v2[i] - 2 * (v1[i] * v2[i]) ** 0.5
                   for i in range(6))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


def symmetric_reference(mu1, sigma1, mu2, sigma2) -> float:
    """tr((Σ1Σ2)^½) = tr((Σ1^½ Σ2 Σ1^½)^½): symmetric PSD square roots by numpy's eigh."""
    def psd_sqrt(matrix):
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root1 = psd_sqrt(sigma1)
    cross = np.trace(psd_sqrt(root1 @ sigma2 @ root1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def test_frechet_distance_matches_an_eigendecomposition_for_full_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(500, 12)), rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    stats = (*feature_statistics(a), *feature_statistics(b + 0.5))
    assert frechet_distance(*stats) == pytest.approx(symmetric_reference(*stats), rel=1e-9)


def test_frechet_distance_with_singular_covariances_is_finite_and_close():
    """Fewer images than features: Σ1Σ2 is singular, sqrtm's result carries rounding-size
    imaginary parts (and may need the eps·I fallback); the distance stays accurate."""
    rng = np.random.default_rng(2)
    stats = (*feature_statistics(rng.normal(size=(10, 40))),
             *feature_statistics(rng.normal(size=(15, 40)) + 0.1))
    got = frechet_distance(*stats)
    assert np.isfinite(got)
    assert got == pytest.approx(symmetric_reference(*stats), rel=1e-4)


def test_frechet_distance_refuses_mismatched_statistics():
    with pytest.raises(InputError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(50, 5)).astype(np.float32)
    mu, sigma = feature_statistics(torch.from_numpy(features))
    x = features.astype(np.float64)
    centred = x - x.sum(axis=0) / len(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.sum(axis=0) / 50, rtol=1e-14)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
    with pytest.raises(InputError, match="at least 2 images"):
        feature_statistics(features[:1])


# --------------------------------------------------------------------------- FID of images


def test_fid_of_a_set_with_itself_is_zero(digits_test, classifier_folder):
    for extractor in (pixels, feature_extractor(f"classifier:{classifier_folder}")):
        result = fid(digits_test, digits_test, extractor)
        assert abs(result.fid) < 1e-8
        assert (result.n_samples, result.n_reference) == (299, 299)
    assert result.feature_dim == 128 and result.features == "classifier"


def test_fid_grows_with_noise(digits_test, classifier_folder):
    classifier = feature_extractor(f"classifier:{classifier_folder}")
    for extractor in (pixels, classifier):
        # Reference statistics once; samples are the same images with more and more noise.
        reference = feature_statistics(extract_features(digits_test, extractor))
        values = [frechet_distance(*feature_statistics(
            extract_features(noisy(digits_test, level), extractor)), *reference)
            for level in NOISE_LEVELS]
        assert np.all(np.diff(values) > 0), values
        assert values[0] > 0
    # Held-out digits are closer to the test set than slightly noisy copies of it are.
    train = load_dataset("digits", split="train")
    assert fid(train, digits_test, classifier).fid < fid(noisy(digits_test, 0.2),
                                                         digits_test, classifier).fid


def test_fid_refuses_samples_of_another_shape(digits_test):
    with pytest.raises(InputError, match="1×28×28.*1×8×8"):
        fid(torch.zeros(4, 1, 28, 28), digits_test, pixels)


@pytest.mark.parametrize("text, expected", [
    ("digits", ("digits", "test")), ("digits:train", ("digits", "train")),
    ("mnist:test", ("mnist", "test")), ("npz:/data/x.npz:train", ("npz:/data/x.npz", "train"))])
def test_parse_reference(text, expected):
    assert parse_reference(text) == expected


def test_parse_reference_of_arrays_with_and_without_a_test_split(tmp_path):
    # An array of images alone (as the other commands take it) is the reference itself; one
    # with a test array gives its test split.
    np.savez(tmp_path / "one.npz", images=np.zeros((3, 1, 8, 8), np.float32))
    np.savez(tmp_path / "split.npz", train=np.zeros((3, 1, 8, 8), np.float32),
             test=np.zeros((2, 1, 8, 8), np.float32))
    np.save(tmp_path / "one.npy", np.zeros((3, 1, 8, 8), np.float32))
    assert parse_reference(f"npz:{tmp_path / 'one.npz'}") == (f"npz:{tmp_path / 'one.npz'}",
                                                              "train")
    assert parse_reference(f"npz:{tmp_path / 'split.npz'}")[1] == "test"
    assert parse_reference(f"npy:{tmp_path / 'one.npy'}")[1] == "train"
    (tmp_path / "imgs" / "test").mkdir(parents=True)
    assert parse_reference(f"folder:{tmp_path / 'imgs'}")[1] == "test"


def test_parse_reference_refuses_unknown_splits():
    with pytest.raises(InputError, match="unknown split 'val'"):
        parse_reference("digits:val")


# --------------------------------------------------------------------------- the classifier


def test_classifier_learns_digits(classifier_folder, digits_test):
    model, record = load_classifier(classifier_folder)
    assert record["test_accuracy"] >= 0.95, record
    assert record["dataset"] == "digits" and record["image_shape"] == [1, 8, 8]
    assert record["n_test"] == 299 and record["architecture"]["feature_dim"] == 128
    with torch.no_grad():
        predicted = model(digits_test).argmax(1)
    labels = load_dataset("digits", split="test", with_labels=True)[1]
    assert (predicted == labels).float().mean().item() == pytest.approx(record["test_accuracy"])


def test_classifier_training_is_seeded_and_saves_atomically(tmp_path, digits_test):
    runs = [train_classifier("digits", limit=128, epochs=1, width=4, feature_dim=8, seed=s)
            for s in (3, 3, 4)]
    first, again, other = (model.state_dict() for model, _ in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    folder = save_classifier(tmp_path / "c", *runs[0])
    model, record = load_classifier(folder)
    assert torch.equal(model.features(digits_test), runs[0][0].features(digits_test))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with pytest.raises(InputError, match="already exists"):
        save_classifier(folder, *runs[0])
    (folder / "classifier.safetensors").write_bytes(b"not the weights")
    with pytest.raises(InputError, match="does not match the sha256"):
        load_classifier(folder)
    with pytest.raises(MissingFileError, match="train-classifier"):
        load_classifier(tmp_path / "nothing")


def test_cli_train_classifier_takes_labels_from_an_npz(tmp_path):
    # digits as a user's own array: images and labels, no test arrays, so its last tenth is
    # the test set; the accuracy is measured against the labels the file holds.
    images, labels = load_dataset("digits", split="train", with_labels=True)
    np.savez(tmp_path / "mine.npz", images=images.numpy(), labels=labels.numpy())
    result = run_in_process("train-classifier", f"npz:{tmp_path / 'mine.npz'}", "--epochs", "3",
                            "--out", str(tmp_path / "c"), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    held = len(images) // 10
    assert (record["n_train"], record["n_test"]) == (len(images) - held, held)
    assert record["tested_on"] == f"its last {held} images (no test split)"
    model, _ = load_classifier(tmp_path / "c")
    with torch.no_grad():
        predicted = model(images[-held:]).argmax(1)
    assert record["test_accuracy"] == pytest.approx(
        int((predicted == labels[-held:]).sum()) / held, abs=1e-12)
    assert record["test_accuracy"] > 0.8
    np.savez(tmp_path / "unlabelled.npz", images=images.numpy())
    result = run_in_process("train-classifier", f"npz:{tmp_path / 'unlabelled.npz'}")
    assert_one_line_error(result, "has no class labels", "labels array")


def test_shift_augment_moves_whole_images():
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    moved = shift_augment(images, 1, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (1,) * 4, mode="replicate")
    for image, source in zip(moved, padded, strict=True):
        windows = [source[:, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(image, window) for window in windows)


# --------------------------------------------------------------------------- extractors


def test_inception_extractor_loads_a_state_dict(tmp_path):
    """Stand-in weights of the right keys and shapes: 2048-d features, grey = repeated RGB."""
    from torchvision.models import Inception3

    with torch.device("meta"):
        model = Inception3(aux_logits=True, init_weights=False)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    for name, tensor in model.state_dict().items():
        if name.endswith(("running_var", "bn.weight")):
            tensor.fill_(1.0)
        elif tensor.dim() > 1:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) / tensor[0].numel() ** 0.5)
        else:
            tensor.zero_()
    torch.save(model.state_dict(), tmp_path / "inception.pth")
    extractor = feature_extractor("inception", tmp_path / "inception.pth")
    grey = load_dataset("digits", split="test", limit=2)
    features = extractor(grey)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    assert torch.isfinite(features).all() and features.std() > 0
    torch.testing.assert_close(extractor(grey.expand(-1, 3, -1, -1)), features)

    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not an Inception v3 state dict"):
        feature_extractor("inception", tmp_path / "other.pth")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_dinov2_extractor_runs_a_torchscript_module(tmp_path):
    class Backbone(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            side = torch.full((x.shape[0], 1), float(x.shape[-1]))
            return torch.cat([x.mean(dim=(2, 3)), side], dim=1)

    torch.jit.script(Backbone()).save(str(tmp_path / "dinov2.pt"))
    extractor = feature_extractor("dinov2", tmp_path / "dinov2.pt")
    images = torch.full((3, 1, 8, 8), 1.0)
    features = extractor(images)
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    torch.testing.assert_close(features[:, :3], ((1 - mean) / std).double().expand(3, 3),
                               rtol=1e-6, atol=1e-6)
    assert features[:, 3].tolist() == [224.0] * 3

    (tmp_path / "broken.pt").write_bytes(b"not torchscript")
    with pytest.raises(InputError, match="TorchScript"):
        feature_extractor("dinov2", tmp_path / "broken.pt")


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingFileError, match="dinov2_vitl14_torchscript.pt"):
        feature_extractor("dinov2")
    with pytest.raises(MissingFileError, match=str(tmp_path / "hub" / "checkpoints")):
        feature_extractor("inception")
    with pytest.raises(InputError, match="unknown features"):
        feature_extractor("clip")


# --------------------------------------------------------------------------- the CLI


def test_cli_fid_with_the_classifier(tmp_path, classifier_folder, digits_test):
    train = load_dataset("digits", split="train")
    np.savez(tmp_path / "samples.npz", samples=train[:400].numpy())
    out = tmp_path / "fid-report"
    result = run_in_process("fid", str(tmp_path / "samples.npz"), "--ref", "digits",
                            "--features", f"classifier:{classifier_folder}", "--json", "--out",
                            str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert json.loads((out / "summary.json").read_text()) == summary  # --out is a folder
    extractor = feature_extractor(f"classifier:{classifier_folder}")
    expected = fid(train[:400], digits_test, extractor)
    assert summary["fid"] == pytest.approx(expected.fid, rel=1e-6)
    # ± is the spread of the FID over resampled samples and references (100 replicates at
    # 128 features), from the same features as the distance.
    replicates = bootstrap_fid({"s": extract_features(train[:400], extractor)},
                               extract_features(digits_test, extractor), 100)["s"]
    assert summary["bootstrap"] == 100
    assert summary["se"] == pytest.approx(replicates.std(ddof=1), rel=1e-6)
    assert 0 < summary["se"] < summary["fid"]
    assert summary["warning"] is None and result.stderr == ""
    assert (summary["n_samples"], summary["n_reference"], summary["feature_dim"]) == (400, 299,
                                                                                      128)
    assert summary["reference"] == "digits:test" and summary["features"] == "classifier"


def test_cli_fid_warns_with_fewer_images_than_features(tmp_path, classifier_folder):
    train = load_dataset("digits", split="train")
    np.savez(tmp_path / "few.npz", samples=train[:50].numpy())
    result = run_in_process("fid", str(tmp_path / "few.npz"), "--ref", "digits", "--features",
                            f"classifier:{classifier_folder}", "--bootstrap", "10")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: 50 images for 128 features")
    assert "±" in result.stdout and "10 replicates" in result.stdout
    # An array of images with no test split is a reference as it stands.
    result = run_in_process("fid", str(tmp_path / "few.npz"), "--ref",
                            f"npz:{tmp_path / 'few.npz'}", "--features",
                            f"classifier:{classifier_folder}", "--bootstrap", "0", "--json")
    summary = json.loads(result.stdout)
    # The same images on both sides: 0 up to the rounding of sqrtm on a singular product.
    assert summary["fid"] == pytest.approx(0, abs=1e-4) and summary["reference"].endswith(":train")
    assert summary["se"] is None and summary["bootstrap"] == 0


def test_cli_fid_refuses_samples_of_another_shape(tmp_path, classifier_folder):
    """Through the installed entry point in a new process, as a user runs it."""
    np.savez(tmp_path / "mnist_like.npz", samples=np.zeros((5, 1, 28, 28), np.float32))
    result = run("fid", str(tmp_path / "mnist_like.npz"), "--ref", "digits", "--features",
                 f"classifier:{classifier_folder}")
    assert_one_line_error(result, "1×28×28", "1×8×8")


@pytest.mark.parametrize("features, file", [("inception", "inception_v3_google-0cc3c7bd.pth"),
                                             ("dinov2", "dinov2_vitl14_torchscript.pt")])
def test_cli_fid_without_weights_names_the_file(tmp_path, monkeypatch, features, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    np.savez(tmp_path / "samples.npz", samples=np.zeros((5, 1, 8, 8), np.float32))
    result = run_in_process("fid", str(tmp_path / "samples.npz"), "--ref", "digits",
                            "--features", features)
    assert_one_line_error(result, file, str(tmp_path / "hub" / "checkpoints"))
    result = run_in_process("fid", str(tmp_path / "samples.npz"), "--ref", "digits",
                            "--features", "classifier:" + str(tmp_path / "none"))
    assert_one_line_error(result, "no classifier at", "knnflow train-classifier")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_classifier_and_fid_on_cuda(tmp_path, digits_test):
    model, record = train_classifier("digits", limit=256, epochs=1, width=4, feature_dim=16,
                                     device="cuda")
    folder = save_classifier(tmp_path / "c", model, record)
    on_gpu = fid(noisy(digits_test, 0.2), digits_test,
                 feature_extractor(f"classifier:{folder}", device="cuda"))
    on_cpu = fid(noisy(digits_test, 0.2), digits_test, feature_extractor(f"classifier:{folder}"))
    assert on_gpu.fid == pytest.approx(on_cpu.fid, rel=1e-3)


def test_a_classifier_near_chance_is_flagged(monkeypatch, tmp_path):
    """FID on the features of a classifier that barely beats chance means little: warned."""
    import knnflow.analysis.features as features_module
    from knnflow.analysis.features import feature_extractor

    record = {"test_accuracy": 0.11, "architecture": {"classes": 10}, "image_shape": [1, 8, 8]}
    stub = torch.nn.Identity()
    stub.features = lambda x: x
    monkeypatch.setattr(features_module, "load_classifier", lambda folder, device: (stub, record))
    with pytest.warns(UserWarning, match="only 11% test accuracy"):
        feature_extractor(f"classifier:{tmp_path}")
    record["test_accuracy"] = 0.97
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_extractor(f"classifier:{tmp_path}")
