"""DART in its paper form (in-LLM): duplication-aware pruning at one layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtc import kernels as ops
from vtc.methods.layerwise import LayerwiseMethod, Stage, check_int, same_shape
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
        return self.choose_all([stage])[0]

    def choose_all(self, stages: list[Stage]) -> list[torch.Tensor]:
        """One pivot selection per group of images with the same token, pivot and budget counts."""
        inputs = [self._pivot_inputs(stage) for stage in stages]
        chosen: list[torch.Tensor] = [torch.empty(0)] * len(stages)
        for members in same_shape([_shape(one) for one in inputs]):
            features = torch.stack([inputs[i][0] for i in members])  # [G, n + t, D]
            pivots = torch.stack([inputs[i][1] for i in members])  # [G, P]
            n, budget = inputs[members[0]][2], inputs[members[0]][3]
            for i, kept in zip(members, ops.pivot_select(features, pivots, budget), strict=True):
                chosen[i] = kept[kept < n]
        return chosen

    def _pivot_inputs(self, stage: Stage) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(features [n + t, D]: the image's visual tokens, then its text pivots; pivots [P] into them, visited in
        descending norm order; n; tokens to keep, text pivots included)."""
        norm = stage.signals["key_norm"]
        n = stage.visual.numel()
        visual_pivots = min(self.visual_pivots, stage.keep)
        order = norm[stage.visual].argsort(descending=True, stable=True)[:visual_pivots]
        text = stage.text[norm[stage.text].argsort(descending=True, stable=True)[: self.text_pivots]]
        features = torch.cat([stage.hidden[stage.visual], stage.hidden[text]])
        pivots = torch.cat([order, torch.arange(n, n + text.numel(), device=order.device)])
        pivots = pivots[torch.cat([norm[stage.visual][order], norm[text]]).argsort(descending=True, stable=True)]
        return features, pivots, n, stage.keep + text.numel()


def _shape(inputs: tuple[torch.Tensor, torch.Tensor, int, int]) -> tuple[int, ...]:
    features, pivots, n, budget = inputs
    return features.shape[0], pivots.numel(), n, budget
