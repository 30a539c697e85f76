"""Duplication-aware selection against pivots (DART): similarity to the pivots, then per-pivot top-k.

Two launches:

1. ``_pivot_similarity_kernel``, grid (B, N / BN): cosine similarity of every token to the pivot rows,
   read by index (no gathered copy), normalisation fused -> [B, P, N] fp32.
2. ``_pivot_pick_kernel``, one program per sample, the whole row in registers (N <= MAX_TOKENS):
   pivots and protected tokens are chosen, the remaining budget is split over the row's pivots as
   in the reference, then pivot j (in order) takes the ``count_j`` unchosen tokens of lowest
   similarity to it. The count_j-th smallest similarity is found by bisection on an order-preserving
   int32 key of the float (32 counting passes, exact); ties at the threshold go to the lowest index.
   The chosen mask is compacted into sorted indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtc.kernels.triton import _utils
from vtc.kernels.triton._utils import cosine_tile

MAX_TOKENS = 16384  # one program holds a row's keys and mask in registers


@triton.jit
def _pivot_similarity_kernel(
    x_ptr,
    pivots_ptr,  # [B, P] int
    sim_ptr,  # [B, P, N] fp32
    n,
    p,
    d,
    stride_xb,
    stride_xn,
    stride_pb,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    slots = tl.arange(0, BLOCK_P)  # [BP]
    row_ok = rows < n
    slot_ok = slots < p
    pivots = tl.load(pivots_ptr + b * stride_pb + slots, mask=slot_ok, other=0).to(tl.int64)  # [BP]
    x_b = x_ptr + b * stride_xb
    sim, _, _ = cosine_tile(
        x_b,
        rows.to(tl.int64) * stride_xn,
        row_ok,
        x_b,
        pivots * stride_xn,
        slot_ok,
        d,
        BLOCK_N,
        BLOCK_P,
        BLOCK_D,
        NATIVE_DOT,
    )  # [BN, BP]
    out = sim_ptr + b * p * n + slots[None, :] * n + rows[:, None]
    tl.store(out, sim, mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def _pivot_pick_kernel(
    sim_ptr,  # [B, P, N] fp32
    pivots_ptr,  # [B, P] int
    used_ptr,  # [B] int64: pivots each row uses (the first ones)
    protected_ptr,  # [B, N] bool (if HAS_PROTECTED)
    out_ptr,  # [B, K] int64 sorted
    n,
    p,
    k,
    stride_pb,
    HAS_PROTECTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)  # [BN], the whole row
    valid = offs < n
    chosen = valid & (tl.load(protected_ptr + b * n + offs, mask=valid, other=0) != 0) if HAS_PROTECTED else offs < 0
    used = tl.load(used_ptr + b)
    for j in range(p):
        pivot = tl.load(pivots_ptr + b * stride_pb + j).to(tl.int64)
        # -1 for unused pivots (not "& (j < used)": Triton 3.9's interpreter turns bool & scalar into int32).
        chosen = chosen | (offs == tl.where(j < used, pivot, -1))
    rest = k - tl.sum(chosen.to(tl.int64), axis=0)
    divisor = tl.maximum(used, 1)
    share = rest // divisor
    extra = rest % divisor
    for j in range(p):
        count = tl.where(j < used, share + (j < extra).to(tl.int64), 0)
        if count > 0:
            sim = tl.load(sim_ptr + b * p * n + j * n + offs, mask=valid, other=0.0)  # [BN]
            # NaN (a non-finite token) is the least similar, as in the reference; its key would otherwise
            # depend on the NaN's sign bit.
            sim = tl.where(sim != sim, float("-inf"), sim)
            bits = (-sim).to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # [BN] int32 ordered like -sim: larger = less similar
            free = valid & ~chosen
            # Largest t with #(free & key >= t) >= count: the invariant holds at lo and fails above hi
            # (bounds in int64 so that hi - lo + 1 cannot overflow; every mid fits int32).
            lo = tl.full((), -2147483648, dtype=tl.int64)
            hi = tl.full((), 2147483647, dtype=tl.int64)
            for _ in range(32):
                mid = lo + (hi - lo + 1) // 2
                enough = tl.sum((free & (key >= mid.to(tl.int32))).to(tl.int32), axis=0) >= count
                lo = tl.where(enough, mid, lo)
                hi = tl.where(enough, hi, mid - 1)
            threshold = lo.to(tl.int32)
            above = free & (key > threshold)
            tied = free & (key == threshold)
            need = count - tl.sum(above.to(tl.int64), axis=0)
            first_tied = tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need)
            chosen = chosen | above | first_tied
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + b * k + slot, offs.to(tl.int64), mask=chosen & (slot < k))


def pick_warps(block_n: int) -> int:
    """Warps for the pick program: the whole row is spread over them (8192 tokens: 16 per thread)."""
    return 32 if block_n >= 16384 else 16 if block_n >= 4096 else 8


def blocks(n: int, p: int, d: int) -> dict[str, int]:
    if _utils.INTERPRETED:
        return {"BLOCK_N": _utils.pow2(n, 16, 1024), "BLOCK_D": _utils.pow2(d, 16, 256)}
    return {"BLOCK_N": 64, "BLOCK_D": 32}  # no register spills on sm_90 (tests/kernels/compile_kernels.py)


def pivot_select(
    x: torch.Tensor,
    pivots: torch.Tensor,
    k: int,
    protected: torch.Tensor | None = None,
    num_pivots: torch.Tensor | None = None,
    *,
    block: dict[str, int] | None = None,
) -> torch.Tensor:
    """[B, N, D], [B, P] pivots -> [B, k] sorted indices (see vtc.kernels.pivot_select)."""
    x = _utils.rows_contiguous(x)
    pivots = pivots.contiguous()
    b, n, d = x.shape
    p = pivots.shape[1]
    if n > MAX_TOKENS:
        raise ValueError(f"the triton pivot_select holds a row in one program: N <= {MAX_TOKENS}, got {n}")
    cfg = blocks(n, p, d) | (block or {})
    device = x.device
    sim = _utils.empty((b, p, n), torch.float32, device)
    grid = (b, triton.cdiv(n, cfg["BLOCK_N"]))
    _pivot_similarity_kernel[grid](
        x,
        pivots,
        sim,
        n,
        p,
        d,
        x.stride(0),
        x.stride(1),
        pivots.stride(0),
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_P=_utils.pow2(p, 16),
        BLOCK_D=cfg["BLOCK_D"],
        NATIVE_DOT=_utils.native_dot(x.dtype),
        enable_fp_fusion=_utils.FP_FUSION,
    )
    if num_pivots is None:
        used = torch.full((b,), p, dtype=torch.int64, device=device)
    else:
        used = num_pivots.to(device=device, dtype=torch.int64).contiguous()
    prot = protected.contiguous() if protected is not None else used  # placeholder when absent
    out = _utils.empty((b, k), torch.int64, device)
    block_n = _utils.pow2(n, 16)
    _pivot_pick_kernel[(b,)](
        sim,
        pivots,
        used,
        prot,
        out,
        n,
        p,
        k,
        pivots.stride(0),
        HAS_PROTECTED=protected is not None,
        BLOCK_N=block_n,
        num_warps=pick_warps(block_n),
        enable_fp_fusion=_utils.FP_FUSION,
    )
    return out
