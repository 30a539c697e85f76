"""Ops on the visual-token path, with explicit backend dispatch (``backend="auto" | "torch" | "triton"``).

``"auto"`` (the default) runs the Triton kernels on CUDA tensors when Triton imports, and the
pure-torch reference ops otherwise (vtc/kernels/reference.py: the CPU path and the oracle of the
kernels' tests). ``fill_top`` and ``mask_to_indices`` are small torch-only helpers.
"""

from vtc.kernels.ops import (
    cosine_similarity,
    gather_rows,
    gather_rows_varlen,
    maxmin_select,
    merge_rows,
    nearest_kept,
    pivot_select,
)
from vtc.kernels.reference import fill_top, mask_to_indices

__all__ = [
    "cosine_similarity",
    "fill_top",
    "gather_rows",
    "gather_rows_varlen",
    "mask_to_indices",
    "maxmin_select",
    "merge_rows",
    "nearest_kept",
    "pivot_select",
]
