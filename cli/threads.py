"""--threads, the option of knnflow.threads.cpu_threads."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ThreadsOption = Annotated[Optional[int], typer.Option(
    help="CPU threads of torch and of numpy/scipy's BLAS (default: the libraries' own, one "
         "per core). On a shared machine fewer can be faster: on 2 cores under load, one "
         "thread trained digits at 4.6 s/step against 12.0 s with two.")]
