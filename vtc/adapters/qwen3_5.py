"""Qwen3.5 and Qwen3.5-MoE (transformers' Qwen3_5ForConditionalGeneration / Qwen3_5MoeForConditionalGeneration, 5.x
only: transformers 4.57 has neither, so no such model exists there).

What differs from Qwen2-VL (vtc.adapters.qwen2_vl, whose pipeline this family shares):
  * The vision tower is Qwen3-VL's without DeepStack: 16 px patches with learned position embeddings, full attention
    in every block (no windows), the same fused-qkv attention and 2 x 2 patch merger, so ``attention_received`` comes
    from the last block, and the language model takes no per-token argument besides the usual ones. No [CLS] token:
    [CLS] methods are refused with the substitute (``signal="attention_received"``); the auxiliary-CLIP option
    (``cls_model``) is not offered (its resampling assumes CLIP's normalisation, Qwen3.5's processor uses mean / std
    0.5). Merging (``dart`` with ``merge=True``) runs as on Qwen2-VL: nothing else follows the tokens.
  * The language model is hybrid: of every ``full_attention_interval`` (4) decoder layers the last is full attention
    (gated output, QK-norm, partial interleaved M-RoPE) and the others are Gated DeltaNet linear attention: a causal
    depthwise convolution over the last 4 tokens, then a gated delta-rule recurrence whose state carries the whole
    prefix. Its DynamicCache holds a convolution and a recurrent state for each linear layer and keys / values for
    each full one; ``get_seq_length()`` reads layer 0, a linear layer that counts the tokens it has consumed. The linear
    layers see padding only through the 2-D attention mask, as zeroed inputs: a zero input leaves a zero state zero
    (its key and value are zero, the decay of zero is zero), so left padding is exact.
    Dropping before the language model therefore gives every layer exactly the shortened prompt: vtc hands over the
    survivors re-padded on the left with an explicit 2-D mask and their original position ids; the linear layers run
    their convolution and recurrence over that sequence, the full ones attend over it, and the cache holds its states.
    Decoding continues on that cache (generate()'s full-length mask is remapped for the full-attention layers; the
    linear layers take no mask for one-token steps). The result equals the uncompressed model run on the shortened
    prompt at the original positions. It does NOT equal masking the dropped tokens: a masked token still decays the
    recurrent state (its gate depends on a bias, not only on the zeroed input) and takes a slot of the convolution
    window (tests/adapters/test_qwen3_5.py checks both).
  * In-LLM methods (fastv, pdrop, dart_llm, adaptive) are refused at attach time: tokens dropped at a decoder layer
    would vanish from the recurrence and the convolution windows of every later linear layer, which no attention mask
    can express, and vtc's layer dropper re-indexes only attention masks and positions (and scores tokens with an
    attention probe, which a linear layer has not). Drop before the language model instead.
  * Video inputs are refused, as for the other Qwen families.
"""

from __future__ import annotations

from typing import ClassVar

from vtc.adapters.qwen2_vl import Qwen2VLAdapter
from vtc.registry import register_family


@register_family
class Qwen3_5Adapter(Qwen2VLAdapter):
    """Adapter for Qwen3.5 and Qwen3.5-MoE (config.model_type "qwen3_5" / "qwen3_5_moe")."""

    model_types = {"qwen3_5": "Qwen3.5", "qwen3_5_moe": "Qwen3.5-MoE"}
    options = ()
    compresses_video = False
    # Its processor (Qwen3-VL's: video timestamps) is not rebuilt without torchvision: AutoProcessor's error stands.
    pil_processor: ClassVar[bool] = False

    def check(self) -> None:
        name = type(self.model).__name__
        if self.layerwise is not None:
            layer_types = self.base.language_model.config.layer_types
            raise ValueError(
                f"in-LLM method {self.layerwise.name!r} cannot run on {name}: {layer_types.count('linear_attention')} "
                f"of its {len(layer_types)} decoder layers are linear attention (Gated DeltaNet: a recurrence and a "
                "convolution over consecutive tokens), so tokens dropped at a decoder layer would leave every later "
                "linear layer with a different sequence, which no attention mask can express (dropping between layers "
                "is only well-defined for attention). Use a pre-LLM method, which drops visual tokens before the "
                "language model: divprune, dart, uniform, random, or fastervlm with signal='attention_received'"
            )
        if {"cls_attention", "cls_attention_layers"} & set(self.requires):
            raise ValueError(
                f"method {self.method_names!r} needs [CLS] attention, but {name}'s vision tower has no [CLS] token. "
                "Use vtc.compress(model, 'fastervlm', signal='attention_received', ...), which ranks tokens by the "
                "attention they receive in the vision tower, or a method that needs no [CLS] attention (divprune, "
                "dart, uniform, random)"
            )
        super().check()
