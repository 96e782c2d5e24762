"""Reading generated samples (knnflow/samples.py): bad input is refused in one line that
names the file. The formats agreeing with each other is tested through the report, in
test_memorization.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from knnflow.errors import InputError, MissingFileError
from knnflow.samples import load_samples


def test_bad_samples_are_refused_with_one_clear_message(tmp_path):
    shape = (1, 8, 8)  # the image shape of an index of the embedded digits
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="is empty"):
        load_samples(empty, shape)
    text_only = tmp_path / "text"
    text_only.mkdir()
    (text_only / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="1 other files skipped"):
        load_samples(text_only, shape)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(corrupt / "a.png")
    (corrupt / "b.png").write_bytes(b"\x89PNG garbage")
    samples = load_samples(corrupt, shape)
    with pytest.raises(InputError, match="b.png"):
        samples.batch(0, 2)
    nan = np.zeros((2, 1, 8, 8), np.float32)
    nan[1, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(InputError, match="NaN"):
        load_samples(tmp_path / "nan.npy", shape)
    with pytest.raises(MissingFileError, match="nowhere"):
        load_samples(tmp_path / "nowhere", shape)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8), mode="L").save(mixed / "b.png")
    with pytest.raises(InputError, match=r"b.png has shape 1×9×9"):
        load_samples(mixed, shape).batch(0, 2)
