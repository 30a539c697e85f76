"""vtc.demo.render: the overlay keeps kept patches' pixels, dims dropped ones, colours merged groups, hatches what no
token covers; the per-layer chart draws its bars to scale."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from training import build
from vtc import geometry
from vtc.demo import render
from vtc.organisms import scenes


def grid_boxes(rows: int, cols: int, step: int) -> torch.Tensor:
    boxes = [[c * step, r * step, (c + 1) * step, (r + 1) * step] for r in range(rows) for c in range(cols)]
    return torch.tensor(boxes, dtype=torch.float64)


def noisy_image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(60, 256, size=(height, width, 3), dtype=np.uint8))


def test_kept_patches_keep_their_pixels_dropped_ones_are_dimmed():
    image = noisy_image(32, 48)
    boxes = grid_boxes(4, 6, 8)
    kept = torch.tensor([0, 7, 23])
    out = np.asarray(render.draw_overlay(image, boxes, kept), dtype=np.int64)
    original = np.asarray(image, dtype=np.int64)
    assert out.shape == original.shape
    for token in range(24):
        x0, y0, x1, y1 = (int(v) for v in boxes[token])
        patch, before = out[y0:y1, x0:x1], original[y0:y1, x0:x1]
        if token in kept.tolist():
            assert np.array_equal(patch, before)
        else:
            expected = np.round(before * render.DIM + render.DIM_TO * (1 - render.DIM))
            assert np.abs(patch - expected).max() <= 1
            assert (patch.sum(-1) < before.sum(-1)).all()  # every pixel darker


def test_merged_groups_take_their_group_colour():
    image = Image.new("RGB", (16, 8), (200, 200, 200))
    boxes = grid_boxes(1, 2, 8)
    out = np.asarray(render.draw_overlay(image, boxes, torch.tensor([1]), torch.tensor([1, 1])))
    assert (out[:, 8:] == 200).all()  # the kept token
    colour = np.array(render.PALETTE[0])
    left = out[0, 0].astype(float)
    expected = 200 * render.DIM + colour * render.TINT + render.DIM_TO * (1 - render.DIM - render.TINT)
    assert np.abs(left - expected).max() <= 1


def test_pixels_no_token_covers_are_hatched():
    """A LLaVA-style crop of a wide image: the cut-off sides are darker than dropped patches and striped."""
    config = build.config("llava", 64)
    image = scenes.scene("test", 0).image.resize((256, 128))
    boxes = geometry.image_token_boxes(type("M", (), {"config": config})(), (128, 256))
    out = np.asarray(render.draw_overlay(image, boxes, torch.arange(256)), dtype=np.int64)
    original = np.asarray(image, dtype=np.int64)
    middle = slice(64, 192)
    assert np.array_equal(out[:, middle], original[:, middle])  # everything seen is kept here
    side = out[:, :64]
    assert side.max() < original[:, :64].max()
    assert len(np.unique(side.sum(-1) > 3 * 40)) == 2  # light and dark stripes


def test_overlapping_boxes_count_as_kept_when_any_kept_token_covers_them():
    image = noisy_image(16, 16)
    boxes = torch.tensor([[0, 0, 16, 16], [0, 0, 8, 8], [float("nan")] * 4], dtype=torch.float64)
    out = np.asarray(render.draw_overlay(image, boxes, torch.tensor([1])))  # the newline row is ignored
    original = np.asarray(image)
    assert np.array_equal(out[:8, :8], original[:8, :8])
    assert (out[8:, 8:].astype(int).sum(-1) < original[8:, 8:].astype(int).sum(-1)).all()


def test_scaled_overlay_keeps_patches_crisp_and_frames_merge_targets():
    small = noisy_image(16, 16)
    assert render.display_scale(noisy_image(128, 128)) == 3 and render.display_scale(noisy_image(500, 300)) == 1
    boxes = grid_boxes(2, 2, 8)
    kept, merge_into = torch.tensor([0]), torch.tensor([0, 0, 0, -1])
    plain = np.asarray(render.draw_overlay(small, boxes, kept, merge_into))
    big = np.asarray(render.draw_overlay(small, boxes, kept, merge_into, scale=3))
    assert big.shape == (48, 48, 3)
    assert np.array_equal(big[::3, ::3], plain)  # the same picture, nearest-neighbour scaled
    framed = np.asarray(render.draw_overlay(small, boxes, kept, merge_into, scale=3, outline=True))
    assert (framed[0, :24] == render.PALETTE[0]).all()  # the kept token's frame in its group's colour
    assert np.array_equal(framed[1:23, 1:23], big[1:23, 1:23])  # inside the frame: unchanged


def test_layer_chart_bars_to_scale():
    chart = render.layer_chart(256, [256, 128, 64, 0])
    pixels = np.asarray(chart)[:-34]  # the plot, without the axis labels and the legend below it
    kept_colour = np.all(pixels == render.KEPT_BAR, axis=-1)
    base_colour = np.all(pixels == render.BASE_BAR, axis=-1)
    columns = kept_colour.any(0).nonzero()[0]
    assert len(columns) > 0 and base_colour.any()
    heights = []
    for layer in range(4):  # the kept bar's height in each layer's slot
        slot = (columns >= 48 + layer * (chart.width - 60) / 4) & (columns < 48 + (layer + 1) * (chart.width - 60) / 4)
        heights.append(int(kept_colour[:, columns[slot]].sum(0).max()) if slot.any() else 0)
    assert heights[3] == 0
    assert abs(heights[0] - 2 * heights[1]) <= 2 and abs(heights[1] - 2 * heights[2]) <= 2


def test_screenshot_png_is_reduced_under_the_limit():
    import io

    from vtc.demo.screenshot import small_png

    buffer = io.BytesIO()
    noisy_image(600, 800).save(buffer, format="PNG")  # noise: about 1.4 MB as a PNG
    small = small_png(buffer.getvalue(), max_kb=150)
    assert small.startswith(b"\x89PNG") and len(small) <= 150 * 1024
    assert Image.open(io.BytesIO(small)).mode == "P"  # 256 colours


def test_a_frame_strip_keeps_each_frames_kept_tokens_bright():
    """Two temporal patches of a 2 x 2 token grid on 32 px frames: frame 0 keeps its token 0, frame 1 its token 3;
    their 16 px squares keep their pixels, the others are dimmed; frames are laid left to right."""
    frames = [Image.new("RGB", (32, 32), (200, 100, 50)), Image.new("RGB", (32, 32), (50, 100, 200))]
    strip = render.frame_strip(frames, (2, 2, 2), torch.tensor([0, 7]))
    scale = render.display_scale(frames[0], target=256)
    pixels = np.asarray(strip).astype(int)
    top = 18  # the label row above each frame
    size, gap = 32 * scale, 4

    def at(frame: int, row: int, col: int) -> np.ndarray:
        return pixels[top + row * 16 * scale + 8 * scale, frame * (size + gap) + col * 16 * scale + 8 * scale]

    assert at(0, 0, 0).tolist() == [200, 100, 50] and at(1, 1, 1).tolist() == [50, 100, 200]
    for frame, row, col in ((0, 0, 1), (0, 1, 1), (1, 0, 0), (1, 0, 1)):
        assert at(frame, row, col).sum() < 0.5 * np.asarray(frames[frame].getpixel((0, 0))).sum()
