"""What a reproduction returns: per-stage times, the table's rows, the verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from knnflow.analysis.reproduce.claims import Verdict
from knnflow.analysis.reproduce.statistics import Estimate


@dataclass
class StageTime:
    name: str
    label: str
    seconds: float
    reused: bool
    finished: str


@dataclass
class TargetRow:
    """One row of the table: a target, aggregated over its seeds."""

    label: str
    loss: Estimate
    ms_step: float
    fid: Estimate
    memorized: float
    memorized_count: int
    samples: int
    d1: float
    d1_over_reference: float
    velocity_error: Estimate
    copy_tau: list[float | None]


@dataclass
class ReproduceResult:
    markdown: Path
    figures: list[Path]
    rows: list[TargetRow]
    verdicts: list[Verdict]
    stages: list[StageTime]
    work: Path
    runs: dict[str, Path]
    records: dict[str, dict]
    collapse_time: float | None
    seconds: float
