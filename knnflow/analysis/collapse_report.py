"""The collapse report: collapse.csv (every number the line panels plot, per size and t),
collapse_histograms.csv (the histogram counts), collapse.png (collapse_figure) and
summary.json, written atomically by `write_collapse_report`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from knnflow.analysis.collapse import (
    COSINE_THRESHOLD,
    PAIR_FRACTION,
    WEIGHT_THRESHOLD,
    CollapseResult,
    persistent_fraction,
)
from knnflow.files import atomic_folder
from knnflow.t_grid import format_t

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def curve_table(result: CollapseResult) -> list[dict]:
    """One row per (size, t): every number the line panels plot."""
    rows = []
    for i, label in enumerate(result.labels):
        kept = persistent_fraction(result.max_weight[i], WEIGHT_THRESHOLD)
        for j, t in enumerate(result.grid.tolist()):
            c, w = result.cosine[i, j], result.max_weight[i, j]
            row = {"size": label, "d": result.dims[i], "t": t}
            row.update({f"cosine_q{round(100 * q):02d}": float(np.quantile(c, q))
                        for q in QUANTILES})
            row.update({
                "cosine_mean": float(c.mean()),
                "frac_cosine_gt_0.9": float((c > COSINE_THRESHOLD).mean()),
                "max_weight_median": float(np.median(w)),
                "frac_max_weight_gt_0.9": float((w > WEIGHT_THRESHOLD).mean()),
                "frac_collapsed_for_good": float(kept[j]),
            })
            rows.append(row)
    return rows


def histogram_table(result: CollapseResult) -> list[dict]:
    """Cosine histogram counts at the panel times, for every size (the plot shows the
    headline size)."""
    rows = []
    for i, label in enumerate(result.labels):
        bins = result.histogram_bins(i)
        for j in result.histogram_times():
            counts, _ = np.histogram(result.cosine[i, j], bins=bins)
            for b, count in enumerate(counts.tolist()):
                rows.append({"size": label, "t": float(result.grid[j]),
                             "bin_left": float(bins[b]), "bin_right": float(bins[b + 1]),
                             "count": count})
    return rows


def summarize(result: CollapseResult, dataset: str, extra: dict | None = None) -> dict:
    """summary.json: the settings, the rule, and per size its estimator and collapse times;
    `extra` (the command's options) follows the data set's name."""
    times, cos_times = result.collapse_times, result.cosine_times
    return {
        "dataset": dataset,
        **(extra or {}),
        "n": result.n,
        "image_shape": [result.channels, *result.native],
        "pairs": result.pairs,
        "seed": result.seed,
        "grid": [round(t, 12) for t in result.grid.tolist()],
        "rule": f"first grid t from which at least {PAIR_FRACTION:.0%} of pairs keep "
                f"max softmax weight > {WEIGHT_THRESHOLD} at every later grid t",
        "sizes": [
            {"size": label, "d": result.dims[i], "estimator": result.estimators[i],
             "rows_on_exact_engine": int(result.exact_rows[i]),
             "collapse_time": times[i], "cosine_time": cos_times[i],
             "median_cosine_first_t": float(np.median(result.cosine[i, 0]))}
            for i, label in enumerate(result.labels)],
        "headline_size": result.labels[result.headline],
        "collapse_time": result.collapse_time,
        "seconds": round(result.seconds, 3),
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.10g}" if isinstance(value, float) else value
                             for key, value in row.items()})


ESTIMATOR_WORDS = {"exact": "the exact engine (all n points)",
                   "knn": "the certified kNN estimator (KNNVelocity)"}


def estimator_text(estimators: list[str]) -> str:
    """What computed û*, for the figure (each size's estimator is in collapse.csv)."""
    kinds = list(dict.fromkeys(estimators))
    return " and ".join(ESTIMATOR_WORDS.get(kind, kind) for kind in kinds)


def plot_collapse(path: Path, result: CollapseResult, dataset: str) -> None:
    """collapse.png: collapse_figure."""
    import matplotlib.pyplot as plt

    fig = collapse_figure(result, dataset)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def collapse_figure(result: CollapseResult, dataset: str):
    """Six cosine histograms (headline size) over three curves against t, one line per size;
    the title names the estimator of û*, the histograms' legend sits above the first panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    picks = result.histogram_times()
    fig = plt.figure(figsize=(15, 8.5), dpi=110)
    # Columns divisible by both the histogram count and the three curve panels.
    grid_spec = fig.add_gridspec(2, math.lcm(len(picks), 3), height_ratios=(1, 1.25),
                                 hspace=0.42, wspace=0.9)
    width = grid_spec.ncols // len(picks)
    head = result.headline
    bins = result.histogram_bins(head)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, j in enumerate(picks):
        ax = fig.add_subplot(grid_spec[0, panel * width:(panel + 1) * width])
        ax.hist(result.cosine[head, j], bins=bins, color="tab:blue", alpha=0.75,
                label=f"{result.labels[head]} pairs")
        ax.axvline(COSINE_THRESHOLD, color="tab:red", linestyle="--", linewidth=1,
                   label="cosine 0.9")
        ax.set_title(f"t = {format_t(float(result.grid[j]))}", fontsize=10)
        ax.set_xlim(bins[0], 1)
        ax.set_xlabel("cos(û*, x1 − x0)", fontsize=9)
        if panel == 0:
            ax.set_ylabel(f"pairs (of {result.pairs})", fontsize=9)
            # Above the panel: at t = 0 the bars can fill any corner.
            ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.12), ncol=2,
                      borderaxespad=0, frameon=False)
        ax.tick_params(labelsize=8)
    thirds = grid_spec.ncols // 3
    axes = [fig.add_subplot(grid_spec[1, k * thirds:(k + 1) * thirds]) for k in range(3)]
    times = result.collapse_times
    t = result.grid
    for i, label in enumerate(result.labels):
        color = colors[i % len(colors)]
        name = f"{label} (d={result.dims[i]})"
        c, w = result.cosine[i], result.max_weight[i]
        axes[0].plot(t, np.median(c, axis=1), color=color, label=name)
        axes[0].fill_between(t, np.quantile(c, 0.25, axis=1), np.quantile(c, 0.75, axis=1),
                             color=color, alpha=0.18, linewidth=0)
        axes[1].plot(t, (c > COSINE_THRESHOLD).mean(axis=1), color=color, label=name)
        axes[2].plot(t, (w > WEIGHT_THRESHOLD).mean(axis=1), color=color,
                     label=f"{name}: collapse time {format_t(times[i])}")
        axes[2].plot(t, persistent_fraction(w, WEIGHT_THRESHOLD), color=color, linestyle="--")
        if times[i] is not None:
            axes[2].axvline(times[i], color=color, linestyle=":", linewidth=1.5)
    axes[0].set_title("Median cosine (band: quartiles)\nat t = 0, û* = mean − x0 and "
                      "x1 − x0 both point near −x0", fontsize=10)
    axes[0].set_ylabel("cos(û*(x_t, t), x1 − x0)")
    axes[1].set_title("Pairs with cosine > 0.9", fontsize=10)
    axes[1].set_ylabel("fraction of pairs")
    axes[2].set_title("Pairs whose largest softmax weight > 0.9", fontsize=10)
    axes[2].set_ylabel("fraction of pairs")
    axes[2].axhline(PAIR_FRACTION, color="grey", linewidth=0.8, linestyle="-.")
    axes[0].set_ylim(top=1.01)
    for ax in axes:
        ax.set_xlim(0, 1)
        if ax is not axes[0]:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("t  (0 = noise, 1 = data)")
        ax.grid(alpha=0.3)
        if ax is not axes[2]:
            ax.legend(fontsize=7, loc="best")
    # Line styles of the max λ panel, explained once beside the per-size colours.
    handles, _ = axes[2].get_legend_handles_labels()
    styles = [Line2D([], [], color="black", label="max λ > 0.9 at t"),
              Line2D([], [], color="black", linestyle="--",
                     label="… at t and every later grid t"),
              Line2D([], [], color="black", linestyle=":", label="collapse time: dashed "
                     f"line reaches {PAIR_FRACTION:.0%}"),
              Line2D([], [], color="grey", linestyle="-.", linewidth=0.8,
                     label=f"{PAIR_FRACTION:.0%} of pairs")]
    axes[2].legend(handles=handles + styles, fontsize=7, loc="upper left",
                   bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    headline = format_t(result.collapse_time)
    fig.suptitle(f"Collapse of û* on {dataset} (n = {result.n}; {result.pairs} pairs "
                 f"x0 ~ N(0, I), x1 ~ training data; x_t = (1−t)·x0 + t·x1): collapse time "
                 f"{headline} at {result.labels[head]}\nû* computed by "
                 f"{estimator_text(result.estimators)}", fontsize=12, y=1.0)
    return fig


def write_collapse_report(result: CollapseResult, out: str | Path, *, dataset: str,
                          extra: dict | None = None, overwrite: bool = False) -> dict:
    """collapse.png, collapse.csv (one row per size and t), collapse_histograms.csv and
    summary.json, written atomically to `out`. Returns the summary."""
    summary = summarize(result, dataset, extra)
    with atomic_folder(out, overwrite, kind="collapse") as tmp:
        _write_csv(tmp / "collapse.csv", curve_table(result))
        _write_csv(tmp / "collapse_histograms.csv", histogram_table(result))
        plot_collapse(tmp / "collapse.png", result, dataset)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
