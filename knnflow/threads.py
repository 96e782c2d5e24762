"""CPU threads of torch and of numpy/scipy's BLAS, for the duration of one piece of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from knnflow.errors import OptionError


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the body with `threads` CPU threads in torch and in the BLAS libraries numpy and
    scipy load (threadpoolctl); None leaves the defaults. torch's count is restored after."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise OptionError(f"must be at least 1, got {threads}", "threads")
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)
