"""The verdicts on the paper's claims, derived from the measured numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from knnflow.analysis.reproduce.common import EARLY_COLLAPSE, HELD, INCONCLUSIVE, NOT_HELD, Z
from knnflow.analysis.reproduce.statistics import Comparison, Estimate, difference_verdict
from knnflow.choices import COPY_FRACTION


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
