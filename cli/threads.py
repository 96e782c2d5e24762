"""--threads: the CPU threads of torch and of numpy/scipy's BLAS for one command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

from knnflow.errors import InputError

ThreadsOption = Annotated[Optional[int], typer.Option(
    help="CPU threads of torch and of numpy/scipy's BLAS (default: the libraries' own, one "
         "per core). On a shared machine fewer can be faster: on 2 cores under load, one "
         "thread trained digits at 4.6 s/step against 12.0 s with two.")]


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the body with `threads` CPU threads (None: leave the defaults)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)
