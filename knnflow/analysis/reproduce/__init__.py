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

The parts: budgets (what a reproduction costs and where it writes), statistics (estimates
with standard errors), claims (the verdicts), stages (the work folder's records), pipeline
(each stage, computed or reused), study (reproduce(): the stages in order, then the page),
table, figures and page (the markdown, rendered from page.md.tmpl).
"""

from knnflow.analysis.reproduce.budgets import (
    BUDGETS,
    DATASETS,
    Budget,
    TargetSpec,
    check_dataset,
    default_work_folder,
    get_budget,
    run_config,
    target_specs,
)
from knnflow.analysis.reproduce.claims import (
    Verdict,
    claim_collapse,
    claim_copy_onset,
    claim_knn_vs_cfm,
)
from knnflow.analysis.reproduce.common import HELD, INCONCLUSIVE, NOT_HELD
from knnflow.analysis.reproduce.results import ReproduceResult, TargetRow
from knnflow.analysis.reproduce.stages import prepare_work_folder
from knnflow.analysis.reproduce.statistics import (
    Comparison,
    Estimate,
    combine,
    difference_verdict,
    final_loss,
)
from knnflow.analysis.reproduce.study import reproduce

__all__ = ["BUDGETS", "DATASETS", "HELD", "INCONCLUSIVE", "NOT_HELD", "Budget", "Comparison",
           "Estimate", "ReproduceResult", "TargetRow", "TargetSpec", "Verdict", "check_dataset",
           "claim_collapse", "claim_copy_onset", "claim_knn_vs_cfm", "combine",
           "default_work_folder", "difference_verdict", "final_loss", "get_budget",
           "prepare_work_folder", "reproduce", "run_config", "target_specs"]
