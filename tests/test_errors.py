"""knnflow.errors: an OptionError names its options by their Python names, and renders them
as any spelling (the command line's flags)."""

from __future__ import annotations

import pytest

from knnflow.errors import InputError, OptionError, OptionWarning


def test_option_error_names_options_and_renders_flags():
    err = OptionError("must be at least 1, got 0", "batch_size")
    assert isinstance(err, InputError) and isinstance(err, ValueError)
    assert str(err) == "batch_size must be at least 1, got 0"
    assert err.render(lambda name: "--" + name.replace("_", "-")) == (
        "--batch-size must be at least 1, got 0")
    both = OptionError("{resume} continues a run and {overwrite} deletes it", "resume",
                       "overwrite")
    assert both.render(str.upper) == "RESUME continues a run and OVERWRITE deletes it"
    # only the listed names' tokens are replaced: other braces stay as they are
    braces = OptionError("{route}: {'a': 1} → {x}", "route")
    assert str(braces) == "route: {'a': 1} → {x}"
    with pytest.raises(InputError, match="^tol must be positive$"):
        raise OptionError("must be positive", "tol")


def test_option_warning_renders_like_errors():
    warning = OptionWarning("{steps} 10 ends inside the warm-up; pass {warmup} 1", "steps",
                            "warmup")
    assert isinstance(warning, UserWarning)
    assert warning.render(lambda name: f"--{name}") == (
        "--steps 10 ends inside the warm-up; pass --warmup 1")
