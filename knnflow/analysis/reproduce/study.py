"""reproduce(): the pipeline's stages in order (pipeline.py), then the table, the verdicts on
the paper's claims, the figures and the markdown page, from the stages' records."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from knnflow.analysis.reproduce.budgets import (
    Budget,
    check_dataset,
    check_page_paths,
    default_page,
    default_work_folder,
    target_specs,
)
from knnflow.analysis.reproduce.claims import claim_collapse, claim_copy_onset, claim_knn_vs_cfm
from knnflow.analysis.reproduce.common import Log, Progress
from knnflow.analysis.reproduce.figures import write_figures
from knnflow.analysis.reproduce.page import code_version, machine_text, write_markdown
from knnflow.analysis.reproduce.pipeline import Pipeline
from knnflow.analysis.reproduce.results import ReproduceResult
from knnflow.analysis.reproduce.stages import now_text, prepare_work_folder
from knnflow.analysis.reproduce.statistics import Estimate, spread
from knnflow.analysis.reproduce.table import comparisons, target_rows
from knnflow.devices import resolve_device
from knnflow.threads import cpu_threads


def reproduce(dataset: str, budget: Budget, *, root: str | Path | None = None,
              work: str | Path | None = None, out_md: str | Path | None = None,
              device: str = "cpu", overwrite: bool = False, command: str | None = None,
              log: Log | None = None, progress: Progress | None = None) -> ReproduceResult:
    """Run (or resume) the reproduction of `dataset` at `budget` and write the markdown page
    (default docs/results/DATASET.md) and its figures (a folder of the page's name beside it).
    """

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
    pipeline = Pipeline(dataset, budget, root, work, device,
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
    floor_fid = Estimate(floor["fid"], spread(replicates["floor"]))
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
        "date": now_text(), "machine": machine_text(device), "device": device,
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
