"""DART: duplication-aware token reduction, in its pre-LLM form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vtc import kernels as ops
from vtc.methods.base import Method, Plan, protected_mask
from vtc.registry import register


@register
@dataclass
class DART(Method):
    """Keep a few pivot tokens and the tokens least similar to them: duplicates of a pivot go.

    Based on arXiv:2502.11494 (ZichenWen1/DART). The paper selects inside the language model at
    layer 2, with pivots = the visual and text tokens of largest key L1 norm. This pre-LLM form
    works on the projected visual tokens: pivots = the ``num_pivots`` tokens of largest feature L1
    norm; then each pivot, in descending norm order, takes the not-yet-chosen tokens of lowest
    cosine similarity to it, the budget split evenly over pivots.

    Fields:
        num_pivots: pivot tokens per image (default 8, the original's 4 visual + 4 text pivots,
            all visual here because there is no text before the language model).
        merge: if True, every dropped token is size-weight-averaged into its most cosine-similar
            kept token instead of being discarded (vtc's extension, in the spirit of ToMe).

    Differences from the original: exactly ``keep`` tokens are kept (the original keeps
    4 + 8 * floor(M / 8), e.g. 132 for "128"): the remainder goes one each to the first pivots;
    pivots are visited in descending norm order (the original iterates a Python set); pivots come
    from feature norms, not layer-1 keys (the in-LLM form comes with layerwise dropping).
    """

    num_pivots: int = 8
    merge: bool = False
    name = "dart"
    requires = ("features",)

    def __post_init__(self) -> None:
        if isinstance(self.num_pivots, bool) or not isinstance(self.num_pivots, int) or self.num_pivots < 1:
            raise ValueError(f"num_pivots must be an int >= 1, got {self.num_pivots!r}")
        if not isinstance(self.merge, bool):
            raise ValueError(f"merge must be True or False, got {self.merge!r}")

    def _plan(self, signals: dict[str, Any], keep: int) -> Plan:
        features = signals["features"]
        protected = protected_mask(signals, features.shape[:2])
        pivot_score = features.abs().sum(dim=-1)  # [B, N] L1 norm
        # Protected tokens take budget first; each row uses as many pivots as its remaining budget allows.
        per_row = (keep - protected.sum(dim=1)).clamp(max=self.num_pivots)  # [B]
        pivots = pivot_score.masked_fill(protected, float("-inf")).topk(min(self.num_pivots, keep), dim=1).indices
        kept = ops.pivot_select(features, pivots, keep, protected, num_pivots=per_row)
        merge_into = ops.nearest_kept(features, kept) if self.merge else None
        return Plan(kept, features.shape[1], merge_into)
