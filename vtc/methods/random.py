"""Random pruning: the baseline every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vtc.methods.base import ScoredMethod, batch_size, num_tokens, signal_device
from vtc.registry import register


@register
@dataclass
class Random(ScoredMethod):
    """Keep a uniformly random subset of ``keep`` tokens per image, reproducibly.

    Fields:
        seed: seed of the generator (default 0). Every call with the same seed and shape keeps the
            same tokens, on any device (the draw happens on the CPU).
    """

    seed: int = 0
    name = "random"
    requires = ()

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def score(self, signals: dict[str, Any], keep: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(batch_size(signals), num_tokens(signals), generator=generator).to(signal_device(signals))
