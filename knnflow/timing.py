"""Wall-clock timing shared by the benchmarks and by estimators that choose their route by
cost (KNNVelocity(route="faster"))."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int,
                        device: torch.device) -> dict[str, float]:
    """Median wall time of each call, timed in rounds after one warm-up call each: the first
    call is slower, and drift in machine speed then affects all alike. Each round runs the
    calls in a new (seeded) order, so no call always runs right after the same one: on small
    data the call after the top-256 truncation took 20-50% longer, whichever it was, which a
    fixed order charged to the exact engine alone."""
    names = list(calls)
    for fn in calls.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
