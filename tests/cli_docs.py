"""docs/cli.md, generated from the typer app: `make cli-docs` writes it, and
tests/test_cli.py checks that it is current."""

from __future__ import annotations

import html
import subprocess
import sys
from pathlib import Path

HEADER = ("<!-- Generated from the typer app: typer knnflow.cli.main utils docs --name knnflow"
          " (make cli-docs) -->\n\n")


def cli_docs() -> str:
    typer = Path(sys.executable).with_name("typer")
    text = subprocess.run([str(typer), "knnflow.cli.main", "utils", "docs", "--name", "knnflow"],
                          capture_output=True, text=True, check=True,
                          env={"COLUMNS": "200", "PATH": ""}).stdout
    return HEADER + html.unescape(text)


if __name__ == "__main__":
    sys.stdout.write(cli_docs())
