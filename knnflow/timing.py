"""Wall-clock timing shared by the benchmarks and by estimators that choose their route by
cost (KNNVelocity(route="faster"))."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

import torch

# The benchmarks' shortest sample: calls faster than this run back to back within a sample.
BENCH_SAMPLE_SECONDS = 0.05


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int,
                        device: torch.device, min_sample: float = 0.0) -> dict[str, float]:
    """Median wall time of each call, timed in rounds after one warm-up call each: the first
    call is slower, and drift in machine speed then affects all alike. Each round runs the
    calls in a new (seeded) order, so no call always runs right after the same one.

    A call that follows other work pays a wake-up cost (on the 2-core CPU here ~1 ms after a
    30 ms sleep or another call: the thread pool and caches have gone cold), which swamps
    calls of a few milliseconds; with min_sample > 0, such calls run back to back, as many
    times as fill min_sample seconds by a timed call after the warm-up, and the sample is the mean.
    """
    def seconds(fn: Callable[[], object], count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            fn()
        sync(device)
        return (time.perf_counter() - start) / count

    names = list(calls)
    for fn in calls.values():
        fn()
    sync(device)
    inner = dict.fromkeys(names, 1)
    if min_sample > 0:  # a second call (the first may calibrate or warm caches) sets the count
        for name, fn in calls.items():
            took = seconds(fn, 1)
            inner[name] = max(1, min(1000, math.ceil(min_sample / max(took, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            times[name].append(seconds(calls[name], inner[name]))
    return {name: statistics.median(values) for name, values in times.items()}
