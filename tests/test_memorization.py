"""knnflow memorization: scores against float64 brute force, input formats, the report folder,
and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import assert_one_line_error, run

from knnflow.data import load_dataset
from knnflow.errors import InputError
from knnflow.index import Index
from knnflow.memorization_report import run_memorization
from knnflow.samples import load_samples


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def held_out():
    return load_dataset("digits", split="test")


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory, train):
    folder = tmp_path_factory.mktemp("idx") / "digits-train"
    Index.build(train, dataset={"name": "digits", "split": "train"}).save(folder)
    return folder


@pytest.fixture(scope="module")
def index(index_folder):
    return Index.load(index_folder)


def quantized(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The same images as uint8 0..255 and as float32 in [-1, 1] (exactly representable)."""
    u8 = np.round((images.numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return u8, u8.astype(np.float32) / 127.5 - 1.0


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def brute_force_two(samples: np.ndarray, train: torch.Tensor):
    q = torch.from_numpy(samples).reshape(len(samples), -1).to(torch.float64)
    p = train.reshape(train.shape[0], -1).to(torch.float64)
    sq = (q[:, None] - p[None]).square().sum(-1)
    values, ids = sq.sort(dim=1, stable=True)
    return values[:, :2].sqrt(), ids[:, :2]


def test_copies_are_flagged_and_held_out_images_are_not(tmp_path, index, train, held_out):
    gen = torch.Generator().manual_seed(0)
    copies = train[:12]
    noisy = (train[12:24] + 0.02 * torch.randn(train[12:24].shape, generator=gen)).clamp(-1, 1)
    fresh = held_out[:60]
    samples = torch.cat([copies, noisy, fresh]).numpy()
    np.save(tmp_path / "s.npy", samples)
    summary, out = run_memorization(tmp_path / "s.npy", index, out=tmp_path / "report")
    rows = read_csv(out / "memorization.csv")
    d1 = np.array([float(r["d1"]) for r in rows])
    flagged = np.array([r["memorized"] == "1" for r in rows])
    nearest = np.array([int(r["nearest_train_id"]) for r in rows])
    assert np.all(d1[:12] == 0) and np.array_equal(nearest[:12], np.arange(12))
    assert np.all(d1[12:24] < 0.02 * 8 * 2) and np.array_equal(nearest[12:24], np.arange(12, 24))
    assert flagged[:24].all()
    assert not flagged[24:].any()
    # Held-out images lie about as far from the training set as training images from each other.
    ratio = d1[24:].mean() / summary["reference"]["mean"]
    assert 0.6 < ratio < 1.5
    assert summary["memorized"]["count"] == 24
    assert summary["n_samples"] == 84 and summary["exact"]
    for name in ("memorization.csv", "summary.json", "histogram.png", "nearest.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_distances_equal_float64_brute_force(tmp_path, index, train, held_out):
    gen = torch.Generator().manual_seed(1)
    noisy = (train[:5] + 0.1 * torch.randn(5, 1, 8, 8, generator=gen)).clamp(-1, 1)
    samples = torch.cat([held_out[:50], noisy]).numpy()
    np.save(tmp_path / "s.npy", samples)
    summary, out = run_memorization(tmp_path / "s.npy", index, out=tmp_path / "r", k=3)
    rows = read_csv(out / "memorization.csv")
    distances, ids = brute_force_two(samples, train)
    got = np.array([[float(r["d1"]), float(r["d2"])] for r in rows])
    assert np.allclose(got, distances.numpy(), rtol=1e-8, atol=0)
    assert np.array_equal([int(r["nearest_train_id"]) for r in rows], ids[:, 0].numpy())
    assert np.allclose([float(r["d1_over_d2"]) for r in rows],
                       (distances[:, 0] / distances[:, 1]).numpy(), rtol=1e-8)
    assert "d3" in rows[0]
    assert summary["d1"]["median"] == pytest.approx(float(distances[:, 0].median()), rel=1e-8)
    assert summary["d1_over_sqrt_d"]["mean"] == pytest.approx(
        float(distances[:, 0].mean()) / 8, rel=1e-8)


def test_folder_npz_npy_and_uint8_inputs_agree(tmp_path, index, train, held_out):
    u8, f32 = quantized(torch.cat([train[:6], held_out[:10]]))
    folder = tmp_path / "pngs" / "nested"
    folder.mkdir(parents=True)
    for i, image in enumerate(u8):
        Image.fromarray(image[0], mode="L").save(folder / f"{i:03d}.png")
    np.savez(tmp_path / "u8.npz", samples=u8)
    np.save(tmp_path / "f.npy", f32)
    np.save(tmp_path / "u8.npy", u8)
    results = {}
    for name in ("pngs", "u8.npz", "f.npy", "u8.npy"):
        summary, out = run_memorization(tmp_path / name, index, out=tmp_path / f"r-{name}")
        rows = read_csv(out / "memorization.csv")
        results[name] = [{k: v for k, v in r.items() if k != "file"} for r in rows]
        assert summary["n_samples"] == 16
        expected = "uint8 0..255" if "u8" in name or name == "pngs" else "float in [-1, 1]"
        assert expected in summary["input"]
    assert results["pngs"] == results["u8.npz"] == results["f.npy"] == results["u8.npy"]


def test_run_samples_folder_reads_samples_npz(tmp_path, index, train):
    run_dir = tmp_path / "run" / "samples"
    run_dir.mkdir(parents=True)
    np.savez(run_dir / "samples.npz", samples=train[:4].numpy())
    summary, _ = run_memorization(run_dir, index, out=tmp_path / "r")
    assert summary["n_samples"] == 4 and summary["memorized"]["count"] == 4


def test_duplicated_training_images_give_ratio_zero(tmp_path):
    points = load_dataset("digits")[:200].clone()
    points[199] = points[0]
    index = Index.build(points)
    np.save(tmp_path / "s.npy", points[:1].numpy())
    summary, out = run_memorization(tmp_path / "s.npy", index, out=tmp_path / "r")
    row = read_csv(out / "memorization.csv")[0]
    assert float(row["d1"]) == 0 and float(row["d2"]) == 0 and float(row["d1_over_d2"]) == 0
    assert summary["memorized"]["count"] == 1


def test_resize_opt_in(tmp_path, index, train):
    big = np.repeat(np.repeat(quantized(train[:3])[0], 2, axis=2), 2, axis=3)  # 1×16×16
    rgb = np.repeat(big, 3, axis=1)
    np.save(tmp_path / "rgb.npy", rgb)
    with pytest.raises(InputError, match=r"3×16×16.*1×8×8.*resize"):
        run_memorization(tmp_path / "rgb.npy", index, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    summary, _ = run_memorization(tmp_path / "rgb.npy", index, out=tmp_path / "r", resize=True)
    assert summary["n_samples"] == 3


# --------------------------------------------------------------------------- bad input


def test_cli_report_json_and_errors(tmp_path, index_folder, train):
    images = tmp_path / "imgs"
    images.mkdir()
    u8, _ = quantized(train[:5])
    for i, image in enumerate(u8):
        Image.fromarray(image[0], mode="L").save(images / f"{i}.png")
    (images / "README.txt").write_text("notes")
    ok = run("memorization", str(images), "--index", str(index_folder), "--json",
             "--out", str(tmp_path / "out"), "--reference-size", "100")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["memorized"]["count"] == 5 and summary["skipped_files"] == 1
    assert "skipped 1 files that are not images" in ok.stderr
    assert summary["reference"]["train_images"] == 100
    table = run("memorization", str(images), "--index", str(index_folder),
                "--out", str(tmp_path / "out2"), "--reference-size", "100")
    assert table.returncode == 0 and "memorized" in table.stdout and "5 (100.00%)" in table.stdout

    missing = run("memorization", str(images), "--index", str(tmp_path / "no-index"),
                  "--out", str(tmp_path / "o3"))
    assert_one_line_error(missing, "no-index")
    bad = run("memorization", str(images), "--index", str(index_folder), "--threshold", "2",
              "--out", str(tmp_path / "o4"))
    assert_one_line_error(bad, "threshold")
    exists = run("memorization", str(images), "--index", str(index_folder),
                 "--out", str(tmp_path / "out"))
    assert_one_line_error(exists, "already exists", "--overwrite")
    both = run("memorization", str(images), "--index", str(index_folder), "--dataset",
               "digits", "--out", str(tmp_path / "o5"))
    assert_one_line_error(both, "--index", "--dataset", "not both")
    for folder in ("o3", "o4", "o5"):
        assert not (tmp_path / folder).exists()


def test_a_cached_index_of_part_of_the_data_is_not_reused(tmp_path):
    """memorization --dataset reuses indices/NAME-train only when it holds the whole set."""
    from test_cli import assert_one_line_error, run

    assert run("build-index", "digits", "--limit", "100", "--out", "indices/digits-train",
               cwd=tmp_path).returncode == 0
    np.save(tmp_path / "s.npy", np.zeros((4, 1, 8, 8), np.float32))
    assert_one_line_error(run("memorization", "s.npy", "--dataset", "digits", cwd=tmp_path),
                          "the first 100", "--index")


def test_a_cached_index_of_other_files_is_refused(tmp_path):
    """The issue's case: indices/mnist-train built from one MNIST folder, then memorization
    --dataset mnist --root OTHER. The cached index is checked against the data it stands
    for by the points' checksum: refused, in one line naming both; the right root passes."""
    from test_cli import assert_one_line_error, run
    from test_loaders import _write_idx

    rng = np.random.default_rng(7)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
        _write_idx(tmp_path / name / "train-images-idx3-ubyte", images, False)
    assert run("build-index", "mnist", "--root", "a", cwd=tmp_path).returncode == 0
    np.save(tmp_path / "s.npy", rng.uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32))
    refused = run("memorization", "s.npy", "--dataset", "mnist", "--root", "b",
                  "--out", "o1", cwd=tmp_path)
    assert_one_line_error(refused, "indices/mnist-train", "checksum", "--overwrite")
    assert not (tmp_path / "o1").exists()
    kept = run("memorization", "s.npy", "--dataset", "mnist", "--root", "a", "--out", "o2",
               "--json", cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["n_samples"] == 4


def test_memorization_as_typed_finds_the_training_set_of_its_samples(tmp_path):
    """`knnflow memorization samples/` with neither --index nor --dataset: a run's samples
    folder knows its run and the run its data set; closed-form samples know their index; a
    plain folder falls back to the default data set (digits) with a note; samples of a shape
    no training set has give one line naming both shapes. The JSON names the training set."""
    from test_cli import assert_one_line_error, run

    assert run("train", "--preset", "mlp", "--steps", "2", "--batch-size", "16",
               "--limit", "300", cwd=tmp_path).returncode == 0
    assert run("sample", "runs/digits-cfm", "--n", "8", "--steps", "2",
               cwd=tmp_path).returncode == 0
    from_run = run("memorization", "runs/digits-cfm/samples", "--json", cwd=tmp_path)
    assert from_run.returncode == 0, from_run.stderr
    summary = json.loads(from_run.stdout)
    assert summary["n_train"] == 300 and summary["n_samples"] == 8
    assert "run runs/digits-cfm" in summary["compared_against"]

    assert run("build-index", "digits", "--limit", "200", "--out", "ix",
               cwd=tmp_path).returncode == 0
    assert run("sample", "--closed-form", "ix", "--n", "4", "--steps", "2", "--out", "cf",
               cwd=tmp_path).returncode == 0
    closed = run("memorization", "cf", "--json", cwd=tmp_path)
    assert closed.returncode == 0, closed.stderr
    assert json.loads(closed.stdout)["n_train"] == 200

    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(plain / f"{i}.png")
    table = run("memorization", "plain", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "note: compared against digits, the default data set" in table.stderr
    assert "--index DIR or --dataset NAME" in table.stderr

    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(odd / "a.png")
    assert_one_line_error(run("memorization", "odd", cwd=tmp_path), "5×7", "8×8")


def test_a_folder_of_knnflows_own_pngs_skips_its_grid_and_reads_grey_rgb(tmp_path):
    """knnflow sample's PNG folder holds grid.png beside sample_NNNNN.png: the grid is not a
    sample, and is skipped with a note. RGB PNGs of greyscale data (R = G = B, as
    torchvision's save_image writes one-channel images) load without --resize, with the
    same distances as their one-channel PNGs; a colour PNG among them is refused."""
    from test_cli import run

    index = Index.build(load_dataset("digits")[:300])
    index.save(tmp_path / "ix")
    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    for name, mode in (("own", "L"), ("rgb", "RGB")):
        folder = tmp_path / name
        folder.mkdir()
        for i, image in enumerate(grey):
            picture = Image.fromarray(image)
            (picture.convert("RGB") if mode == "RGB" else picture).save(
                folder / f"sample_{i:05d}.png")
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "grid.png")
    own = run("memorization", "own", "--index", "ix", "--json", cwd=tmp_path)
    assert own.returncode == 0, own.stderr
    summary = json.loads(own.stdout)
    assert summary["n_samples"] == 5 and summary["skipped_grids"] == ["own/grid.png"]
    samples = load_samples(tmp_path / "own", (1, 8, 8))
    as_rgb = load_samples(tmp_path / "rgb", (1, 8, 8))
    assert as_rgb.shape == (1, 8, 8) and len(as_rgb) == 5
    assert np.array_equal(as_rgb.batch(0, 5), samples.batch(0, 5))
    colour = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "rgb" / "sample_00009.png")
    with pytest.raises(InputError, match="colour image among greyscale samples"):
        load_samples(tmp_path / "rgb", (1, 8, 8)).batch(0, 6)


def test_nearest_png_shows_both_neighbours_and_says_when_none_is_memorized(tmp_path, index,
                                                                           train, held_out):
    import matplotlib.pyplot as plt

    from knnflow.memorization_report import nearest_figure
    from knnflow.nearest import Scores

    def figure_of(images):
        np.save(tmp_path / "s.npy", images.numpy())
        samples = load_samples(tmp_path / "s.npy", index.image_shape)
        d, ids = brute_force_two(images.numpy(), train)
        scores = Scores(ids=ids, distances=d, exact=True, search="test")
        return nearest_figure(samples, index, scores, 1 / 3, count=4)

    fig, order = figure_of(held_out[:6])  # held-out digits: none memorized
    title = fig._suptitle.get_text().replace("\n", " ")
    assert title.startswith("No sample is memorized (d1/d2 < 1/3): the 4 samples of smallest")
    assert "second-nearest" in title
    # Each shown sample sits beside two training images: its 1st and 2nd nearest by float64.
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3 * len(order) == 12
    d, ids = brute_force_two(held_out[:6].numpy(), train)
    for slot, sample in enumerate(order):
        names = [ax.get_title() for ax in shown[3 * slot:3 * slot + 3]]
        assert names == [f"sample {sample}", f"1st: train {int(ids[sample, 0])}",
                         f"2nd: train {int(ids[sample, 1])}"]
        assert np.allclose(shown[3 * slot + 2].images[0].get_array(),
                           (train[int(ids[sample, 1])].reshape(8, 8).numpy() + 1) / 2)
    plt.close(fig)
    fig, _ = figure_of(torch.cat([train[:2], held_out[:4]]))  # two copies of training images
    assert fig._suptitle.get_text().startswith("The 2 memorized samples (d1/d2 < 1/3)")
    plt.close(fig)


def test_missing_samples_are_refused_before_any_index_is_built(tmp_path):
    result = run("memorization", "nothing.npy", cwd=tmp_path)
    assert_one_line_error(result, "no samples at nothing.npy")
    assert not (tmp_path / "indices").exists()
