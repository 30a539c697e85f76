"""Greedy max-min diversity selection (DivPrune) under cosine distance, k picks per sample in one kernel.

Two launches:

1. ``_nearest_kernel``, grid (B, N / BM, N / BN), all SMs: cosine tiles of x against itself; each
   tile's row maximum, self excluded, goes to ``nearest[b, i]`` with an atomic max (order-free, so
   deterministic): every token's nearest-neighbour similarity, for the first pick. With
   ``materialize`` the tiles are also stored ([B, N, N] fp32); otherwise only the inverse norms ([B, N]).
2. ``_pick_kernel``, one program per sample, all k picks in one launch: the running min-distance
   vector lives in a [B, N] fp32 scratch buffer (Triton cannot index a register tensor by tile, and
   N = 8192 is tiled). Each pick is one pass over N: the distance of the last pick to every token
   (a row of the stored matrix, or 1 - cos computed on the fly from the features and inverse norms),
   the min update, the "picked" mark (-inf) and the running argmax for the next pick (ties: lowest
   index) are fused. A last pass compacts the -inf marks into sorted indices. A barrier ends every
   pass, so no thread reads a scratch element before the pass that wrote it is complete, whatever
   register layout the compiler gives each pass.

Which distances a pick reads: recomputing them costs N x D multiply-adds and reads per pick inside one
program (one SM), k N D in all: at LLaVA-1.5's N = 576, D = 4096, k = 64 that is ~150 M fp32 FMAs
and ~600 MB of L2 reads on a single SM, milliseconds. Storing the matrix moves that work into the
parallel similarity pass (N N D, tensor cores for fp16 / bf16) and leaves k reads of N floats. So
by default the matrix is stored, for as many samples at a time as fit MATERIALIZE_BYTES (chunks of
the batch), and only a sample whose N x N alone exceeds it is recomputed on the fly (``materialize``
forces either; benchmarks/kernel_ops.py times both). The torch reference always stores it, with copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtc.kernels.triton import _utils
from vtc.kernels.triton._utils import cosine_tile, scale_cosine

# The similarity matrix is stored for as many samples at a time as fit here (N = 576: 1.3 MB per
# image, 2880: 33 MB, 8192: 268 MB); a sample whose N x N alone is larger (N > 11585) is recomputed.
MATERIALIZE_BYTES = 512 * 2**20


@triton.jit
def _distance(cos):
    """1 - cos as the running min and argmax may use it (the reference's rule): NaN (a non-finite token)
    counts as +inf, farthest and never a minimum, and -inf is lifted to the lowest finite value, so the
    only -inf scores are the picked marks; otherwise a token could be picked twice or never written."""
    dist = 1.0 - cos
    return tl.where(dist != dist, float("inf"), tl.maximum(dist, -3.4028234663852886e38))  # fp32 lowest


@triton.jit
def _nearest_kernel(
    x_ptr,
    sim_ptr,  # [B, N, N] fp32, written if STORE_SIM
    inv_ptr,  # [B, N] fp32 inverse norms, written if not STORE_SIM
    nearest_ptr,  # [B, N] fp32, initialised to -inf; atomic max
    n,
    d,
    stride_xb,
    stride_xn,
    STORE_SIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < n
    col_ok = cols < n
    x_b = x_ptr + b * stride_xb
    sim, row_inv, _ = cosine_tile(
        x_b,
        rows.to(tl.int64) * stride_xn,
        row_ok,
        x_b,
        cols.to(tl.int64) * stride_xn,
        col_ok,
        d,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        NATIVE_DOT,
    )  # [BM, BN]
    if STORE_SIM:
        out = sim_ptr + b * n * n + rows.to(tl.int64)[:, None] * n + cols[None, :]
        tl.store(out, sim, mask=row_ok[:, None] & col_ok[None, :])
    elif tl.program_id(2) == 0:
        tl.store(inv_ptr + b * n + rows, row_inv, mask=row_ok)
    # A NaN similarity is the lowest (distance +inf): it never becomes a nearest neighbour.
    others = col_ok[None, :] & (rows[:, None] != cols[None, :]) & (sim == sim)
    best = tl.max(tl.where(others, sim, float("-inf")), axis=1)  # [BM]
    tl.atomic_max(nearest_ptr + b * n + rows, best, mask=row_ok)


@triton.jit
def _pick_kernel(
    x_ptr,
    sim_ptr,  # [B, N, N] fp32 if FROM_SIM
    inv_ptr,  # [B, N] fp32 if not FROM_SIM
    nearest_ptr,  # [B, N] fp32 nearest-neighbour similarity
    score_ptr,  # [B, N] fp32 scratch: running min distance to the picked set, -inf once picked
    protected_ptr,  # [B, N] int64: each row's protected indices first (if HAS_PROTECTED)
    num_protected_ptr,  # [B] int64 (if HAS_PROTECTED)
    order_ptr,  # [B, K] int64: picks in pick order
    out_ptr,  # [B, K] int64: picks sorted
    n,
    d,
    k,
    stride_xb,
    stride_xn,
    FROM_SIM: tl.constexpr,
    HAS_PROTECTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    x_b = x_ptr + b * stride_xb
    score_b = score_ptr + b * n
    num_protected = tl.load(num_protected_ptr + b) if HAS_PROTECTED else tl.zeros((), dtype=tl.int64)
    seeded = num_protected > 0

    # Initial scores: nearest-neighbour distance (paper), or +inf when protected tokens seed the set.
    best_val = tl.full((), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((), dtype=tl.int64)
    for n0 in range(0, n, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)  # [BN]
        valid = offs < n
        nearest = tl.load(nearest_ptr + b * n + offs, mask=valid, other=0.0)
        score = tl.where(seeded, float("inf"), _distance(nearest))
        tl.store(score_b + offs, score, mask=valid)
        cand = tl.where(valid, score, float("-inf"))
        top = tl.max(cand, axis=0)
        top_idx = tl.min(tl.where(valid & (cand == top), offs, n), axis=0).to(tl.int64)
        better = top > best_val
        best_idx = tl.where(better, top_idx, best_idx)
        best_val = tl.where(better, top, best_val)
    tl.debug_barrier()  # the scratch row is complete before any thread reads it back
    pick = best_idx
    if HAS_PROTECTED:
        pick = tl.where(seeded, tl.load(protected_ptr + b * n, mask=seeded, other=0), best_idx)

    for step in range(k):
        tl.store(order_ptr + b * k + step, pick)
        replace = (step == 0) & (num_protected == 0)  # after the first paper pick: distance to {pick} only
        if not FROM_SIM:
            pick_inv = tl.load(inv_ptr + b * n + pick)
        best_val = tl.full((), float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros((), dtype=tl.int64)
        for n0 in range(0, n, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)  # [BN]
            valid = offs < n
            if FROM_SIM:
                cos = tl.load(sim_ptr + b * n * n + pick * n + offs, mask=valid, other=0.0)
            else:
                dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for d0 in range(0, d, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    in_d = cols < d
                    tile = tl.load(
                        x_b + offs.to(tl.int64)[:, None] * stride_xn + cols[None, :],
                        mask=valid[:, None] & in_d[None, :],
                        other=0.0,
                    ).to(tl.float32)  # [BN, BD]
                    row = tl.load(x_b + pick * stride_xn + cols, mask=in_d, other=0.0).to(tl.float32)  # [BD]
                    dot += tl.sum(tile * row[None, :], axis=1)
                inv = tl.load(inv_ptr + b * n + offs, mask=valid, other=0.0)
                cos = scale_cosine(dot, pick_inv, inv)
            dist = _distance(cos)
            old = tl.load(score_b + offs, mask=valid, other=float("-inf"))
            new = tl.where(replace, dist, tl.minimum(old, dist))
            new = tl.where(offs == pick, float("-inf"), new)
            tl.store(score_b + offs, new, mask=valid)
            cand = tl.where(valid, new, float("-inf"))
            top = tl.max(cand, axis=0)
            top_idx = tl.min(tl.where(valid & (cand == top), offs, n), axis=0).to(tl.int64)
            better = top > best_val
            best_idx = tl.where(better, top_idx, best_idx)
            best_val = tl.where(better, top, best_val)
        tl.debug_barrier()
        following = step + 1
        if HAS_PROTECTED:
            queued = following < num_protected
            next_protected = tl.load(protected_ptr + b * n + following, mask=queued, other=0)
            pick = tl.where(queued, next_protected, best_idx)
        else:
            pick = best_idx

    # Picked tokens are exactly the -inf scores: write their indices in ascending order.
    count = tl.zeros((), dtype=tl.int32)
    for n0 in range(0, n, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < n
        picked = valid & (tl.load(score_b + offs, mask=valid, other=0.0) == float("-inf"))
        slot = count + tl.cumsum(picked.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + b * k + slot, offs.to(tl.int64), mask=picked & (slot < k))
        count += tl.sum(picked.to(tl.int32), axis=0)


def pick_warps(pick_n: int) -> int:
    return 16 if pick_n >= 4096 else 8


def blocks(n: int, d: int, materialize: bool) -> dict[str, int]:
    """Tile sizes: the similarity pass (BLOCK_M, BLOCK_N, BLOCK_D) and the pick pass (PICK_N, PICK_D)."""
    if _utils.INTERPRETED:  # the interpreter pays per program and per op: few, large tiles
        big = _utils.pow2(n, 16, 256)
        return {"BLOCK_M": big, "BLOCK_N": big, "BLOCK_D": _utils.pow2(d, 16, 256), "PICK_N": _utils.pow2(n, 16, 4096),
                "PICK_D": _utils.pow2(d, 16, 256)}  # fmt: skip
    # No register spills on sm_90 with these (tests/kernels/compile_kernels.py, cuobjdump).
    if materialize:  # a pick reads one row of N: few, wide tiles (N = 2880 in one)
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "PICK_N": _utils.pow2(n, 128, 4096), "PICK_D": 32}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "PICK_N": 128, "PICK_D": 32}  # [128, 32] feature tiles


def maxmin_select(
    x: torch.Tensor,
    k: int,
    protected: torch.Tensor | None = None,
    *,
    materialize: bool | None = None,
    block: dict[str, int] | None = None,
    return_order: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[B, N, D] -> [B, k] sorted indices (see vtc.kernels.maxmin_select).

    Args:
        materialize: store the similarity matrix and read one row per pick (True), or recompute each
            pick's distances from the features (False). None: store it when one sample's N x N fp32
            fits MATERIALIZE_BYTES; the batch then runs in chunks that fit.
        block: tile sizes (keys of :func:`blocks`), for tests.
        return_order: also return the [B, k] picks in the order they were made (protected first).
    """
    x = _utils.rows_contiguous(x)
    b, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    per_sample = n * n * 4
    if materialize is None:
        materialize = per_sample <= MATERIALIZE_BYTES
    chunk = max(1, MATERIALIZE_BYTES // per_sample) if materialize else b
    cfg = blocks(n, d, materialize) | (block or {})
    out = _utils.empty((b, k), torch.int64, x.device)
    order = _utils.empty((b, k), torch.int64, x.device)
    for b0 in range(0, b, chunk):
        rows = slice(b0, min(b, b0 + chunk))
        _select_chunk(
            x[rows], k, None if protected is None else protected[rows], materialize, cfg, out[rows], order[rows]
        )
    return (out, order) if return_order else out


def _select_chunk(
    x: torch.Tensor,
    k: int,
    protected: torch.Tensor | None,
    materialize: bool,
    cfg: dict[str, int],
    out: torch.Tensor,
    order: torch.Tensor,
) -> None:
    """Both launches for a batch chunk; writes the [b, k] sorted picks to out and the pick order to order."""
    b, n, d = x.shape
    device = x.device
    nearest = torch.full((b, n), float("-inf"), dtype=torch.float32, device=device)
    sim = _utils.empty((b, n, n) if materialize else (1,), torch.float32, device)
    inv = _utils.empty((1,) if materialize else (b, n), torch.float32, device)
    grid = (b, triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _nearest_kernel[grid](
        x,
        sim,
        inv,
        nearest,
        n,
        d,
        x.stride(0),
        x.stride(1),
        STORE_SIM=materialize,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        NATIVE_DOT=_utils.native_dot(x.dtype),
        num_warps=8,
        enable_fp_fusion=_utils.FP_FUSION,
    )
    if protected is not None:
        counts = protected.sum(dim=1)  # [b]
        queue = torch.arange(n, device=device).expand(b, n).masked_fill(~protected, n)
        queue = queue.sort(dim=1).values.contiguous()  # [b, N], protected indices first, ascending
    else:
        counts = queue = nearest  # unused placeholders
    score = _utils.empty((b, n), torch.float32, device)
    _pick_kernel[(b,)](
        x,
        sim,
        inv,
        nearest,
        score,
        queue,
        counts,
        order,
        out,
        n,
        d,
        k,
        x.stride(0),
        x.stride(1),
        FROM_SIM=materialize,
        HAS_PROTECTED=protected is not None,
        BLOCK_N=cfg["PICK_N"],
        BLOCK_D=cfg["PICK_D"],
        num_warps=pick_warps(cfg["PICK_N"]),
        enable_fp_fusion=_utils.FP_FUSION,
    )
