"""FastV (in-LLM): drop at one layer by the last token's attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtc.methods.layerwise import LayerwiseMethod, Stage, check_int, top, top_all
from vtc.registry import register


@register
@dataclass
class FastV(LayerwiseMethod):
    """FastV: drop at the input of layer ``layer``, keep the visual tokens the last token attends to most.

    Based on arXiv:2403.06764 (pkunlp-icler/FastV). Score = attention of the last token's query at
    layer ``layer - 1`` (the layer just before), mean over heads; the top ``keep`` visual tokens of each
    image go on at their original positions.

    Fields:
        layer: the drop layer K (default 2, the paper's).

    Differences from the original: the attention row is computed from layer K-1's own key and query
    projections (taken by hooks as the layer runs) instead of asking for eager attention maps; tokens
    are removed (hidden states, positions, masks, KV cache of later layers), not masked; ``keep`` is
    per image (the paper's R=50% is ``ratio=0.5``).
    """

    layer: int = 2
    name = "fastv"
    uses_hidden = False

    def __post_init__(self) -> None:
        check_int("layer", self.layer, 1)

    def schedule(self, num_layers: int) -> list[int]:
        return [self.layer]

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        return {self.layer - 1: ("last_row",)}

    def choose(self, stage: Stage) -> torch.Tensor:
        return top(stage.signals["last_row"][stage.visual], stage.keep)

    def choose_all(self, stages: list[Stage]) -> list[torch.Tensor]:
        return top_all(stages, "last_row")
