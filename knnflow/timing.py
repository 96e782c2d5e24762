"""Wall-clock timing shared by the benchmarks and by estimators that choose their route by
cost (KNNVelocity(route="faster"))."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int,
                        device: torch.device) -> dict[str, float]:
    """Median wall time of each call, timed in rounds (a, b, c, a, b, c, ...) after one warm-up
    call each: the first call is slower, and drift in machine speed then affects all alike."""
    for fn in calls.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
