"""The catalogue and load_dataset: limits, the listed data sets, where missing files were
expected, and mistakes in the name, split, limit or size in one line."""

from __future__ import annotations

import pytest
import torch
from test_cli import run

from knnflow.data import dataset_infos, load_dataset
from knnflow.errors import InputError, MissingFileError


def test_limit_keeps_the_first_images():
    assert torch.equal(load_dataset("digits", limit=10), load_dataset("digits")[:10])


def test_every_listed_dataset_has_a_shape_and_a_location():
    names = {info.name for info in dataset_infos()}
    expected = {"digits", "mnist", "cifar10", "celeba", "celeba64", "folder:PATH", "npz:PATH",
                "npy:PATH"}
    assert expected <= names
    assert all(info.shape and info.location for info in dataset_infos())


@pytest.mark.parametrize("name, expected", [
    ("mnist", "train-images-idx3-ubyte"),
    ("cifar10", "data_batch_1"),
    ("celeba64", "img_align_celeba"),
    ("celeba", "list_eval_partition.txt"),
])
def test_missing_files_name_the_expected_path(tmp_path, name, expected):
    with pytest.raises(MissingFileError, match=expected) as info:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(InputError, match="digits.*mnist.*cifar10"):
        load_dataset("imagenet")


def test_bad_split_and_limit():
    with pytest.raises(InputError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(InputError, match="limit"):
        load_dataset("digits", limit=0)


@pytest.mark.parametrize("args, fragments", [
    (("photos", "--size", "48"), ("photos comes in --size 32 or 64, got 48",)),
    (("digits", "--size", "8"), ("--size applies to folder:PATH and photos, celeba only",
                                 "digits")),
])
def test_build_index_size_mistakes_are_one_line_before_any_work(tmp_path, args, fragments):
    result = run("build-index", *args, cwd=tmp_path, KNNFLOW_DATA=str(tmp_path / "data"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments)
    assert list(tmp_path.iterdir()) == []
