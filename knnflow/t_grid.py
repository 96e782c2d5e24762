"""Grids of times t in [0, 1): parsed from text, checked, and printed.

A grid is written 'start:stop:step' (stop included when it lands on the grid) or as a comma
list of t; it comes back sorted, without duplicates, as float64. t = 1 is refused because the
closed-form velocity û* = (D - x)/(1 - t) divides by 1 - t. The collapse analysis and the
benchmarks read their t grids with these functions.
"""

from __future__ import annotations

import math

import numpy as np

from knnflow.errors import OptionError

# The most points a start:stop:step grid may hold.
MAX_POINTS = 100_000


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"{{{option}}}: {text.strip()!r} is not a number", option) from None
    if not math.isfinite(value):
        raise OptionError(f"{{{option}}}: {text.strip()!r} is not a finite number", option)
    return value


def check_grid(values, option: str = "t_grid") -> np.ndarray:
    """A sorted float64 grid without duplicates, every t in [0, 1); errors name `option`."""
    grid = np.asarray(values, dtype=np.float64).reshape(-1)
    if grid.size == 0:
        raise OptionError("holds no t values", option)
    bad = grid[~((grid >= 0) & (grid < 1))]
    if bad.size:
        raise OptionError(f"{{{option}}}: every t must lie in [0, 1) (t = 1 is invalid: û* "
                          f"divides by 1 - t); got {bad[0]:g}", option)
    return np.unique(grid)


def parse_t_grid(text: str, option: str = "t_grid") -> np.ndarray:
    """'start:stop:step' (stop included when it lands on the grid) or a comma list of t."""
    raw = text.strip()
    name = "{" + option + "}"
    if ":" in raw:
        parts = raw.split(":")
        if len(parts) != 3:
            raise OptionError(f"{name} takes start:stop:step or a comma list, got {raw!r}",
                              option)
        start, stop, step = (_number(p, option) for p in parts)
        if step <= 0:
            raise OptionError(f"{name}: the step must be positive, got {step:g}", option)
        if stop < start:
            raise OptionError(f"{name}: stop {stop:g} is below start {start:g}", option)
        if stop > start and step > stop - start:
            raise OptionError(f"{name} {raw!r}: the step {step:g} is larger than the range "
                              f"(start:stop:STEP, not a count: for 10 points from {start:g} "
                              f"to {stop:g} write {start:g}:{stop:g}:{(stop - start) / 9:g})",
                              option)
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_POINTS:
            raise OptionError(f"{name} {raw!r} has {count} points; at most {MAX_POINTS}",
                              option)
        # Rounding to 12 decimals turns 0.30000000000000004 into 0.3.
        values = np.round(start + step * np.arange(count), 12)
    else:
        items = [p for p in raw.split(",")]
        if not raw or any(not p.strip() for p in items):
            raise OptionError(f"{name} takes start:stop:step or a comma list, got {raw!r}",
                              option)
        values = np.array([_number(p, option) for p in items])
    return check_grid(values, option)


def format_t(t: float | None) -> str:
    """A grid t as printed: 0.12 (more decimals only when the grid needs them); None: never."""
    if t is None:
        return "never"
    for decimals in range(2, 7):
        if abs(round(t, decimals) - t) < 1e-9:
            return f"{t:.{decimals}f}"
    return f"{t:g}"
