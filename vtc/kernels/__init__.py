"""Ops on the visual-token path. Pure torch (fp32 accumulation) today; this is also the CPU fallback."""

from vtc.kernels.reference import (
    cosine_similarity,
    gather_rows,
    maxmin_select,
    merge_rows,
    nearest_kept,
    pivot_select,
)

__all__ = ["cosine_similarity", "gather_rows", "maxmin_select", "merge_rows", "nearest_kept", "pivot_select"]
