"""EVS: Efficient Video Sampling, keep the video tokens that changed since the previous frame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vtc.methods.base import Plan, ScoredMethod
from vtc.registry import register

# Above every dissimilarity (1 - cosine lies in [0, 2]): the first frame's tokens rank before all others.
FIRST_FRAME = 3.0


@register
@dataclass
class EVS(ScoredMethod):
    """Temporal pruning of a video's tokens by their change since the previous frame.

    Based on arXiv:2510.14624 as implemented in vLLM (PR #22980, ``vllm/multimodal/evs.py``,
    ``compute_retention_mask``). A video unit's features [B, N, D] come frame after frame
    (N = T * H * W, index t*H*W + h*W + w; frames are temporal patches, e.g. 2 video frames each in
    Qwen2.5-VL). Each token of frames 1..T-1 scores its dissimilarity 1 - cos to the token at the same
    (h, w) in the previous frame; the first frame's tokens score above every dissimilarity, so the
    first frame is always kept whole. The ``keep`` highest scores survive, one global choice over all
    frames; ties go to the earlier frame, then to raster order (a stable descending sort, as vLLM's);
    kept tokens return to original order. Only for videos (``temporal``): it needs the (T, H, W)
    grid, and images or ``video_budget="per_frame"`` are refused.

    No options: vLLM's pruning rate q is vtc's budget.

    Differences from vLLM:
    - The kept count is vtc's budget: ``keep`` exactly, or ``round(ratio * N)``. vLLM keeps
      ``max(H*W, floor(N * (1 - q)))``; pass that as ``keep`` for its count. A ``keep`` below H*W
      (the first frame cannot be kept whole) is refused rather than raised to H*W.
    - Dissimilarities are fp32 (vLLM computes them in the model's dtype, usually bf16); the first
      frame's priority is 3 rather than 255 (the same order: both exceed 2).
    - Protected tokens (optional signal, vLLM has none) are kept first; the rest of the budget goes
      by the order above.
    - Batched over videos of one grid (vLLM takes one video at a time).
    """

    name = "evs"
    requires = ("features",)
    temporal = True

    def score(self, signals: dict[str, Any], keep: int) -> torch.Tensor:
        frames, height, width = signals["grid"]
        features = signals["features"]  # [B, N, D] fp32
        video = features.reshape(features.shape[0], frames, height * width, features.shape[2])  # [B, T, HW, D]
        change = 1 - torch.nn.functional.cosine_similarity(video[:, 1:], video[:, :-1], dim=-1)  # [B, T-1, HW]
        first = change.new_full((features.shape[0], 1, height * width), FIRST_FRAME)
        return torch.cat([first, change], dim=1).flatten(1)  # [B, N]

    def check_video(self, grid: tuple[int, int, int], keep: int) -> None:
        frames, height, width = grid
        if keep < height * width:
            raise ValueError(
                f"method 'evs' keeps the whole first frame of a video: keep={keep} is below the {height * width} "
                f"tokens of one {height} x {width} frame (grid {(frames, height, width)}); use keep >= "
                f"{height * width} (vLLM keeps max(H*W, floor(N * (1 - q))))"
            )

    def _plan(self, signals: dict[str, Any], keep: int) -> Plan:
        self.check_video(signals["grid"], keep)
        score = self.score(signals, keep)
        protected = signals.get("protected")
        if protected is not None:
            score = score.masked_fill(protected, float("inf"))
        # torch.topk does not order ties; a stable sort gives them to the earlier frame, then raster order.
        order = score.argsort(dim=1, descending=True, stable=True)  # [B, N]
        return Plan(order[:, :keep].sort(dim=1).values, score.shape[1])
