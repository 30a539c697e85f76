"""VTC-CLS: [CLS] attention summed over a range of vision layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vtc.methods.base import ScoredMethod
from vtc.registry import register


@register
@dataclass
class VTCCLS(ScoredMethod):
    """[CLS]-attention ensemble over vision layers, before the language model.

    Based on arXiv:2412.05819 (THU-MIG/VTC-CLS). Score = sum over vision layers ``start_layer`` up to
    and including the feature layer of the [CLS]->patch attention (head mean, raw softmax values, no
    per-layer normalisation); top ``keep`` in original order. With CLIP-L/336 and feature layer -2
    this is layers 16..22, exactly the original's ``attentions[16:-1]``.

    Fields:
        start_layer: first vision layer of the ensemble. Default None: the original's relative depth,
            layer round(16 / 23 * V) of the V layers up to the feature layer - exactly 16 for CLIP-L/336
            with feature layer -2. A negative value counts back from the feature layer (-1 = it alone).

    Differences from the original: batches of any size (the original squeezes batch 1); the paper's
    default budget of 36 tokens is not implied - pass keep=36 for it.
    """

    start_layer: int | None = None
    name = "vtc_cls"
    requires = ("cls_attention_layers",)

    def __post_init__(self) -> None:
        if self.start_layer is not None and (
            isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int)
        ):
            raise ValueError(f"start_layer must be an int or None, got {self.start_layer!r}")

    def first_layer(self, vision_layers: int) -> int:
        """The ensemble's first layer among ``vision_layers`` layers up to the feature layer."""
        v = vision_layers
        if self.start_layer is None:
            return min(v - 1, round(16 / 23 * v))
        start = self.start_layer if self.start_layer >= 0 else v + self.start_layer
        if not 0 <= start < v:
            raise ValueError(
                f"start_layer={self.start_layer} is outside the {v} vision layers up to the feature layer "
                f"(allowed: {-v}..{v - 1})"
            )
        return start

    def check_geometry(self, num_tokens: int | None, vision_layers: int | None) -> None:
        if vision_layers is not None:
            self.first_layer(vision_layers)

    def score(self, signals: dict[str, Any], keep: int) -> torch.Tensor:
        layers = signals["cls_attention_layers"]  # [B, V, N]
        return layers[:, self.first_layer(layers.shape[1]) :].sum(dim=1)
