"""Qwen3-VL and Qwen3-VL-MoE (transformers' Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration).

What differs from Qwen2-VL (vtc.adapters.qwen2_vl, whose pipeline this family shares):
  * DeepStack: the vision tower also returns merged features of some vision blocks (``deepstack_visual_indexes``);
    the language model adds the i-th of them to the hidden states of the visual positions after decoder layer i
    (arguments ``visual_pos_masks`` [B, L] and ``deepstack_visual_embeds``: one [visual tokens, D] tensor per
    level, rows in sequence order). Dropping before the language model shortens the mask with the tokens and
    keeps the rows of the surviving tokens in every level (Adapter.visual_aligned). In-LLM dropping happens at a
    decoder layer's input, but the additions are made by the decoder stack itself with its full-length mask, so a
    drop layer must come after the last layer that receives DeepStack features: earlier ones are refused at attach
    time with the first layer allowed.
  * Merging (``dart`` with ``merge=True``) is refused: a merged token would carry merged values in the first layer
    and one token's DeepStack features in the next ones.
  * The text attention has QK-norm (probed like Qwen3's); the vision tower is full attention in every block (no
    windows), with learned position embeddings and the same fused-qkv attention as Qwen2-VL's, so
    ``attention_received`` comes from the last block. No [CLS] token: [CLS] methods are refused with the substitute
    (``signal="attention_received"``). The auxiliary-CLIP option (``cls_model``) is not offered: its resampling
    assumes Qwen2-VL's CLIP normalisation, and Qwen3-VL's image processor normalises with mean / std 0.5.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from vtc.adapters.qwen2_vl import Qwen2VLAdapter
from vtc.methods.base import Budget, Method
from vtc.registry import register_family


@register_family
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter for Qwen3-VL and Qwen3-VL-MoE (config.model_type "qwen3_vl" / "qwen3_vl_moe")."""

    model_types = {"qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE"}
    options = ("video_budget",)
    token_aligned: ClassVar[tuple[str, ...]] = ("visual_pos_masks",)
    visual_aligned: ClassVar[tuple[str, ...]] = ("deepstack_visual_embeds",)
    # Its processor (video timestamps) is not rebuilt without torchvision: AutoProcessor's error stands.
    pil_processor: ClassVar[bool] = False

    def __init__(self, model: nn.Module, method: Method, budget: Budget, options: dict | None = None, **layerwise):
        super().__init__(model, method, budget, options, **layerwise)
        self.deepstack_layers = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def check(self) -> None:
        if {"cls_attention", "cls_attention_layers"} & set(self.requires):
            raise ValueError(
                f"method {self.method_names!r} needs [CLS] attention, but {type(self.model).__name__}'s vision tower "
                "has no [CLS] token. Use vtc.compress(model, 'fastervlm', signal='attention_received', ...), which "
                "ranks tokens by the attention they receive in the vision tower, or a method that needs no [CLS] "
                "attention (divprune, dart, uniform, random, or an in-LLM method; adaptive with protect=0)"
            )
        if getattr(self.method, "merge", False) is True:
            raise ValueError(
                f"method {self.method.name!r} with merge=True cannot run on {type(self.model).__name__}: a merged "
                "token would carry merged values into the first decoder layer and a single token's DeepStack features "
                "into the next ones. Use merge=False (the default), or another method"
            )
        super().check()
        if self.dropper is not None and self.dropper.schedule[0] < self.deepstack_layers:
            first = self.dropper.schedule[0]
            raise ValueError(
                f"in-LLM method {self.layerwise.name!r} would drop tokens at decoder layer {first}, but "
                f"{type(self.model).__name__} adds DeepStack visual features to the visual positions after each of "
                f"its first {self.deepstack_layers} decoder layers (with a mask of the full prompt), so in-LLM "
                f"dropping must start at layer {self.deepstack_layers} or later: fastv / dart_llm take "
                f"layer={self.deepstack_layers} (in a method list: vtc.methods.FastV(layer={self.deepstack_layers})); "
                "pdrop / adaptive take layers= (given for a 32-layer model, scaled to this one's "
                f"{len(self.base.language_model.layers)}) whose first scales to {self.deepstack_layers} or more"
            )
