"""The batches of a training run, drawn in order from seeded generators (BatchStream)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor


class BatchStream:
    """A run's training batches in order: x1 (random flips under --flip), x0, t from one CPU
    generator, then the target, whose own draws come from `target_generator` (default: the
    same generator).

    With prefetch (on GPUs), the next batch and its target are computed in a background thread
    while the current one trains, so a target computed on the CPU (knn-efm's certified search)
    overlaps the network's step. The draws happen in the same order either way, so a run is the
    same with and without prefetch. rows: under DDP, the rows of every batch this process
    trains on (all processes draw the whole batch, so they stay in step); next() returns the
    generators' states after the batch
    ({"rng.data": ..., "rng.target": ...}, one entry when they are the same generator), which
    is what a checkpoint taken after that batch must hold.
    """

    def __init__(self, images: Tensor, target, batch_size: int, flip: bool,
                 generator: torch.Generator, prefetch: bool = False,
                 target_generator: torch.Generator | None = None, rows: slice | None = None):
        self.rows = rows
        self.flat = images.reshape(len(images), -1)
        self.image_shape = tuple(images.shape[1:])
        self.target, self.batch_size, self.flip = target, batch_size, flip
        self.generator = generator
        self.target_generator = target_generator if target_generator is not None else generator
        self.pool = None
        self.pending = None
        self.stream = None
        if prefetch:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knnflow-batch")
            if target.device.type == "cuda":  # the target's GPU work on its own stream
                self.stream = torch.cuda.Stream(target.device)

    def _make(self):
        gen = self.generator
        ids = torch.randint(len(self.flat), (self.batch_size,), generator=gen)
        x1 = self.flat[ids].reshape(-1, *self.image_shape).clone()
        if self.flip:
            flips = torch.rand(self.batch_size, generator=gen) < 0.5
            x1[flips] = x1[flips].flip(-1)
        x0 = torch.randn(x1.shape, generator=gen)
        t = torch.rand(self.batch_size, generator=gen)
        # This process's share of the batch (all draw all of it); a target over sharded data
        # is computed for the whole batch on every process, then shared out.
        whole = getattr(self.target, "whole_batch", False)
        if self.rows is not None and not whole:
            x1, x0, t = x1[self.rows], x0[self.rows], t[self.rows]
        draws = self.target_generator
        if self.stream is None:
            batch = self.target(x0, x1, t, generator=draws)
        else:
            with torch.cuda.stream(self.stream):
                batch = self.target(x0, x1, t, generator=draws)
        if self.rows is not None and whole:
            t = t[self.rows]
            batch = replace(batch, x_t=batch.x_t[self.rows], target=batch.target[self.rows])
        states = {"rng.data": gen.get_state()}
        if draws is not gen:
            states["rng.target"] = draws.get_state()
        return t, batch, states

    def next(self) -> tuple[Tensor, object, Tensor]:
        """(t, TargetBatch, the generators' states after this batch)."""
        if self.pool is None:
            return self._make()
        current = self.pending.result() if self.pending is not None else self._make()
        if self.stream is not None:
            # The training stream reads tensors made on the target's stream: wait for it
            # (before the next batch queues work there), and keep the allocator from reusing
            # their memory until the training stream is done with them.
            main = torch.cuda.current_stream(self.stream.device)
            main.wait_stream(self.stream)
            for tensor in (current[1].x_t, current[1].target):
                if tensor.is_cuda:
                    tensor.record_stream(main)
        self.pending = self.pool.submit(self._make)
        return current

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if self.pending is not None:
                self.pending.cancel()
            self.pool.shutdown(wait=True)
