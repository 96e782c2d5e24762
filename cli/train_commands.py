"""knnflow train and knnflow sample."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from knnflow.choices import (
    EFM_M,
    EFM_POOLS,
    KNN_BUDGET,
    KNN_FALLBACKS,
    KNN_TOL,
    SOLVERS,
    TARGETS,
)
from knnflow.choices import ROUTES as KNN_ROUTES
from knnflow.errors import IndexMismatchError, InputError
from knnflow.models.presets import PRESETS, preset_defaults
from knnflow.threads import cpu_threads

from .console import (
    console,
    err_console,
    key_value_table,
    log_throttle,
    progress_bar,
)
from .threads import ThreadsOption

PRESET_LIST = "; ".join(f"{name}: {preset.summary}" for name, preset in PRESETS.items())
# train's flags that set the target's own options (knnflow.targets: make_target), and the
# flags of the option names that are not --NAME.
TARGET_OPTION_FLAGS = {"m": "m", "efm_pool": "pool", "index": "index", "tol": "tol",
                       "knn_budget": "budget", "knn_fallback": "fallback",
                       "knn_route": "route", "shard_data": "shard"}
TARGET_FLAG_NAMES = {option: "--" + flag.replace("_", "-")
                     for flag, option in TARGET_OPTION_FLAGS.items() if flag != option}


def note(text: str) -> None:
    err_console.print(text, soft_wrap=True)


def train_command(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(
        help="Training data set: digits, mnist, cifar10, celeba, photos, synthetic, folder:PATH, "
             "npz:PATH, npy:PATH.")] = "digits",
    root: Annotated[Optional[Path], typer.Option(
        help="Folder holding the data set's files (default: data/NAME).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Train on the first N training images only.")] = None,
    target: Annotated[str, typer.Option(
        help=f"Regression target: {', '.join(TARGETS)}. cfm: x1 - x0; ot-cfm: x1 - x0 after "
             "pairing each batch's noise and images by exact optimal transport; efm: "
             "self-normalised "
             "û* over M candidates; knn-efm: certified kNN û* (from --index, or the data set's "
             "default index, built when missing); exact: û* over "
             "all data.")] = "cfm",
    m: Annotated[int, typer.Option("--m", help="efm: candidates per row (M).")] = EFM_M,
    efm_pool: Annotated[str, typer.Option(
        help=f"efm: {' or '.join(EFM_POOLS)}. independent: x1 + M-1 fresh draws per row (the "
             "paper's algorithm); shared: the batch's x1s + M draws for all rows (its code).")]
    = EFM_POOLS[0],
    index: Annotated[Optional[Path], typer.Option(
        help="knn-efm: index folder of the training data (knnflow build-index DATASET); "
             "default indices/DATASET-train, built on first use.")]
    = None,
    tol: Annotated[float, typer.Option(help="knn-efm: error tolerance relative to ‖û*‖.")]
    = KNN_TOL,
    knn_budget: Annotated[float, typer.Option(
        help="knn-efm: largest fraction of the data read in full dimension per row before "
             "falling back.")] = KNN_BUDGET,
    knn_fallback: Annotated[str, typer.Option(
        help=f"knn-efm: what rows over budget get: {' or '.join(KNN_FALLBACKS)} (efm uses "
             "--m and --efm-pool).")] = KNN_FALLBACKS[0],
    knn_route: Annotated[str, typer.Option(
        help=f"knn-efm: {', '.join(KNN_ROUTES)}. certify: certify every row above the t where "
             "certifying stops succeeding; faster: rows at t where the exact engine is faster "
             "(timed once per run, kept in checkpoints) go to it; auto: faster, on every "
             "data set and device.")] = KNN_ROUTES[0],
    shard_data: Annotated[bool, typer.Option(
        help="exact or knn-efm, under torchrun: each process's target holds (exact) or scans "
             "and weighs (knn-efm) 1/N of the training set on its device, and û* of the whole "
             "batch is combined across them (for data too large for one device).")]
    = False,
    flip: Annotated[bool, typer.Option(
        help="Random horizontal flips of x1; candidates and index hold both flips.")] = False,
    preset: Annotated[str, typer.Option(help=f"Model: {PRESET_LIST}.")] = "tiny",
    batch_size: Annotated[int, typer.Option(help="Training pairs per step.")] = 128,
    steps: Annotated[int, typer.Option(help="Total optimiser steps.")] = 2000,
    lr: Annotated[Optional[float], typer.Option(
        help=f"Adam learning rate after warm-up (default: {preset_defaults('lr')}).")]
    = None,
    warmup: Annotated[Optional[int], typer.Option(
        help=f"Linear warm-up steps (default: {preset_defaults('warmup')}).")]
    = None,
    grad_clip: Annotated[float, typer.Option(help="Gradient norm clipping.")] = 1.0,
    ema_decay: Annotated[Optional[float], typer.Option(
        help=f"EMA decay of the weights (default: {preset_defaults('ema_decay')}).")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed of the model and of every random draw.")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps between metrics lines.")] = 50,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    sample_every: Annotated[int, typer.Option(
        help="Steps between sample grids in RUN/progress/ (0: none).")] = 0,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept on disk.")] = 2,
    name: Annotated[Optional[Path], typer.Option(
        help="Run folder (default: runs/DATASET-TARGET).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the run from its newest complete checkpoint (same config; --steps may "
             "grow).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run and start again.")]
    = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (cuda when torch sees a GPU).")]
    = "cpu",
    threads: ThreadsOption = None,
    tensorboard: Annotated[bool, typer.Option(
        help="Also write the logged metrics as TensorBoard scalars to RUN/tensorboard "
             "(tensorboard --logdir runs; needs pip install 'knnflow[tensorboard]').")]
    = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON on stdout, for scripts.")] = False,
) -> None:
    """Train a velocity network on a flow-matching target; writes runs/NAME/ (config.json,
    metrics.jsonl, checkpoints/, progress/). Under torchrun (torchrun --standalone
    --nproc_per_node N -m knnflow.cli.main train ...) the N processes share each batch (DDP;
    NCCL with --device cuda, one GPU each, gloo on CPUs)."""
    from knnflow.api import training_config
    from knnflow.checkpoints import newest_checkpoint_step
    from knnflow.devices import resolve_device
    from knnflow.distributed import init_from_env, leave_group, rank_and_world
    from knnflow.runs import TrainConfig, default_run_folder
    from knnflow.trainer import train

    # Options given on the command line (not defaults): on --resume the rest come from the
    # run, and the target gets only those (it fills in its own defaults).
    given = {k for k in ctx.params
             if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
    options = {f.name: ctx.params[f.name] for f in dataclasses.fields(TrainConfig)
               if f.name in ctx.params and f.name not in ("dataset", "target")}
    options.update({option: ctx.params[flag] for flag, option in TARGET_OPTION_FLAGS.items()
                    if flag in given})
    explicit = {TARGET_OPTION_FLAGS.get(k, k) for k in given}
    with progress_bar() as progress:
        config, explicit = training_config(dataset, target, options, resume=resume,
                                           explicit=explicit, progress=progress, log=note)
    folder = name or default_run_folder(dataset, target)
    device = init_from_env(resolve_device(device))
    first = rank_and_world()[0] == 0  # only the first process reports
    columns = (TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]:.1f} steps/s"),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
               TimeRemainingColumn())
    due = log_throttle()
    with Progress(*columns, console=err_console, transient=True,
                  disable=not (err_console.is_terminal and first)) as bar:
        task = bar.add_task("train", total=config.steps, rate=0.0, loss=float("nan"))

        resumed_from = newest_checkpoint_step(Path(folder)) if resume and first else None
        announce = [resume and first]  # once the run has started (its checks passed)

        def update(info: dict) -> None:
            if announce[0]:
                announce[0] = False
                bar.console.print(f"resumed {folder} from step {resumed_from}"
                                  if resumed_from is not None else
                                  f"note: {folder} had no complete checkpoint: it started "
                                  "again from step 0", soft_wrap=True)
            speed = bar.tasks[0].speed or 0.0
            bar.update(task, completed=info["step"], loss=info["loss"], rate=speed)
            if not err_console.is_terminal and due("train", info["step"] == info["steps"]):
                print(f"step {info['step']}/{info['steps']}, loss {info['loss']:.4f}",
                      file=sys.stderr, flush=True)

        try:
            with cpu_threads(threads):
                logged = train(config, folder, resume=resume, overwrite=overwrite,
                               progress=update, device=device, explicit=explicit,
                               tensorboard=tensorboard)
        except IndexMismatchError as err:
            index = config.target_options.get("index")
            raise IndexMismatchError(
                f"{err} (knnflow build-index {dataset} --out {index} --overwrite"
                + (f" --limit {config.limit}" if config.limit else "")
                + (" --flip" if config.flip else "") + ")") from None
        except KeyboardInterrupt:
            bar.stop()
            step = newest_checkpoint_step(Path(folder))
            kept = (f"its newest checkpoint, step {step}, is kept: continue with knnflow "
                    f"train --name {folder} --resume" if step is not None
                    else "no checkpoint was written yet: nothing to resume")
            print(f"interrupted: {kept}", file=sys.stderr)
            sys.exit(130)
    leave_group()
    if not first:
        return
    record = json.loads((folder / "config.json").read_text())
    if as_json:
        last = dataclasses.asdict(logged[-1]) if logged else None
        print(json.dumps({"run": str(folder), "target": record["target"],
                          "preset": record["preset"], "parameters": record["parameters"],
                          "steps": record["steps"], "processes": record.get("processes", 1),
                          "last_logged": last}, indent=2))
        return
    rows = [("run", folder), ("target", record["target"]), ("preset", record["preset"]),
            ("parameters", f"{record['parameters']:,}"), ("steps", record["steps"])]
    if record.get("processes", 1) > 1:
        rows.append(("processes (DDP)", record["processes"]))
    if logged:
        last = logged[-1]
        rows += [("final loss", f"{last.loss:.4f}"), ("ms / step", f"{last.ms_step:.1f}"),
                 ("ms on the target", f"{last.ms_target:.1f}")]
        if last.fallback is not None:
            rows.append(("knn-efm fallback (last step)", f"{last.fallback:.0%} of the rows"))
        if last.routed is not None:
            rows.append(("knn-efm routed (last step)", f"{last.routed:.0%} of the rows"))
    console.print(key_value_table("Training finished", rows))
    if logged and logged[-1].fallback is not None:
        given = ("the exact û* (--knn-fallback exact): their target is û* all the same, only "
                 "its cost differs" if record["target_options"].get("fallback") == "exact" else
                 "the EFM estimate (--knn-fallback efm)")
        err_console.print(f"note: fallback rows are those at t below where certifying "
                          f"succeeds, or over --knn-budget; they got {given}", soft_wrap=True)
        if logged[-1].routed:
            err_console.print("note: routed rows are those at t where the exact engine is faster "
                              "than certifying here (--knn-route; timed once, kept in the "
                              "checkpoints): they got the exact û*", soft_wrap=True)


def sample_command(
    run: Annotated[Optional[Path], typer.Argument(
        help="Run folder to sample from (omit with --closed-form).")] = None,
    closed_form: Annotated[Optional[Path], typer.Option(
        help="Follow the closed-form û* of this index folder instead of a network.")] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")] = True,
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 64,
    solver: Annotated[str, typer.Option(help=f"ODE solver: {', '.join(SOLVERS)}.")] = "euler",
    steps: Annotated[int, typer.Option(help="Steps of fixed-step solvers.")] = 100,
    atol: Annotated[float, typer.Option(help="dopri5: absolute tolerance.")] = 1e-5,
    rtol: Annotated[float, typer.Option(help="dopri5: relative tolerance.")] = 1e-5,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default: RUN/samples, or runs/closed-form-INDEX/samples).")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")]
    = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (cuda when torch sees a GPU).")]
    = "cpu",
    threads: ThreadsOption = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON on stdout, for scripts.")] = False,
) -> None:
    """Sample by integrating dx/dt = v(x, t) from noise (torchdiffeq); writes one PNG per
    sample, grid.png and samples.npz."""
    from knnflow.api import sample

    if (run is None) == (closed_form is None):
        raise InputError("pass a RUN folder or --closed-form INDEX (one of them)")
    folder = out or (Path("runs") / f"closed-form-{closed_form.name}" / "samples"
                     if closed_form is not None else run / "samples")
    with progress_bar() as progress:
        sample(run, closed_form=closed_form, n=n, solver=solver, steps=steps, atol=atol,
               rtol=rtol, seed=seed, ema=ema, out=folder, overwrite=overwrite, device=device,
               threads=threads, progress=progress)
    meta = json.loads((folder / "sampling.json").read_text())
    if as_json:
        print(json.dumps({"folder": str(folder), "grid": str(folder / "grid.png"),
                          "array": str(folder / "samples.npz"), **meta}, indent=2))
        return
    console.print(key_value_table(f"{n} samples written to {folder}", [
        ("grid", folder / "grid.png"), ("array", folder / "samples.npz"),
        ("solver", f"{solver} ({steps} steps)" if solver != "dopri5" else
         f"dopri5 (atol {atol:g}, rtol {rtol:g})")]))
