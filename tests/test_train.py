"""Models, trainer, checkpoints and sampling: bit-exact resume after SIGKILL, atomic
checkpoints, config checks, ODE solvers on a known flow, closed-form samples that land on
training images."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_cli import assert_one_line_error, run

from knnflow.checkpoints import CHECKPOINTS, complete_checkpoints, load_checkpoint
from knnflow.data import load_dataset
from knnflow.errors import InputError
from knnflow.index import Index
from knnflow.runs import TrainConfig, load_run_model
from knnflow.trainer import train

TRAIN = [sys.executable, "-m", "knnflow.cli.main", "train", "digits", "--preset", "tiny",
         "--batch-size", "32", "--steps", "40", "--checkpoint-every", "10", "--log-every", "1",
         "--target", "efm", "--m", "8"]


def _final_tensors(folder):
    meta, tensors = load_checkpoint(folder / CHECKPOINTS)
    return meta["step"], tensors


def _metrics(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"], e["target_sq"]) for e in map(json.loads, lines)]


def wait_for_steps(metrics, count: int, timeout: float = 300) -> None:
    """Until a running run's metrics.jsonl holds `count` logged steps (or the timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = subprocess.run([*TRAIN, "--name", str(tmp_path / "a")], capture_output=True,
                              text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr
    killed = subprocess.Popen([*TRAIN, "--name", str(tmp_path / "b")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    wait_for_steps(metrics, 25)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert len(metrics.read_text().splitlines()) < 40, "the run ended before it was killed"
    resumed = subprocess.run([*TRAIN, "--name", str(tmp_path / "b"), "--resume"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resumed .*b from step (20|30)", resumed.stderr), resumed.stderr
    step_a, a = _final_tensors(tmp_path / "a")
    step_b, b = _final_tensors(tmp_path / "b")
    assert step_a == step_b == 40 and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def test_resume_checks_the_config_and_continues(tmp_path):
    config = TrainConfig(preset="mlp", batch_size=16, steps=6, checkpoint_every=3, log_every=1)
    train(config, tmp_path / "r")
    with pytest.raises(InputError, match=r"target: 'cfm' → 'efm'; batch_size: 16 → 8"):
        train(TrainConfig(preset="mlp", batch_size=8, steps=6, target="efm"), tmp_path / "r",
              resume=True)
    more = TrainConfig(preset="mlp", batch_size=16, steps=9, checkpoint_every=3, log_every=1)
    logged = train(more, tmp_path / "r", resume=True)
    assert [m.step for m in logged] == [7, 8, 9]
    assert [s for s, _, _ in _metrics(tmp_path / "r")] == list(range(1, 10))
    with pytest.raises(InputError, match="pass resume to continue it"):
        train(config, tmp_path / "r")


def test_a_damaged_newest_checkpoint_is_skipped(tmp_path):
    config = TrainConfig(preset="mlp", batch_size=8, steps=4, checkpoint_every=2, log_every=2,
                         keep_checkpoints=3)
    train(config, tmp_path / "r")
    marks = complete_checkpoints(tmp_path / "r" / CHECKPOINTS)
    assert [m.stem for m in marks] == ["step_2", "step_4"]
    weights = marks[-1].with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="skipped damaged checkpoint.*step_4.*step 2"):
        meta, _ = load_checkpoint(tmp_path / "r" / CHECKPOINTS)
    assert meta["step"] == 2


def test_bad_training_options_are_refused(tmp_path, digits):
    for options, fragment in (({"batch_size": 0}, "batch_size"), ({"steps": -1}, "steps"),
                              ({"preset": "huge"}, "choose one of"),
                              ({"target": "ddpm"}, "choose one of: cfm, ot-cfm, efm, knn-efm, "
                                                   "exact"),
                              ({"target": "ot-cfm", "batch_size": 1}, "at least 2"),
                              ({"target": "knn-efm"}, "build-index DATASET")):
        with pytest.raises(InputError, match=fragment):
            train(TrainConfig(**{"preset": "mlp", "steps": 2, **options}), tmp_path / "x")
    other = tmp_path / "other-index"
    Index.build(digits[:500]).save(other)
    with pytest.raises(Exception, match="build-index"):
        train(TrainConfig(preset="mlp", steps=2, target="knn-efm",
                          target_options={"index": str(other)}),
              tmp_path / "y")
    result = run("train", "digits", "--target", "nope", "--name", str(tmp_path / "z"))
    assert_one_line_error(result, "cfm, ot-cfm, efm, knn-efm, exact")
    assert not (tmp_path / "z").exists()


def test_sample_command_writes_pngs_grid_and_npz(tmp_path):
    train(TrainConfig(preset="mlp", batch_size=8, steps=3, checkpoint_every=3, sample_every=3),
          tmp_path / "r")
    assert (tmp_path / "r" / "progress" / "step_3.png").is_file()
    model, record = load_run_model(tmp_path / "r")
    assert record["checkpoint_step"] == 3
    result = run("sample", str(tmp_path / "r"), "--n", "5", "--steps", "10")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "r" / "samples"
    assert sorted(p.name for p in out.glob("sample_*.png")) == [f"sample_{i:05d}.png"
                                                                 for i in range(5)]
    with np.load(out / "samples.npz") as data:
        assert data["samples"].shape == (5, 1, 8, 8)
    assert (out / "grid.png").is_file()
    again = run("sample", str(tmp_path / "r"), "--n", "5")
    assert_one_line_error(again, "already exists")
    neither = run("sample")
    assert_one_line_error(neither, "--closed-form")


def test_knn_efm_with_flips_trains_on_a_flip_index(tmp_path):
    result = run("build-index", "digits", "--limit", "200", "--flip", "--out",
                 str(tmp_path / "idx"))
    assert result.returncode == 0, result.stderr
    assert Index.load(tmp_path / "idx").n == 400
    config = TrainConfig(preset="mlp", limit=200, flip=True, target="knn-efm",
                         target_options={"index": str(tmp_path / "idx")}, batch_size=8,
                         steps=2)
    logged = train(config, tmp_path / "run")
    assert logged[-1].step == 2 and logged[-1].fallback is not None
    plain = tmp_path / "plain"
    Index.build(load_dataset("digits", limit=200)).save(plain)
    with pytest.raises(Exception, match="both flips"):
        train(replace(config, target_options={"index": str(plain)}), tmp_path / "run2")


def test_prefetched_batches_equal_the_plain_stream():
    """The background thread draws in the same order: same batches, same generator states."""
    from knnflow.batches import BatchStream
    from knnflow.data import load_dataset
    from knnflow.targets import make_target

    images = load_dataset("digits")
    target = make_target("efm", data=images.reshape(len(images), -1), m=16)
    outs = []
    for prefetch in (False, True):
        with BatchStream(images, target, 8, True, torch.Generator().manual_seed(3),
                         prefetch=prefetch,
                         target_generator=torch.Generator().manual_seed(4)) as stream:
            outs.append([stream.next() for _ in range(4)])
    for (t_a, a, state_a), (t_b, b, state_b) in zip(*outs, strict=True):
        assert torch.equal(t_a, t_b) and torch.equal(a.x_t, b.x_t)
        assert torch.equal(a.target, b.target)
        assert state_a.keys() == state_b.keys() == {"rng.data", "rng.target"}
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_targets_draw_apart_from_the_batches():
    """With one seed, cfm and efm train on the same (x0, x1, t): EFM's candidate draws come
    from the target's own generator, so they do not shift the next batches."""
    from knnflow.batches import BatchStream
    from knnflow.data import load_dataset
    from knnflow.targets import make_target

    images = load_dataset("digits")
    flat = images.reshape(len(images), -1)
    batches = {}
    for name in ("cfm", "efm"):
        options = {"m": 16} if name == "efm" else {}
        with BatchStream(images, make_target(name, data=flat, **options), 8, False,
                         torch.Generator().manual_seed(3),
                         target_generator=torch.Generator().manual_seed(4)) as stream:
            batches[name] = [stream.next() for _ in range(3)]
    for (t_c, c, _), (t_e, e, _) in zip(batches["cfm"], batches["efm"], strict=True):
        assert torch.equal(t_c, t_e) and torch.equal(c.x_t, e.x_t)
        assert not torch.equal(c.target, e.target)


def test_resume_refuses_what_would_not_continue_the_run(tmp_path):
    """--resume with --overwrite, with fewer steps than already trained, or after the training
    data changed: each refused in one line, the run left as it was."""
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (40, 1, 4, 4)).astype(np.float32))
    config = TrainConfig(dataset=f"npy:{data}", preset="mlp", batch_size=8, steps=4,
                         checkpoint_every=2, log_every=1)
    train(config, tmp_path / "r")
    before = _metrics(tmp_path / "r")
    with pytest.raises(InputError, match="resume continues a run and overwrite deletes"):
        train(config, tmp_path / "r", resume=True, overwrite=True)
    with pytest.raises(InputError, match="has trained 4 steps, more than the steps 2"):
        train(TrainConfig(**{**config.__dict__, "steps": 2}), tmp_path / "r", resume=True)
    np.save(data, np.random.default_rng(1).uniform(-1, 1, (40, 1, 4, 4)).astype(np.float32))
    with pytest.raises(InputError, match="training data of .* changed"):
        train(TrainConfig(**{**config.__dict__, "steps": 6}), tmp_path / "r", resume=True)
    assert _metrics(tmp_path / "r") == before


def test_overwrite_keeps_the_old_run_until_the_new_one_can_start(tmp_path):
    """train --overwrite with a mistake in the new run (an index of other data) fails before
    it deletes anything; a folder knnflow did not write is never replaced."""
    config = TrainConfig(dataset="digits", preset="mlp", batch_size=8, steps=2, log_every=1)
    train(config, tmp_path / "r")
    other = tmp_path / "other-index"
    from knnflow.errors import IndexMismatchError
    from knnflow.index import Index

    Index.build(torch.rand(30, 1, 8, 8) * 2 - 1).save(other)
    with pytest.raises(IndexMismatchError, match="index holds 30 points"):
        train(replace(config, target="knn-efm", target_options={"index": str(other)}),
              tmp_path / "r", overwrite=True)
    assert (tmp_path / "r" / "config.json").is_file()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(InputError, match="not a folder knnflow wrote"):
        train(config, precious, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "years of work"
    # a key the config does not know (written by another version) does not stop a resume
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps({**saved, "index": "elsewhere"}))
    train(replace(config, steps=3), tmp_path / "r", resume=True)
    (tmp_path / "r" / "config.json").write_text(json.dumps({**saved, "steps": "4"}))
    with pytest.raises(InputError, match="wrong type"):
        train(TrainConfig(**{**config.__dict__, "steps": "4"}), tmp_path / "r", resume=True,
              explicit=set())
    (tmp_path / "r" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        train(config, tmp_path / "r", resume=True)


def test_knn_route_floors_are_kept_in_checkpoints(tmp_path, monkeypatch):
    """knn-efm with --knn-route faster times its routes once; the floors go into every
    checkpoint and a resumed run takes them back instead of timing again (timings differ
    from run to run, the targets must not)."""
    from knnflow.routing import Router

    Index.build(load_dataset("digits", limit=200)).save(tmp_path / "idx")
    monkeypatch.setattr(Router, "time_routes", lambda self, floor: 0.85)
    config = TrainConfig(preset="mlp", limit=200, target="knn-efm",
                         target_options={"index": str(tmp_path / "idx"), "route": "faster"},
                         batch_size=8, steps=4, checkpoint_every=2)
    train(config, tmp_path / "run")
    first = json.loads((tmp_path / "run" / "checkpoints" / "step_4.json").read_text())
    low, high = first["knn_floors"]
    assert 0 < low <= high == 0.85

    def no_timing(self, floor):
        raise AssertionError("a resumed run timed its routes again")

    monkeypatch.setattr(Router, "time_routes", no_timing)
    train(TrainConfig(**{**config.__dict__, "steps": 6}), tmp_path / "run", resume=True)
    again = json.loads((tmp_path / "run" / "checkpoints" / "step_6.json").read_text())
    assert again["knn_floors"] == [low, high]
    with pytest.raises(InputError, match="route: 'faster' → 'certify'"):
        train(replace(config, steps=8,
                      target_options={**config.target_options, "route": "certify"}),
              tmp_path / "run", resume=True)
    with pytest.raises(InputError, match="unknown route 'fastest'"):
        train(replace(config, target_options={**config.target_options, "route": "fastest"}),
              tmp_path / "bad")


def test_a_process_share_of_the_batch_is_its_rows_of_the_whole_batch():
    """Under DDP every process draws the whole batch and keeps its rows: two streams with
    rows 0-7 and 8-15 give the halves of one stream's batch of 16 (x_t and target), and the
    generators stay in step."""
    from knnflow.batches import BatchStream
    from knnflow.targets import make_target

    images = load_dataset("digits", limit=100)
    target = make_target("cfm")

    def stream(rows=None):
        return BatchStream(images, target, 16, True, torch.Generator().manual_seed(3),
                           rows=rows)

    whole, first, second = stream(), stream(slice(0, 8)), stream(slice(8, 16))
    for _ in range(3):
        t, batch, states = whole.next()
        (t0, b0, s0), (t1, b1, s1) = first.next(), second.next()
        assert torch.equal(torch.cat([t0, t1]), t)
        assert torch.equal(torch.cat([b0.x_t, b1.x_t]), batch.x_t)
        assert torch.equal(torch.cat([b0.target, b1.target]), batch.target)
        assert torch.equal(s0["rng.data"], states["rng.data"])
        assert torch.equal(s1["rng.data"], states["rng.data"])


def test_ot_cfm_trains_and_its_loss_falls(tmp_path):
    """--target ot-cfm runs as the other targets do; on the mlp preset its loss falls over
    a short run (the OT pairing straightens the regression problem; cfm's floor is higher)."""
    config = TrainConfig(preset="mlp", batch_size=64, steps=60, log_every=10, target="ot-cfm",
                         warmup=0)
    logged = train(config, tmp_path / "ot")
    assert all(math.isfinite(m.loss) for m in logged)
    assert logged[-1].loss < logged[0].loss


def test_train_knn_efm_without_index_builds_and_reuses_the_default_index(tmp_path):
    """`knnflow train --target knn-efm` as typed (with a short, small run): no --index builds
    indices/digits-train with one line saying so, a second run reuses it without building,
    and an index of other data at that place is refused in one line (points checksum)."""
    short = ("--steps", "2", "--preset", "mlp", "--batch-size", "16")
    first = run("train", "--target", "knn-efm", *short, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "built the index of digits for knn-efm at indices/digits-train" in first.stderr
    assert (tmp_path / "indices" / "digits-train" / "manifest.json").is_file()
    # The summary explains the fallback share, and a run shorter than its warm-up says so.
    assert re.search(r"knn-efm fallback \(last step\) [│ ]+\d+% of the rows", first.stdout)
    assert re.search(r"knn-efm routed \(last step\) [│ ]+\d+% of the rows", first.stdout)
    assert "note: fallback rows are those at t below where certifying succeeds, or over " \
           "--knn-budget; they got the exact û*" in first.stderr
    assert "warning: --steps 2 ends inside the 100-step warm-up: the learning rate reaches " \
           "only 2% of --lr 0.001; pass --warmup 0 (a tenth of the run)" in first.stderr
    again = run("train", "--target", "knn-efm", *short, "--name", "runs/again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "built the index" not in again.stderr
    assert run("build-index", "digits", "--limit", "300", "--out", "indices/digits-train",
               "--overwrite", cwd=tmp_path).returncode == 0
    refused = run("train", "--target", "knn-efm", *short, "--name", "runs/third", cwd=tmp_path)
    assert_one_line_error(refused, "indices/digits-train is not the index", "300 points",
                          "--overwrite")


def test_ctrl_c_says_what_was_kept_and_how_to_continue(tmp_path):
    """SIGINT (Ctrl-C) during train: exit 130 with one line naming the newest checkpoint
    kept and the command that continues the run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # A shell's background jobs inherit SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as a terminal would.
    running = subprocess.Popen([*TRAIN, "--name", str(tmp_path / "c")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_steps(tmp_path / "c" / "metrics.jsonl", 15)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 130, stderr
    assert re.search(r"interrupted: its newest checkpoint, step (10|20|30), is kept: continue "
                     r"with knnflow train --name .*c --resume", stderr), stderr


def test_train_sample_and_build_index_print_json(tmp_path):
    """--json: the summary as one JSON document on stdout, matching what was written."""
    built = run("build-index", "digits", "--limit", "50", "--out", "ix", "--json", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    manifest = json.loads(built.stdout)
    assert manifest["n"] == 50 and manifest["folder"] == "ix"
    assert manifest == {**json.loads((tmp_path / "ix" / "manifest.json").read_text()),
                        "folder": "ix", "bytes": manifest["bytes"],
                        "peak_memory_bytes": manifest["peak_memory_bytes"]}
    assert manifest["peak_memory_bytes"] > 0
    trained = run("train", "--preset", "mlp", "--steps", "3", "--batch-size", "8", "--warmup",
                  "1", "--log-every", "1", "--json", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    lines = (tmp_path / "runs" / "digits-cfm" / "metrics.jsonl").read_text().splitlines()
    assert summary["steps"] == 3 and summary["last_logged"]["step"] == 3
    assert summary["last_logged"]["loss"] == pytest.approx(json.loads(lines[-1])["loss"])
    # The run folder's loss.png plots those logged losses (redrawn at each checkpoint).
    from PIL import Image

    with Image.open(tmp_path / "runs" / "digits-cfm" / "loss.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 300
    sampled = run("sample", "runs/digits-cfm", "--n", "3", "--steps", "2", "--json",
                  cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    record = json.loads(sampled.stdout)
    assert record["n"] == 3 and record["checkpoint_step"] == 3
    with np.load(tmp_path / record["array"]) as data:
        assert data["samples"].shape == (3, 1, 8, 8)


def test_train_and_sample_take_threads_and_device_auto(tmp_path):
    """--threads N (torch and BLAS threads) and --device auto on train and sample; a
    --threads below 1 is one line."""
    ran = run("train", "--preset", "mlp", "--steps", "2", "--batch-size", "8", "--device",
              "auto", "--threads", "1", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    sampled = run("sample", "runs/digits-cfm", "--n", "4", "--steps", "2", "--threads", "1",
                  "--device", "auto", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert_one_line_error(run("train", "--preset", "mlp", "--steps", "2", "--threads", "0",
                              "--name", "runs/z", cwd=tmp_path), "--threads must be at least 1")


def test_loss_plot_survives_a_line_cut_by_a_crash(tmp_path):
    from PIL import Image

    from knnflow.run_logs import plot_loss

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    plot_loss(metrics, tmp_path / "loss.png", "a run")
    with Image.open(tmp_path / "loss.png") as picture:
        assert picture.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_python_functions_train_sample_and_score_as_the_commands_do(tmp_path, monkeypatch):
    """knnflow.train, knnflow.sample and knnflow.memorization: the commands' jobs from a
    script, with the same files and the same numbers."""
    import knnflow

    monkeypatch.chdir(tmp_path)
    run_ = knnflow.train("digits", target="cfm", preset="mlp", steps=4, batch_size=8,
                         warmup=1, log_every=2, folder="runs/api")
    assert [m.step for m in run_.metrics] == [2, 4] and run_.record["steps"] == 4
    logged = [json.loads(line) for line in (tmp_path / "runs/api/metrics.jsonl").read_text()
              .splitlines()]
    assert run_.final_loss == pytest.approx(logged[-1]["loss"])
    images = knnflow.sample("runs/api", n=5, steps=3, out="runs/api/samples")
    assert images.shape == (5, 1, 8, 8)
    with np.load(tmp_path / "runs/api/samples/samples.npz") as data:
        assert np.array_equal(data["samples"], images.numpy())
    # The command from the same run and seed draws the same samples.
    assert run("sample", "runs/api", "--n", "5", "--steps", "3", "--out", "cli-samples",
               cwd=tmp_path).returncode == 0
    with np.load(tmp_path / "cli-samples" / "samples.npz") as data:
        assert np.array_equal(data["samples"], images.numpy())
    summary = knnflow.memorization("runs/api/samples")
    assert summary["n_samples"] == 5 and summary["compared_against"].startswith("digits, ")
    assert (tmp_path / summary["report"] / "summary.json").is_file()
    copies = knnflow.memorization(load_dataset("digits")[:6], out="copies-report")
    assert copies["memorized"]["count"] == 6 and copies["n_samples"] == 6
    with pytest.raises(knnflow.InputError, match="unknown options stepz"):
        knnflow.train("digits", stepz=3)


def test_tensorboard_scalars_follow_the_logged_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run("train", "--preset", "mlp", "--steps", "4", "--batch-size", "8", "--warmup",
                 "1", "--log-every", "2", "--tensorboard", "--name", "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text()
              .splitlines()]
    assert [step for step, _ in losses] == [2, 4]
    assert [value for _, value in losses] == pytest.approx([m["loss"] for m in logged],
                                                           rel=1e-6)
    assert {"train/lr", "train/ms_step", "train/target_sq"} <= set(events.Tags()["scalars"])
