"""Nearest-neighbour scores (knnflow/nearest.py): the leave-one-out reference against float64
brute force, and the threshold read and printed as a fraction."""

from __future__ import annotations

import pytest
import torch

from knnflow.data import load_dataset
from knnflow.errors import InputError
from knnflow.index import Index
from knnflow.nearest import parse_threshold, threshold_text, train_reference


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def index(train):
    return Index.build(train)


def test_reference_is_leave_one_out_against_brute_force(index, train):
    ids, distances = train_reference(index, size=200)
    assert len(ids) == 200 and len(set(ids.tolist())) == 200
    flat = train.reshape(train.shape[0], -1).to(torch.float64)
    for i, d in zip(ids.tolist()[:50], distances.tolist()[:50], strict=True):
        sq = (flat - flat[i]).square().sum(1)
        sq[i] = float("inf")
        assert d == pytest.approx(float(sq.min().sqrt()), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("text", ["0", "1.5", "-0.1", "abc", "1/0", "nan"])
def test_threshold_outside_unit_interval_is_refused(text):
    with pytest.raises(InputError, match="threshold"):
        parse_threshold(text)


def test_threshold_accepts_fractions():
    assert parse_threshold("1/3") == pytest.approx(1 / 3)
    assert parse_threshold("1") == 1.0


def test_the_threshold_reads_as_the_fraction_it_is():
    assert threshold_text(1 / 3) == "1/3" and threshold_text(0.25) == "1/4"
    assert threshold_text(0.123456) == "0.1235" and threshold_text(0.5) == "1/2"
