"""The pipeline: each stage (index, classifier, collapse, training, sampling, FID, memorization,
velocity error, hybrid sampling) run once, or reused when its record matches (study.py runs
them in order and writes the page)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from knnflow.analysis.classifier import save_classifier, train_classifier
from knnflow.analysis.collapse import compute_collapse
from knnflow.analysis.collapse_report import write_collapse_report
from knnflow.analysis.features import extract_features, feature_extractor
from knnflow.analysis.fid import bootstrap_fid, fid
from knnflow.analysis.hybrid import hybrid_of_run
from knnflow.analysis.hybrid_report import write_hybrid
from knnflow.analysis.reproduce.budgets import Budget, TargetSpec, run_config
from knnflow.analysis.reproduce.common import MEMORIZATION_THRESHOLD, Log, Progress
from knnflow.analysis.reproduce.results import StageTime
from knnflow.analysis.reproduce.stages import (
    digest,
    newest_checkpoint,
    now_text,
    read_json,
    write_atomic,
)
from knnflow.analysis.velocity_error import velocity_error_of_run, write_velocity_error
from knnflow.data import load_dataset
from knnflow.errors import OptionError
from knnflow.files import atomic_folder
from knnflow.images import with_flips
from knnflow.index import Index, points_sha256
from knnflow.memorization_report import run_memorization
from knnflow.runs import config_differences, load_run_model
from knnflow.samples import load_samples
from knnflow.sampling import sample_model, save_samples
from knnflow.t_grid import parse_t_grid
from knnflow.trainer import train

# --------------------------------------------------------------------------- the pipeline


class Pipeline:
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
        record = read_json(path)
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
        record = {"key": key, "stamp": digest(key), "result": result,
                  "seconds": round(seconds, 3), "finished": now_text()}
        write_atomic(path, json.dumps(record, indent=2) + "\n")
        self.times.append(StageTime(name, label, record["seconds"], False, record["finished"]))
        self.records[name] = record
        return record

    # ------------------------------------------------------------------ shared stages

    def load_data(self) -> None:

        self.images = load_dataset(self.dataset, self.root, "train", self.budget.limit)
        self.reference = load_dataset(self.dataset, self.root, "test")
        self.candidates = with_flips(self.images) if self.budget.flip else self.images
        self.image_shape = tuple(self.images.shape[1:])
        flat = self.candidates.reshape(len(self.candidates), -1).numpy()
        self.points_sha = points_sha256(np.ascontiguousarray(flat, dtype=np.float32))

    def build_index(self) -> None:

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
            saved = read_json(folder / "classifier.json")
            return saved is not None and saved.get("sha256") == result["sha256"]

        self.classifier = self.stage(
            "classifier", "classifier for FID features",
            {"points_sha256": self.points_sha, "dataset": self.dataset,
             "epochs": self.budget.classifier_epochs}, compute, done)
        self.classifier_folder = folder

    def extractor(self):

        if self._extractor is None:
            self._extractor = feature_extractor(f"classifier:{self.classifier_folder}",
                                                device=self.device)
        return self._extractor

    def collapse(self) -> None:

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
                # Each difference names its setting as a template token, spelled here as the
                # config's field: this command has no flag of that name.
                differences = [text.replace("{" + name + "}", name) for name, text
                               in config_differences(saved, resolved) if name != "index"]
                index = resolved.target_options.get("index")
                saved_options = saved.get("target_options") or {}
                if index is not None and saved_options.get("index") != index:
                    saved["target_options"] = {**saved_options, "index": index}  # for train()
                    (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
                if differences:
                    raise OptionError(f"{folder} was trained with other settings "
                                      f"({'; '.join(differences)}); pass {{overwrite}} to "
                                      "start the reproduction again", "overwrite")
                mark = newest_checkpoint(folder)
                resumed_from = mark["step"] if mark is not None else 0
                if resumed_from > config.steps:
                    raise OptionError(f"{folder} has trained {resumed_from} steps, more than "
                                      f"the {config.steps} asked for; pass {{overwrite}} to "
                                      "start again", "overwrite")
                if resumed_from:
                    self.log(f"resuming {spec.label} (seed {seed}) from step {resumed_from}")
            stage = f"training {spec.label}"
            train(config, folder, resume=resumed_from is not None,
                  overwrite=resumed_from is None, device=self.device,
                  progress=lambda info: self.progress(stage, info["step"], info["steps"]))
            mark = newest_checkpoint(folder)
            return {"checkpoint_step": mark["step"], "checkpoint_sha256": mark["sha256"],
                    "resumed_from": resumed_from}

        options = dict(resolved.target_options)
        if options.get("index") is not None:
            options["index"] = "work/index"
        key = {**asdict(resolved), "target_options": options}
        record = self.stage(f"train-{spec.label}-seed{seed}", label, key, compute, done)
        return folder, record

    def analyse_run(self, spec: TargetSpec, seed: int, folder: Path, trained: dict) -> dict:
        """Samples, FID, memorization, velocity error and hybrid sampling of one run."""

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
