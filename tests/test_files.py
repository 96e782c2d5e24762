"""Atomic output folders and the checks made before any work is done."""

from __future__ import annotations

import hashlib

import pytest

from knnflow.errors import InputError
from knnflow.files import (
    atomic_folder,
    check_output_file,
    check_output_folder,
    folder_kind,
    sha256_file,
)


def test_a_crash_inside_leaves_no_folder_and_a_finished_one_is_marked(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_folder(target, kind="samples") as tmp:
        (tmp / "half.txt").write_text("half written")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target, kind="samples") as tmp:
        (tmp / "whole.txt").write_text("done")
    assert (target / "whole.txt").read_text() == "done" and folder_kind(target) == "samples"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_only_knnflow_output_of_the_same_kind(tmp_path):
    with atomic_folder(tmp_path / "s", kind="samples") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(InputError, match="already exists; pass overwrite"):
        check_output_folder(tmp_path / "s", False, "samples")
    assert check_output_folder(tmp_path / "s", True, "samples") == tmp_path / "s"
    with pytest.raises(InputError, match="samples"):
        check_output_folder(tmp_path / "s", True, "index")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's")
    with pytest.raises(InputError):
        check_output_folder(tmp_path / "mine", True, "samples")
    assert (tmp_path / "mine" / "notes.txt").is_file()


def test_outputs_never_replace_their_inputs(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="holds the input"):
        check_output_folder(tmp_path, True, "samples", [tmp_path / "data"])
    with pytest.raises(InputError, match="lies inside the input"):
        check_output_file(tmp_path / "data" / "r.json", "json_out", [tmp_path / "data"])
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with pytest.raises(InputError, match="symbolic link"):
        check_output_folder(tmp_path / "link", True, "samples")


def test_sha256_file_reads_in_blocks(tmp_path):
    payload = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(payload)
    assert sha256_file(tmp_path / "f", block=1000) == hashlib.sha256(payload).hexdigest()
