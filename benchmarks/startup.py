"""Start-up time of the command line: median wall seconds of `knnflow ARGS` for help and an
option error, for one or several checkouts, interleaved.

    python benchmarks/startup.py [--tree DIR ...] [--repeats 5]

Each tree's cli/ and knnflow/ run with this interpreter (PYTHONPATH=DIR), so a worktree of an
older commit compares with the current one on the same machine and in the same minutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = (["--help"], ["train", "--help"], ["memorization", "--no-such-option"])
RUN = "import sys; sys.argv = ['knnflow', *sys.argv[1:]]; from cli.main import run; run()"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path,
                        help="checkout to time (repeatable; default: this one)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per case and tree")
    args = parser.parse_args()
    trees = args.tree or [Path(__file__).resolve().parents[1]]
    for case in CASES:
        seconds: dict[Path, list[float]] = {tree: [] for tree in trees}
        for _ in range(args.repeats):
            for tree in trees:
                env = dict(os.environ, PYTHONPATH=str(tree))
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", RUN, *case], cwd=tree, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                seconds[tree].append(time.perf_counter() - start)
        cells = "  ".join(f"{tree.name}: {statistics.median(v):.2f} s"
                          for tree, v in seconds.items())
        print(f"knnflow {' '.join(case):32s} {cells}", flush=True)


if __name__ == "__main__":
    main()
