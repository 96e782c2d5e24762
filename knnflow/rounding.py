"""Floating-point rounding: the unit roundoffs, the rounding of matmul inputs under torch's
float32 matmul settings (TF32, bf16), the proven and typical error of screened logits, and the
dtype results come back in."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT32_ROUNDOFF = 2.0**-24
FLOAT64_ROUNDOFF = 2.0**-53

TF32_ROUNDOFF = 2.0**-10  # tensor cores read 10 mantissa bits: truncation, not rounding
BF16_ROUNDOFF = 2.0**-7    # 7 stored mantissa bits, truncated in the worst case


def _fp32_precision(backend) -> str | None:
    """A backend's float32 matmul mode under torch's newer setting ('ieee', 'tf32', 'bf16'),
    inherited from torch.backends.fp32_precision where it says 'none'; None where unset."""
    mode = getattr(backend, "fp32_precision", None)
    if mode in (None, "none"):
        mode = getattr(torch.backends, "fp32_precision", None)
    return None if mode in (None, "none") else mode


def matmul_input_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """Relative rounding of a matmul's inputs under torch's current float32 matmul settings.

    0 for full-precision float32 or float64; TF32_ROUNDOFF where TF32 is allowed,
    BF16_ROUNDOFF for bf16. Reads torch's newer per-backend setting (fp32_precision) first and
    the older flags only where it is unset: once the newer one is used, reading the older
    ones raises. Where the older ones cannot be read either, the coarser rounding is assumed.
    """
    if dtype == torch.float64:
        return 0.0
    if device.type == "cuda":
        mode = _fp32_precision(torch.backends.cuda.matmul)
        if mode is None:
            try:
                mode = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
            except RuntimeError:
                mode = "tf32"
        return TF32_ROUNDOFF if mode == "tf32" else 0.0
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    mode = _fp32_precision(mkldnn) if mkldnn is not None else None
    if mode is None:
        try:
            mode = {"highest": "ieee", "high": "tf32"}.get(
                torch.get_float32_matmul_precision(), "bf16")
        except RuntimeError:
            mode = "bf16"
    return {"ieee": 0.0, "tf32": TF32_ROUNDOFF}.get(mode, BF16_ROUNDOFF)


def screening_error_bound(x_norm: Tensor, t: Tensor | float, max_norm: float, dim: int,
                          dtype: torch.dtype, device: torch.device,
                          s: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """(proven, typical) bounds on |screened logit - exact logit| in nats, per query (t per
    query or one float for all; s: the caller's 1/(2(1-t)²), where it has them).

    The screened logit is fl(fl(a·x)·x_j) - fl(b·‖x_j‖²) with a = 2st, b = st², s = 1/(2(1-t)²).
    With A = a‖x‖R and Bn = bR² (R the largest data norm), a dot product of length d has error
    at most γ_d·Σ|a_i||b_i| ≤ γ_d‖a‖‖b‖ in any summation order (γ_d = du/(1-du)); rounding a·x,
    the norm product and the final sum add a few u·(A + Bn). Inputs rounded for TF32 or bf16 add
    2·u_in·A. The typical bound u·(A + Bn) follows the measured float32 GEMM error (≤ 0.5u‖a‖‖b‖
    at d = 3072) and decides which weights to recompute for accuracy; the proven one decides
    which weights may be skipped.
    """
    u = FLOAT64_ROUNDOFF if dtype == torch.float64 else FLOAT32_ROUNDOFF
    u_in = matmul_input_roundoff(dtype, device)
    gamma = dim * u / (1 - dim * u)
    # a_term = 2st·‖x‖·R and b_term = st²·R² (few ops: this runs on every call of the exact
    # engine)
    if s is None:
        s = 0.5 / (1 - t) ** 2
    st = s * t
    a_term = (x_norm * st).mul_(2 * max_norm)
    b_term = st * t * max_norm**2
    proven = torch.add(a_term * (1.01 * (gamma + 2 * u_in + 4 * u)), b_term,
                       alpha=1.01 * 6 * u)
    typical = (a_term + b_term).mul_(u + 2 * u_in)
    return proven, typical


def output_dtype(x: Tensor) -> torch.dtype:
    """The dtype results come back in for queries x: x's own, but float32 for float16 and
    bfloat16 queries (rounding to those, 2^-11 and 2^-8 relative, would exceed the engine's
    accuracy, and large velocities would overflow float16)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def unit_roundoff(dtype: torch.dtype) -> float:
    """u with |fl(v) - v| ≤ u·|v| for rounding to `dtype` (round to nearest)."""
    return torch.finfo(dtype).eps / 2
