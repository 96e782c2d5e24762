"""The exact engine's tuning knobs (closed_form.py), one frozen record per device kind.

A knob here changes how fast the engine runs and how much memory it takes, never what it
promises: whatever these values are, a row whose estimated error stays above FLOAT64_TARGET
after the head corrections is computed again with every live weight exact. The numbers are
measured choices: per chunk a row's live weights cost ~0.25 µs each in a sparse product
against ~45 µs for a dense row of 2,048 × 3,072 in the second GEMM (CPU), and each chunk
costs ~100 kernel launches and a few host syncs on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineSettings:
    """How the streaming engine divides its work on one kind of device.

    chunk: training points per chunk, the default `chunk_size` (a call may pass another).
    The row limits are per `row_limit_columns` columns and scale with the chunk actually
    streamed: `sparse_limit(chunk_size)` and `exact_limit(chunk_size)`; the float32 sums
    move into float64 every `flush_every(chunk_size)` chunks.

    Per chunk a row's live weights (within the dropped-mass margin of its running top) are
    counted: a row with at most exact_row_limit of them keeps them for exact evaluation at
    the end, when the final top prunes most (a sparse product costs ~3 ms a chunk however
    few its weights); one with at most sparse_row_limit sums them by a sparse product; the
    others take the second GEMM. When at least all_dense_share of a chunk's rows are dense,
    every row takes the GEMM, and the next chunks skip the count, looking again every
    recheck_dense_every chunks. flush_terms: terms per float32 sum before it moves into
    float64 (a sum of K terms of one sign errs by ~u·√K, which the error estimate counts).
    ref_slack: the dense sums' references trail the running top by up to this many nats
    (weights up to e^ref_slack enter the float32 sums, far inside their range), so they are
    rescaled rarely.

    Heads (the largest screened weights, candidates for exact recomputation): recorded
    within head_nats of the running top, widened by 2·log(typical / head_growth_nats) for
    coarser screens, at most head_max per row; a row with more than head_chunk_max within
    its margin in one chunk records only those within head_near_nats of its top there; no
    weight below head_share_min of the total is recorded. Weights left unrecorded are
    bounded and counted by the error estimate, so these knobs move work between the head
    corrections and the exact recomputation, not the accuracy.

    One pass (small sets: n·d ≤ small_set_numbers within one chunk): weights below
    e^-one_pass_floor_nats of a row's top are held at that value, keeping the second GEMM
    away from float32 subnormals; a row made exact from float64 differences has at most
    one_pass_pair_rows live weights, others take a float64 GEMM.

    The int8 digits (int_screen.py, grid_digits.py), where int_screen is on and int8 GEMMs
    run fast here: rows first take the int8 screen (closed_form._int_pass) and leave it once
    a chunk holds more than int_row_limit live weights per row_limit_columns (all leave when
    fewer than int_min_rows stay after the first chunk, a probe); it keeps 2 bytes per
    number of the data, or 1 over a grid, up to int_screen_max_bytes. grid_gemms: over data
    on an 8-bit grid, the dense rows take int8 GEMMs for both products too.

    The engine's contracts stay module constants of closed_form.py, because changing them
    changes what a result promises rather than how fast it comes: ACCURACY_TARGET and
    FLOAT64_TARGET (the accuracy every row meets), DROPPED_MASS_NATS (dropped weights hold
    less than float64 rounding of the sums), SCREEN_SAFETY (the error estimate's factor,
    checked against measured errors), DENSE_T_MAX, DENSE_TYPICAL_MAX and HEAD_SKIP_NATS
    (where the float32 path and its error model hold), NORMALISER_NATS and NORMALISER_SHARE
    (which weights are always exact, so that log Z and max λ err only by what stays
    screened) and FLOAT32_SCREEN_MAX (float32's range).
    """

    chunk: int
    row_limit_columns: int = 2048
    sparse_row_limit: int = 192
    exact_row_limit: int = 4
    all_dense_share: float = 0.85
    recheck_dense_every: int = 4
    flush_terms: int = 8192
    ref_slack: float = 20.0
    head_nats: float = 10.0
    head_growth_nats: float = 1e-3
    head_max: int = 256
    head_chunk_max: int = 64
    head_near_nats: float = 3.0
    head_share_min: float = 0.05
    small_set_numbers: int = 1 << 21
    one_pass_floor_nats: float = 60.0
    one_pass_pair_rows: int = 96
    int_screen: bool = True
    int_row_limit: int = 16
    int_min_rows: int = 64
    int_screen_max_bytes: int = 8 << 30
    grid_gemms: bool = True

    def sparse_limit(self, chunk_size: int) -> int:
        """Live weights per row of a chunk of chunk_size points up to which the row's weights
        are summed by a sparse product instead of the second GEMM."""
        return self.sparse_row_limit * chunk_size // self.row_limit_columns

    def exact_limit(self, chunk_size: int) -> int:
        """Live weights per row of a chunk of chunk_size points up to which they are kept for
        exact evaluation at the end."""
        return self.exact_row_limit * chunk_size // self.row_limit_columns

    def int_limit(self, chunk_size: int) -> int:
        """Live weights per row of a chunk of chunk_size points up to which a row stays on
        the int8 screen (closed_form._int_pass)."""
        return self.int_row_limit * chunk_size // self.row_limit_columns

    def flush_every(self, chunk_size: int) -> int:
        """Chunks of chunk_size points per float32 sum before it moves into float64."""
        return max(1, self.flush_terms // chunk_size)


# 8,192 points per chunk on CPUs: n = 45,000 takes 6 chunks (fewer per-chunk operations), a
# chunk's B × 8,192 logits still fit the L3 cache, and a U[0,1) batch of photos reads 103% of
# the two-GEMM limit against 86% at 2,048. 16,384 on GPUs, where each chunk costs ~100 kernel
# launches and a few host syncs: at 2,048 points a chunk, n = 50,000 spends 50 ms in launches
# for 8 ms of kernels (H200).
CPU_SETTINGS = EngineSettings(chunk=8192)
CUDA_SETTINGS = EngineSettings(chunk=16384, int_screen=False)


def engine_settings(device: torch.device) -> EngineSettings:
    """The settings the exact engine uses on `device`."""
    return CUDA_SETTINGS if device.type == "cuda" else CPU_SETTINGS
