"""Pictures for the demo, with PIL only: the image with kept / dropped / merged patches, and visual tokens per layer."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DIM = 0.25  # dropped patches keep this share of their brightness...
DIM_TO = np.array([18.0, 18.0, 26.0])  # ...blended towards this dark blue-grey
TINT = 0.4  # merged patches: share of their group's colour
PALETTE = [  # colour-blind-friendly (Okabe-Ito, then Tol's bright), cycled over merge groups
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167),
    (102, 204, 238), (34, 136, 51), (204, 187, 68), (238, 102, 119), (170, 51, 119),
]  # fmt: skip
KEPT_BAR = (0, 114, 178)
BASE_BAR = (205, 205, 212)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> np.ndarray:
    """[height, width] bool: pixels whose centre lies in any of ``boxes`` [n, 4] (x0, y0, x1, y1); NaN rows ignored."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in _pixel_spans(boxes):
        mask[y0:y1, x0:x1] = True
    return mask


def _pixel_spans(boxes: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Pixel index ranges [x0, x1) x [y0, y1) of the pixels whose centres (j + 0.5) fall in each box."""
    boxes = boxes[~boxes.isnan().any(-1)]
    spans = torch.ceil(boxes - 0.5).long().tolist()
    return [tuple(span) for span in spans]


def draw_overlay(
    image: Image.Image,
    boxes: torch.Tensor,
    kept: torch.Tensor,
    merge_into: torch.Tensor | None = None,
    *,
    scale: int = 1,
    outline: bool = False,
) -> Image.Image:
    """The image as the language model still sees it.

    Pixels of kept tokens keep their values; pixels of dropped tokens are dimmed; with a merging method
    (``merge_into`` [N]: the kept token each token joined, -1 for none) the dropped tokens of a group take the group's
    colour. Pixels no visual token covers (cut off by a center crop) are dimmed further and hatched. Where boxes
    overlap (LLaVA-NeXT: base image and high-resolution crops), a pixel counts as kept when any kept token covers it.

    Args:
        image: the original image (any mode; drawn as RGB).
        boxes: [N, 4] the visual tokens' rectangles in ``image`` pixels (:func:`vtc.geometry.token_boxes`).
        kept: [K] indices into ``boxes`` of the kept tokens (``handle.last_kept``).
        merge_into: optional [N] index into ``boxes`` of the kept token each token was merged into.
        scale: draw at ``scale`` times the image size (nearest neighbour: small images keep crisp patches).
        outline: frame each kept token that absorbed a merge group in the group's colour (changes kept pixels on
            the frame, so off by default).
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    height, width = rgb.shape[:2]
    kept = kept.long().cpu()
    boxes = boxes.cpu() * scale
    is_kept = torch.zeros(len(boxes), dtype=torch.bool)
    is_kept[kept] = True
    seen = box_mask(boxes, height, width)
    keep_mask = box_mask(boxes[is_kept], height, width)
    out = rgb * DIM + DIM_TO * (1 - DIM)
    # Not covered by any token: darker still, with diagonal hatching.
    hidden = ~seen
    if hidden.any():
        ys, xs = np.mgrid[0:height, 0:width]
        stripes = ((xs + ys) // max(2, min(height, width) // 40)) % 2 == 0
        out[hidden] = rgb[hidden] * 0.12 + np.where(stripes[hidden, None], 70.0, 8.0)
    colour_of: dict[int, tuple[int, int, int]] = {}
    if merge_into is not None:
        merge_into = merge_into.long().cpu()
        merged = (merge_into >= 0) & ~is_kept
        targets = merge_into[merged].unique().tolist()
        colour_of = {target: PALETTE[i % len(PALETTE)] for i, target in enumerate(sorted(targets))}
        for token in merged.nonzero()[:, 0].tolist():
            spans = _pixel_spans(boxes[token : token + 1])
            if not spans:
                continue
            x0, y0, x1, y1 = spans[0]
            colour = np.array(colour_of[int(merge_into[token])], dtype=np.float64)
            region = rgb[y0:y1, x0:x1]
            out[y0:y1, x0:x1] = region * DIM + colour * TINT + DIM_TO * (1 - DIM - TINT)
    out[keep_mask] = rgb[keep_mask]
    result = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
    if outline and merge_into is not None and colour_of:
        draw = ImageDraw.Draw(result)
        width_px = max(1, min(height, width) // 200)
        for target, colour in colour_of.items():
            for x0, y0, x1, y1 in _pixel_spans(boxes[target : target + 1]):
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width_px)
    return result


def frame_strip(
    frames: list[Image.Image], grid: tuple[int, int, int], kept: torch.Tensor, columns: int = 4
) -> Image.Image:
    """The frames of a video as the model still sees them, left to right and top to bottom: each frame (one per
    temporal patch, at the model's input size) with its kept tokens bright and the rest dimmed, and its kept count.

    Args:
        frames: one image per temporal patch, each ``grid[2] x grid[1]`` tokens in size.
        grid: (temporal patches, rows, columns) of the video's visual tokens.
        kept: indices into the video's tokens, raster order, temporal patch after temporal patch.
    """
    t, h, w = grid
    scale = display_scale(frames[0], target=256)
    tiles = []
    for i, frame in enumerate(frames[:t]):
        sx, sy = frame.width / w, frame.height / h
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        boxes = torch.stack([cols * sx, rows * sy, (cols + 1) * sx, (rows + 1) * sy], -1).reshape(-1, 4).double()
        own = kept[(kept >= i * h * w) & (kept < (i + 1) * h * w)] - i * h * w
        tile = draw_overlay(frame, boxes, own, scale=scale)
        label = Image.new("RGB", (tile.width, 18), "white")
        ImageDraw.Draw(label).text(
            (4, 2), f"frame {i}: {own.numel()} of {h * w} kept", fill=(60, 60, 70), font=_font(12)
        )
        tiles.append((tile, label))
    columns = max(1, min(columns, len(tiles)))
    cell_w = max(tile.width for tile, _ in tiles)
    cell_h = max(tile.height for tile, _ in tiles) + 18
    rows_needed = -(-len(tiles) // columns)
    strip = Image.new(
        "RGB", (columns * cell_w + (columns - 1) * 4, rows_needed * cell_h + (rows_needed - 1) * 4), "white"
    )
    for i, (tile, label) in enumerate(tiles):
        x, y = (i % columns) * (cell_w + 4), (i // columns) * (cell_h + 4)
        strip.paste(label, (x, y))
        strip.paste(tile, (x, y + 18))
    return strip


def display_scale(image: Image.Image, target: int = 448) -> int:
    """The whole factor that brings a small image (the 128 px scenes) near ``target`` pixels; 1 for larger ones."""
    return max(1, target // max(image.width, image.height))


def layer_chart(before: int, per_layer: list[int], *, width: int = 480, height: int = 300) -> Image.Image:
    """Bars of the visual tokens at the input of every LLM layer: uncompressed (grey) and compressed (blue)."""
    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    font = _font(12)
    left, right, top, bottom = 48, 12, 40, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    layers = max(1, len(per_layer))
    peak = max([before, *per_layer, 1])
    for tick in (0, peak // 2, peak):
        y = top + plot_h - plot_h * tick / peak
        draw.line([(left - 4, y), (width - right, y)], fill=(232, 232, 236))
        draw.text((4, y - 7), str(tick), fill=(90, 90, 100), font=font)
    slot = plot_w / layers
    bar = max(2.0, slot * 0.7)
    for layer, count in enumerate(per_layer):
        x = left + slot * layer + (slot - bar) / 2
        draw.rectangle([x, top + plot_h - plot_h * before / peak, x + bar, top + plot_h], fill=BASE_BAR)
        if count > 0:
            draw.rectangle([x, top + plot_h - plot_h * count / peak, x + bar, top + plot_h], fill=KEPT_BAR)
        if layers <= 40 or layer % 4 == 0:
            draw.text((x + bar / 2 - 4, top + plot_h + 4), str(layer), fill=(90, 90, 100), font=font)
    draw.text((left, height - 15), "LLM layer", fill=(90, 90, 100), font=font)
    for i, (colour, name) in enumerate(((BASE_BAR, "without vtc"), (KEPT_BAR, "with vtc"))):
        x = width - right - 190 + i * 100
        draw.rectangle([x, height - 13, x + 10, height - 3], fill=colour)
        draw.text((x + 14, height - 15), name, fill=(60, 60, 70), font=font)
    draw.text((4, top - 18), "visual tokens", fill=(90, 90, 100), font=font)
    return chart


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font
        return ImageFont.load_default()
