"""Shared pieces of the Triton launchers: output allocation, block sizes, the cosine tile."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

# Triton decides at decoration time (i.e. when these modules are imported) whether kernels are
# compiled or interpreted (TRITON_INTERPRET=1); record the mode the kernels actually have.
INTERPRETED = bool(knobs.runtime.interpret)

# Fused multiply-add contraction: Triton's default through 3.9 (3.10 turns it off). Passed explicitly
# so results do not change with the Triton release (and Triton does not warn about the default).
FP_FUSION = True

EPS = 1e-12  # as reference.cosine_similarity: x / max(||x||, EPS)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must write completely comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """Next power of two >= n, clamped to [lo, hi]."""
    p = max(lo, triton.next_power_of_2(max(n, 1)))
    return p if hi is None else min(p, hi)


def native_dot(dtype: torch.dtype) -> bool:
    """fp16 / bf16 tiles go to tl.dot as they are (exact products, fp32 accumulation); fp32 uses
    input_precision="ieee" (no TF32, selections must match the fp32 reference). Triton 3.9's
    interpreter computes bf16 tl.dot wrongly, so there bf16 tiles are upcast first (same result)."""
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not INTERPRETED


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels address rows by stride and expect unit stride along the last dimension."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def cosine_tile(
    a_ptr,
    a_rows,  # [BM] int64 element offset of each row of a
    a_valid,  # [BM] bool
    b_ptr,
    b_rows,  # [BN] int64
    b_valid,  # [BN] bool
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    """Cosine similarity of two row tiles, [BM] x [BN] -> [BM, BN] fp32, normalisation fused:
    dot(a, b) / (max(|a|, EPS) * max(|b|, EPS)), the squared norms summed from the same loads.
    Also returns the inverse norms [BM], [BN] (0 for a row whose squared norm overflows fp32)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < d
        a = tl.load(a_ptr + a_rows[:, None] + cols[None, :], mask=a_valid[:, None] & in_d[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] + cols[None, :], mask=b_valid[:, None] & in_d[None, :], other=0.0)
        a32 = a.to(tl.float32)  # [BM, BD]
        b32 = b.to(tl.float32)  # [BN, BD]
        a_sq += tl.sum(a32 * a32, axis=1)
        b_sq += tl.sum(b32 * b32, axis=1)
        acc = tl.dot(a, tl.trans(b), acc) if NATIVE_DOT else tl.dot(a32, tl.trans(b32), acc, input_precision="ieee")
    # Rounded-to-nearest sqrt and division (tl.sqrt / "/" may be approximate on the GPU).
    a_inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(a_sq), 1e-12))  # [BM]
    b_inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(b_sq), 1e-12))  # [BN]
    return scale_cosine(acc, a_inv[:, None], b_inv[None, :]), a_inv, b_inv


@triton.jit
def scale_cosine(dot, a_inv, b_inv):
    """dot * a_inv * b_inv, but 0 where an inverse norm is 0: a finite row whose squared norm overflows
    fp32 (|x| > ~1.8e19) acts as a zero vector, as in the reference (x / inf = 0), not as NaN (inf * 0)."""
    # Nested, not "|": a scalar a_inv (one pick's row) would make Triton 3.9's interpreter fail on bool | tensor.
    return tl.where(a_inv == 0.0, 0.0, tl.where(b_inv == 0.0, 0.0, dot * a_inv * b_inv))
