"""Uniform pruning: a spatially even lattice of tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from vtc.methods.base import ScoredMethod, batch_size, num_tokens, protected_mask, signal_device
from vtc.registry import register


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


def video_lattice(frames: int, height: int, width: int, keep: int) -> torch.Tensor:
    """Sorted indices of ``keep`` tokens of a video (frames x height x width, frame after frame in raster order):
    frame t takes keep // frames tokens, the first keep % frames frames one more, each frame's share a
    :func:`lattice` of its grid (a share of 0 keeps nothing of that frame)."""
    per_frame = height * width
    shares = [keep // frames + (t < keep % frames) for t in range(frames)]
    return torch.cat([t * per_frame + lattice(height, width, m) for t, m in enumerate(shares) if m > 0])


def bit_reversed_order(n: int) -> torch.Tensor:
    """[n] distinct values in [0, 1): the van der Corput sequence of each index (spread, deterministic)."""
    bits = max(1, (n - 1).bit_length())
    index = torch.arange(n)
    reversed_bits = torch.zeros(n, dtype=torch.long)
    for bit in range(bits):
        reversed_bits |= ((index >> bit) & 1) << (bits - 1 - bit)
    return reversed_bits.float() / (1 << bits)


@register
@dataclass
class Uniform(ScoredMethod):
    """Keep ``keep`` tokens spread evenly over the image's token grid (no signal needed).

    The grid comes from the adapter (e.g. 24 x 24 for LLaVA-1.5); a square N is taken as sqrt(N) x
    sqrt(N) and any other N as one row. A video's (T, H, W) grid spreads ``keep`` over the frames as
    evenly as possible (keep // T each, the first keep % T frames one more), each frame's share a
    lattice of its H x W grid. With protected tokens, a row's remaining budget m is spread
    as an m-point lattice; lattice points that are protected are made up by the next tokens in a
    fixed bit-reversed raster order, so every row's choice depends on that row alone.
    """

    name = "uniform"
    requires = ()

    def score(self, signals: dict[str, Any], keep: int) -> torch.Tensor:
        n = num_tokens(signals)
        side = math.isqrt(n)
        grid = signals.get("grid") or ((side, side) if side * side == n else (1, n))
        frames, height, width = grid if len(grid) == 3 else (1, *grid)
        remaining = keep - protected_mask(signals, (batch_size(signals), n)).sum(dim=1).cpu()  # [B]
        score = bit_reversed_order(n).expand(len(remaining), n).clone()  # ties broken, never equal
        for m in remaining.unique().tolist():
            if m > 0:
                rows = (remaining == m).nonzero().squeeze(1)
                score[rows.unsqueeze(1), video_lattice(frames, height, width, m).unsqueeze(0)] += 2.0
        return score.to(signal_device(signals))
