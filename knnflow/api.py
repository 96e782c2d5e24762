"""knnflow.train, knnflow.sample and knnflow.memorization: the three jobs of the command line
as Python functions, for a researcher's own scripts.

Each takes the options of its command (as keyword arguments with the same names, underscores
for dashes) and returns what the command prints, as Python values:

    import knnflow
    run = knnflow.train("digits", target="knn-efm", steps=500)      # → TrainResult
    images = knnflow.sample(run.folder, n=64, out="samples")          # → (64, 1, 8, 8) tensor
    report = knnflow.memorization("samples")                          # → summary dict

Nothing is printed; pass progress= (stage, done, total) or log= (one line of text) to see
what happens. Errors are knnflow.InputError (and its kinds) with the one-line message the
command prints.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from torch import Tensor

from knnflow.choices import MEMORIZATION_REFERENCE
from knnflow.data import dataset_sources
from knnflow.devices import resolve_device
from knnflow.distributed import init_from_env
from knnflow.errors import InputError
from knnflow.files import check_output_folder
from knnflow.index import Index
from knnflow.memorization_report import default_out, run_memorization
from knnflow.nearest import parse_threshold
from knnflow.runs import TrainConfig, default_run_folder, load_run_model
from knnflow.samples import check_samples_path
from knnflow.sampling import check_solver, sample_closed_form, sample_model, save_samples
from knnflow.targets import TARGET_CLASSES
from knnflow.threads import cpu_threads
from knnflow.trainer import train as run_training
from knnflow.training_sets import (
    cached_index_folder,
    default_knn_index,
    open_index,
    open_recorded_index,
    recorded_training_set,
)

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


@dataclass
class TrainResult:
    """A trained run: its folder (config.json, metrics.jsonl, checkpoints/, loss.png), the
    metrics logged in this call, and the run's record (config.json)."""

    folder: Path
    metrics: list
    record: dict

    @property
    def final_loss(self) -> float | None:
        return self.metrics[-1].loss if self.metrics else None


def training_config(dataset: str, target: str, options: dict, *, resume: bool = False,
                    explicit: set[str] | None = None, progress: Progress | None = None,
                    log: Log | None = None) -> tuple[TrainConfig, set[str]]:
    """The TrainConfig of a run, and the options its user gave (on resume the others come
    from the saved run; default: every key of `options`).

    options: fields of TrainConfig, and the target's own options (make_target's: m, pool,
    tol, index, ...), which go into target_options; other names are refused. knn-efm
    without an index gets the data set's cached one, built when missing (progress, log),
    once the other options have been checked.
    """
    config_fields = {f.name for f in fields(TrainConfig)} - {"dataset", "target",
                                                             "target_options"}
    target_options = {name for cls in TARGET_CLASSES.values() for name in cls.OPTIONS}
    unknown = sorted(set(options) - config_fields - target_options)
    if unknown:
        raise InputError(f"knnflow.train got unknown options {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(config_fields | target_options))}")
    options = {key: str(value) if key in ("root", "index") and value is not None else value
               for key, value in options.items()}
    config = TrainConfig(dataset=dataset, target=target,
                         target_options={k: v for k, v in options.items()
                                         if k not in config_fields},
                         **{k: v for k, v in options.items() if k in config_fields})
    explicit = {"dataset", "target", *options} if explicit is None else set(explicit)
    if target == "knn-efm" and config.target_options.get("index") is None and not resume:
        config.resolved()  # bad options are refused before an index is built
        built = default_knn_index(dataset, config.root, config.limit, config.flip, progress,
                                  log)
        config = replace(config, target_options={**config.target_options, "index": str(built)})
        explicit.add("index")
    return config, explicit


def train(dataset: str = "digits", target: str = "cfm", *, folder: str | Path | None = None,
          resume: bool = False, overwrite: bool = False, device: str = "cpu",
          threads: int | None = None, progress: Callable[[dict], None] | None = None,
          log: Log | None = None, tensorboard: bool = False, **options) -> TrainResult:
    """Train a velocity network on a flow-matching target, as `knnflow train`.

    options: the fields of knnflow.runs.TrainConfig (steps, batch_size, preset, lr, flip,
    limit, root, seed, ...) and the target's own (make_target's: m, pool, index, tol, ...).
    target="knn-efm" without `index` uses the data set's cached index
    (indices/<dataset>-train), built when missing. folder: the run folder (default
    runs/<dataset>-<target>). progress(info) after each step, info holding step,
    steps and loss. tensorboard: also write TensorBoard scalars to FOLDER/tensorboard.
    """
    config, explicit = training_config(dataset, target, options, resume=resume, log=log)
    run_folder = Path(folder) if folder is not None else default_run_folder(dataset, target)
    device = init_from_env(resolve_device(device))
    with cpu_threads(threads):
        logged = run_training(config, run_folder, resume=resume, overwrite=overwrite,
                              progress=progress, device=device, explicit=explicit,
                              tensorboard=tensorboard)
    record = json.loads((run_folder / "config.json").read_text())
    return TrainResult(run_folder, logged, record)


def sample(run: str | Path | None = None, *, closed_form: str | Path | None = None,
           n: int = 64, solver: str = "euler", steps: int = 100, atol: float = 1e-5,
           rtol: float = 1e-5, seed: int = 0, ema: bool = True,
           out: str | Path | None = None, overwrite: bool = False, device: str = "cpu",
           threads: int | None = None, progress: Progress | None = None) -> Tensor:
    """Samples of a trained run (or, with closed_form=INDEX, of the closed-form û*), as
    `knnflow sample`: an (n, C, H, W) float32 tensor in [-1, 1]. With `out`, also the samples
    folder the command writes (PNGs, grid.png, samples.npz and sampling.json, which
    knnflow.memorization reads to find the training set)."""
    if (run is None) == (closed_form is None):
        raise InputError("pass a run folder or closed_form=INDEX (one of them)")
    check_solver(solver, steps, atol, rtol, n)
    device = resolve_device(device)
    source = Path(closed_form if closed_form is not None else run)
    target = None if out is None else check_output_folder(out, overwrite, "samples", [source])
    meta = {"n": n, "solver": solver, "steps": steps, "atol": atol, "rtol": rtol, "seed": seed}
    with cpu_threads(threads):
        if closed_form is not None:
            samples = sample_closed_form(Index.load(source), n, seed, solver, steps, atol, rtol,
                                         progress=progress, device=device)
            meta["closed_form"] = str(source)
        else:
            model, record = load_run_model(source, ema, device)
            samples = sample_model(model, n, tuple(record["image_shape"]), seed, solver, steps,
                                   atol, rtol, device=device, progress=progress)
            meta.update({"run": str(source), "ema": ema,
                         "checkpoint_step": record["checkpoint_step"]})
    if target is not None:
        save_samples(samples, target, overwrite, meta)
    return samples


def memorization(samples: str | Path | Tensor | np.ndarray, *,
                 index: str | Path | None = None, dataset: str | None = None,
                 root: str | Path | None = None, threshold: float | str = 1 / 3, k: int = 2,
                 out: str | Path | None = None, approximate: bool = False,
                 resize: bool = False, reference_size: int | None = None,
                 batch_size: int = 256, overwrite: bool = False,
                 progress: Progress | None = None, log: Log | None = None) -> dict:
    """How close samples lie to the training set, as `knnflow memorization`: the summary
    (d1, d2, the ratio test, the train-to-train reference, "compared_against" and "report",
    the report folder).

    samples: a folder of images, an .npz/.npy file or a run's samples folder, or an
    (N, C, H, W) tensor or array in [-1, 1] (then `out` names the report folder). With
    neither index nor dataset: the training set the samples record (a samples folder of
    knnflow.sample), else the default data set, digits. The options are checked, and the
    report folder too (it must not hold the samples or the training data), before any work.
    """
    parse_threshold(threshold)
    reference_size = MEMORIZATION_REFERENCE if reference_size is None else reference_size
    for option, value, least in (("--batch-size", batch_size, 1), ("--k", k, 2),
                                 ("--reference-size", reference_size, 1)):
        if value < least:
            raise InputError(f"{option} must be at least {least}, got {value}"
                             + (" (the ratio test needs d2)" if option == "--k" else ""))
    given_array = isinstance(samples, (Tensor, np.ndarray))
    if given_array and out is None:
        raise InputError("samples given as an array need out=FOLDER for the report")
    cached = None if dataset is None else cached_index_folder(dataset, approximate=approximate)
    out = check_output_folder(out if out is not None else default_out(samples), overwrite,
                              "memorization", [None if given_array else samples, index, cached,
                                               *dataset_sources(dataset, root)])
    with tempfile.TemporaryDirectory() as scratch:
        if given_array:
            array = samples.detach().cpu().numpy() if isinstance(samples, Tensor) else samples
            path = Path(scratch) / "samples.npy"
            np.save(path, np.asarray(array, dtype=np.float32))
        else:
            path = check_samples_path(samples)  # before an index is opened or built
        if index is None and dataset is None:
            opened, compared = open_recorded_index(recorded_training_set(path), approximate,
                                                   progress, log)
        else:
            opened = open_index(None if index is None else Path(index), dataset,
                                None if root is None else Path(root), approximate, progress,
                                log)
            compared = f"{index}" if index is not None else f"{dataset}, as asked"
        if approximate and opened.kind == "flat" and log:
            log("note: a flat index searches exactly; --approximate changes nothing")
        summary, folder = run_memorization(
            path, opened, threshold=threshold, k=k, out=out, approximate=approximate,
            resize=resize, reference_size=reference_size, batch_size=batch_size,
            overwrite=overwrite, progress=progress)
    return {**summary, "compared_against": compared, "report": str(folder)}


__all__ = ["TrainResult", "memorization", "sample", "train"]
