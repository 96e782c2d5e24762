"""`knnflow bench exact` with each timed call's page faults and wall time, per row.

Usage: python benchmarks/exact_page_faults.py [DATASET] [REPEATS]  (default digits 15; Linux
or macOS: it reads getrusage). Runs the same rows as `knnflow bench exact --dataset DATASET
--repeats REPEATS` and prints, for the naive form (a) and the engine (b), the minor page
faults per call and the median wall time of a single call. Where a call takes about a
millisecond, the naive form's B×n temporaries decide b/a: they come back either from the
allocator's heap or from fresh pages that the kernel faults in and zeroes, which can take
longer than the arithmetic. The engine writes its B×n logits once and works in place.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import knnflow.bench.exact as bench_exact_module
from knnflow.timing import interleaved_seconds

TIMED = ("naive", "engine")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(dataset: str = "digits", repeats: int = 15) -> None:
    per_row: list[dict[str, tuple[float, float]]] = []

    def counted(calls, repeats, device, min_sample=0.0):
        seen: dict[str, list[tuple[int, float]]] = {name: [] for name in TIMED}

        def wrap(name, fn):
            def call():
                before, start = _faults(), time.perf_counter()
                fn()
                seen[name].append((_faults() - before, time.perf_counter() - start))
            return call

        wrapped = {name: wrap(name, fn) if name in TIMED else fn for name, fn in calls.items()}
        result = interleaved_seconds(wrapped, repeats, device, min_sample)
        per_row.append({name: (statistics.mean(f for f, _ in values),
                               statistics.median(s for _, s in values))
                        for name, values in seen.items()})
        return result

    bench_exact_module.interleaved_seconds = counted
    result = bench_exact_module.bench_exact(dataset=dataset, repeats=repeats)
    config = result.config
    print(f"{dataset}, n={config['n']}, d={config['d']}, batch {config['batch']}")
    print(f"{'t':>7} {'b/a':>6} {'(a) faults':>11} {'(a) ms':>7} {'(b) faults':>11} {'(b) ms':>7}")
    for row, seen in zip(result.rows, per_row, strict=True):
        (fa, ta), (fb, tb) = seen["naive"], seen["engine"]
        print(f"{row.label:>7} {row.speedup:>5.2f}× {fa:>11.0f} {ta * 1e3:>7.2f} {fb:>11.0f} "
              f"{tb * 1e3:>7.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "digits",
         int(sys.argv[2]) if len(sys.argv) > 2 else 15)
