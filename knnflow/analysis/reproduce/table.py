"""The table of the page: one row per target, aggregated over seeds, and the paired
comparisons of cfm and knn-efm."""

from __future__ import annotations

import numpy as np

from knnflow.analysis.reproduce.budgets import TargetSpec
from knnflow.analysis.reproduce.results import TargetRow
from knnflow.analysis.reproduce.statistics import (
    Comparison,
    Estimate,
    combine,
    final_loss,
    read_metrics,
    spread,
)

# --------------------------------------------------------------------------- the table


def target_rows(specs: list[TargetSpec], seeds: tuple[int, ...], runs: dict[str, dict],
                replicates: dict[str, np.ndarray], steps: int) -> list[TargetRow]:
    rows = []
    for spec in specs:
        names = [f"{spec.label}-seed{seed}" for seed in seeds]
        picked = [runs[name] for name in names]
        metrics = [read_metrics(run["folder"] / "metrics.jsonl") for run in picked]
        memorized = [run["memorization"]["result"] for run in picked]
        velocity = [run["velocity"]["result"] for run in picked]
        rows.append(TargetRow(
            label=spec.label,
            loss=combine([final_loss(run["folder"] / "metrics.jsonl", steps) for run in picked]),
            ms_step=float(np.mean([np.median([m["ms_step"] for m in lines])
                                   for lines in metrics])),
            fid=combine([Estimate(run["fid"]["result"]["fid"], spread(replicates[name]))
                         for name, run in zip(names, picked, strict=True)]),
            memorized=float(np.mean([m["memorized_fraction"] for m in memorized])),
            memorized_count=int(sum(m["memorized_count"] for m in memorized)),
            samples=int(sum(m["n_samples"] for m in memorized)),
            d1=float(np.mean([m["d1_mean"] for m in memorized])),
            d1_over_reference=float(np.mean([m["d1_over_reference"] for m in memorized])),
            velocity_error=combine([Estimate(v["mean_error"], v["mean_error_se"])
                                    for v in velocity]),
            copy_tau=[run["hybrid"]["result"]["copy_tau"] for run in picked]))
    return rows


def comparisons(seeds: tuple[int, ...], runs: dict[str, dict],
                replicates: dict[str, np.ndarray], steps: int,
                candidate: str = "knn-efm", baseline: str = "cfm"
                ) -> tuple[Comparison, Comparison, Comparison]:
    """FID (paired bootstrap per seed), velocity error and final loss of cfm and knn-efm."""
    fid, velocity, loss = [], [], []
    for seed in seeds:
        a, b = f"{baseline}-seed{seed}", f"{candidate}-seed{seed}"
        fa, fb = runs[a]["fid"]["result"]["fid"], runs[b]["fid"]["result"]["fid"]
        fid.append(Comparison(Estimate(fa, spread(replicates[a])),
                              Estimate(fb, spread(replicates[b])),
                              Estimate(fa - fb, spread(replicates[a] - replicates[b]))))
        va, vb = (runs[name]["velocity"]["result"] for name in (a, b))
        velocity.append(Comparison.independent(Estimate(va["mean_error"], va["mean_error_se"]),
                                               Estimate(vb["mean_error"], vb["mean_error_se"])))
        loss.append(Comparison.independent(
            final_loss(runs[a]["folder"] / "metrics.jsonl", steps),
            final_loss(runs[b]["folder"] / "metrics.jsonl", steps)))

    def merged(items: list[Comparison]) -> Comparison:
        return Comparison(combine([c.baseline for c in items]),
                          combine([c.candidate for c in items]),
                          combine([c.difference for c in items]))

    return merged(fid), merged(velocity), merged(loss)
