"""knnflow bench train: the training step time of each target relative to cfm, in one run
on the same batches."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knnflow.batches import BatchStream
from knnflow.bench.common import BenchResult, Progress, bench_index, bench_target, faiss_device
from knnflow.devices import resolve_device
from knnflow.errors import OptionError
from knnflow.models import build_model, count_parameters
from knnflow.timing import sync as _sync
from knnflow.trainer import TrainConfig, lr_at, optimizer_step

TRAIN_TARGETS = ("cfm", "efm-128", "knn-efm", "exact")


def parse_target_label(label: str, n: int) -> dict:
    """'cfm', 'exact', 'knn-efm', 'knn-efm-certify', 'knn-efm-faster', 'efm-M' or
    'efm-M-shared' (M a number or 'n') → the target's spec (bench_target)."""
    if label in ("cfm", "ot-cfm", "exact", "knn-efm"):
        return {"name": label}
    if label in ("knn-efm-certify", "knn-efm-faster"):
        return {"name": "knn-efm", "knn_route": label.rsplit("-", 1)[1]}
    parts = label.split("-")
    if parts[0] == "efm" and len(parts) in (2, 3) and (len(parts) == 2 or parts[2] == "shared"):
        m = n if parts[1] == "n" else (int(parts[1]) if parts[1].isdigit() else 0)
        if m >= 1:
            return {"name": "efm", "m": m, "pool": "shared" if len(parts) == 3 else "independent"}
    raise OptionError(f"unknown target {label!r}; use cfm, ot-cfm, exact, knn-efm (or "
                      "knn-efm-certify, knn-efm-faster: its {knn_route}), efm-M or efm-M-shared "
                      "(M a number or n)", "knn_route")


@dataclass
class TrainRow:
    target: str
    ms_step: float
    ms_target: float
    ratio: float
    fallback: float | None
    routed: float | None


@dataclass
class TrainBench(BenchResult):
    rows: list[TrainRow] = field(default_factory=list)


def bench_train(dataset: str | None = None, root: str | None = None, limit: int | None = None,
                preset: str = "tiny", targets: tuple[str, ...] = TRAIN_TARGETS,
                batch: int = 128, steps: int = 20, warmup: int = 3, device: str = "cpu",
                tol: float = 1e-4, index_folder: str | Path | None = None, seed: int = 0,
                prefetch: bool | None = None, knn_search_device: str = "cpu",
                size: int | None = None, progress: Progress | None = None) -> TrainBench:
    """Training step time with each target, relative to cfm, in one run: every target trains
    its own copy of the model (same initial weights) on the same seeded stream of (x0, x1, t),
    through the trainer's own BatchStream and optimizer_step. Without prefetch (the default on
    CPUs) the targets take turns step by step; with prefetch (the default on GPUs, as in
    knnflow train) each target runs its steps in one block, and a step's time runs from the
    end of the previous step to the end of this one, so a target computed while the network
    trains costs only what it adds. Median over `steps` timed steps after `warmup` untimed
    ones."""

    if min(batch, steps) < 1 or warmup < 0:
        raise OptionError("{batch} and {steps} must be at least 1, {warmup} at least 0",
                          "batch", "steps", "warmup")
    device = resolve_device(device)
    knn_search_device = resolve_device(knn_search_device, "knn_search_device")
    prefetch = device == "cuda" if prefetch is None else prefetch
    source = bench_index(dataset, root, limit, index_folder, progress, device, size=size)
    index, name = source.index, source.name
    train_set = index.training_set()
    specs = {label: parse_target_label(label, index.n) for label in targets}
    image_shape = index.image_shape
    images = train_set.points.reshape(-1, *image_shape)
    config = TrainConfig(dataset=name, preset=preset, batch_size=batch).resolved()
    step_ms = {label: [] for label in specs}
    target_ms = {label: [] for label in specs}
    fallback = {label: [] for label in specs}
    routed = {label: [] for label in specs}
    total = len(specs) * (warmup + steps)

    def trainer(label: str, spec: dict):
        """One target's model, EMA, optimizer and batch stream, from the same seeds."""
        torch.manual_seed(seed)
        model = build_model(preset, image_shape).to(device)
        ema = build_model(preset, image_shape).to(device)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        target = bench_target(spec, index, tol, knn_search_device, data=train_set,
                              device=device, image_shape=image_shape)
        stream = BatchStream(images, target, batch, False, torch.Generator().manual_seed(seed),
                             prefetch=prefetch,
                             target_generator=torch.Generator().manual_seed(seed + 1))
        return model, ema, torch.optim.Adam(model.parameters(), lr=config.lr), stream

    def step_once(label: str, parts, step: int, began: float) -> float:
        model, ema, optimizer, stream = parts
        t, out, _ = stream.next()
        loss = optimizer_step(model, ema, optimizer, out, t, config, step,
                              lr_at(step, config), device)
        float(loss)  # waits for the step
        now = time.perf_counter()
        if step >= warmup:
            step_ms[label].append(1e3 * (now - began))
            target_ms[label].append(1e3 * out.seconds)
            if out.fallback is not None:
                fallback[label].append(out.fallback)
            if out.routed is not None:
                routed[label].append(out.routed)
        return now

    if prefetch:
        # One target at a time: a prefetching stream would otherwise compute its next target
        # while the other targets train, which hides more than training would.
        for number, (label, spec) in enumerate(specs.items()):
            parts = trainer(label, spec)
            with parts[3]:
                _sync(torch.device(device))
                last = time.perf_counter()
                for step in range(warmup + steps):
                    if progress:
                        progress("bench train", number * (warmup + steps) + step, total)
                    last = step_once(label, parts, step, last)
            parameters = count_parameters(parts[0])
            del parts
    else:
        # Interleaved rounds in rotating order, so drift in machine speed affects all alike.
        built = {label: trainer(label, spec) for label, spec in specs.items()}
        parameters = count_parameters(next(iter(built.values()))[0])
        order = list(built)
        for step in range(warmup + steps):
            if progress:
                progress("bench train", step * len(order), total)
            order = order[1:] + order[:1]
            for label in order:
                _sync(torch.device(device))
                step_once(label, built[label], step, time.perf_counter())
    if progress:
        progress("bench train", total, total)
    result = TrainBench(config={
        **source.described(), "preset": preset, "parameters": parameters,
        "batch": batch, "steps": steps, "warmup": warmup, "device": device,
        "faiss_device": faiss_device(device), "prefetch": prefetch, "tol": tol,
        "knn_search_device": knn_search_device,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None})
    base = statistics.median(step_ms["cfm"]) if "cfm" in step_ms else None
    for label in specs:
        ms = statistics.median(step_ms[label])
        result.rows.append(TrainRow(
            target=label, ms_step=ms, ms_target=statistics.median(target_ms[label]),
            ratio=ms / base if base else math.nan,
            fallback=statistics.mean(fallback[label]) if fallback[label] else None,
            routed=statistics.mean(routed[label]) if routed[label] else None))
    return result
