"""DivPrune: keep the most diverse visual tokens (greedy max-min diversity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vtc import kernels as ops
from vtc.methods.base import Method, Plan
from vtc.registry import register


@register
@dataclass
class DivPrune(Method):
    """Diversity pruning on the projected visual tokens, before the language model.

    Based on arXiv:2503.02175 (vbdi/divprune). Distance d(i, j) = 1 - cos(x_i, x_j). The first pick
    is the token whose nearest neighbour is farthest; each next pick maximises the distance to its
    closest already-picked token; ties go to the lowest index. Kept tokens return to original order.

    Differences from the original: the running min-distance vector is updated with one row per
    pick (O(N) per step instead of a min over all picked rows), with no host synchronisation in the
    loop, batched over images; distances are fp32 (the original runs in the model's dtype); an
    already-picked token is never picked twice (the original can repeat an index when the remaining
    tokens all duplicate picked ones). The paper's default ratio 0.098 (56 of 576) is not implied:
    pass ratio=0.098 or keep=56. The selection itself equals the paper's form (tested).
    """

    name = "divprune"
    requires = ("features",)

    def _plan(self, signals: dict[str, Any], keep: int) -> Plan:
        features = signals["features"]
        return Plan(ops.maxmin_select(features, keep, signals.get("protected")), features.shape[1])
