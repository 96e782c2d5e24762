"""`knnflow reproduce`: the paper's comparison of training targets, end to end, at equal budgets.

For one data set: train cfm, ot-cfm, efm-128, efm-n (EFM with M = n, as many candidates as û*
sums over) and knn-efm with the same preset, batch, step count and seeds (EFM's candidate draws
share the data generator, so after the first batch the targets see different batches: data-
order noise, not bias); sample each run; measure FID with the features of an in-domain classifier,
memorization, the velocity error against û* and hybrid sampling (û* on [0, τ], the network on
[τ, 1]); run the collapse analysis on the data set; and write one markdown page with a table,
figures, and a verdict on each of the paper's claims derived from the measured numbers.

Paper: Bertrand, Gagneux, Massias, Emonet, "On the Closed-Form of Flow Matching: Generalization
Does Not Arise from Target Stochasticity" (arXiv:2506.03719).

The work folder (default runs/reproduce-DATASET-BUDGET) holds the index, the classifier, the
collapse report, runs/TARGET-seedS/ (a training run with its samples/, fid/, memorization/,
velocity-error/ and hybrid/) and stages/NAME.json, one record per stage: its key (its settings
and the identity of its inputs, such as the sha256 of the checkpoint it used), its result and
its wall time. A stage whose record matches its key and whose outputs exist is reused; an
interrupted training run resumes from its newest checkpoint. A crash loses at most the stage in
progress (for training, the steps since the last checkpoint). Every output folder is written
atomically by the analysis that makes it; the record is written after it, so a stage without a
record is redone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from knnflow.choices import COLLAPSE_GRID as DEFAULT_GRID
from knnflow.choices import COPY_FRACTION
from knnflow.choices import REPRODUCE_DATASETS as DATASETS
from knnflow.errors import InputError
from knnflow.threads import cpu_threads

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
# A difference counts when it exceeds two standard errors (about 95% two-sided).
Z = 2.0
# The collapse counts as early when the softmax has collapsed over the second half of the path
# at the latest: then cfm's target x1 - x0 equals û* on most of [0, 1].
EARLY_COLLAPSE = 0.5
# The final training loss is the mean of the batch losses logged over the last 10% of steps.
LOSS_TAIL = 0.1
MEMORIZATION_THRESHOLD = 1 / 3
MARKER = "reproduce.json"
PAPER = ("Bertrand, Gagneux, Massias, Emonet, *On the Closed-Form of Flow Matching: "
         "Generalization Does Not Arise from Target Stochasticity* (arXiv:2506.03719)")
COLORS = {"cfm": "tab:blue", "knn-efm": "tab:red"}
EFM_COLORS = ("tab:orange", "tab:green")


# --------------------------------------------------------------------------- budgets


REPRODUCE_TAUS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.85,0.9,0.925,0.95,0.975,1"


@dataclass(frozen=True)
class Budget:
    """Everything that sets the cost of a reproduction, identical for every target.

    steps, batch_size, preset, seeds: training (lr, warm-up and EMA are the preset's
    defaults, knnflow.models.presets). samples / sample_steps: Euler samples per run for FID
    and memorization. velocity_*: t bins and queries per bin of the velocity error (EMA
    weights). hybrid_*: noises and Euler steps of hybrid sampling at every τ of `taus`.
    collapse_*: pairs, t grid and square sizes of the collapse analysis (None: the data's own
    size). bootstrap: replicates of the FID bootstrap. closed_form_index: û* for the velocity
    error and hybrid sampling from the certified KNNVelocity over the index (for large data)
    instead of the exact engine. efm_large_max: the second EFM's M is min(n, this).
    threads: CPU threads of torch and of numpy/scipy's
    BLAS (None: the libraries' defaults).
    """

    name: str
    preset: str
    steps: int
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 128
    log_every: int = 10
    checkpoint_every: int = 200
    flip: bool = False
    efm_m: int = 128
    # The large EFM's M: n (None) or at most this. On CIFAR-10 with flips, M = n = 100,000
    # candidates per row would gather ~40 GB per step; the paper's largest M is 1000.
    efm_large_max: int | None = None
    samples: int = 512
    sample_steps: int = 100
    velocity_bins: int = 20
    velocity_n: int = 512
    hybrid_n: int = 128
    hybrid_steps: int = 100
    # The copy onset lies near 1 on small data (digits: ~0.92), so the grid is finer there.
    taus: str = REPRODUCE_TAUS
    classifier_epochs: int | None = None
    collapse_pairs: int = 256
    collapse_grid: str = DEFAULT_GRID
    collapse_sides: tuple[int, ...] | None = None
    bootstrap: int = 100
    closed_form_index: bool = False
    threads: int | None = None
    limit: int | None = None


# digits: the tiny U-Net on one CPU thread. On the 2-core machine these budgets were set on,
# a second thread made a training step 1.3× (cfm) to 1.9× (efm-1498) faster when the machine
# was otherwise idle, and up to 10× slower while another process used the other core (OpenMP
# threads waiting on each other); --threads 2 is the choice for a machine of your own. small:
# about 15 minutes there; 50 Euler steps for sampling (100 in full) keep it inside that.
# cifar10: the paper's released configuration (conf/train_cifar10.yaml of
# github.com/generativemodels/closedformfm): 128-channel U-Net (preset cifar), batch 128,
# lr 2e-4, 5000 warm-up steps, EMA 0.9999, horizontal flips, 500,000 steps in full. efm-n then
# has M = 100,000 candidates per row (both flips of the 50,000 images): by far the most
# expensive target, as in the paper.
BUDGETS: dict[str, dict[str, Budget]] = {
    "digits": {
        "small": Budget("small", "tiny", steps=800, log_every=10, checkpoint_every=200,
                        samples=512, sample_steps=50, hybrid_n=128, hybrid_steps=50,
                        collapse_sides=(8, 16, 32), bootstrap=100, threads=1),
        "full": Budget("full", "tiny", steps=4000, seeds=(0, 1), log_every=20,
                       checkpoint_every=500, samples=2048, sample_steps=100, hybrid_n=256,
                       hybrid_steps=100, collapse_sides=(8, 16, 32), bootstrap=200, threads=1),
    },
    # mnist: the tiny U-Net on 60,000 images of 28×28, meant for a GPU (on 2 CPU cores a step
    # takes ~1.5 s, so small runs for hours there); efm-n capped at M = 1000 like cifar10.
    "mnist": {
        "small": Budget("small", "tiny", steps=2000, log_every=20, checkpoint_every=500,
                        samples=2048, sample_steps=100, velocity_n=512, hybrid_n=256,
                        collapse_sides=(7, 14, 28), bootstrap=100, efm_large_max=1000),
        "full": Budget("full", "tiny", steps=20_000, seeds=(0, 1), log_every=100,
                       checkpoint_every=2000, samples=10_000, sample_steps=100,
                       velocity_n=512, hybrid_n=256, collapse_sides=(7, 14, 28),
                       bootstrap=200, efm_large_max=1000),
    },
    "cifar10": {
        "small": Budget("small", "cifar", steps=20_000, log_every=100, checkpoint_every=2000,
                        flip=True, samples=10_000, sample_steps=100, velocity_n=256,
                        hybrid_n=256, collapse_pairs=256, bootstrap=100,
                        closed_form_index=True, efm_large_max=1000),
        "full": Budget("full", "cifar", steps=500_000, log_every=100, checkpoint_every=10_000,
                       flip=True, samples=50_000, sample_steps=100, velocity_n=512,
                       hybrid_n=256, collapse_pairs=256, bootstrap=200, closed_form_index=True,
                       efm_large_max=1000),
    },
}


def check_dataset(dataset: str) -> str:
    if dataset not in BUDGETS:
        raise InputError(f"knnflow reproduce does not know the data set {dataset!r}; choose one "
                         f"of: {', '.join(DATASETS)}")
    return dataset


def get_budget(dataset: str, name: str, steps: int | None = None,
               limit: int | None = None, threads: int | None = None) -> Budget:
    """The named budget of a data set, with the step count, training-set limit and thread
    count replaced where given."""
    budgets = BUDGETS[check_dataset(dataset)]
    if name not in budgets:
        raise InputError(f"unknown --budget {name!r}; choose one of: {', '.join(budgets)}")
    budget = budgets[name]
    for option, value in (("--steps", steps), ("--limit", limit), ("--threads", threads)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be at least 1, got {value}")
    return replace(budget, steps=steps or budget.steps, limit=limit or budget.limit,
                   threads=threads or budget.threads)


def default_work_folder(dataset: str, budget: Budget) -> Path:
    """runs/reproduce-DATASET-BUDGET, with -stepsN / -limitN when those differ from the named
    budget, so that runs of other settings never share a folder."""
    name = f"reproduce-{dataset}-{budget.name}"
    base = BUDGETS.get(dataset, {}).get(budget.name)
    if base is not None and budget.steps != base.steps:
        name += f"-steps{budget.steps}"
    if budget.limit is not None:
        name += f"-limit{budget.limit}"
    return Path("runs") / name


# Written into every figures folder, so a later call replaces only a folder it made.
FIGURES_MARK = ".knnflow-reproduce-figures"


def default_page(dataset: str, budget: Budget) -> Path:
    """docs/results/DATASET.md, with the work folder's -stepsN / -limitN suffix when those
    differ from the named budget, so a trial run never replaces the page of a full one."""
    suffix = default_work_folder(dataset, budget).name[len(f"reproduce-{dataset}-{budget.name}"):]
    return Path("docs/results") / f"{dataset}{suffix}.md"


def check_page_paths(md_path: Path, work: Path) -> None:
    """Refuse a page whose figures folder (the page's path without .md) exists but was not
    made by this command, or holds the work folder."""
    figures = md_path.parent / md_path.stem
    if md_path.suffix != ".md":
        raise InputError(f"--out-md must name a .md file, got {md_path}")
    if figures.exists() and not (figures / FIGURES_MARK).is_file():
        raise InputError(f"{figures} exists and holds no figures of knnflow reproduce (the "
                         "page's figures go there); choose another --out-md")
    resolved = figures.resolve()
    if resolved == work.resolve() or resolved in work.resolve().parents:
        raise InputError(f"the figures folder {figures} would hold the work folder {work}; "
                         "choose another --out-md or --work")


@dataclass(frozen=True)
class TargetSpec:
    """One row of the comparison: its label, the training target and EFM's M."""

    label: str
    target: str
    m: int = 128


def target_specs(n: int, budget: Budget) -> list[TargetSpec]:
    """cfm, ot-cfm, efm-128, efm-n (M capped at budget.efm_large_max) and knn-efm; n: the points û*
    sums over (with flips, 2× images)."""
    large = n if budget.efm_large_max is None else min(n, budget.efm_large_max)
    if large == budget.efm_m:
        raise InputError(f"the training set has {n} points, the M of efm-{budget.efm_m}: efm-n "
                         "would repeat it; choose another --limit")
    return [TargetSpec("cfm", "cfm"), TargetSpec("ot-cfm", "ot-cfm"),
            TargetSpec(f"efm-{budget.efm_m}", "efm", budget.efm_m),
            TargetSpec(f"efm-{large}", "efm", large), TargetSpec("knn-efm", "knn-efm")]


def run_config(dataset: str, budget: Budget, spec: TargetSpec, seed: int,
               index_folder: Path, root: str | Path | None = None):
    """The TrainConfig of one run: everything but target, m and index is the budget's."""
    from knnflow.trainer import TrainConfig

    return TrainConfig(dataset=dataset, root=str(root) if root is not None else None,
                       limit=budget.limit, target=spec.target, m=spec.m,
                       index=str(index_folder) if spec.target == "knn-efm" else None,
                       flip=budget.flip, preset=budget.preset, batch_size=budget.batch_size,
                       steps=budget.steps, seed=seed, log_every=budget.log_every,
                       checkpoint_every=budget.checkpoint_every, sample_every=0)


# --------------------------------------------------------------------------- numbers


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


@dataclass
class Verdict:
    """One claim of the paper: what it says, what was measured, the verdict and why."""

    title: str
    claim: str
    measured: list[str]
    verdict: str
    reason: str

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", f"**Claim.** {self.claim}", "", "**Measured.**", ""]
        lines += [f"- {line}" for line in self.measured]
        reason = self.reason[:1].upper() + self.reason[1:]
        lines += ["", f"**Verdict: {self.verdict}.** {reason}", ""]
        return "\n".join(lines)


def _span(low: float, high: float, form: str) -> str:
    """'low to high', or one value when both print alike."""
    a, b = form.format(low), form.format(high)
    return a if a == b else f"{a} to {b}"


def _t_text(t: float | None) -> str:
    return "never (within the t grid)" if t is None else f"{t:.2f}"


def claim_collapse(sizes: list[dict], headline: str, early: float = EARLY_COLLAPSE) -> Verdict:
    """Claim 1 from the collapse summaries: sizes holds {size, d, collapse_time} per image
    size; headline: the data set's own size."""
    head = next(s for s in sizes if s["size"] == headline)
    t, d = head["collapse_time"], head["d"]
    measured = [f"collapse time T = {_t_text(s['collapse_time'])} at {s['size']} (d = {s['d']})"
                + (" — the data set's own size" if s is head else
                   " — the same images resized") for s in sizes]
    if t is None:
        verdict, reason = NOT_HELD, (f"at {headline} (d = {d}) the softmax never collapses "
                                     "within the t grid")
    elif t <= early:
        verdict, reason = HELD, (f"T = {t:.2f} ≤ {early:g}: from T on, at least 90% of pairs "
                                 "have one training image with softmax weight above 0.9 (in "
                                 "almost all cases the x1 that made x_t), so the cfm and "
                                 "closed-form targets nearly coincide on most of the path")
    else:
        verdict, reason = NOT_HELD, (
            f"T = {t:.2f} > {early:g}: at d = {d} the softmax weights stay spread over several "
            "training images for most of the path, so cfm's target x1 − x0 differs from û* "
            f"there. The paper's claim is about high dimension, and d = {d} is not")
    larger = sorted((s for s in sizes if s["d"] > d), key=lambda s: s["d"])
    if larger:
        times = [1.0 if s["collapse_time"] is None else s["collapse_time"] for s in larger]
        start = 1.0 if t is None else t
        earlier = all(b <= a for a, b in zip([start, *times], times, strict=False)) \
            and times[-1] < start
        listed = ", ".join(f"T = {_t_text(s['collapse_time'])} at d = {s['d']}" for s in larger)
        reason += (f". The same images resized to more pixels collapse earlier as d grows "
                   f"({listed}), as the paper's high-dimension argument predicts" if earlier else
                   f". Resized to more pixels the images do not collapse earlier ({listed}), "
                   "against the paper's high-dimension argument")
    return Verdict("1. Collapse time of û*", (
        "In high dimension the softmax weights of û* collapse onto the one training image that "
        "generated x_t early in the path, so beyond a collapse time T the closed-form target "
        "û*(x_t, t) equals the cfm target x1 − x0 and the stochastic and closed-form losses "
        "nearly coincide. T is the first grid t from which at least 90% of pairs (x0, x1) keep "
        "their largest softmax weight above 0.9 (`knnflow collapse`); we call the collapse "
        f"early when T ≤ {early:g}."), measured, verdict, reason + ".")


def claim_knn_vs_cfm(fid: Comparison, velocity: Comparison, loss: Comparison,
                     floor: Estimate | None = None, z: float = Z) -> Verdict:
    """Claim 2: FID and velocity error decide; the training loss is reported beside them.
    floor: the FID of real training images, for scale."""
    fid_verdict, fid_reason = difference_verdict(fid.difference, z)
    vel_verdict, vel_reason = difference_verdict(velocity.difference, z)
    loss_verdict, loss_reason = difference_verdict(loss.difference, z)
    measured = [
        f"FID (classifier features, lower is better): cfm {fid.baseline.text()}, knn-efm "
        f"{fid.candidate.text()}; cfm − knn-efm = {fid.difference.text()} (paired bootstrap). "
        f"knn-efm better: {fid_verdict} ({fid_reason})."
        + (f" For scale, as many real training images score {floor.text()}."
           if floor is not None else ""),
        f"Velocity error E‖u_θ − û*‖² (EMA weights, mean over t bins): cfm "
        f"{velocity.baseline.text()}, knn-efm {velocity.candidate.text()}. knn-efm closer to "
        f"û*: {vel_verdict} ({vel_reason}; the runs share their queries, so treating their "
        "errors as independent overstates the noise of the difference).",
        f"Final training loss: cfm {loss.baseline.text()}, knn-efm {loss.candidate.text()}. "
        f"knn-efm lower: {loss_verdict} ({loss_reason}). Not part of the verdict: cfm's loss "
        "includes the variance of x1 − x0 given x_t, which knn-efm's target does not have, so "
        "a lower knn-efm loss is expected whether or not its network is better.",
    ]
    worse = [name for name, v in (("FID", fid_verdict), ("velocity error", vel_verdict))
             if v == NOT_HELD]
    if worse:
        verdict = NOT_HELD
        reason = (f"knn-efm is worse than cfm on {' and '.join(worse)} by more than {z:g} "
                  "standard errors.")
    elif fid_verdict == HELD:
        verdict = HELD
        reason = (f"knn-efm's samples have a lower FID than cfm's by more than {z:g} standard "
                  "errors" + (", and its network is closer to û*." if vel_verdict == HELD
                              else "; the velocity errors do not differ beyond the noise."))
    else:
        verdict = INCONCLUSIVE
        reason = (f"the FIDs differ by less than {z:g} standard errors: the sample quality is "
                  "the same within the measured noise, which is consistent with the paper's "
                  "'comparable' but is no evidence that knn-efm is better"
                  + ({HELD: "; knn-efm's network is closer to û*.",
                      INCONCLUSIVE: "; nor do the velocity errors differ beyond the noise."}
                     [vel_verdict]))
    return Verdict("2. knn-efm at least as good as cfm", (
        "Training on û* (here knn-efm: the certified k-NN estimate of û*, exact wherever it "
        "cannot certify cheaply) instead of the stochastic cfm target x1 − x0 gives samples at "
        "least as good (the paper: comparable FID, sometimes better) and a network closer to "
        f"û*. A difference counts when it exceeds {z:g} standard errors."), measured, verdict,
        reason)


def claim_copy_onset(onsets: dict[str, float | None], fractions: dict[str, dict[float, float]],
                     n: int, collapse_t: float | None, copy_fraction: float = COPY_FRACTION,
                     distances: dict[str, dict[float, float]] | None = None,
                     reference: float | None = None, z: float = Z) -> Verdict:
    """Claim 3 from the hybrid curves: onsets[label] is the copy onset τ (or None), and
    fractions[label] the memorized fraction at every τ measured, over n noises. distances:
    the mean distance d1 to the nearest training image per τ, and reference the mean
    train-to-train distance, to say how near the samples come when they are not copies."""
    measured = [f"collapse time of û* on the data set: T = {_t_text(collapse_t)}"]
    if distances is not None:
        measured.append("per target and τ: the memorized fraction, and in brackets the mean "
                        "distance d1 to the nearest training image"
                        + (f" (between training images: {reference:.3g})"
                           if reference is not None else ""))
    failing, close = [], []
    noise = math.sqrt(copy_fraction * (1 - copy_fraction) / n)
    for label, onset in onsets.items():
        curve = fractions[label]
        below = [tau for tau in curve if tau < 1]
        last = max(below) if below else None
        text = "copies from τ = " + ("— (none)" if onset is None else f"{onset:g}")
        near = distances.get(label, {}) if distances is not None else {}
        measured.append(f"{label}: {text}; at τ = " + ", ".join(
            f"{tau:g}: {curve[tau]:.0%}" + (f" ({near[tau]:.2g})" if tau in near else "")
            for tau in sorted(curve)))
        if onset is None or onset >= 1:
            failing.append((label, last, curve.get(last, float("nan"))))
            if last is not None and abs(curve[last] - copy_fraction) <= z * noise:
                close.append(label)
    if not failing:
        taus = sorted(onsets.values())
        span = f"τ = {taus[0]:g}" if taus[0] == taus[-1] else f"τ = {taus[0]:g} to {taus[-1]:g}"
        verdict = HELD
        reason = (f"every network completes the copies û* has started: the samples are copies "
                  f"from {span} on")
        if collapse_t is not None:
            reason += (f", against a collapse time T = {collapse_t:.2f} of û* on the data set"
                       + (" (the onset is at or after T)" if taus[0] >= collapse_t - 1e-9
                          else " (some onsets come before T)"))
        zero = [label for label, onset in onsets.items() if onset == 0]
        if zero:
            reason += (f"; {', '.join(zero)} copies even without û* (τ = 0), so there the "
                       "claim holds trivially")
        reason += "."
    elif len(close) == len(failing):
        verdict = INCONCLUSIVE
        reason = ("for " + ", ".join(f"{label} (τ = {last:g}: {value:.0%})"
                                     for label, last, value in failing)
                  + f" the memorized fraction at the largest τ below 1 is within {z:g} binomial "
                  f"standard errors ({noise:.2g} at {n} noises) of the {copy_fraction:g} copy "
                  "level.")
    else:
        verdict = NOT_HELD
        shown = [(label, last, value) for label, last, value in failing if label not in close]
        reason = ("for " + ", ".join(f"{label} ({value:.0%} at τ = {last:g})"
                                     for label, last, value in shown)
                  + " the samples are copies only when û* runs all the way (τ = 1): these "
                  "networks do not complete the copies û* has started.")
        curves = [distances[label] for label, last, _ in shown
                  if distances is not None and last in distances.get(label, {})]
        if curves and reference:
            near = [curve[last] for curve, (_, last, _) in zip(curves, shown, strict=False)]
            steady = all(all(c[b] <= c[a] + 1e-12 for a, b in zip(sorted(c), sorted(c)[1:],
                                                                    strict=False))
                         for c in curves)
            reason += (" At the largest τ below 1 they come near one: a mean distance of "
                       f"{_span(min(near), max(near), '{:.2g}')} to the nearest training "
                       f"image, {_span(min(near) / reference, max(near) / reference, '{:.0%}')}"
                       " of the distance between training images"
                       + (", and the distance shrinks at every step of τ." if steady else "."))
    return Verdict("3. The τ at which hybrid samples become copies", (
        "Following û* from the noise up to a switch time τ and the trained network from τ to "
        "1, samples become copies of training images from some τ < 1 on: the network finishes "
        "the copy û* has started, so whether a sample generalizes is settled early in the "
        "path. The onset is the smallest τ from which at least "
        f"{copy_fraction:.0%} of the samples are memorized (d1/d2 < 1/3) at every larger τ "
        "measured."), measured, verdict, reason)


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


def _spread(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- files


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def newest_checkpoint(run: Path) -> dict | None:
    """The JSON mark of a run's newest complete checkpoint (step, sha256), or None."""
    from knnflow.trainer import CHECKPOINTS, complete_checkpoints

    for mark in reversed(complete_checkpoints(Path(run) / CHECKPOINTS)):
        meta = _read_json(mark)
        if meta is not None and mark.with_suffix(".safetensors").is_file():
            return meta
    return None


def prepare_work_folder(work: Path, dataset: str, budget: Budget, overwrite: bool,
                        root: str | Path | None = None) -> None:
    """Create (or, with overwrite, empty) the work folder; refuse a folder that is not a
    reproduce work folder, one of another data set, or (with overwrite) one that holds the
    data set's files."""
    marker = work / MARKER
    if work.exists() and any(work.iterdir()):
        saved = _read_json(marker)
        if saved is None:
            raise InputError(f"{work} exists and is not a knnflow reproduce work folder (no "
                             f"{MARKER}); choose another --work")
        if overwrite:
            from knnflow.data import dataset_sources
            from knnflow.files import refuse_inputs

            refuse_inputs(work, dataset_sources(dataset, root), "--work")
            shutil.rmtree(work)
        elif saved.get("dataset") != dataset:
            raise InputError(f"{work} holds a reproduction of {saved.get('dataset')}, not "
                             f"{dataset}; choose another --work or pass --overwrite")
    work.mkdir(parents=True, exist_ok=True)
    _write_atomic(marker, json.dumps({"dataset": dataset, "budget": asdict(budget)}, indent=2)
                  + "\n")


# --------------------------------------------------------------------------- the pipeline


class _Pipeline:
    def __init__(self, dataset: str, budget: Budget, root, work: Path, device: str,
                 log: Log, progress: Progress):
        self.dataset, self.budget, self.root = dataset, budget, root
        self.work, self.device = work, device
        self.log_line, self.progress = log, progress
        self.times: list[StageTime] = []
        self.records: dict[str, dict] = {}
        self.done_count, self.total = 0, 0
        self._extractor = None

    def log(self, text: str) -> None:
        self.log_line(f"[{self.done_count}/{self.total}] {text}")

    def stage(self, name: str, label: str, key: dict, compute: Callable[[], dict],
              done: Callable[[dict], bool] = lambda result: True) -> dict:
        """Reuse the stage's record when its key matches and done(result) says its outputs
        exist; else compute, then write the record (after the outputs)."""
        path = self.work / "stages" / f"{name}.json"
        key = json.loads(json.dumps(key, sort_keys=True))
        record = _read_json(path)
        self.done_count += 1
        if record is not None and record.get("key") == key and done(record["result"]):
            self.log(f"{label}: done before ({record['seconds']:.0f} s, {record['finished']}), "
                     "reused")
            self.times.append(StageTime(name, label, record["seconds"], True,
                                        record["finished"]))
            self.records[name] = record
            return record
        path.unlink(missing_ok=True)
        self.log(f"{label}…")
        began = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - began
        record = {"key": key, "stamp": _digest(key), "result": result,
                  "seconds": round(seconds, 3), "finished": _now()}
        _write_atomic(path, json.dumps(record, indent=2) + "\n")
        self.times.append(StageTime(name, label, record["seconds"], False, record["finished"]))
        self.records[name] = record
        return record

    # ------------------------------------------------------------------ shared stages

    def load_data(self) -> None:
        from knnflow.data import load_dataset
        from knnflow.index import points_sha256
        from knnflow.targets import with_flips

        self.images = load_dataset(self.dataset, self.root, "train", self.budget.limit)
        self.reference = load_dataset(self.dataset, self.root, "test")
        self.candidates = with_flips(self.images) if self.budget.flip else self.images
        self.image_shape = tuple(self.images.shape[1:])
        flat = self.candidates.reshape(len(self.candidates), -1).numpy()
        self.points_sha = points_sha256(np.ascontiguousarray(flat, dtype=np.float32))

    def build_index(self) -> None:
        from knnflow.index import Index

        folder = self.work / "index"

        def compute() -> dict:
            described = {"name": self.dataset, "split": "train", "limit": self.budget.limit,
                         "root": str(self.root) if self.root else None,
                         "flip": self.budget.flip}
            index = Index.build(self.candidates, dataset=described, progress=self.progress)
            index.save(folder, overwrite=True, progress=self.progress)
            return {"n": index.n, "d": index.dim}

        self.stage("index", f"index of the {len(self.candidates)} training points",
                   {"points_sha256": self.points_sha, "kind": "flat"}, compute,
                   lambda result: (folder / "manifest.json").is_file())
        self.index_folder = folder
        self.index = Index.load(folder)

    def train_classifier(self) -> None:
        from knnflow.analysis.classifier import save_classifier, train_classifier

        folder = self.work / "classifier"

        def compute() -> dict:
            model, record = train_classifier(self.dataset, self.root, self.budget.limit,
                                             epochs=self.budget.classifier_epochs,
                                             device=self.device, progress=self.progress)
            save_classifier(folder, model, record, overwrite=True)
            saved = json.loads((folder / "classifier.json").read_text())
            return {"test_accuracy": record["test_accuracy"], "sha256": saved["sha256"],
                    "epochs": record["epochs"]}

        def done(result: dict) -> bool:
            saved = _read_json(folder / "classifier.json")
            return saved is not None and saved.get("sha256") == result["sha256"]

        self.classifier = self.stage(
            "classifier", "classifier for FID features",
            {"points_sha256": self.points_sha, "dataset": self.dataset,
             "epochs": self.budget.classifier_epochs}, compute, done)
        self.classifier_folder = folder

    def extractor(self):
        from knnflow.analysis.fid import feature_extractor

        if self._extractor is None:
            self._extractor = feature_extractor(f"classifier:{self.classifier_folder}",
                                                device=self.device)
        return self._extractor

    def collapse(self) -> None:
        from knnflow.analysis.collapse import (
            compute_collapse,
            parse_t_grid,
            write_collapse_report,
        )

        folder = self.work / "collapse"
        budget = self.budget

        def compute() -> dict:
            result = compute_collapse(
                self.images, pairs=budget.collapse_pairs,
                grid=parse_t_grid(budget.collapse_grid),
                sides=list(budget.collapse_sides) if budget.collapse_sides else None,
                progress=self.progress)
            summary = write_collapse_report(result, folder, dataset=self.dataset,
                                            overwrite=True)
            return {"collapse_time": summary["collapse_time"],
                    "headline_size": summary["headline_size"], "pairs": summary["pairs"],
                    "sizes": [{"size": s["size"], "d": s["d"],
                               "collapse_time": s["collapse_time"]} for s in summary["sizes"]]}

        key = {"points_sha256": self.points_sha, "pairs": budget.collapse_pairs,
               "grid": budget.collapse_grid, "sides": budget.collapse_sides, "seed": 0}
        self.collapse_record = self.stage("collapse", "collapse analysis of the data set", key,
                                          compute,
                                          lambda result: (folder / "collapse.png").is_file())
        self.collapse_folder = folder

    # ------------------------------------------------------------------ per run

    def train_run(self, spec: TargetSpec, seed: int) -> tuple[Path, dict]:
        from knnflow.trainer import config_differences, train

        config = run_config(self.dataset, self.budget, spec, seed, self.index_folder, self.root)
        resolved = config.resolved()
        folder = self.work / "runs" / f"{spec.label}-seed{seed}"
        label = f"training {spec.label} (seed {seed}, {config.steps} steps)"

        def done(result: dict) -> bool:
            mark = newest_checkpoint(folder)
            return (mark is not None and mark["step"] == config.steps
                    and mark["sha256"] == result["checkpoint_sha256"])

        def compute() -> dict:
            resumed_from = None
            if (folder / "config.json").is_file():
                saved = json.loads((folder / "config.json").read_text())
                # The index is the work folder's own (its points are checked by their
                # checksum); its path changes when the work folder is moved or named anew.
                differences = [text for text in config_differences(saved, resolved)
                               if not text.startswith("index:")]
                if resolved.index is not None and saved.get("index") != resolved.index:
                    saved["index"] = resolved.index  # so that train() resumes it
                    (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
                if differences:
                    raise InputError(f"{folder} was trained with other settings "
                                     f"({'; '.join(differences)}); pass --overwrite to start "
                                     "the reproduction again")
                mark = newest_checkpoint(folder)
                resumed_from = mark["step"] if mark is not None else 0
                if resumed_from > config.steps:
                    raise InputError(f"{folder} has trained {resumed_from} steps, more than "
                                     f"the {config.steps} asked for; pass --overwrite to start "
                                     "again")
                if resumed_from:
                    self.log(f"resuming {spec.label} (seed {seed}) from step {resumed_from}")
            stage = f"training {spec.label}"
            train(config, folder, resume=resumed_from is not None,
                  overwrite=resumed_from is None, device=self.device,
                  progress=lambda info: self.progress(stage, info["step"], info["steps"]))
            mark = newest_checkpoint(folder)
            return {"checkpoint_step": mark["step"], "checkpoint_sha256": mark["sha256"],
                    "resumed_from": resumed_from}

        key = {**asdict(resolved), "index": None if resolved.index is None else "work/index"}
        record = self.stage(f"train-{spec.label}-seed{seed}", label, key, compute, done)
        return folder, record

    def analyse_run(self, spec: TargetSpec, seed: int, folder: Path, trained: dict) -> dict:
        """Samples, FID, memorization, velocity error and hybrid sampling of one run."""
        from knnflow.analysis.fid import extract_features, fid
        from knnflow.analysis.hybrid import hybrid_of_run, write_hybrid
        from knnflow.analysis.velocity_error import velocity_error_of_run, write_velocity_error
        from knnflow.files import atomic_folder
        from knnflow.nearest import load_samples, run_memorization
        from knnflow.sampling import sample_model, save_samples
        from knnflow.trainer import load_run_model

        budget, name = self.budget, f"{spec.label}-seed{seed}"
        checkpoint = trained["result"]["checkpoint_sha256"]
        closed_form_index = self.index_folder if budget.closed_form_index else None
        samples_folder = folder / "samples"

        def sample() -> dict:
            model, _ = load_run_model(folder, device=self.device)
            images = sample_model(model, budget.samples, self.image_shape, seed=seed,
                                  steps=budget.sample_steps, device=self.device,
                                  progress=self.progress)
            save_samples(images, samples_folder, overwrite=True, meta={
                "run": str(folder), "checkpoint_sha256": checkpoint, "n": budget.samples,
                "seed": seed, "solver": "euler", "steps": budget.sample_steps, "ema": True})
            return {"n": budget.samples}

        samples = self.stage(
            f"sample-{name}", f"{budget.samples} samples of {spec.label} (seed {seed})",
            {"checkpoint": checkpoint, "n": budget.samples, "seed": seed,
             "solver": "euler", "steps": budget.sample_steps}, sample,
            lambda result: (samples_folder / "samples.npz").is_file())

        fid_folder = folder / "fid"

        def measure_fid() -> dict:
            extractor = self.extractor()
            opened = load_samples(samples_folder, self.image_shape)
            result = fid(opened, self.reference, extractor, progress=self.progress)
            features = extract_features(opened, extractor)
            with atomic_folder(fid_folder, overwrite=True) as tmp:
                np.save(tmp / "features.npy", features)
                (tmp / "fid.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
            return {"fid": result.fid, "n_samples": result.n_samples,
                    "n_reference": result.n_reference, "feature_dim": result.feature_dim}

        fid_record = self.stage(
            f"fid-{name}", f"FID of {spec.label} (seed {seed})",
            {"samples": samples["stamp"], "classifier": self.classifier["result"]["sha256"],
             "reference": f"{self.dataset}:test"}, measure_fid,
            lambda result: (fid_folder / "features.npy").is_file())

        def memorization() -> dict:
            summary, _ = run_memorization(samples_folder, self.index,
                                          threshold=MEMORIZATION_THRESHOLD,
                                          out=folder / "memorization", overwrite=True,
                                          progress=self.progress)
            return {"memorized_fraction": summary["memorized"]["fraction"],
                    "memorized_count": summary["memorized"]["count"],
                    "n_samples": summary["n_samples"], "d1_mean": summary["d1"]["mean"],
                    "reference_mean": summary["reference"]["mean"],
                    "d1_over_reference": summary["d1_mean_over_reference_mean"]}

        memorized = self.stage(
            f"memorization-{name}", f"memorization of {spec.label} (seed {seed})",
            {"samples": samples["stamp"], "index": self.points_sha,
             "threshold": MEMORIZATION_THRESHOLD}, memorization,
            lambda result: (folder / "memorization" / "summary.json").is_file())

        def velocity() -> dict:
            result, summary = velocity_error_of_run(
                folder, weights=("ema",), t_bins=budget.velocity_bins, n=budget.velocity_n,
                seed=0, index=closed_form_index, device=self.device, progress=self.progress)
            write_velocity_error(folder / "velocity-error", result, summary, overwrite=True)
            errors, stderr = result.errors["ema"], result.stderr["ema"]
            return {"mean_error": float(errors.mean()),
                    "mean_error_se": float(math.sqrt(float(np.sum(stderr ** 2))) / len(errors)),
                    "t": result.centres.tolist(), "errors": errors.tolist(),
                    "stderr": stderr.tolist(), "target_sq": result.target_sq.tolist(),
                    "peak_t": result.peak("ema")["t"], "dim": result.dim}

        velocity_record = self.stage(
            f"velocity-error-{name}", f"velocity error of {spec.label} (seed {seed})",
            {"checkpoint": checkpoint, "bins": budget.velocity_bins, "n": budget.velocity_n,
             "seed": 0, "weights": ["ema"], "index": budget.closed_form_index}, velocity,
            lambda result: (folder / "velocity-error" / "summary.json").is_file())

        def hybrid() -> dict:
            result, summary = hybrid_of_run(
                folder, taus=budget.taus, n=budget.hybrid_n, seed=0, steps=budget.hybrid_steps,
                index=closed_form_index, device=self.device, progress=self.progress)
            write_hybrid(folder / "hybrid", result, summary, overwrite=True)
            return {"copy_tau": result.copy_tau, "taus": list(result.taus),
                    "memorized_fraction": result.memorized_fraction.tolist(),
                    "n": budget.hybrid_n, "threshold": result.threshold,
                    "copy_fraction": result.copy_fraction}

        hybrid_record = self.stage(
            f"hybrid-{name}", f"hybrid sampling of {spec.label} (seed {seed})",
            {"checkpoint": checkpoint, "taus": budget.taus, "n": budget.hybrid_n,
             "steps": budget.hybrid_steps, "seed": 0, "index": budget.closed_form_index},
            hybrid, lambda result: (folder / "hybrid" / "summary.json").is_file())
        return {"folder": folder, "train": trained, "fid": fid_record,
                "memorization": memorized, "velocity": velocity_record,
                "hybrid": hybrid_record}

    def bootstrap(self, runs: dict[str, dict]) -> dict:
        from knnflow.analysis.fid import bootstrap_fid, extract_features, fid

        budget = self.budget

        def compute() -> dict:
            extractor = self.extractor()
            reference = extract_features(self.reference, extractor)
            count = min(budget.samples, len(self.images))
            pick = torch.randperm(len(self.images),
                                  generator=torch.Generator().manual_seed(0))[:count]
            floor_images = self.images[pick.sort()[0]]
            floor = fid(floor_images, self.reference, extractor)
            features = {name: np.load(run["folder"] / "fid" / "features.npy")
                        for name, run in runs.items()}
            features["floor"] = extract_features(floor_images, extractor)
            replicates = bootstrap_fid(features, reference, budget.bootstrap, seed=0,
                                       progress=self.progress)
            return {"floor": {"fid": floor.fid, "n": count},
                    "replicates": {name: values.tolist() for name, values in replicates.items()}}

        key = {"fid": {name: run["fid"]["stamp"] for name, run in runs.items()},
               "replicates": budget.bootstrap, "seed": 0, "distance": "symmetric eigh",
               "classifier": self.classifier["result"]["sha256"]}
        return self.stage("fid-bootstrap", f"FID bootstrap ({budget.bootstrap} replicates)",
                          key, compute)


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
            fid=combine([Estimate(run["fid"]["result"]["fid"], _spread(replicates[name]))
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
        fid.append(Comparison(Estimate(fa, _spread(replicates[a])),
                              Estimate(fb, _spread(replicates[b])),
                              Estimate(fa - fb, _spread(replicates[a] - replicates[b]))))
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


# --------------------------------------------------------------------------- figures


def _color(label: str, labels: list[str]) -> str:
    if label in COLORS:
        return COLORS[label]
    efms = [x for x in labels if x not in COLORS]
    return EFM_COLORS[efms.index(label) % len(EFM_COLORS)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(path: Path, curves: dict[str, list[tuple[int, list[dict]]]], caption: str) -> None:
    """Training loss against step, one colour per target (dashed: further seeds): the logged
    batch losses, faint, and their moving average over 5 logged steps."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    labels = list(curves)
    for label, seeds in curves.items():
        for i, (seed, lines) in enumerate(seeds):
            steps = np.array([m["step"] for m in lines])
            loss = np.array([m["loss"] for m in lines])
            color, style = _color(label, labels), "-" if i == 0 else "--"
            ax.plot(steps, loss, color=color, linestyle=style, lw=0.6, alpha=0.3)
            window = min(5, len(loss))
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color=color, linestyle=style, marker=".",
                    ms=2, label=label if len(seeds) == 1 else f"{label} (seed {seed})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss: batch MSE to the target\n(faint: logged values; line: "
                  "mean of 5)")
    ax.set_title(f"Training loss per target ({caption})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_velocity_errors(path: Path, curves: dict[str, list[tuple[int, dict]]],
                         caption: str) -> None:
    """E‖u_θ - û*‖² per t bin, one line per target (band: ± one standard error), and E‖û*‖²."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    labels = list(curves)
    scale = None
    for label, seeds in curves.items():
        for i, (seed, result) in enumerate(seeds):
            t = np.array(result["t"])
            errors, se = np.array(result["errors"]), np.array(result["stderr"])
            color = _color(label, labels)
            ax.fill_between(t, np.clip(errors - se, 1e-12, None), errors + se, color=color,
                            alpha=0.15, lw=0)
            ax.plot(t, errors, marker="o", ms=3, color=color, linestyle="-" if i == 0 else "--",
                    label=label if len(seeds) == 1 else f"{label} (seed {seed})")
            scale = result
    ax.plot(np.array(scale["t"]), np.array(scale["target_sq"]), color="grey", linestyle=":",
            label=r"$E\,\|\hat{u}^*\|^2$ on the same queries (for scale)")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("t  (0 = noise, 1 = data)")
    ax.set_ylabel(r"$E\,\|u_\theta(x_t, t) - \hat{u}^*(x_t, t)\|^2$" + f"  (sum over d = "
                  f"{scale['dim']})")
    ax.set_title(f"Velocity error of the EMA networks against û* ({caption})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_hybrid(path: Path, curves: dict[str, list[tuple[int, dict]]],
                collapse_t: float | None, caption: str) -> None:
    """Memorized fraction of hybrid samples against τ, one line per target."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    labels = list(curves)
    level, threshold = COPY_FRACTION, MEMORIZATION_THRESHOLD
    for label, seeds in curves.items():
        for i, (seed, result) in enumerate(seeds):
            onset = result["copy_tau"]
            name = label if len(seeds) == 1 else f"{label} (seed {seed})"
            ax.plot(result["taus"], result["memorized_fraction"], marker="o", ms=4,
                    color=_color(label, labels), linestyle="-" if i == 0 else "--",
                    label=f"{name}: copies from τ = " + ("—" if onset is None else f"{onset:g}"))
            level, threshold = result["copy_fraction"], result["threshold"]
    ax.axhline(level, color="grey", linestyle="--", lw=1, label=f"copy level {level:g}")
    if collapse_t is not None:
        ax.axvline(collapse_t, color="black", linestyle=":", lw=1.2,
                   label=f"collapse time of û* on the data, T = {collapse_t:.2f}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("τ: û* on [0, τ], network on [τ, 1]  (t: 0 = noise, 1 = data)")
    ax.set_ylabel(f"memorized fraction (d1/d2 < {threshold:.3g})")
    ax.set_title(f"Hybrid sampling: when do samples become copies? ({caption})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(path: Path, panels: dict[str, torch.Tensor], caption: str) -> None:
    """Up to 64 images per panel: each target's samples and real training images."""
    from knnflow.sampling import image_grid

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.8), dpi=100,
                             squeeze=False)
    for ax, (label, images) in zip(axes[0], panels.items(), strict=True):
        grid = image_grid(images[:64], columns=8)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid,
                  cmap="gray" if grid.shape[-1] == 1 else None, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def copy_small_png(source: Path, target: Path, width: int = 1400) -> None:
    """Copy a PNG, shrunk to at most `width` pixels across and stored with a palette of 256
    colours (a plot loses nothing visible, and the file a half to two thirds of its size)."""
    from PIL import Image

    with Image.open(source) as image:
        picture = image.convert("RGB")
    if picture.width > width:
        picture = picture.resize((width, round(picture.height * width / picture.width)),
                                 Image.LANCZOS)
    picture.quantize(256).save(target, optimize=True)


# --------------------------------------------------------------------------- markdown


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


def write_markdown(path: Path, *, dataset: str, budget: Budget, rows: list[TargetRow],
                   verdicts: list[Verdict], figures: dict[str, Path], info: dict,
                   stages: list[StageTime]) -> None:
    seeds = ", ".join(map(str, budget.seeds))
    one_seed = len(budget.seeds) == 1
    config = info["config"]
    rel = {name: f.relative_to(path.parent).as_posix() for name, f in figures.items()}
    n_train, d = info["n_train"], info["d"]
    lines = [
        f"# Reproducing the paper's claims on {dataset}",
        "",
        f"Generated by `knnflow reproduce {dataset}` from the numbers it measured; rerun the "
        "command rather than editing this page. Paper: " + PAPER + ".",
        "",
        f"**This is a small experiment.** {budget.steps:,} training steps of a "
        f"{info['parameters']:,}-parameter network (preset {budget.preset}) on {n_train:,} "
        f"{'×'.join(map(str, info['image_shape']))} images (d = {d}), "
        f"{len(budget.seeds)} seed{'s' if len(budget.seeds) > 1 else ''} per target"
        + ("; the paper's released configuration trains CIFAR-10 for 500,000 steps. The "
           "networks here are far from converged"
           + (", the data set is small and low-dimensional, and the sample counts are small"
              if dataset == "digits" else "")
           + ", so read the verdicts as what this budget shows, not as a test of the paper at "
             "its scale." if dataset == "digits" or budget.steps < 500_000 else "."),
        "",
        "## Results",
        "",
        table_markdown(rows),
        "",
        f"- **final training loss**: mean ± standard error of the batch losses logged over the "
        f"last {LOSS_TAIL:.0%} of steps. cfm's loss includes the variance of x1 − x0 given "
        "x_t, which the other targets remove, so losses of different targets are not like for "
        "like; the velocity error is.",
        "- **ms / step**: median wall time of a training step (all runs on the machine below).",
        f"- **FID**: Fréchet distance between the features of a classifier trained on "
        f"{dataset} (test accuracy {info['classifier_accuracy']:.1%}) for {budget.samples:,} "
        f"samples per run (Euler, {budget.sample_steps} steps, EMA weights) and the "
        f"{info['n_reference']:,} test images; ± is the bootstrap standard error "
        f"({budget.bootstrap} replicates, samples and test images resampled). FID is biased "
        "upwards at small n: for scale, "
        f"{info['floor_n']:,} real training images score {info['floor'].text()}. Compare the "
        "rows with each other, not with published FIDs.",
        f"- **memorized**: samples whose distances d1, d2 to their two nearest training images "
        f"have d1/d2 < 1/3. **mean d1**: mean L2 distance to the nearest training image "
        f"(pixels in [-1, 1]), and its ratio to the mean distance from a training image to its "
        f"nearest other training image ({info['train_to_train']:.3g}).",
        f"- **velocity error**: E‖u_θ(x_t, t) − û*(x_t, t)‖² (sum over the d = {d} values), "
        f"EMA weights, mean over {budget.velocity_bins} equal t bins of [0, 1 − 1e-4] with "
        f"{budget.velocity_n} queries each (the same queries for every run) ± standard error.",
        f"- **copies from τ**: hybrid sampling of {budget.hybrid_n} noises (û* on [0, τ], the "
        f"network on [τ, 1], Euler, {budget.hybrid_steps} steps over [0, 1]) at τ = "
        f"{budget.taus}: the smallest τ from which at least {COPY_FRACTION:.0%} of the samples "
        "are memorized at every larger τ."
        + ("" if one_seed else " One value per seed."),
    ]
    if not one_seed:
        lines.append(f"- Values are means over the seeds {seeds}; ± combines the measurement "
                     "error with the seed-to-seed spread (the larger of the two).")
    lines += ["", f"## Did the paper's claims hold on {dataset}?", ""]
    if one_seed:
        lines += ["With one training seed, every ± is measurement noise only (bootstrap of "
                  "samples and test images, the velocity-error queries, the logged batch "
                  "losses): how much a second training seed would move the numbers is not "
                  "measured here. `--budget full` trains two seeds.", ""]
    for verdict in verdicts:
        lines.append(verdict.markdown())
    lines += ["## Figures", ""]
    captions = {
        "samples": "Samples of each run (EMA weights) beside real training images.",
        "loss": "Training loss against step; t plays no part here.",
        "velocity_error": "Velocity error against û* per t bin (t = 0 noise, t = 1 data).",
        "hybrid": "Memorized fraction of hybrid samples against the switch time τ; the "
                  "dotted line is the collapse time of û* on the data set.",
        "collapse": "Collapse of û* on the data set (`knnflow collapse`): cosine histograms "
                    "and the fraction of pairs whose largest softmax weight exceeds 0.9, "
                    "against t (0 = noise, 1 = data), at each image size.",
    }
    for name, link in rel.items():
        lines += [f"**{captions.get(name, name)}**", "", f"![{name}]({link})", ""]
    lines += [
        "## Setup",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}; device {info['device']}",
        f"- Code: {info['code']}",
        f"- Budget `{budget.name}`: preset {budget.preset} ({info['parameters']:,} parameters), "
        f"batch {budget.batch_size}, {budget.steps:,} steps, seed(s) {seeds}, lr "
        f"{config['lr']:g} with {config['warmup']} warm-up steps, gradient clipping "
        f"{config['grad_clip']:g}, EMA {config['ema_decay']:g}, horizontal flips "
        f"{'on' if budget.flip else 'off'}; identical for every target but the target. "
        f"Training set: {n_train:,} images"
        + (f" (first {budget.limit})" if budget.limit else "")
        + "; efm-M draws x1 plus M − 1 candidates per row (independent pool); knn-efm is the "
        "certified k-NN estimate of û* (tol 1e-4), exact where it cannot certify cheaply.",
        f"- Collapse: {info['collapse_pairs']} pairs, t grid {budget.collapse_grid}, sizes "
        + (", ".join(f"{s}×{s}" for s in budget.collapse_sides) if budget.collapse_sides
           else "native") + ".",
        f"- Work folder: `{info['work']}` (index/, classifier/, collapse/, runs/TARGET-seedS/ "
        "with samples/, fid/, memorization/, velocity-error/, hybrid/; stages/ holds one "
        "record per stage). Rerunning the command reuses every finished stage.",
        f"- Wall time of this call: {info['seconds']:.0f} s "
        f"({sum(not s.reused for s in stages)} stages computed, "
        f"{sum(s.reused for s in stages)} reused); of all stages as measured when they ran: "
        f"{sum(s.seconds for s in stages):.0f} s.",
        "",
        "| stage | wall time (s) | finished |",
        "|---|---|---|",
    ]
    for stage in stages:
        lines.append(f"| {stage.label} | {stage.seconds:.1f} | {stage.finished}"
                     + (" (reused)" if stage.reused else "") + " |")
    _write_atomic(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- entry point


def reproduce(dataset: str, budget: Budget, *, root: str | Path | None = None,
              work: str | Path | None = None, out_md: str | Path | None = None,
              device: str = "cpu", overwrite: bool = False, command: str | None = None,
              log: Log | None = None, progress: Progress | None = None) -> ReproduceResult:
    """Run (or resume) the reproduction of `dataset` at `budget` and write the markdown page
    (default docs/results/DATASET.md) and its figures (a folder of the page's name beside it).
    """
    from knnflow.index import resolve_device

    check_dataset(dataset)
    device = resolve_device(device, allow_auto=False)
    # The thread limit covers numpy's and scipy's BLAS too: on the shared 2-core machine,
    # scipy's sqrtm of a 128×128 covariance product (FID) took 1.2 s with two OpenBLAS
    # threads and 5 ms with one.
    with cpu_threads(budget.threads or None):
        return _reproduce(dataset, budget, root=root, work=work, out_md=out_md,
                          device=device, overwrite=overwrite, command=command, log=log,
                          progress=progress)


def _reproduce(dataset: str, budget: Budget, *, root, work, out_md, device: str,
               overwrite: bool, command: str | None, log: Log | None,
               progress: Progress | None) -> ReproduceResult:
    began = time.perf_counter()
    work = Path(work) if work is not None else default_work_folder(dataset, budget)
    md_path = Path(out_md) if out_md is not None else default_page(dataset, budget)
    check_page_paths(md_path, work)
    pipeline = _Pipeline(dataset, budget, root, work, device,
                         log or (lambda text: None), progress or (lambda *args: None))
    # The data come first: missing files fail in one line before anything is written.
    pipeline.load_data()
    specs = target_specs(len(pipeline.candidates), budget)
    pipeline.total = 4 + 6 * len(specs) * len(budget.seeds)
    prepare_work_folder(pipeline.work, dataset, budget, overwrite, root)
    pipeline.build_index()
    pipeline.train_classifier()
    pipeline.collapse()
    runs = {}
    for seed in budget.seeds:
        for spec in specs:
            folder, trained = pipeline.train_run(spec, seed)
            runs[f"{spec.label}-seed{seed}"] = pipeline.analyse_run(spec, seed, folder,
                                                                    trained)
    boot = pipeline.bootstrap(runs)
    replicates = {name: np.array(values, dtype=np.float64)
                  for name, values in boot["result"]["replicates"].items()}
    rows = target_rows(specs, budget.seeds, runs, replicates, budget.steps)
    collapse = pipeline.collapse_record["result"]
    fid_cmp, velocity_cmp, loss_cmp = comparisons(budget.seeds, runs, replicates,
                                                  budget.steps)
    many = len(budget.seeds) > 1
    onsets, fractions, distances = {}, {}, {}
    for name, run in runs.items():
        label = name if many else name.rsplit("-seed", 1)[0]
        result = run["hybrid"]["result"]
        onsets[label] = result["copy_tau"]
        fractions[label] = dict(zip(result["taus"], result["memorized_fraction"],
                                    strict=True))
        summary = json.loads((run["folder"] / "hybrid" / "summary.json").read_text())
        distances[label] = {row["tau"]: row["d1_mean"] for row in summary["per_tau"]}
        train_to_train = summary["train_to_train_mean"]
    floor = boot["result"]["floor"]
    floor_fid = Estimate(floor["fid"], _spread(replicates["floor"]))
    verdicts = [claim_collapse(collapse["sizes"], collapse["headline_size"]),
                claim_knn_vs_cfm(fid_cmp, velocity_cmp, loss_cmp, floor_fid),
                claim_copy_onset(onsets, fractions, budget.hybrid_n,
                                 collapse["collapse_time"], distances=distances,
                                 reference=train_to_train)]

    first = runs[f"{specs[0].label}-seed{budget.seeds[0]}"]
    config = json.loads((first["folder"] / "config.json").read_text())
    memo = json.loads((first["folder"] / "memorization" / "summary.json").read_text())
    figures = write_figures(md_path.parent / md_path.stem, specs, budget, runs,
                            pipeline, collapse["collapse_time"])
    seconds = time.perf_counter() - began
    info = {
        "command": command or f"knnflow reproduce {dataset} --budget {budget.name}",
        "date": _now(), "machine": machine_text(device), "device": device,
        "code": code_version(), "config": config, "parameters": config["parameters"],
        "n_train": len(pipeline.images), "d": int(np.prod(pipeline.image_shape)),
        "image_shape": list(pipeline.image_shape), "n_reference": len(pipeline.reference),
        "classifier_accuracy": pipeline.classifier["result"]["test_accuracy"],
        "floor": floor_fid,
        "floor_n": floor["n"], "train_to_train": memo["reference"]["mean"],
        "collapse_pairs": collapse["pairs"], "work": str(pipeline.work),
        "seconds": seconds,
    }
    write_markdown(md_path, dataset=dataset, budget=budget, rows=rows, verdicts=verdicts,
                   figures=figures, info=info, stages=pipeline.times)
    return ReproduceResult(md_path, list(figures.values()), rows, verdicts, pipeline.times,
                           pipeline.work, {name: run["folder"] for name, run in runs.items()},
                           pipeline.records, collapse["collapse_time"], seconds)


def write_figures(folder: Path, specs: list[TargetSpec], budget: Budget, runs: dict[str, dict],
                  pipeline: _Pipeline, collapse_t: float | None) -> dict[str, Path]:
    """samples.png, loss.png, velocity_error.png, hybrid.png and collapse.png, written
    atomically into `folder`; returns name → final path."""
    from knnflow.files import atomic_folder

    caption = (f"{pipeline.dataset}, {budget.steps:,} steps, preset {budget.preset}, batch "
               f"{budget.batch_size}")

    def per_target(getter) -> dict[str, list]:
        return {spec.label: [(seed, getter(runs[f"{spec.label}-seed{seed}"]))
                             for seed in budget.seeds] for spec in specs}

    names = ("samples", "loss", "velocity_error", "hybrid", "collapse")
    with atomic_folder(folder, overwrite=True) as tmp:
        (tmp / FIGURES_MARK).write_text("figures of knnflow reproduce; replaced on every call\n")
        first = budget.seeds[0]
        panels = {spec.label: torch.from_numpy(np.load(
            runs[f"{spec.label}-seed{first}"]["folder"] / "samples" / "samples.npz")["samples"])
            for spec in specs}
        panels["training images"] = pipeline.images[:64]
        plot_samples(tmp / "samples.png", panels, f"{caption}, seed {first}")
        plot_losses(tmp / "loss.png",
                    per_target(lambda run: read_metrics(run["folder"] / "metrics.jsonl")),
                    caption)
        plot_velocity_errors(tmp / "velocity_error.png",
                             per_target(lambda run: run["velocity"]["result"]), caption)
        plot_hybrid(tmp / "hybrid.png", per_target(lambda run: run["hybrid"]["result"]),
                    collapse_t, caption)
        copy_small_png(pipeline.collapse_folder / "collapse.png", tmp / "collapse.png")
    return {name: folder / f"{name}.png" for name in names}


__all__ = ["BUDGETS", "DATASETS", "Budget", "Comparison", "Estimate", "ReproduceResult",
           "TargetRow", "TargetSpec", "Verdict", "claim_collapse",
           "claim_copy_onset", "claim_knn_vs_cfm", "combine", "default_work_folder",
           "difference_verdict", "final_loss", "get_budget",
           "prepare_work_folder", "reproduce", "run_config",
           "target_specs"]
