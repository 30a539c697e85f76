"""Cosine similarity of two token sets, normalisation fused: [B, N, D] x [B, M, D] -> [B, N, M] fp32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtc.kernels.triton import _utils
from vtc.kernels.triton._utils import cosine_tile


@triton.jit
def _cosine_kernel(
    x_ptr,
    y_ptr,
    out_ptr,  # [B, N, M] fp32
    n,
    m,
    d,
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] tokens of x
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] tokens of y
    row_ok = rows < n
    col_ok = cols < m
    sim, _, _ = cosine_tile(
        x_ptr + b * stride_xb,
        rows.to(tl.int64) * stride_xn,
        row_ok,
        y_ptr + b * stride_yb,
        cols.to(tl.int64) * stride_yn,
        col_ok,
        d,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        NATIVE_DOT,
    )  # [BM, BN]
    out = out_ptr + b * n * m + rows.to(tl.int64)[:, None] * m + cols[None, :]
    tl.store(out, sim, mask=row_ok[:, None] & col_ok[None, :])


def blocks(n: int, m: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D). The interpreter pays per program, so it gets a few large tiles."""
    if _utils.INTERPRETED:
        return _utils.pow2(n, 16, 256), _utils.pow2(m, 16, 256), _utils.pow2(d, 16, 256)
    return 64, 64, 32  # with 8 warps: no register spills on sm_90, fp32 or bf16


def cosine_similarity(x: torch.Tensor, y: torch.Tensor, *, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """[B, N, D] x [B, M, D] -> [B, N, M] fp32 cosine similarity (see vtc.kernels.cosine_similarity)."""
    x = _utils.rows_contiguous(x)
    y = x if y is x else _utils.rows_contiguous(y)
    b, n, d = x.shape
    m = y.shape[1]
    out = _utils.empty((b, n, m), torch.float32, x.device)
    if out.numel() == 0:
        return out
    bm, bn, bd = block or blocks(n, m, d)
    grid = (b, triton.cdiv(n, bm), triton.cdiv(m, bn))
    _cosine_kernel[grid](
        x,
        y,
        out,
        n,
        m,
        d,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        NATIVE_DOT=_utils.native_dot(x.dtype) and x.dtype == y.dtype,
        num_warps=8,
        enable_fp_fusion=_utils.FP_FUSION,
    )
    return out
