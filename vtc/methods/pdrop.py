"""PyramidDrop (in-LLM): several drop stages, each keeping a fraction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtc.methods.layerwise import LayerwiseMethod, Stage, check_int, scaled, top, top_all
from vtc.registry import register


@register
@dataclass
class PDrop(LayerwiseMethod):
    """PyramidDrop: several drop stages, each keeping a fraction of the visual tokens that reach it.

    Based on arXiv:2410.17247 (Cooperx521/PyramidDrop). Score at each stage = attention of the last
    (instruction) token's query at the drop layer itself (its input norm, q/k projections and RoPE),
    mean over heads. With the default schedule (layers 8/16/24 of a 32-layer model, scaled to the
    model's depth) and ``keep = N / 8``, an image keeps N/2, N/4, N/8 tokens - the paper's 0.5 / 0.25 /
    0.125. ``keep`` is the count after the last stage; stage s keeps keep / lambda^(S-1-s).

    Fields:
        layers: drop layers for a 32-layer model (scaled to the actual depth); None = (8, 16, 24).
        lam: the ratio between consecutive stages (default 0.5, the paper's lambda).

    Differences from the original: batches of any size and any attention implementation; tokens are
    removed, and the last instruction token is the last token of the prompt.
    """

    layers: tuple[int, ...] | None = None
    lam: float = 0.5
    name = "pdrop"
    uses_hidden = False

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(self.layers)
            for layer in self.layers:
                check_int("every entry of layers", layer, 1)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 < self.lam < 1:
            raise ValueError(f"lam must be a number in (0, 1), got {self.lam!r}")

    def schedule(self, num_layers: int) -> list[int]:
        return scaled(self.layers if self.layers is not None else (8, 16, 24), num_layers)

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        return {layer: ("last_row",) for layer in self.schedule(num_layers)}

    def stage_counts(self, tokens: int, keep: int, stages: int) -> list[int]:
        return [min(tokens, max(keep, round(keep / self.lam ** (stages - 1 - s)))) for s in range(stages)]

    def choose(self, stage: Stage) -> torch.Tensor:
        return top(stage.signals["last_row"][stage.visual], stage.keep)

    def choose_all(self, stages: list[Stage]) -> list[torch.Tensor]:
        return top_all(stages, "last_row")
