"""The markdown page: the machine, the code version, the table and the verdicts."""

from __future__ import annotations

import os
import platform
import string
import subprocess
from pathlib import Path

import torch

from knnflow.analysis.reproduce.budgets import Budget
from knnflow.analysis.reproduce.claims import Verdict
from knnflow.analysis.reproduce.common import LOSS_TAIL, PAPER
from knnflow.analysis.reproduce.results import StageTime, TargetRow
from knnflow.analysis.reproduce.stages import write_atomic
from knnflow.choices import COPY_FRACTION


def machine_text(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    text = (f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} with "
            f"{torch.get_num_threads()} CPU thread(s)")
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def code_version() -> str:
    """knnflow's version and, from a git checkout, its commit (and whether it has changes)."""
    import knnflow

    text = f"knnflow {knnflow.__version__}"
    folder = Path(knnflow.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return text
    text += f", commit {commit.stdout.strip()}"
    return text + (" with local changes" if dirty.stdout.strip() else "")


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _taus_text(taus: list[float | None]) -> str:
    return " / ".join("—" if t is None else f"{t:g}" for t in taus)


def table_markdown(rows: list[TargetRow]) -> str:
    lines = ["| target | final training loss | ms / step | FID (classifier features) | "
             "memorized | mean d1 (÷ train→train) | velocity error (EMA) | copies from τ |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.label} | {row.loss.text()} | {row.ms_step:.0f} | {row.fid.text()} | "
            f"{_percent(row.memorized)} ({row.memorized_count}/{row.samples}) | "
            f"{row.d1:.3g} ({row.d1_over_reference:.2f}×) | {row.velocity_error.text()} | "
            f"{_taus_text(row.copy_tau)} |")
    return "\n".join(lines)


TEMPLATE = Path(__file__).with_name("page.md.tmpl")
CAPTIONS = {
    "samples": "Samples of each run (EMA weights) beside real training images.",
    "loss": "Training loss against step; t plays no part here.",
    "velocity_error": "Velocity error against û* per t bin (t = 0 noise, t = 1 data).",
    "hybrid": "Memorized fraction of hybrid samples against the switch time τ; the dotted "
              "line is the collapse time of û* on the data set.",
    "collapse": "Collapse of û* on the data set (`knnflow collapse`): cosine histograms and "
                "the fraction of pairs whose largest softmax weight exceeds 0.9, against t "
                "(0 = noise, 1 = data), at each image size.",
}


def scale_note(dataset: str, budget: Budget) -> str:
    """The end of the page's first sentence: how far this budget is from the paper's."""
    if not (dataset == "digits" or budget.steps < 500_000):
        return "."
    small = (", the data set is small and low-dimensional, and the sample counts are small"
             if dataset == "digits" else "")
    return ("; the paper's released configuration trains CIFAR-10 for 500,000 steps. The "
            f"networks here are far from converged{small}, so read the verdicts as what this "
            "budget shows, not as a test of the paper at its scale.")


def write_markdown(path: Path, *, dataset: str, budget: Budget, rows: list[TargetRow],
                   verdicts: list[Verdict], figures: dict[str, Path], info: dict,
                   stages: list[StageTime]) -> None:
    """The page, from page.md.tmpl: every number comes from `info`, the rows, the verdicts
    and the stage records."""
    one_seed = len(budget.seeds) == 1
    seeds = ", ".join(map(str, budget.seeds))
    config = info["config"]
    figure_blocks = "".join(
        f"**{CAPTIONS.get(name, name)}**\n\n![{name}]({f.relative_to(path.parent).as_posix()})"
        "\n\n" for name, f in figures.items())
    values = {
        "dataset": dataset, "paper": PAPER, "steps": f"{budget.steps:,}",
        "parameters": f"{info['parameters']:,}", "preset": budget.preset,
        "n_train": f"{info['n_train']:,}", "image_shape": "×".join(map(str, info["image_shape"])),
        "d": info["d"],
        "seed_count": f"{len(budget.seeds)} seed{'s' if len(budget.seeds) > 1 else ''}",
        "scale_note": scale_note(dataset, budget), "table": table_markdown(rows),
        "loss_tail": f"{LOSS_TAIL:.0%}",
        "classifier_accuracy": f"{info['classifier_accuracy']:.1%}",
        "samples": f"{budget.samples:,}", "sample_steps": budget.sample_steps,
        "n_reference": f"{info['n_reference']:,}", "bootstrap": budget.bootstrap,
        "floor_n": f"{info['floor_n']:,}", "floor": info["floor"].text(),
        "train_to_train": f"{info['train_to_train']:.3g}", "velocity_bins": budget.velocity_bins,
        "velocity_n": budget.velocity_n, "hybrid_n": budget.hybrid_n,
        "hybrid_steps": budget.hybrid_steps, "taus": budget.taus,
        "copy_fraction": f"{COPY_FRACTION:.0%}",
        "per_seed": "" if one_seed else " One value per seed.",
        "seeds_note": "" if one_seed else (
            f"- Values are means over the seeds {seeds}; ± combines the measurement error "
            "with the seed-to-seed spread (the larger of the two).\n"),
        "one_seed_note": (
            "With one training seed, every ± is measurement noise only (bootstrap of samples "
            "and test images, the velocity-error queries, the logged batch losses): how much a "
            "second training seed would move the numbers is not measured here. `--budget "
            "full` trains two seeds.\n\n") if one_seed else "",
        "verdicts": "".join(verdict.markdown() + "\n" for verdict in verdicts),
        "figures": figure_blocks,
        "command": info["command"], "date": info["date"], "machine": info["machine"],
        "device": info["device"], "code": info["code"], "budget": budget.name,
        "batch_size": budget.batch_size, "seeds": seeds, "lr": f"{config['lr']:g}",
        "warmup": config["warmup"], "grad_clip": f"{config['grad_clip']:g}",
        "ema_decay": f"{config['ema_decay']:g}", "flips": "on" if budget.flip else "off",
        "limit": f" (first {budget.limit})" if budget.limit else "",
        "collapse_pairs": info["collapse_pairs"], "collapse_grid": budget.collapse_grid,
        "collapse_sizes": (", ".join(f"{s}×{s}" for s in budget.collapse_sides)
                           if budget.collapse_sides else "native"),
        "work": info["work"], "seconds": f"{info['seconds']:.0f}",
        "computed": sum(not s.reused for s in stages), "reused": sum(s.reused for s in stages),
        "all_seconds": f"{sum(s.seconds for s in stages):.0f}",
        "stage_rows": "\n".join(f"| {s.label} | {s.seconds:.1f} | {s.finished}"
                                + (" (reused)" if s.reused else "") + " |" for s in stages),
    }
    text = string.Template(TEMPLATE.read_text()).substitute(values)
    write_atomic(path, text.rstrip("\n") + "\n")
