"""Where each visual token comes from: its rectangle in the ORIGINAL image, in pixels.

    inputs = processor(images=images, text=prompts, return_tensors="pt")
    boxes = vtc.geometry.token_boxes(model, inputs, images, processor)  # per sample, per image: [n_i, 4]
    with vtc.compress(model, "dart", keep=64) as handle:
        model.generate(**inputs)
    kept = torch.cat(boxes[0])[handle.last_kept[0]]  # the rectangles the language model still sees, sample 0

A box is ``(x0, y0, x1, y1)`` in continuous pixel coordinates of the image as the user gave it (before any
resize, crop or pad): pixel (row i, column j) is the unit square [j, j + 1] x [i, i + 1], so a token that
sees the whole image has the box (0, 0, width, height). Boxes are float64 and clipped to the image. Rows are
in the order of the visual tokens that ``handle.last_kept`` indexes (the image placeholders of a sample, in
sequence order; several images of a sample are concatenated, so ``torch.cat(boxes[b])`` lines up with them).

Two kinds of rows carry no area:

* NaN rows: tokens with no place in the image, LLaVA-NeXT's and OneVision's ``image_newline`` tokens (and the [CLS]
  token of a LLaVA model with ``vision_feature_select_strategy="full"``).
* empty boxes (``x0 == x1`` or ``y0 == y1``): tokens that see only padding the processor added.

What is inverted, per token layout (each family's adapter names its ``layout``; each step is the processor's own
arithmetic, with transformers' helpers):

* ``grid``, LLaVA-1.5 (``CLIPImageProcessor`` / ``LlavaImageProcessor``): optional pad to a square
  (``LlavaImageProcessor`` with ``do_pad``), resize (shortest edge, or a fixed size), center crop, then a grid of
  ``patch_size`` patches in row-major order. The crop can cut parts of the image off: no token covers them.
* ``anyres``, LLaVA-NeXT and LLaVA-OneVision: the base image (the whole image squeezed to the crop size) and the
  high-resolution crops of the image resized into its best grid resolution and padded to it; the boxes of their
  patches are packed into the model's token order by the family's adapter (``pack_boxes``: the model's own
  ``pack_image_features``, with unpadding and newline tokens). LLaVA-OneVision downsamples a big grid of crop tokens
  (bilinear): such a token's box is centred where it samples the grid and as wide as its sampling step, so the tokens
  still tile the image. Its processor does not cut the images of a sample with several images (``batch_num_images``):
  each is padded to a square (centred) and resized to one crop.
* ``merged_grid``, the Qwen families: the image is resized (``smart_resize``) to ``image_grid_thw`` patches;
  each visual token is a ``merge x merge`` group of patches, in row-major order of the merged grid.
* ``tiles``, InternVL (``GotOcr2ImageProcessor`` with ``crop_to_patches``): the image is resized to the tile grid
  whose aspect ratio fits best (``get_optimal_tiled_canvas`` between ``min_patches`` and ``max_patches`` tiles), cut
  into tiles in row-major order, and followed by a thumbnail (the whole image resized to one tile) when there is more
  than one tile; a token's box covers the patches the model's own ``pixel_shuffle`` puts into it.

A box is the area the token's pixels were resampled FROM (the resize maps output pixel u to input
[u * s, (u + 1) * s]); a bicubic filter also gives a little weight to pixels just outside it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vtc.registry import ADAPTERS, list_models

_packers: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Affine:
    """original = scale * processed + offset, on both axes (y then x)."""

    scale_y: float = 1.0
    offset_y: float = 0.0
    scale_x: float = 1.0
    offset_x: float = 0.0

    def then(self, outer: _Affine) -> _Affine:
        """This map followed by ``outer`` (``outer`` maps this map's output further back to the original)."""
        return _Affine(
            outer.scale_y * self.scale_y,
            outer.scale_y * self.offset_y + outer.offset_y,
            outer.scale_x * self.scale_x,
            outer.scale_x * self.offset_x + outer.offset_x,
        )

    def boxes(self, processed: torch.Tensor) -> torch.Tensor:
        """[n, 4] boxes in processed pixels -> [n, 4] in the source."""
        x0, y0, x1, y1 = processed.unbind(-1)
        return torch.stack(
            [
                self.scale_x * x0 + self.offset_x,
                self.scale_y * y0 + self.offset_y,
                self.scale_x * x1 + self.offset_x,
                self.scale_y * y1 + self.offset_y,
            ],
            dim=-1,
        )


def token_boxes(
    model: nn.Module,
    inputs: Any,
    images: Sequence[Any] | None = None,
    processor: Any = None,
) -> list[list[torch.Tensor]]:
    """Rectangles of every visual token of a processed batch, in original image pixels.

    Args:
        model: a supported VLM (``config.model_type`` in :func:`vtc.list_models`), or anything with its ``config``.
        inputs: the processor's output for the batch (``input_ids``; ``image_sizes`` for LLaVA-NeXT and OneVision,
            with ``batch_num_images`` for OneVision; ``image_grid_thw`` for the Qwen families).
        images: the images given to the processor, in the same order (all samples' images, flattened): PIL images,
            HWC / HW numpy arrays, or ``(height, width)`` pairs. Needed for LLaVA-1.5 and Qwen (their inputs do not
            record the original size); optional for LLaVA-NeXT (checked against ``image_sizes`` when given).
        processor: the processor (or its image processor) that made ``inputs``; it decides resize, crop and pad.
            None: the model family's standard preprocessing for the model's vision size (LLaVA-1.5: shortest
            edge resize + center crop; LLaVA-NeXT: the same per crop); Qwen needs none (``image_grid_thw`` says it).

    Returns:
        Per sample, per image of that sample (sequence order), a float64 tensor [n_i, 4] of (x0, y0, x1, y1), one
        row per visual token (placeholder) of the image; NaN rows for tokens without a place (newline tokens),
        empty boxes for tokens over padding only. ``torch.cat(result[b])[handle.last_kept[b]]`` are the boxes of
        the tokens that sample b kept.
    """
    config = model.config
    layout = _layout(config)
    input_ids = inputs["input_ids"]
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = config.image_token_index
    per_row = (input_ids == image_token).sum(dim=1).tolist()
    sizes = None if images is None else [image_size(image) for image in images]

    if layout == "grid":
        if sizes is None:
            raise ValueError("token_boxes needs the images (or their (height, width)) for LLaVA-1.5 inputs")
        per_image = [image_token_boxes(model, size, processor) for size in sizes]
    elif layout == "anyres":
        recorded = [tuple(int(v) for v in size) for size in inputs["image_sizes"].tolist()]
        if sizes is not None and [tuple(s) for s in sizes] != recorded:
            raise ValueError(f"the images have sizes {sizes} but inputs['image_sizes'] records {recorded}")
        counts = inputs.get("batch_num_images")
        # LLaVA-OneVision's processor cuts only the image of a single-image sample into crops.
        patched = [True] * len(recorded) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        if len(patched) != len(recorded):
            raise ValueError(f"inputs['batch_num_images'] counts {len(patched)} images, image_sizes {len(recorded)}")
        per_image = [
            image_token_boxes(model, size, processor, patched=cut) for size, cut in zip(recorded, patched, strict=True)
        ]
    elif layout == "tiles":
        if sizes is None:
            raise ValueError("token_boxes needs the images (or their (height, width)) for InternVL inputs")
        tiles = _tile_counts(model, input_ids)
        if len(sizes) != len(tiles):
            raise ValueError(f"{len(sizes)} images given, but input_ids hold {len(tiles)} runs of image tokens")
        per_image = [image_token_boxes(model, size, processor, tiles=k) for size, k in zip(sizes, tiles, strict=True)]
    else:
        grids = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
        if sizes is None:
            raise ValueError("token_boxes needs the images (or their (height, width)) for Qwen2-VL inputs")
        if len(sizes) != len(grids):
            raise ValueError(f"{len(sizes)} images given, but inputs['image_grid_thw'] lists {len(grids)}")
        per_image = [image_token_boxes(model, size, grid_thw=grid) for size, grid in zip(sizes, grids, strict=True)]
    return _split(per_image, per_row)


def image_token_boxes(
    model: nn.Module,
    size: tuple[int, int],
    processor: Any = None,
    *,
    grid_thw: Sequence[int] | None = None,
    tiles: int | None = None,
    patched: bool = True,
) -> torch.Tensor:
    """[n, 4] boxes of the visual tokens of ONE image of ``size`` = (height, width) pixels (see :func:`token_boxes`).

    For the Qwen families give ``grid_thw`` (the image's row of ``inputs["image_grid_thw"]``) or the
    ``processor``, whose ``smart_resize`` settings then decide the grid. ``patched=False``: a LLaVA-OneVision image
    of a sample with several images, not cut into AnyRes crops. For InternVL, ``tiles`` is the image's tile count (its
    placeholders / ``image_seq_length``), checked against the processor's tiling; None: tiled as InternVLProcessor does
    by default (``crop_to_patches``).
    """
    config = model.config
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"an image size is (height, width) in pixels, got {size!r}")
    layout = _layout(config)
    if layout == "grid":
        return _llava_boxes(config, (height, width), _image_processor(processor))
    if layout == "anyres":
        return _anyres_boxes(model, (height, width), _image_processor(processor), patched)
    if layout == "merged_grid":
        return _qwen_boxes(config, (height, width), _image_processor(processor), grid_thw)
    if layout == "tiles":
        return _internvl_boxes(model, (height, width), _image_processor(processor), tiles)
    raise ValueError(f"token_boxes knows the layouts grid, anyres, merged_grid and tiles, not {layout!r}")


def _layout(config: Any) -> str:
    """The token layout of the model's family (its adapter's ``layout``)."""
    if config.model_type not in ADAPTERS:
        raise ValueError(f"token_boxes supports model_types {list_models()}, got {config.model_type!r}")
    return ADAPTERS[config.model_type].layout


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an array / tensor (HW, HWC, or CHW with 1, 3 or 4 channels first, as
    transformers' processors infer it) or a (height, width) pair."""
    if hasattr(image, "size") and isinstance(getattr(image, "size", None), tuple) and hasattr(image, "mode"):
        width, height = image.size  # PIL
        return int(height), int(width)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        shape = tuple(int(v) for v in image.shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"an image array is HW, HWC or CHW, got shape {shape}")
        if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4):
            return shape[1], shape[2]  # channels first
        return shape[0], shape[1]
    if isinstance(image, (tuple, list)) and len(image) == 2 and all(isinstance(v, (int, np.integer)) for v in image):
        return int(image[0]), int(image[1])
    raise TypeError(f"cannot tell the size of {type(image).__name__}; give a PIL image, an array or (height, width)")


# -- shared ---------------------------------------------------------------------------------------------


def _image_processor(processor: Any) -> Any:
    return getattr(processor, "image_processor", processor)


def _get(mapping: Any, key: str) -> Any:
    """A key of a processor size dict (a plain dict in transformers 4.x, a SizeDict in 5.x)."""
    if mapping is None:
        return None
    if isinstance(mapping, dict):
        return mapping.get(key)
    return getattr(mapping, key, None)


def _grid_boxes(rows: int, cols: int, step_y: float, step_x: float) -> torch.Tensor:
    """[rows * cols, 4] row-major cells of ``step`` pixels, in processed pixels."""
    ys = torch.arange(rows, dtype=torch.float64) * step_y
    xs = torch.arange(cols, dtype=torch.float64) * step_x
    y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y0.flatten(), x0.flatten()
    return torch.stack([x0, y0, x0 + step_x, y0 + step_y], dim=-1)


def _shape_only(height: int, width: int) -> np.ndarray:
    """A [1, height, width] array for transformers' size helpers, which read only its shape (no pixels allocated)."""
    return np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (1, height, width))


def _clip(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clip to the image; NaN rows stay NaN, boxes outside collapse to empty ones on the border."""
    height, width = size
    x0, y0, x1, y1 = boxes.unbind(-1)
    out = torch.stack(
        [x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)],
        dim=-1,
    )
    return torch.where(boxes.isnan(), boxes, out)


def _resized_size(size: tuple[int, int], target: Any) -> tuple[int, int]:
    """(height, width) after the image processor's resize to ``target`` (its ``size``), as transformers computes it."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio

    height, width = size
    shortest, longest = _get(target, "shortest_edge"), _get(target, "longest_edge")
    if shortest and longest:
        return tuple(get_size_with_aspect_ratio((height, width), shortest, longest))
    if shortest:
        dummy = _shape_only(height, width)
        resized = get_resize_output_image_size(
            dummy, shortest, default_to_square=False, input_data_format="channels_first"
        )
        return int(resized[0]), int(resized[1])
    max_height, max_width = _get(target, "max_height"), _get(target, "max_width")
    if max_height and max_width:
        from transformers.image_transforms import get_image_size_for_max_height_width

        return tuple(get_image_size_for_max_height_width((height, width), max_height, max_width))
    if _get(target, "height") and _get(target, "width"):
        return int(_get(target, "height")), int(_get(target, "width"))
    raise ValueError(f"unsupported image processor size {target!r}")


def _resize_and_crop(size: tuple[int, int], image_processor: Any, default: int) -> tuple[_Affine, tuple[int, int]]:
    """The CLIP-style steps: resize then center crop. Returns (processed -> source map, processed (h, w))."""
    height, width = size
    if image_processor is None:
        target, crop, do_resize, do_crop = {"shortest_edge": default}, {"height": default, "width": default}, True, True
    else:
        target, crop = image_processor.size, getattr(image_processor, "crop_size", None)
        do_resize = getattr(image_processor, "do_resize", True)
        do_crop = bool(getattr(image_processor, "do_center_crop", False)) and crop is not None
    resized = _resized_size((height, width), target) if do_resize else (height, width)
    if do_crop:
        crop_hw = (int(_get(crop, "height")), int(_get(crop, "width")))
        # transformers' center_crop: top = (H - h) // 2 (a crop larger than the image pads it around: same formula)
        top, left = (resized[0] - crop_hw[0]) // 2, (resized[1] - crop_hw[1]) // 2
    else:
        crop_hw, top, left = resized, 0, 0
    scale_y, scale_x = height / resized[0], width / resized[1]
    return _Affine(scale_y, top * scale_y, scale_x, left * scale_x), crop_hw


def _check_processed(processed: tuple[int, int], side: int, what: str) -> None:
    if processed != (side, side):
        raise ValueError(
            f"the image processor makes {what} of {processed[0]} x {processed[1]} pixels, but the vision tower takes "
            f"{side} x {side}; pass the processor the model was used with"
        )


# -- LLaVA-1.5 ------------------------------------------------------------------------------------------


def _llava_boxes(config: Any, size: tuple[int, int], image_processor: Any) -> torch.Tensor:
    vision = config.vision_config
    side, patch = vision.image_size, vision.patch_size
    height, width = size
    to_source = _Affine()
    padded = size
    if getattr(image_processor, "do_pad", False) and hasattr(image_processor, "pad_to_square"):
        # LlavaImageProcessor: pad to a square of the longest edge, image centered, before the resize.
        edge = max(height, width)
        to_source = _Affine(1.0, -float((edge - height) // 2), 1.0, -float((edge - width) // 2))
        padded = (edge, edge)
    crop_map, processed = _resize_and_crop(padded, image_processor, side)
    _check_processed(processed, side, "images")
    grid = side // patch
    boxes = crop_map.then(to_source).boxes(_grid_boxes(grid, grid, patch, patch))
    if config.vision_feature_select_strategy != "default":  # "full": the [CLS] token comes first
        boxes = torch.cat([torch.full((1, 4), float("nan"), dtype=torch.float64), boxes])
    return _clip(boxes, size)


# -- LLaVA-NeXT, LLaVA-OneVision ----------------------------------------------------------------------------


def _packer(model: nn.Module):
    """The model family's adapter, used only for its token maps (the AnyRes families' box packing, InternVL's pixel
    shuffle groups); no hooks are attached."""
    if model not in _packers:
        from vtc.methods.base import Budget
        from vtc.methods.keep_all import KeepAll

        _packers[model] = ADAPTERS[model.config.model_type](model, KeepAll(), Budget(ratio=1.0))
    return _packers[model]


def _crop_boxes(config: Any, size: tuple[int, int], image_processor: Any) -> torch.Tensor:
    """[crops, T, 4] boxes of every patch of the base image (crop 0) and of each AnyRes crop, in source pixels."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    vision = config.vision_config
    side, patch = vision.image_size, vision.patch_size
    height, width = size
    ip = image_processor
    target = ip.size if ip is not None else {"shortest_edge": side}
    crop = getattr(ip, "crop_size", None) if ip is not None else {"height": side, "width": side}
    pinpoints = getattr(ip, "image_grid_pinpoints", None) if ip is not None else None
    pinpoints = pinpoints or config.image_grid_pinpoints
    # The processor's sizes: the base image is squeezed to base_hw; the high-resolution crops are crop_side squares.
    if _get(target, "height") and _get(target, "width"):
        base_hw = (int(_get(target, "height")), int(_get(target, "width")))
    else:
        base_hw = (int(_get(target, "shortest_edge")),) * 2
    crop_side = int(_get(crop, "height") or _get(target, "height") or _get(target, "shortest_edge"))

    grid = side // patch
    tokens = _grid_boxes(grid, grid, patch, patch)  # one crop's patches in processed pixels
    out = []
    # Base image: resize (ignoring the aspect ratio) to base_hw, then the per-crop resize / crop.
    per_crop, processed = _resize_and_crop(base_hw, ip, side)
    _check_processed(processed, side, "crops")
    squeeze = _Affine(height / base_hw[0], 0.0, width / base_hw[1], 0.0)
    out.append(per_crop.then(squeeze).boxes(tokens))
    # High-resolution crops: resize into the best resolution keeping the aspect ratio, pad to it (centered), split.
    best = select_best_resolution((height, width), pinpoints)
    new_h, new_w = get_patch_output_size(_shape_only(height, width), best, input_data_format="channels_first")
    paste_y, paste_x = (best[0] - new_h) // 2, (best[1] - new_w) // 2
    unpad = _Affine(height / new_h, -paste_y * height / new_h, width / new_w, -paste_x * width / new_w)
    per_crop, processed = _resize_and_crop((crop_side, crop_side), ip, side)
    _check_processed(processed, side, "crops")
    for row in range(0, best[0], crop_side):
        for col in range(0, best[1], crop_side):
            place = _Affine(1.0, float(row), 1.0, float(col))
            out.append(per_crop.then(place).then(unpad).boxes(tokens))
    return torch.stack(out)


def _square_boxes(config: Any, size: tuple[int, int], image_processor: Any) -> torch.Tensor:
    """[1, T, 4] LLaVA-OneVision's image of a multi-image sample: padded to a square of its longest edge (centred),
    then resized to one crop."""
    vision = config.vision_config
    side, patch = vision.image_size, vision.patch_size
    height, width = size
    edge = max(height, width)
    pad = _Affine(1.0, -float((edge - height) // 2), 1.0, -float((edge - width) // 2))
    crop_map, processed = _resize_and_crop((edge, edge), image_processor, side)
    _check_processed(processed, side, "images")
    grid = side // patch
    return crop_map.then(pad).boxes(_grid_boxes(grid, grid, patch, patch)).unsqueeze(0)


def _anyres_boxes(model: nn.Module, size: tuple[int, int], image_processor: Any, patched: bool) -> torch.Tensor:
    config = model.config
    crops = _crop_boxes(config, size, image_processor) if patched else _square_boxes(config, size, image_processor)
    return _clip(_packer(model).pack_boxes(crops, size), size)  # [L, 4], NaN rows for the newline tokens


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ---------------------------------------------------------------------


def _qwen_grid(config: Any, size: tuple[int, int], image_processor: Any) -> tuple[int, int, int]:
    """(t, h, w) in patches, as the image processor's smart_resize gives it."""
    try:  # transformers 5.x: the PIL module (the torchvision one needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # 4.x
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if image_processor is None:
        raise ValueError("Qwen2-VL boxes need grid_thw (inputs['image_grid_thw']) or the processor")
    vision = config.vision_config
    patch = getattr(image_processor, "patch_size", None) or vision.patch_size
    merge = getattr(image_processor, "merge_size", None) or vision.spatial_merge_size
    target = getattr(image_processor, "size", None)
    low = _get(target, "shortest_edge") or getattr(image_processor, "min_pixels", None)
    high = _get(target, "longest_edge") or getattr(image_processor, "max_pixels", None)
    resized = smart_resize(size[0], size[1], factor=patch * merge, min_pixels=low, max_pixels=high)
    return 1, resized[0] // patch, resized[1] // patch


def _qwen_boxes(
    config: Any, size: tuple[int, int], image_processor: Any, grid_thw: Sequence[int] | None
) -> torch.Tensor:
    vision = config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    if grid_thw is None:
        grid_thw = _qwen_grid(config, size, image_processor)
    t, grid_h, grid_w = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"grid_thw {tuple(grid_thw)} is a video (t = {t}); token_boxes maps images")
    if grid_h % merge or grid_w % merge:
        raise ValueError(f"grid_thw {tuple(grid_thw)}: h and w must be multiples of the merge size {merge}")
    # The processor resized the whole image to (grid_h * patch, grid_w * patch): no crop, no pad.
    resized = _Affine(size[0] / (grid_h * patch), 0.0, size[1] / (grid_w * patch), 0.0)
    cells = _grid_boxes(grid_h // merge, grid_w // merge, patch * merge, patch * merge)
    return _clip(resized.boxes(cells), size)


# -- InternVL -------------------------------------------------------------------------------------------


def _tile_counts(model: nn.Module, input_ids: torch.Tensor) -> list[int]:
    """Tile count of every image of a batch, in order: its run of consecutive placeholders / tokens per tile."""
    adapter = _packer(model)
    visual = input_ids == adapter.image_token_id
    return [image.vision["tiles"] for image in adapter._locate_images(visual, visual)]


def _tile_layout(config: Any, size: tuple[int, int], image_processor: Any) -> tuple[int, int]:
    """(rows, cols) of the tiles the processor cuts an image of ``size`` into (before the thumbnail)."""
    try:  # transformers 5.x: the PIL module (the torchvision one needs torchvision)
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    except ImportError:  # 4.x
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    tile = _tile_size(config, image_processor)
    low = getattr(image_processor, "min_patches", None) or 1
    high = getattr(image_processor, "max_patches", None) or 12
    cols, rows = get_optimal_tiled_canvas(tuple(size), tile, low, high)
    return rows, cols


def _tile_size(config: Any, image_processor: Any) -> tuple[int, int]:
    size = getattr(image_processor, "size", None)
    if _get(size, "height") and _get(size, "width"):
        return int(_get(size, "height")), int(_get(size, "width"))
    side = config.vision_config.image_size
    return (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))


def _internvl_boxes(model: nn.Module, size: tuple[int, int], image_processor: Any, tiles: int | None) -> torch.Tensor:
    config = model.config
    tile_h, tile_w = _tile_size(config, image_processor)
    if (tile_h, tile_w) != tuple(_tile_size(config, None)):
        raise ValueError(
            f"the image processor makes tiles of {tile_h} x {tile_w} pixels, but the vision tower takes "
            f"{_tile_size(config, None)}; pass the processor the model was used with"
        )
    rows, cols = _tile_layout(config, size, image_processor)
    tiled = rows * cols + 1 if rows * cols > 1 else 1  # the thumbnail follows several tiles
    if tiles is None:
        tiles = tiled
    if tiles not in (1, tiled):
        raise ValueError(
            f"an image of {size[0]} x {size[1]} pixels has {tiles} tiles in the inputs, but the processor settings "
            f"(min_patches / max_patches) give {tiled} ({rows} x {cols} and a thumbnail); pass the processor the model "
            "was used with"
        )
    patch = config.vision_config.patch_size
    patch_y, patch_x = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    groups = _packer(model).groups  # [T, patches per token]: the patches each token holds
    patches = _grid_boxes(tile_h // patch_y, tile_w // patch_x, patch_y, patch_x)  # one tile's patches
    held = patches[groups]  # [T, group, 4]
    tokens = torch.cat([held[..., :2].amin(1), held[..., 2:].amax(1)], dim=-1)  # their union, in tile pixels
    whole = _Affine(size[0] / tile_h, 0.0, size[1] / tile_w, 0.0)  # the image resized to one tile
    if tiles == 1:  # one tile of the whole image (a 1 x 1 grid, or crop_to_patches off)
        return _clip(whole.boxes(tokens), size)
    resized = _Affine(size[0] / (rows * tile_h), 0.0, size[1] / (cols * tile_w), 0.0)
    out = [
        resized.boxes(_Affine(1.0, float(r * tile_h), 1.0, float(c * tile_w)).boxes(tokens))
        for r in range(rows)
        for c in range(cols)
    ]
    out.append(whole.boxes(tokens))
    return _clip(torch.cat(out), size)


# -- batch layout ---------------------------------------------------------------------------------------


def _split(per_image: list[torch.Tensor], per_row: list[int]) -> list[list[torch.Tensor]]:
    """Assign images, in order, to the samples whose placeholder counts they fill."""
    out: list[list[torch.Tensor]] = []
    index = 0
    for row, count in enumerate(per_row):
        sample, filled = [], 0
        while filled < count:
            if index >= len(per_image):
                raise ValueError(
                    f"sample {row} has {count} image placeholders, more than the {len(per_image)} images account for "
                    f"(tokens per image: {[len(b) for b in per_image]})"
                )
            sample.append(per_image[index])
            filled += len(per_image[index])
            index += 1
        if filled != count:
            raise ValueError(
                f"sample {row} has {count} image placeholders, which do not split into whole images "
                f"(tokens per image: {[len(b) for b in per_image]})"
            )
        out.append(sample)
    if index != len(per_image):
        raise ValueError(f"{len(per_image)} images given but the prompts hold placeholders for {index}")
    return out


def union_area(boxes: torch.Tensor) -> float:
    """Area in pixels covered by the union of ``boxes`` [n, 4] (NaN rows ignored); exact, by coordinate compression."""
    boxes = boxes[~boxes.isnan().any(-1)]
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if boxes.numel() == 0:
        return 0.0
    xs = torch.unique(torch.cat([boxes[:, 0], boxes[:, 2]]))
    ys = torch.unique(torch.cat([boxes[:, 1], boxes[:, 3]]))
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    inside_x = (boxes[:, None, 0] <= cx) & (cx < boxes[:, None, 2])  # [n, X]
    inside_y = (boxes[:, None, 1] <= cy) & (cy < boxes[:, None, 3])  # [n, Y]
    covered = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).any(0)  # [Y, X]
    cell = torch.diff(ys).unsqueeze(1) * torch.diff(xs).unsqueeze(0)
    return float((cell * covered).sum())


__all__ = ["image_size", "image_token_boxes", "token_boxes", "union_area"]
