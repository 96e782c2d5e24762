"""The trainer: a velocity network regressed on a target (targets.py) with Adam, linear warm-up,
gradient clipping and an EMA of the weights, checkpointed atomically and resumable bit for bit.

A run folder runs/NAME holds config.json, metrics.jsonl (one line per logged step), loss.png
(the loss against step, redrawn at each checkpoint), checkpoints/step_N.safetensors +
step_N.json and progress/step_N.png (sample grids). Every
random draw comes from sources whose states the checkpoint stores: a torch.Generator for the
data (x1 ids, flips, x0, t), a second one for the target's own draws (EFM candidates), and
torch's global RNG (dropout). With the target's draws apart, runs with the same seed and
different targets train on the same (x0, x1, t) batches, a paired comparison. A checkpoint
counts only when its JSON, written last, names the sha256 of its tensors, so a run killed at
any moment resumes from the newest complete checkpoint and continues exactly as if it had not
stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from knnflow.batches import BatchStream
from knnflow.checkpoints import (
    CHECKPOINTS,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
    split_state,
)
from knnflow.data import dataset_sources, load_dataset
from knnflow.distributed import rank_and_world
from knnflow.errors import IndexMismatchError, InputError, OptionError, OptionWarning
from knnflow.files import check_output_folder, write_marker
from knnflow.images import with_flips
from knnflow.index import points_sha256
from knnflow.models.unet import build_model, count_parameters
from knnflow.run_logs import (
    LOSS_PLOT,
    plot_loss,
    progress_grid,
    summary_writer_class,
    tensorboard_writer,
)
from knnflow.runs import Run, TrainConfig, config_differences, lr_at
from knnflow.targets import make_target, target_class

# Seeds of process R's own draws (dropout, the target's) are offset by R times this.
RANK_SEED_STRIDE = 7919


@dataclass
class StepMetrics:
    step: int
    loss: float
    target_sq: float
    ms_step: float
    ms_target: float
    fallback: float | None
    lr: float
    routed: float | None


def load_training_data(config: TrainConfig) -> tuple[Tensor, Tensor]:
    """The training images, and the target's data: the images flattened (with both flips
    under `flip`, as x1 is drawn)."""
    images = load_dataset(config.dataset, root=config.root, split="train", limit=config.limit)
    candidates = with_flips(images) if config.flip else images
    return images, candidates.reshape(len(candidates), -1)


def train(config: TrainConfig, folder: Path, resume: bool = False, overwrite: bool = False,
          progress: Callable[[dict], None] | None = None, device: str = "cpu",
          explicit: set[str] | None = None, tensorboard: bool = False) -> list[StepMetrics]:
    """Train (or continue) the run in `folder`; returns the metrics logged in this call.

    tensorboard: also write each logged step's metrics as TensorBoard scalars to
    FOLDER/tensorboard (needs the tensorboard package, the `tensorboard` extra); a resumed
    run drops the events after its checkpoint, as metrics.jsonl does.

    resume: continue from the newest complete checkpoint. The config must match the saved
    one except for RESUMABLE_CHANGES; with `explicit` (the options a user actually gave),
    every other field is taken from the saved config.

    Under torch.distributed (torchrun; knnflow.distributed.init_from_env) every process
    calls this with the same arguments: each draws the same global batch and trains on its
    own rows of it through DistributedDataParallel; process 0 writes the run folder.
    """
    import torch.distributed as dist

    folder = Path(folder)
    if tensorboard:
        summary_writer_class()  # a missing package is refused before the run starts
    run = Run(folder)
    checkpoint = None
    rank, world = rank_and_world()
    if resume and overwrite:
        raise OptionError("{resume} continues a run and {overwrite} deletes it: pass one of "
                          "them", "resume", "overwrite")
    if resume:
        saved = run.read_config()
        if explicit is not None:
            config = TrainConfig.resumed(saved, config, explicit)
    try:
        config = config.resolved()
    except InputError:
        raise
    except (TypeError, ValueError) as err:  # only a saved config.json can carry wrong types
        raise InputError(f"{run.config_path} holds a value of the wrong type ({err})") from None
    if world > 1 and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # its RNG state and DDP's device
    if config.batch_size % world:
        raise OptionError(f"{{batch_size}} {config.batch_size} must be a multiple of the "
                          f"{world} processes (each trains on an equal share of the batch)",
                          "batch_size")
    if resume:
        differences = config_differences(saved, config)
        if differences:
            raise OptionError("cannot resume with a different config: "
                              + "; ".join(text for _, text in differences),
                              *(name for name, _ in differences))
        if saved.get("processes", 1) != world:
            raise InputError(f"{folder} was trained by {saved.get('processes', 1)} processes "
                             f"and this is {world}; resume it with as many (torchrun "
                             "--nproc_per_node), or its batches and random draws differ")
        checkpoint = load_checkpoint(folder / CHECKPOINTS)
        if checkpoint is not None and checkpoint[0]["step"] > config.steps:
            raise OptionError(f"{folder} has trained {checkpoint[0]['step']} steps, more than "
                              f"the {{steps}} {config.steps} asked for", "steps")
    else:
        if folder.exists() and not overwrite:
            raise OptionError(f"{folder} already exists; pass {{resume}} to continue it or "
                              "{overwrite} to start again", "resume", "overwrite")
        # Only a run folder (or an empty one) is replaced, and only once the new run's data,
        # index and target have loaded: a mistake in them must not cost the old run.
        check_output_folder(folder, overwrite, "run", [
            *target_class(config.target).inputs(config.target_options),
            *dataset_sources(config.dataset, config.root)], option="name")
    images, target_data = load_training_data(config)
    data_sha256 = points_sha256(images.reshape(len(images), -1).numpy())
    if resume and saved.get("data_sha256", data_sha256) != data_sha256:
        raise InputError(f"the training data of {config.dataset} changed since {folder} "
                         "started (checksum differs); resuming would not continue the same run")
    image_shape = tuple(images.shape[1:])
    try:
        target = make_target(config.target, data=target_data, image_shape=image_shape,
                             device=device, **config.target_options)
    except IndexMismatchError as err:
        if not config.flip:
            raise
        raise IndexMismatchError(f"{err}, with both flips of each image (flip is on)") from None

    torch.manual_seed(config.seed)
    net = build_model(config.preset, image_shape).to(device)
    ema = build_model(config.preset, image_shape).to(device)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    # Every process draws the same batches (rng.data); the other draws (dropout, EFM's
    # candidates) are each process's own, process 0's as in a single-process run.
    data_gen = torch.Generator().manual_seed(config.seed + 1)
    target_gen = torch.Generator().manual_seed(config.seed + 2 + RANK_SEED_STRIDE * rank)
    if rank:
        torch.manual_seed(config.seed + RANK_SEED_STRIDE * rank)
    mine = f"rank{rank}." if rank else ""  # this process's keys in a checkpoint
    start = 0
    if checkpoint is not None:
        meta, tensors = checkpoint
        net.load_state_dict(split_state(tensors, "model."))
        ema.load_state_dict(split_state(tensors, "ema."))
        restore_optimizer(optimizer, tensors, meta["param_groups"])
        torch.set_rng_state(tensors[mine + "rng.torch"])
        data_gen.set_state(tensors["rng.data"])
        if mine + "rng.target" in tensors:
            target_gen.set_state(tensors[mine + "rng.target"])
        else:  # a checkpoint from before the target had its own generator: resume as it ran
            target_gen = data_gen
        if mine + "rng.cuda" in tensors and torch.device(device).type == "cuda":
            torch.cuda.set_rng_state(tensors[mine + "rng.cuda"])
        target.restore(meta.get("ranks", {}).get(str(rank), {}) if rank else meta)
        start = meta["step"]
    if world > 1:
        dist.barrier()  # every process has checked and read the run folder before it changes
    if rank == 0:
        if not resume and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_marker(folder, "run")
        record = {**asdict(config), "image_shape": list(image_shape),
                  "parameters": count_parameters(net), "data_sha256": data_sha256,
                  "processes": world}
        run.config_path.write_text(json.dumps(record, indent=2) + "\n")
    metrics_path = folder / "metrics.jsonl"
    if rank == 0:
        _truncate_metrics(metrics_path, start)
    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dist.barrier()  # the run folder is ready
        on_gpu = torch.device(device).type == "cuda"
        model = DistributedDataParallel(
            net, device_ids=[torch.device(device).index or 0] if on_gpu else None)

    if config.steps < config.warmup and rank == 0 and start == 0:  # the run's checks passed
        warnings.warn(OptionWarning(
            f"{{steps}} {config.steps} ends inside the {config.warmup}-step warm-up: the "
            f"learning rate reaches only {config.steps / config.warmup:.0%} of {{lr}} "
            f"{config.lr:g}; pass {{warmup}} {config.steps // 10} (a tenth of the run) for a "
            "run this short", "steps", "lr", "warmup"), stacklevel=2)
    writer = tensorboard_writer(folder, start) if tensorboard and rank == 0 else None
    logged: list[StepMetrics] = []
    share = config.batch_size // world
    stream = BatchStream(images, target, config.batch_size, config.flip, data_gen,
                         prefetch=torch.device(device).type == "cuda",
                         target_generator=target_gen,
                         rows=slice(rank * share, (rank + 1) * share) if world > 1 else None)
    model.train()
    with open(metrics_path, "a") as metrics_file, stream:
        for step in range(start, config.steps):
            began = time.perf_counter()
            t, batch, rng_states = stream.next()
            lr = lr_at(step, config)
            loss = optimizer_step(model, ema, optimizer, batch, t, config, step, lr, device)
            done = step + 1
            # The loss, the target's variance and knn-efm's fallback and routed fractions over
            # the whole batch (all processes); the times are process 0's.
            loss_value, variance, fallback, routed = _batch_means(
                torch.tensor([float(loss.detach()), float(batch.target.square().mean()),
                              math.nan if batch.fallback is None else batch.fallback,
                              math.nan if batch.routed is None else batch.routed],
                             dtype=torch.float64), world)
            if not math.isfinite(loss_value):
                raise OptionError(f"the loss became {loss_value} at step {done}; lower {{lr}}",
                                  "lr")
            entry = StepMetrics(done, loss_value, variance,
                                1e3 * (time.perf_counter() - began), 1e3 * batch.seconds,
                                None if batch.fallback is None else fallback, lr,
                                None if batch.routed is None else routed)
            if done % config.log_every == 0 or done == config.steps:
                if rank == 0:
                    metrics_file.write(json.dumps(asdict(entry)) + "\n")
                    metrics_file.flush()
                if writer is not None:
                    for key, value in asdict(entry).items():
                        if key != "step" and value is not None:
                            writer.add_scalar(f"train/{key}", value, done)
                    writer.flush()
                logged.append(entry)
            if done % config.checkpoint_every == 0 or done == config.steps:
                extra, tensors = target.state(), dict(rng_states)
                if world > 1:
                    extra, tensors = _gather_rank_states(extra, tensors, rank, world, device)
                if rank == 0:
                    save_checkpoint(folder / CHECKPOINTS, done, net, ema, optimizer, tensors,
                                    config.keep_checkpoints, extra=extra)
                    plot_loss(metrics_path, folder / LOSS_PLOT, f"{folder.name}: "
                              f"{config.target} on {config.dataset}, {config.preset} (logged "
                              f"every {config.log_every} steps)")
            if rank == 0 and config.sample_every and (done % config.sample_every == 0
                                                      or done == config.steps):
                progress_grid(ema, image_shape, folder / "progress" / f"step_{done}.png", device)
            if progress and rank == 0:
                progress({"step": done, "steps": config.steps, "loss": loss_value})
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()  # every process returns once process 0 has written the last checkpoint
    return logged


def _batch_means(values: Tensor, world: int) -> list[float]:
    """Per-process means of equal shares of the batch → the whole batch's means."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
        values = values / world
    return [float(v) for v in values]


def _gather_rank_states(extra: dict, tensors: dict[str, Tensor], rank: int, world: int,
                        device: str) -> tuple[dict, dict[str, Tensor]]:
    """Every process's own random states (torch's, the target's generator, the GPU's) and
    target state, gathered for process 0's checkpoint: under "rankR." keys and meta["ranks"]
    for R ≥ 1 (process 0's stay where a single-process run keeps them)."""
    import torch.distributed as dist

    own = {k: v for k, v in tensors.items() if k != "rng.data"}  # rng.data: the same on all
    own["rng.torch"] = torch.get_rng_state()
    if torch.device(device).type == "cuda":
        own["rng.cuda"] = torch.cuda.get_rng_state()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"state": extra, "tensors": own})
    ranks = {}
    for r in range(1, world):
        tensors.update({f"rank{r}.{k}": v for k, v in gathered[r]["tensors"].items()})
        ranks[str(r)] = gathered[r]["state"]
    return {**extra, "ranks": ranks}, tensors


def optimizer_step(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                   batch, t: Tensor, config: TrainConfig, step: int, lr: float,
                   device: str | torch.device) -> Tensor:
    """One Adam step on the mean squared error to batch.target, clipped, then the EMA update.

    Returns the loss (a tensor on `device`; reading it synchronises). Out-of-memory errors
    become one line naming the batch size.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    try:
        prediction = model(batch.x_t.to(device), t.to(device))
        loss = (prediction - batch.target.to(device)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    except RuntimeError as err:  # torch.OutOfMemoryError on GPUs, a RuntimeError on CPU
        if "out of memory" not in str(err) and "can't allocate" not in str(err):
            raise
        raise OptionError(f"out of memory at {{batch_size}} {config.batch_size} with "
                          f"{{preset}} {config.preset}; lower {{batch_size}}", "batch_size",
                          "preset") from None
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    # The EMA warms up as (1 + step)/(10 + step) so short runs get a usable average.
    decay = min(config.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p, 1 - decay)
        for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
    return loss.detach()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from (they will be redone)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            break
    path.write_text("".join(f"{line}\n" for line in kept))
