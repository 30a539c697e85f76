"""Row gather by index: batched [B, N, D] x [B, K] -> [B, K, D], and packed variable-length sequences.

Values are copied in their own dtype (bit-exact). Indices are not range-checked (the torch op
raises on an out-of-range index; this kernel would read outside the sequence).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtc.kernels.triton import _utils


@triton.jit
def _gather_kernel(
    x_ptr,
    idx_ptr,  # [B, K] (batched) or [K_total] (varlen), local row indices
    out_ptr,
    cu_x_ptr,  # [S + 1] first row of each packed sequence of x (if VARLEN)
    cu_idx_ptr,  # [S + 1] first entry of each sequence in idx (if VARLEN)
    num_rows,  # K (batched) or K_total (varlen)
    num_seqs,  # S (varlen)
    d,
    stride_xb,
    stride_xn,
    stride_ib,
    stride_ob,
    stride_on,
    VARLEN: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(S)) + 1 (varlen)
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK] output rows
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < num_rows
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    if VARLEN:
        # Sequence of each output row: the largest s with cu_idx[s] <= row (empty sequences skipped).
        lo = tl.zeros((BLOCK_K,), dtype=tl.int32)
        hi = tl.zeros((BLOCK_K,), dtype=tl.int32) + (num_seqs - 1)
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi + 1) // 2
            start = tl.load(cu_idx_ptr + mid, mask=row_ok, other=0)
            ahead = start <= rows
            lo = tl.where(ahead, mid, lo)
            hi = tl.where(ahead, hi, mid - 1)
        base = tl.load(cu_x_ptr + lo, mask=row_ok, other=0).to(tl.int64)  # [BK]
        local = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        src = x_ptr + (base + local)[:, None] * stride_xn + cols[None, :]
        dst = out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
    else:
        local = tl.load(idx_ptr + b * stride_ib + rows, mask=row_ok, other=0).to(tl.int64)  # [BK]
        src = x_ptr + b * stride_xb + local[:, None] * stride_xn + cols[None, :]
        dst = out_ptr + b * stride_ob + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


def blocks(k: int, d: int) -> tuple[int, int]:
    if _utils.INTERPRETED:
        return _utils.pow2(k, 16, 1024), _utils.pow2(d, 16, 1024)
    return 32, _utils.pow2(d, 16, 256)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, *, block: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, N, D] x [B, K] -> [B, K, D] (see vtc.kernels.gather_rows)."""
    x = _utils.rows_contiguous(x)
    idx = idx.contiguous()
    b, _, d = x.shape
    k = idx.shape[1]
    out = _utils.empty((b, k, d), x.dtype, x.device)
    if out.numel() == 0:
        return out
    bk, bd = block or blocks(k, d)
    grid = (b, triton.cdiv(k, bk), triton.cdiv(d, bd))
    _gather_kernel[grid](
        x, idx, out, idx, idx, k, 1, d, x.stride(0), x.stride(1), idx.stride(0), out.stride(0), out.stride(1),
        VARLEN=False, SEARCH_STEPS=0, BLOCK_K=bk, BLOCK_D=bd, enable_fp_fusion=_utils.FP_FUSION,
    )  # fmt: skip
    return out


def gather_rows_varlen(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens_idx: torch.Tensor,
    *,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Packed [T, D], local indices [K_total] -> [K_total, D] (see vtc.kernels.gather_rows_varlen)."""
    x = _utils.rows_contiguous(x)
    idx = idx.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    cu_seqlens_idx = cu_seqlens_idx.contiguous()
    d = x.shape[1]
    k_total = idx.shape[0]
    num_seqs = cu_seqlens_idx.shape[0] - 1
    out = _utils.empty((k_total, d), x.dtype, x.device)
    if out.numel() == 0:
        return out
    bk, bd = block or blocks(k_total, d)
    grid = (1, triton.cdiv(k_total, bk), triton.cdiv(d, bd))
    _gather_kernel[grid](
        x, idx, out, cu_seqlens, cu_seqlens_idx, k_total, num_seqs, d, 0, x.stride(0), 0, 0, out.stride(0),
        VARLEN=True, SEARCH_STEPS=max(1, num_seqs).bit_length() + 1, BLOCK_K=bk, BLOCK_D=bd,
        enable_fp_fusion=_utils.FP_FUSION,
    )  # fmt: skip
    return out
