"""knnflow.t_grid: t grids parsed from start:stop:step and comma lists, refused outside
[0, 1), and printed."""

from __future__ import annotations

import numpy as np
import pytest

from knnflow.errors import InputError, OptionError
from knnflow.t_grid import check_grid, format_t, parse_t_grid


def test_format_t():
    assert format_t(0.71) == "0.71" and format_t(0.0) == "0.00" and format_t(0.125) == "0.125"
    assert format_t(None) == "never"


def test_parse_t_grid():
    default = parse_t_grid("0:0.99:0.01")
    assert len(default) == 100 and default[-1] == 0.99 and default[30] == 0.3
    np.testing.assert_array_equal(parse_t_grid("0.1:0.5:0.2"), [0.1, 0.3, 0.5])
    np.testing.assert_array_equal(parse_t_grid("0.1:0.6:0.2"), [0.1, 0.3, 0.5])
    np.testing.assert_array_equal(parse_t_grid("0.9, 0,0.5"), [0, 0.5, 0.9])
    with pytest.raises(InputError, match=r"\[0, 1\).*1 - t"):
        parse_t_grid("0:1:0.25")
    for bad in ("1", "-0.1", "0,1.5"):
        with pytest.raises(InputError, match=r"\[0, 1\)"):
            parse_t_grid(bad)
    for bad in ("0:0.5", "a,b", "0:0.5:0", "0.5:0.1:0.1", "", "0,,0.5", "nan", "0:x:0.1"):
        with pytest.raises(InputError, match="t_grid"):
            parse_t_grid(bad)


def test_errors_name_the_option_for_the_command_line_to_spell():
    with pytest.raises(OptionError) as caught:
        parse_t_grid("0:0.5")
    assert caught.value.options == ("t_grid",)
    assert caught.value.render(lambda name: "--t-grid").startswith("--t-grid takes ")
    with pytest.raises(OptionError, match="^grid holds no t values$"):
        check_grid([], "grid")
