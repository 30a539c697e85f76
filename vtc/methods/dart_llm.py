"""DART in its paper form (in-LLM): duplication-aware pruning at one layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtc import kernels as ops
from vtc.methods.layerwise import LayerwiseMethod, Stage, check_int
from vtc.registry import register


@register
@dataclass
class DARTLLM(LayerwiseMethod):
    """DART in its paper form: duplication-aware pruning at the input of layer ``layer``.

    Based on arXiv:2502.11494 (ZichenWen1/DART). Pivots = the 4 visual and 4 text tokens (text after
    the image) with the largest key L1 norm at layer ``layer - 1`` (post-RoPE, heads concatenated);
    each pivot, in descending norm order, takes the not-yet-chosen visual tokens least cosine-similar
    to it in the drop layer's input after the final norm; the text pivots are removed at the end.

    Fields:
        layer: the drop layer K (default 2, the paper's).
        visual_pivots / text_pivots: pivot counts (default 4 / 4).

    Differences from the original: exactly ``keep`` visual tokens per image (the original keeps
    4 + 8 * floor(M / 8)); pivots visited in descending norm order (the original iterates a set);
    several images per prompt get their own pivots (text pivots: the text after the row's last image).
    """

    layer: int = 2
    visual_pivots: int = 4
    text_pivots: int = 4
    name = "dart_llm"

    def __post_init__(self) -> None:
        check_int("layer", self.layer, 1)
        check_int("visual_pivots", self.visual_pivots, 1)
        check_int("text_pivots", self.text_pivots, 0)

    def schedule(self, num_layers: int) -> list[int]:
        return [self.layer]

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        return {self.layer - 1: ("key_norm",)}

    def choose(self, stage: Stage) -> torch.Tensor:
        norm = stage.signals["key_norm"]
        n = stage.visual.numel()
        visual_pivots = min(self.visual_pivots, stage.keep)
        order = norm[stage.visual].argsort(descending=True, stable=True)[:visual_pivots]
        text = stage.text[norm[stage.text].argsort(descending=True, stable=True)[: self.text_pivots]]
        features = torch.cat([stage.hidden[stage.visual], stage.hidden[text]]).unsqueeze(0)  # [1, n + t, D]
        pivots = torch.cat([order, torch.arange(n, n + text.numel(), device=order.device)])
        pivots = pivots[torch.cat([norm[stage.visual][order], norm[text]]).argsort(descending=True, stable=True)]
        pivots = pivots.unsqueeze(0)  # visual and text pivots visited in descending norm order
        kept = ops.pivot_select(features, pivots, stage.keep + text.numel())[0]
        return kept[kept < n]
