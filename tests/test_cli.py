"""The command line as a user runs it: one-line errors with non-zero exit, tables, help."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pytest

KNNFLOW = [sys.executable, "-m", "knnflow.cli.main"]
# KNNFLOW_TEST_PROCESSES=1 runs every `run` in a fresh process instead of this one.
IN_PROCESS = os.environ.get("KNNFLOW_TEST_PROCESSES", "") in ("", "0")


def run_process(*args: str, cwd=None, **env_vars: str) -> subprocess.CompletedProcess:
    """The knnflow command in a fresh Python process, as a user types it."""
    env = {k: v for k, v in os.environ.items() if k != "KNNFLOW_DEBUG"}  # errors one line
    env.update(COLUMNS="200", **env_vars)
    return subprocess.run([*KNNFLOW, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def run(*args: str, cwd=None, **env_vars: str) -> subprocess.CompletedProcess:
    """The knnflow command through the console script's entry point (knnflow.cli.main.run) in
    this process: the same parsing, output, exit status and one-line errors as a fresh
    process, without starting torch again (about 2.5 s a command). The process state a command
    may change (working folder, environment, threads, random generators, warning hooks) is
    put back afterwards. Tests that need a process of their own use run_process."""
    if not IN_PROCESS:
        return run_process(*args, cwd=cwd, **env_vars)
    import random
    import warnings

    import numpy as np
    import torch
    from knnflow.cli.main import run as knnflow_main

    env = {k: v for k, v in os.environ.items() if k != "KNNFLOW_DEBUG"}
    env.update(COLUMNS="200", **env_vars)
    out, err = io.StringIO(), io.StringIO()
    saved = (os.getcwd(), dict(os.environ), torch.get_num_threads(), torch.get_rng_state(),
             np.random.get_state(), random.getstate(), warnings.showwarning,
             torch.get_default_dtype())
    code = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), redirect_stdout(out), redirect_stderr(err), \
                mock.patch.object(sys, "argv", ["knnflow", *map(str, args)]):
            try:
                knnflow_main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None
                                                                       else 1)
    finally:
        os.chdir(saved[0])
        os.environ.clear()
        os.environ.update(saved[1])
        torch.set_num_threads(saved[2])
        torch.set_rng_state(saved[3])
        np.random.set_state(saved[4])
        random.setstate(saved[5])
        warnings.showwarning = saved[6]
        torch.set_default_dtype(saved[7])
    return subprocess.CompletedProcess([*KNNFLOW, *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_commands_and_every_option_has_help():
    result = run("--help")
    assert result.returncode == 0
    for command in ("datasets", "build-index", "index-info", "train", "sample", "memorization",
                    "bench"):
        assert command in result.stdout
    for args in (("build-index",), ("index-info",), ("bench", "exact"), ("datasets",)):
        text = run(*args, "--help").stdout
        assert "Usage" in text
    build_help = run("build-index", "--help").stdout
    for option in ("--root", "--split", "--limit", "--kind", "--out", "--device", "--overwrite"):
        assert option in build_help
    assert "[default: flat]" in build_help and "[default: train]" in build_help


def test_every_option_and_argument_of_every_command_has_help():
    import typer
    from knnflow.cli.main import app

    def commands(group, path=()):
        for name, command in getattr(group, "commands", {}).items():
            if getattr(command, "commands", None):
                yield from commands(command, (*path, name))
            else:
                yield (*path, name), command

    found = dict(commands(typer.main.get_command(app)))
    assert {("train",), ("sample",), ("memorization",), ("bench", "targets")} <= set(found)
    for path, command in found.items():
        assert command.help, path
        for param in command.params:
            assert getattr(param, "help", None), (path, param.name)


HEAVY = ("torch", "faiss", "matplotlib", "scipy", "sklearn", "skimage")
START_UP = """
import contextlib, io, sys
import typer
from knnflow.cli.main import app, run

def commands(group, path=()):
    for name, command in getattr(group, "commands", {}).items():
        if getattr(command, "commands", None):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)

# Listing the commands builds every command's options (their help and choices).
paths = [(), *commands(typer.main.get_command(app))]
codes = []
for path in paths:
    for extra in (["--help"], ["--no-such-option"]):
        sys.argv = ["knnflow", *path, *extra]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                run()
            except SystemExit as stop:
                codes.append((path, extra[0], stop.code))
print(len(paths), sorted({code for *_, code in codes}))
print(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv_heavy)))
"""


def test_help_and_option_errors_load_no_heavy_library():
    # `knnflow --help`, each command's --help and an unknown option answer without importing
    # torch, faiss or matplotlib (seconds of start-up); the library loads when a command runs.
    script = START_UP.replace("sys.argv_heavy", repr(HEAVY))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    asked, loaded = result.stdout.strip().splitlines()
    count, codes = asked.split(" ", 1)
    assert int(count) >= 18  # every command and bench subcommand was asked
    assert codes == "[0, 2]"  # help exits 0, the unknown option 2
    assert loaded == "[]"


def test_datasets_lists_shapes_and_locations():
    result = run("datasets")
    assert result.returncode == 0
    for text in ("digits", "1×8×8", "mnist", "idx3-ubyte", "cifar10", "cifar-10-batches-py",
                 "celeba64", "img_align_celeba", "folder:PATH", "npz:PATH", "npy:PATH"):
        assert text in result.stdout


def test_build_index_then_index_info(tmp_path):
    result = run("build-index", "digits", "--limit", "100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "indices" / "digits-train"
    for text in ("100", "64", "1×8×8", "flat", "build seconds", "bytes on disk", "peak memory"):
        assert text in result.stdout
    info = run("index-info", str(folder), "--json")
    assert json.loads(info.stdout)["n"] == 100
    again = run("build-index", "digits", cwd=tmp_path)
    assert_one_line_error(again, "--overwrite")
    assert run("build-index", "digits", "--overwrite", "--kind", "ivf",
               cwd=tmp_path).returncode == 0
    assert json.loads(run("index-info", str(folder), "--json").stdout)["index"]["kind"] == "ivf"


@pytest.mark.parametrize("args, fragments", [
    (("build-index", "imagenet"), ("unknown data set", "digits", "cifar10")),
    (("build-index", "cifar10", "--root", "/nonexistent/c10"), ("/nonexistent/c10",
                                                                 "data_batch_1")),
    (("build-index", "digits", "--kind", "hnsw"), ("flat, ivf",)),
    (("build-index", "digits", "--split", "val"), ("split",)),
    (("build-index", "digits", "--device", "tpu"), ("device",)),
    (("index-info", "/nonexistent/index"), ("/nonexistent/index",)),
    (("bench", "exact", "--t-grid", "0.5,1.2"), ("[0, 1)", "1.2")),
    (("bench", "exact", "--t", "0.5,1.2"), ("[0, 1)",)),  # --t: the old name, hidden
    (("bench", "knn", "--t-grid", "abc"), ("--t-grid", "not a number")),
    # the target's own options: checked by the target, named by train's flags
    (("train", "digits", "--target", "cfm", "--tol", "1e-3"),
     ("the cfm target has no option --tol",)),
    (("train", "digits", "--target", "knn-efm", "--knn-route", "zz"),
     ("unknown --knn-route 'zz'", "auto, certify, faster")),
    (("train", "digits", "--target", "efm", "--efm-pool", "global"),
     ("unknown --efm-pool 'global'",)),
    (("train", "digits", "--target", "knn-efm", "--knn-budget", "2"), ("--knn-budget", "(0, 1]")),
    (("train", "digits", "--batch-size", "0"), ("--batch-size must be at least 1",)),
])
def test_bad_input_is_one_line_with_nonzero_exit(tmp_path, args, fragments):
    assert_one_line_error(run(*args, cwd=tmp_path), *fragments)


def test_corrupt_index_is_refused_in_one_line(tmp_path):
    assert run("build-index", "digits", "--limit", "50", "--out", "ix", cwd=tmp_path) \
        .returncode == 0
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    manifest["format_version"] = 0
    (tmp_path / "ix" / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run("index-info", "ix", cwd=tmp_path), "version 0")


def test_bench_exact_quick_prints_the_check_table(tmp_path):
    result = run("bench", "exact", "--quick", "--repeats", "1", "--json-out", "q.json",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "digits" in result.stdout and "0.999" in result.stdout and "U[0,1)" in result.stdout
    saved = json.loads((tmp_path / "q.json").read_text())
    rows = saved["rows"]
    assert [row["t"] for row in rows] == [0.0, 0.1, 0.5, 0.7, 0.9, 0.99, 0.999, None]
    assert rows[-1]["label"] == "U[0,1)"
    assert max(row["engine_error_max"] for row in rows) < 1e-4
    config = saved["config"]
    assert (config["data"], config["n"], config["d"]) == ("digits", 1498, 64)
    assert config["threads"] >= 1 and "size" in config


def test_overwrite_never_deletes_inputs_or_foreign_folders(tmp_path):
    """--overwrite replaces only a folder knnflow wrote, never the command's own input, and a
    path that cannot be written is refused before any work: one line each, nothing lost."""
    images = tmp_path / "imgs.npy"
    import numpy as np

    np.save(images, np.random.default_rng(0).uniform(-1, 1, (30, 1, 8, 8)).astype(np.float32))
    assert run("build-index", f"npy:{images}", "--out", "ix", cwd=tmp_path).returncode == 0
    assert_one_line_error(run("build-index", f"npy:{tmp_path}/ix/data.npy", "--out", "ix",
                              "--overwrite", cwd=tmp_path), "holds the input")
    assert (tmp_path / "ix" / "manifest.json").is_file()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("years of work")
    assert_one_line_error(run("build-index", "digits", "--limit", "20", "--out", "notes",
                              "--overwrite", cwd=tmp_path), "not a folder knnflow wrote")
    assert (tmp_path / "notes" / "thesis.txt").is_file()
    assert run("sample", "--closed-form", "ix", "--n", "2", "--steps", "2", "--out", "s",
               cwd=tmp_path).returncode == 0
    assert_one_line_error(run("memorization", "s", "--index", "ix", "--out", "s", "--overwrite",
                              cwd=tmp_path), "holds the input")
    assert (tmp_path / "s" / "samples.npz").is_file()
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run("build-index", "digits", "--out", "afile/ix", cwd=tmp_path),
                          "afile is a file")
    assert_one_line_error(run("build-index", "digits", "--out", "afile", "--overwrite",
                              cwd=tmp_path), "is a file")
    assert_one_line_error(run("bench", "exact", "--quick", "--json-out", "notes",
                              cwd=tmp_path), "--json-out", "is a folder")
    # names alone do not make a folder knnflow's (an ML project with checkpoints/ and
    # config.json), one kind of output never replaces another, links are not followed
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.json").write_text('{"model_type": "bert"}')
    assert_one_line_error(run("sample", "--closed-form", "ix", "--n", "2", "--steps", "2",
                              "--out", "project", "--overwrite", cwd=tmp_path),
                          "not a folder knnflow wrote")
    assert_one_line_error(run("sample", "--closed-form", "ix", "--n", "2", "--steps", "2",
                              "--out", "ix", "--overwrite", cwd=tmp_path),
                          "holds the input")
    assert_one_line_error(run("build-index", "digits", "--limit", "20", "--out", "s",
                              "--overwrite", cwd=tmp_path), "holds a knnflow samples")
    (tmp_path / "link").symlink_to(tmp_path / "s")
    assert_one_line_error(run("sample", "--closed-form", "ix", "--n", "2", "--steps", "2",
                              "--out", "link", "--overwrite", cwd=tmp_path), "symbolic link")
    assert_one_line_error(run("bench", "knn", "--index", "ix", "--json-out", "ix/manifest.json",
                              cwd=tmp_path), "lies inside the input")
    assert (tmp_path / "ix" / "manifest.json").is_file() and (tmp_path / "s").is_dir()


@pytest.mark.parametrize("args, fragment", [
    (("build-index", "digits", "--limit", "0"), "--limit must be at least 1"),
    (("build-index", "digits", "--kind", "bogus"), "unknown index kind"),
    (("build-index", "digits", "--dtype", "int8"), "unknown data dtype"),
    (("sample", "--closed-form", "out", "--n", "0"), "--n must be at least 1"),
    (("sample", "--closed-form", "out", "--solver", "bogus"), "unknown solver"),
    (("train-classifier", "digits", "--epochs", "0"), "--epochs must be at least 1"),
    (("memorization", "out", "--k", "1"), "--k must be at least 2"),
    (("train", "--steps", "0", "--name"), "--steps must be at least 1"),
    (("fid", "out", "--ref", "digits", "--bootstrap", "-1"), "--bootstrap must be at least 0"),
])
def test_invalid_options_are_reported_before_an_existing_output_folder(tmp_path, args,
                                                                        fragment):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("a user's file")
    given = (*args, "out") if args[-1] == "--name" else (*args, "--out", "out")
    assert_one_line_error(run(*given, cwd=tmp_path), fragment)
    assert (tmp_path / "out" / "mine.txt").read_text() == "a user's file"


@pytest.mark.parametrize("args, fragments", [
    (("train", "--stepz", "3"), ("No such option", "knnflow train --help")),
    (("sample", "--n", "1.5", "run"), ("--n",)),
    (("fid", "samples"), ("--ref",)),
    (("build-index", "folder:.", "--size", "0"), ("--size must be at least 1",)),
    (("build-index", "digits", "--kind", "flat", "--nlist", "3"), ("ivf only",)),
    (("build-index", "digits", "--kind", "ivf", "--nprobe", "-1"), ("--nprobe must be at least",)),
    (("collapse", "digits", "--t-grid", "0:0.9:10"), ("larger than the range", "0:0.9:0.1")),
    (("train", "digits", "--index", "somewhere"), ("no option --index", "knn-efm takes it")),
    (("train", "--target", "ot-cfm", "--batch-size", "1"), ("--batch-size must be at least 2",)),
    (("fid", "x", "--ref", "nosuch"), ("unknown reference data set",)),
    (("train-classifier", "digits", "--lr", "nan"), ("--lr",)),
    (("bench", "knn", "--t-grid", "0:1:0.25"), ("t = 1 is invalid",)),
    (("bench", "exact", "--t-grid", "0.5", "--t", "0.5"), ("--t-grid only",)),
    (("bench", "exact", "--d", "192"), ("--d applies to --dataset synthetic only",)),
    (("bench", "memorization", "--t-grid", "0,0.5"), ("every t must lie in (0, 1)",)),
])
def test_command_line_mistakes_are_one_line(tmp_path, args, fragments):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, *fragments)


def test_progress_in_logs_only_for_long_stages():
    """Where stderr is not a terminal, a stage prints a line only once it has run `every`
    seconds, then at most that often, plus one at its end; short stages print nothing."""
    from knnflow.cli.console import log_throttle

    now = [0.0]
    due = log_throttle(every=30, clock=lambda: now[0])
    printed = []
    for second in range(0, 100, 5):  # a 95-second stage, updated every 5 s
        now[0] = float(second)
        printed.append((second, due("long", second == 95)))
    assert [s for s, shown in printed if shown] == [30, 60, 90, 95]
    now[0] = 0.0
    short = log_throttle(every=30, clock=lambda: now[0])
    short("short")
    now[0] = 12.0
    assert not short("short", True)


def test_knnflow_debug_shows_the_traceback(tmp_path):
    """Errors are one line, unless KNNFLOW_DEBUG is set: then the traceback, to report a bug."""
    assert_one_line_error(run_process("index-info", "nosuch", cwd=tmp_path), "no index folder")
    result = run_process("index-info", "nosuch", cwd=tmp_path, KNNFLOW_DEBUG="1")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "MissingFileError" in result.stderr


def test_docs_cli_md_is_the_current_help():
    # docs/cli.md is generated from the typer app (make cli-docs): every command and option as
    # the help prints it, so it cannot fall behind the code.
    from pathlib import Path

    from cli_docs import cli_docs

    page = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert page.read_text() == cli_docs(), "docs/cli.md is stale: run make cli-docs"
