"""FasterVLM: keep the visual tokens the vision encoder's [CLS] token attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vtc.methods.base import ScoredMethod
from vtc.registry import register


@register
@dataclass
class FasterVLM(ScoredMethod):
    """[CLS]-attention pruning before the language model.

    Based on arXiv:2412.01818 (Theia-4869/FasterVLM). Score = attention of the [CLS] query over the
    patch keys at the vision layer whose output the model uses (LLaVA-1.5: vision_feature_layer -2),
    averaged over heads; the top ``keep`` tokens survive in their original order.

    Fields:
        signal: the importance score, "cls_attention" (default, the paper's) or "attention_received":
            the mean attention each token receives in the vision tower, the published substitute for
            towers without a [CLS] token (Qwen2-VL / Qwen2.5-VL; VisionZip and EffiVLM-Bench use it for
            SigLIP). It is only used when asked for, never substituted silently.

    Differences from the original: none in the selection. vtc prunes after the projector (the
    original projects all tokens and masks afterwards, which is equivalent because the projector
    acts per token) and obtains the attention row without eager attention.
    """

    signal: str = "cls_attention"
    name = "fastervlm"
    requires = ("cls_attention",)

    def __post_init__(self) -> None:
        if self.signal not in SIGNAL_CHOICES:
            raise ValueError(f"signal must be one of {list(SIGNAL_CHOICES)}, got {self.signal!r}")
        self.requires = (self.signal,)

    def score(self, signals: dict[str, Any], keep: int) -> torch.Tensor:
        return signals[self.signal]


SIGNAL_CHOICES = ("cls_attention", "attention_received")
