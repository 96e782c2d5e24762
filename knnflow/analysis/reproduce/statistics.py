"""Measured values with standard errors: combining seeds, paired differences, and the
final training loss."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnflow.analysis.reproduce.common import HELD, INCONCLUSIVE, LOSS_TAIL, NOT_HELD, Z
from knnflow.errors import InputError


@dataclass(frozen=True)
class Estimate:
    """A measured value and its standard error (nan when unknown)."""

    value: float
    se: float

    def text(self, digits: int = 3) -> str:
        if not math.isfinite(self.se):
            return f"{self.value:.{digits}g}"
        return f"{self.value:.{digits}g} ± {self.se:.2g}"


def combine(estimates: list[Estimate]) -> Estimate:
    """The mean over seeds. Its standard error is the larger of the propagated measurement
    error, √(Σ se²)/S, and, with two seeds or more, the seed-to-seed spread std/√S."""
    values = np.array([e.value for e in estimates], dtype=np.float64)
    ses = np.array([e.se for e in estimates], dtype=np.float64)
    count = len(values)
    se = float(math.sqrt(np.sum(ses ** 2)) / count)
    if count > 1:
        se = max(se, float(values.std(ddof=1)) / math.sqrt(count))
    return Estimate(float(values.mean()), se)


@dataclass(frozen=True)
class Comparison:
    """A lower-is-better measure of cfm (baseline) and knn-efm (candidate), and baseline minus
    candidate with its standard error (paired where the measurements share their noise)."""

    baseline: Estimate
    candidate: Estimate
    difference: Estimate

    @classmethod
    def independent(cls, baseline: Estimate, candidate: Estimate) -> Comparison:
        return cls(baseline, candidate, Estimate(baseline.value - candidate.value,
                                                 math.hypot(baseline.se, candidate.se)))


def difference_verdict(difference: Estimate, z: float = Z) -> tuple[str, str]:
    """(verdict, reason) for 'the candidate is better' from baseline − candidate of a
    lower-is-better measure: held beyond z standard errors, did not hold below -z standard
    errors, inconclusive in between."""
    value, se = difference.value, difference.se
    if not (math.isfinite(value) and math.isfinite(se)):
        return INCONCLUSIVE, "no spread could be measured"
    if se == 0:
        if value == 0:
            return INCONCLUSIVE, "the two values are equal"
        return (HELD if value > 0 else NOT_HELD), f"a difference of {value:+.3g} with no noise"
    ratio = value / se
    if ratio > z:
        return HELD, f"lower by {value:.3g} ± {se:.2g} ({ratio:.1f} standard errors)"
    if ratio < -z:
        return NOT_HELD, f"higher by {-value:.3g} ± {se:.2g} ({-ratio:.1f} standard errors)"
    return INCONCLUSIVE, (f"the difference {value:+.3g} ± {se:.2g} is within {z:g} standard "
                          "errors, i.e. within the measured noise")


def final_loss(metrics_path: Path, steps: int, tail: float = LOSS_TAIL) -> Estimate:
    """Mean ± standard error of the batch losses logged after step (1 - tail)·steps (the
    last logged loss alone when none was)."""
    entries = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()
               if line.strip()]
    if not entries:
        raise InputError(f"{metrics_path} holds no logged step")
    values = [e["loss"] for e in entries if e["step"] > steps * (1 - tail)] \
        or [entries[-1]["loss"]]
    array = np.array(values, dtype=np.float64)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else float("nan")
    return Estimate(float(array.mean()), se)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def spread(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
