"""Public ops on the visual-token path, each with explicit dispatch ``backend="auto" | "torch" | "triton"``.

``"torch"`` is vtc/kernels/reference.py (the CPU path and the test oracle); ``"triton"`` is the kernel
in vtc/kernels/triton/<op>.py; ``"auto"`` takes the kernel for CUDA tensors when Triton imports (see
vtc/kernels/dispatch.py). Both backends take fp32 / fp16 / bf16 inputs and accumulate in fp32; the
kernels' results equal the reference's up to fp32 rounding (selections: exactly, barring near-ties).

Non-finite values, on both backends: similarities, gathers and merges propagate NaN; the selections
(``maxmin_select``, ``pivot_select``, ``nearest_kept``) always return exactly k distinct sorted
indices (valid slots), treating a NaN similarity as the lowest. A finite token whose squared norm
overflows fp32 (norm > ~1.8e19, possible in bf16 / fp32) has similarity 0 to everything, a zero
vector, on both. One difference: a token with an inf feature has NaN similarity in the reference
(inf / inf) and 0 in the kernels, which cannot tell it from an overflow; the counts hold either way.
"""

from __future__ import annotations

import torch

from vtc.kernels import reference
from vtc.kernels.dispatch import use_triton

# The triton pivot_select keeps a whole row of tokens in one program's registers.
PIVOT_MAX_TOKENS = 16384


def _check_tokens(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, N, D], got shape {tuple(x.shape)}")


def _check_rows(name: str, t: torch.Tensor, x: torch.Tensor, width: int | None = None) -> None:
    """t is [B, *] with x's batch size (and width columns, if given)."""
    if t.dim() != 2 or t.shape[0] != x.shape[0] or (width is not None and t.shape[1] != width):
        want = f"[{x.shape[0]}, {width if width is not None else '*'}]"
        raise ValueError(f"{name} must be {want} for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")


def cosine_similarity(x: torch.Tensor, y: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Cosine similarity of two token sets: [B, N, D] x [B, M, D] -> [B, N, M] fp32.

    A zero vector has similarity 0 to everything (norms are clamped at 1e-12).
    """
    _check_tokens("x", x)
    _check_tokens("y", y)
    if y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]:
        raise ValueError(f"y must be [{x.shape[0]}, M, {x.shape[2]}], got {tuple(y.shape)}")
    # On an H200 (benchmarks/kernel_ops.py) the fp32 kernel ran at 0.15-0.23x of cuBLAS: its dot products use no
    # tensor cores, which would change the result. fp16 / bf16 run at 2.3-5.7x.
    slower = "float32 cosine similarity: cuBLAS is faster than the kernel" if x.dtype == torch.float32 else None
    if use_triton("cosine_similarity", backend, (x, y), (x, y), slower=slower):
        from vtc.kernels.triton import cosine

        return cosine.cosine_similarity(x, y)
    return reference.cosine_similarity(x, y)


def maxmin_select(
    x: torch.Tensor, k: int, protected: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Greedy max-min diversity selection (DivPrune) under cosine distance: [B, N, D] -> [B, k] sorted.

    The first pick is the token farthest from its nearest neighbour; each next pick is the token
    farthest from its closest picked token (ties: lowest index). ``protected`` ([B, N] bool, at most
    k per row) are kept first and seed the search. The Triton kernel picks all k tokens of a sample
    in one program and never forms N x N distances when that would be large (see
    vtc/kernels/triton/maxmin.py).
    """
    _check_tokens("x", x)
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k must be in [1, {x.shape[1]}] for {x.shape[1]} tokens, got {k}")
    tensors = (x,) if protected is None else (x, protected)
    if protected is not None:
        _check_rows("protected", protected, x, x.shape[1])
    if use_triton("maxmin_select", backend, tensors, (x,)):
        from vtc.kernels.triton import maxmin

        return maxmin.maxmin_select(x, k, protected)
    return reference.maxmin_select(x, k, protected)


def pivot_select(
    x: torch.Tensor,
    pivots: torch.Tensor,
    k: int,
    protected: torch.Tensor | None = None,
    num_pivots: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Duplication-aware selection (DART): keep the pivots, then the tokens least similar to them.

    Args as :func:`vtc.kernels.reference.pivot_select`: x [B, N, D]; pivots [B, P] distinct,
    unprotected; k kept per row; protected [B, N] bool; num_pivots [B] pivots used per row. Returns
    [B, k] sorted. Ties at a pivot's cut-off go to the lowest index in the Triton kernel (the
    reference's torch.topk leaves their order unspecified).
    """
    _check_tokens("x", x)
    _check_rows("pivots", pivots, x)
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k must be in [1, {x.shape[1]}] for {x.shape[1]} tokens, got {k}")
    tensors = tuple(t for t in (x, pivots, protected, num_pivots) if t is not None)
    if protected is not None:
        _check_rows("protected", protected, x, x.shape[1])
    n = x.shape[1]
    limit = f"N={n} tokens exceeds the triton pivot_select's {PIVOT_MAX_TOKENS}" if n > PIVOT_MAX_TOKENS else None
    if use_triton("pivot_select", backend, tensors, (x,), limit):
        from vtc.kernels.triton import pivot

        return pivot.pivot_select(x, pivots, k, protected, num_pivots)
    return reference.pivot_select(x, pivots, k, protected, num_pivots)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Batched row gather: [B, N, D] x [B, K] -> [B, K, D], bit-exact, in x's dtype.

    The Triton kernel does not range-check indices (an index outside [0, N) reads outside the row).
    """
    _check_tokens("x", x)
    _check_rows("idx", idx, x)
    if use_triton("gather_rows", backend, (x, idx), (x,)):
        from vtc.kernels.triton import gather

        return gather.gather_rows(x, idx)
    return reference.gather_rows(x, idx)


def gather_rows_varlen(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens_idx: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Row gather over packed sequences of different lengths: x [T, D] -> [K_total, D], bit-exact.

    Sequence s is rows cu_seqlens[s] .. cu_seqlens[s + 1] - 1 of x, and its kept rows are
    idx[cu_seqlens_idx[s] : cu_seqlens_idx[s + 1]], local to the sequence. No host synchronisation.
    """
    if x.dim() != 2 or idx.dim() != 1 or cu_seqlens.dim() != 1 or cu_seqlens.shape != cu_seqlens_idx.shape:
        raise ValueError(
            "gather_rows_varlen takes x [T, D], cu_seqlens [S + 1], idx [K_total], cu_seqlens_idx [S + 1]; got "
            f"{tuple(x.shape)}, {tuple(cu_seqlens.shape)}, {tuple(idx.shape)}, {tuple(cu_seqlens_idx.shape)}"
        )
    if use_triton("gather_rows_varlen", backend, (x, cu_seqlens, idx, cu_seqlens_idx), (x,)):
        from vtc.kernels.triton import gather

        return gather.gather_rows_varlen(x, cu_seqlens, idx, cu_seqlens_idx)
    return reference.gather_rows_varlen(x, cu_seqlens, idx, cu_seqlens_idx)


def merge_rows(
    x: torch.Tensor,
    kept: torch.Tensor,
    targets: torch.Tensor,
    sizes: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Size-weighted merge: [B, N, D] -> [B, K, D], sum(x * size) / sum(size) over each kept slot's group.

    targets [B, N] gives each token's slot in kept [B, K] (kept tokens target their own slot);
    sizes [B, N] how many original tokens each stands for (default 1). fp32 accumulation, x's dtype
    out. The Triton kernel adds with fp32 atomics: on a GPU the last bits can vary between runs.
    """
    _check_tokens("x", x)
    _check_rows("kept", kept, x)
    _check_rows("targets", targets, x, x.shape[1])
    if sizes is not None:
        _check_rows("sizes", sizes, x, x.shape[1])
    tensors = tuple(t for t in (x, kept, targets, sizes) if t is not None)
    if use_triton("merge_rows", backend, tensors, (x,)):
        from vtc.kernels.triton import merge

        return merge.merge_rows(x, kept, targets, sizes)
    return reference.merge_rows(x, kept, targets, sizes)


def nearest_kept(x: torch.Tensor, kept: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """For every token the slot (0..K-1) of its most cosine-similar kept token; kept tokens map to
    themselves: [B, N, D], [B, K] -> [B, N] long. Uses :func:`gather_rows` and
    :func:`cosine_similarity` on the chosen backend, then :func:`vtc.kernels.reference.nearest_slots`."""
    _check_tokens("x", x)
    _check_rows("kept", kept, x)
    sim = cosine_similarity(x, gather_rows(x, kept, backend=backend), backend=backend)  # [B, N, K]
    return reference.nearest_slots(sim, kept)
