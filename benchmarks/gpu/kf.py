"""The knnflow commands the GPU checks use (build-index, bench), without the rest of the CLI,
run from a checkout without installing: python3 benchmarks/gpu/kf.py bench knn --device cuda."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import typer  # noqa: E402

from cli import bench_commands, data_commands  # noqa: E402
from knnflow.errors import KnnflowError  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("build-index")(data_commands.build_index)
app.add_typer(bench_commands.app, name="bench")

if __name__ == "__main__":
    try:
        app()
    except KnnflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
