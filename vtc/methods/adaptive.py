"""Adaptive (in-LLM): keep the fewest visual tokens that carry a fraction of the attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtc.methods.layerwise import LayerwiseMethod, Stage, check_int, scaled
from vtc.registry import register


@register
@dataclass
class Adaptive(LayerwiseMethod):
    """Instance-adaptive dropping: keep the fewest visual tokens that carry a fraction of the attention.

    Training-free, in the spirit of ATP-LLaVA (arXiv 2412.00447) and MustDrop (arXiv 2411.10803): at
    each scheduled layer, the last token's attention over an image's surviving visual tokens (drop
    layer's own weights, head mean) is sorted, and the smallest set whose attention sums to at least
    ``mass`` of the image's total survives, but never fewer than the budget (``keep`` / ``ratio`` is the
    floor). How many tokens survive therefore depends on the image and the question.

    Fields:
        layers: drop layers for a 32-layer model, scaled to the actual depth (default (2, 6, 10, 14),
            MustDrop's).
        mass: fraction of the attention mass to keep at each stage (default 0.9).
        protect: fraction of each image's tokens (at the LLM input) with the highest vision-side [CLS]
            attention that are never dropped - MustDrop's key set (it protects ~8%: ``protect=0.08``).
            Default 0: none. Needs a model that provides ``cls_attention``.
    """

    layers: tuple[int, ...] = (2, 6, 10, 14)
    mass: float = 0.9
    protect: float = 0.0
    name = "adaptive"
    uses_hidden = False
    exact = False

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        for layer in self.layers:
            check_int("every entry of layers", layer, 1)
        if isinstance(self.mass, bool) or not isinstance(self.mass, (int, float)) or not 0 < self.mass <= 1:
            raise ValueError(f"mass must be a number in (0, 1], got {self.mass!r}")
        if isinstance(self.protect, bool) or not isinstance(self.protect, (int, float)) or not 0 <= self.protect < 1:
            raise ValueError(f"protect must be a number in [0, 1), got {self.protect!r}")

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cls_attention",) if self.protect > 0 else ()

    def key_set(self, score: torch.Tensor) -> torch.Tensor | None:
        """The ceil(protect * n) tokens of the image with the highest vision-side [CLS] attention (MustDrop)."""
        if not self.protect:
            return None
        protected = torch.zeros_like(score, dtype=torch.bool)
        protected[score.topk(min(score.numel(), math.ceil(self.protect * score.numel()))).indices] = True
        return protected

    def schedule(self, num_layers: int) -> list[int]:
        return scaled(self.layers, num_layers)

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        return {layer: ("last_row",) for layer in self.schedule(num_layers)}

    def choose(self, stage: Stage) -> torch.Tensor:
        scores = stage.signals["last_row"][stage.visual].double()
        protected = stage.protected if stage.protected is not None else torch.zeros_like(scores, dtype=torch.bool)
        # Protected tokens first, then by attention: the kept set is always a prefix of this order.
        ranking = torch.where(protected, scores + scores.sum() + 1, scores)
        order = ranking.argsort(descending=True, stable=True)
        cumulative = scores[order].cumsum(0)
        needed = int((cumulative < self.mass * cumulative[-1]).sum()) + 1  # smallest prefix reaching the mass
        count = min(scores.numel(), max(stage.keep, needed, int(protected.sum())))
        return order[:count].sort().values
