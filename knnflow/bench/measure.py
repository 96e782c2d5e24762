"""Measuring: peak extra memory (glibc's heap in use, sampled by a thread; CUDA's peak on
a GPU) and relative errors."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from knnflow.timing import sync as _sync


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_reader() -> Callable[[], int] | None:
    """Bytes malloc has handed out (main-arena heap plus mmapped blocks, glibc's mallinfo2),
    or None where that is not available. torch's CPU tensors come from malloc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return read


class PeakMemory:
    """Peak extra memory of a block: the CUDA allocator's peak on a GPU; on a CPU, the peak of
    malloc's bytes in use, read by a busy thread (glibc only; None elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None

    @contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        if self.device.type == "cuda":
            _sync(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            _sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - base
            return
        read = heap_reader()
        if read is None:
            yield self
            return
        base = read()
        peak, done = [base], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], read())
                time.sleep(0)  # yield the GIL; a busy reader catches short-lived peaks

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()
            self.peak_bytes = max(peak[0], read()) - base


def peak_extra_bytes(fn: Callable[[], object], device: torch.device,
                     min_seconds: float = 0.1) -> int | None:
    """Peak extra memory of fn(), called repeatedly for at least `min_seconds` so that the
    sampling thread sees its short-lived peaks too."""
    meter = PeakMemory(device)
    with meter.measure():
        start = time.perf_counter()
        while True:
            fn()
            if time.perf_counter() - start >= min_seconds:
                break
    return meter.peak_bytes


def relative_errors(estimate: Tensor, reference: Tensor) -> Tensor:
    """‖estimate - reference‖ / ‖reference‖ per row, in float64."""
    estimate, reference = estimate.to(torch.float64).cpu(), reference.to(torch.float64).cpu()
    return (estimate - reference).norm(dim=1) / reference.norm(dim=1).clamp(min=1e-300)
