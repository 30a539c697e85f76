"""Size-weighted merge: every token is added, weighted by its size, into its target kept slot.

``_merge_scatter_kernel``, grid (B, N / BN, D / BD): fp32 atomic adds of x * size into [B, K, D] sums
and of size into [B, K] totals; ``_merge_divide_kernel`` writes sums / totals in x's dtype. The fp32
atomics make the summation order, and so the last bits, vary between GPU runs (as torch's CUDA
scatter_add_ does); the reference sums in index order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtc.kernels.triton import _utils


@triton.jit
def _merge_scatter_kernel(
    x_ptr,
    targets_ptr,  # [B, N] int, slot 0..K-1 of each token
    sizes_ptr,  # [B, N] (if HAS_SIZES)
    sums_ptr,  # [B, K, D] fp32, zeroed
    totals_ptr,  # [B, K] fp32, zeroed
    n,
    k,
    d,
    stride_xb,
    stride_xn,
    stride_tb,
    stride_sb,
    HAS_SIZES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < n
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    slot = tl.load(targets_ptr + b * stride_tb + rows, mask=row_ok, other=0).to(tl.int64)  # [BN]
    if HAS_SIZES:
        size = tl.load(sizes_ptr + b * stride_sb + rows, mask=row_ok, other=0).to(tl.float32)
    else:
        size = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    x = tl.load(x_ptr + b * stride_xb + rows.to(tl.int64)[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
    tl.atomic_add(sums_ptr + (b * k + slot)[:, None] * d + cols[None, :], x.to(tl.float32) * size[:, None], mask=mask)
    if tl.program_id(2) == 0:
        tl.atomic_add(totals_ptr + b * k + slot, size, mask=row_ok)


@triton.jit
def _merge_divide_kernel(
    sums_ptr,  # [B * K, D] fp32
    totals_ptr,  # [B * K] fp32
    out_ptr,  # [B * K, D] in x's dtype
    rows_total,
    d,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mask = (rows < rows_total)[:, None] & (cols < d)[None, :]
    at = rows.to(tl.int64)[:, None] * d + cols[None, :]
    total = tl.load(totals_ptr + rows, mask=rows < rows_total, other=1.0)
    value = tl.load(sums_ptr + at, mask=mask, other=0.0) / total[:, None]  # [BK, BD] fp32
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: Triton 3.9's interpreter truncates fp32 -> bf16 casts (the GPU
        # rounds); the same code on both keeps the interpreter tests meaningful.
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + at, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + at, value.to(out_ptr.dtype.element_ty), mask=mask)


def blocks(n: int, d: int) -> tuple[int, int]:
    if _utils.INTERPRETED:
        return _utils.pow2(n, 16, 1024), _utils.pow2(d, 16, 1024)
    return 32, _utils.pow2(d, 16, 128)


def merge_rows(
    x: torch.Tensor,
    kept: torch.Tensor,
    targets: torch.Tensor,
    sizes: torch.Tensor | None = None,
    *,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """[B, N, D] -> [B, K, D] size-weighted group means (see vtc.kernels.merge_rows)."""
    x = _utils.rows_contiguous(x)
    targets = targets.contiguous()
    b, n, d = x.shape
    k = kept.shape[1]
    sums = torch.zeros((b, k, d), dtype=torch.float32, device=x.device)
    totals = torch.zeros((b, k), dtype=torch.float32, device=x.device)
    out = _utils.empty((b, k, d), x.dtype, x.device)
    if out.numel() == 0:
        return out
    if sizes is not None:
        sizes = sizes.contiguous()
    bn, bd = block or blocks(n, d)
    _merge_scatter_kernel[(b, triton.cdiv(n, bn), triton.cdiv(d, bd))](
        x, targets, sizes if sizes is not None else targets, sums, totals, n, k, d,
        x.stride(0), x.stride(1), targets.stride(0), sizes.stride(0) if sizes is not None else 0,
        HAS_SIZES=sizes is not None, BLOCK_N=bn, BLOCK_D=bd, enable_fp_fusion=_utils.FP_FUSION,
    )  # fmt: skip
    bk, bd = block or blocks(b * k, d)
    _merge_divide_kernel[(triton.cdiv(b * k, bk), triton.cdiv(d, bd))](
        sums, totals, out, b * k, d, BLOCK_K=bk, BLOCK_D=bd, enable_fp_fusion=_utils.FP_FUSION
    )
    return out
