"""Uniform pruning: a spatially even lattice of tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from vtc.methods.base import ScoredMethod, batch_size, num_tokens


def lattice(height: int, width: int, keep: int) -> torch.Tensor:
    """Raster indices of ``keep`` tokens spread evenly over a height x width grid.

    Picks an r x c lattice with r * c >= keep whose aspect follows the grid, centres its points in
    their cells, then drops r * c - keep lattice points evenly spaced in raster order.
    """
    rows = min(height, max(1, round(math.sqrt(keep * height / width))))
    cols = min(width, math.ceil(keep / rows))
    rows = min(height, math.ceil(keep / cols))
    r = ((torch.arange(rows) + 0.5) * height / rows).long()
    c = ((torch.arange(cols) + 0.5) * width / cols).long()
    points = (r.unsqueeze(1) * width + c.unsqueeze(0)).flatten()  # [rows * cols]
    pick = ((torch.arange(keep) + 0.5) * points.numel() / keep).long()
    return points[pick]


@dataclass
class Uniform(ScoredMethod):
    """Keep ``keep`` tokens spread evenly over the image's token grid (no signal needed).

    The grid comes from the adapter (e.g. 24 x 24 for LLaVA-1.5); a square N is taken as sqrt(N) x
    sqrt(N) and any other N as one row. Protected tokens are kept first and the rest filled from
    the lattice.
    """

    name = "uniform"
    requires = ()

    def score(self, signals: dict[str, Any], keep: int) -> torch.Tensor:
        n = num_tokens(signals)
        side = math.isqrt(n)
        height, width = signals.get("grid") or ((side, side) if side * side == n else (1, n))
        score = torch.zeros(n)
        score[lattice(height, width, keep)] = 1.0
        device = next(v.device for v in signals.values() if isinstance(v, torch.Tensor))
        return score.to(device).expand(batch_size(signals), n)
