"""vtc.geometry: every visual token's rectangle in the original image, checked against the model itself.

The evidence is independent of vtc.geometry's arithmetic. A "probe" turns a real model's vision path into a
colour meter: the patch embedding (the real conv) averages each patch's RGB, the transformer layers, layer norms
and projector pass values through unchanged (the Qwen patch merger gets weights that average its 2 x 2 group),
so the visual token the language model receives carries the mean colour of the pixels behind it. The images are
colour ramps (red = x, green = y, blue = 255 on the image, anything else on padding) run through the REAL
processors, so a token's decoded colour says where in the original image its pixels came from, after the
processor's resize / crop / pad and the model's patch order, AnyRes packing, unpadding and newline tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from training import build
from vtc import geometry
from vtc.aux_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vtc.loading import QwenProcessor
from vtc.tiny import (
    BOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VISION_END_TOKEN_ID,
    QWEN_VISION_START_TOKEN_ID,
    llava_onevision_image_tokens,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
)

NEWLINE_MARK = -1000.0


def ramp(height: int, width: int) -> Image.Image:
    """Red encodes x, green y (pixel centres), blue 255 marks the image (padding has other blue)."""
    assert height <= 255 and width <= 255  # one grey level per pixel at most
    xs = np.round(255 * (np.arange(width) + 0.5) / width)
    ys = np.round(255 * (np.arange(height) + 0.5) / height)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = xs[None, :]
    pixels[..., 1] = ys[:, None]
    pixels[..., 2] = 255
    return Image.fromarray(pixels)


# -- probes -------------------------------------------------------------------------------------------


def _pass_through(module: torch.nn.Module) -> None:
    """Make a module return its (first) input: layer norms, transformer layers, projectors."""

    def hook(mod, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    module.register_forward_hook(hook, with_kwargs=True)


@torch.no_grad()
def clip_probe(model) -> None:
    """LLaVA / LLaVA-NeXT (CLIP) and LLaVA-OneVision (SigLIP): each visual token = the mean normalised RGB of its
    patch (channels 0-2); a token OneVision resamples, the same mix of its patches' colours."""
    base = model.model
    vision = getattr(base.vision_tower, "vision_model", base.vision_tower)
    embeddings = vision.embeddings
    weight = torch.zeros_like(embeddings.patch_embedding.weight)  # [D, 3, p, p]
    for c in range(3):
        weight[c, c] = 1 / weight[c, c].numel()
    embeddings.patch_embedding.weight.copy_(weight)
    if embeddings.patch_embedding.bias is not None:  # SigLIP
        embeddings.patch_embedding.bias.zero_()
    if hasattr(embeddings, "class_embedding"):  # CLIP
        embeddings.class_embedding.zero_()
    embeddings.position_embedding.weight.zero_()
    for norm in ("pre_layrnorm", "post_layernorm"):
        if hasattr(vision, norm):
            _pass_through(getattr(vision, norm))
    for layer in vision.encoder.layers:
        if hasattr(embeddings, "class_embedding"):
            _pass_through(layer)
        else:  # SigLIP: no branch adds to the residual stream (transformers 4.57 records its hidden states by hooks)
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    _pass_through(base.multi_modal_projector)
    if getattr(base, "image_newline", None) is not None:
        base.image_newline.fill_(NEWLINE_MARK)


@torch.no_grad()
def qwen_probe(model) -> None:
    """Qwen2-VL / 2.5-VL: each visual token = the mean normalised RGB of its merge group of patches."""
    visual = model.model.visual
    proj = visual.patch_embed.proj  # Conv3d [E, 3, T, P, P]
    weight = torch.zeros_like(proj.weight)
    for c in range(3):
        weight[c, c] = 1 / weight[c, c].numel()
    proj.weight.copy_(weight)
    for block in visual.blocks:
        _pass_through(block)
    merger = visual.merger
    _pass_through(merger.ln_q)
    first, last = merger.mlp[0], merger.mlp[2]
    context = first.in_features // (visual.spatial_merge_size**2)
    group = first.in_features // context
    # The real MLP: the first linear averages channel c over the group (+10 keeps GELU in its linear range), the
    # second removes the offset.
    first.weight.zero_()
    first.bias.zero_()
    last.weight.zero_()
    last.bias.zero_()
    for c in range(3):
        for k in range(group):
            first.weight[c, k * context + c] = 1 / group
        first.bias[c] = 10.0
        last.weight[c, c] = 1.0
        last.bias[c] = -10.0


@torch.no_grad()
def visual_tokens(model, inputs: dict) -> list[torch.Tensor]:
    """Per sample: the visual tokens as the language model receives them, [N_b, D], in placeholder order."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    token = model.config.image_token_id
    return [seen["embeds"][b][inputs["input_ids"][b] == token] for b in range(inputs["input_ids"].shape[0])]


def decode(tokens: torch.Tensor, image_processor) -> torch.Tensor:
    """[n, D] probe tokens -> [n, 3] mean RGB in 0..255."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64)
    return (tokens[:, :3].double() * std + mean) * 255


def check_centres(boxes: torch.Tensor, rgb: torch.Tensor, size: tuple[int, int], content: torch.Tensor) -> int:
    """For tokens that see only image pixels (``content``), the decoded ramp position is the box centre."""
    height, width = size
    measured_x = rgb[content, 0] * width / 255
    measured_y = rgb[content, 1] * height / 255
    b = boxes[content]
    centre_x, centre_y = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    # Quantisation (<= 0.5 px here) and bicubic bias at the borders stay far below a box; a wrong token is a box off.
    tol_x = (b[:, 2] - b[:, 0]) * 0.2 + 0.75
    tol_y = (b[:, 3] - b[:, 1]) * 0.2 + 0.75
    bad = ((measured_x - centre_x).abs() > tol_x) | ((measured_y - centre_y).abs() > tol_y)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {int(content.sum())} tokens: boxes {b[bad][:4].tolist()} but the pixels come from "
        f"x {measured_x[bad][:4].tolist()}, y {measured_y[bad][:4].tolist()}"
    )
    return int(content.sum())


# -- LLaVA-1.5 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava():
    """The shapes-llava organism's architecture (128 px, 8 px patches, 256 tokens) and its real LlavaProcessor."""
    processor = build.processor("llava")
    model = build.model("llava", len(processor.tokenizer)).eval()
    clip_probe(model)
    return model, processor


def _llava_inputs(processor, images_per_sample: list[list[Image.Image]]):
    prompts = []
    for images in images_per_sample:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what shape is the red object ?"}]
        prompts.append(
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        )
    flat = [image for images in images_per_sample for image in images]
    return processor(images=flat, text=prompts, return_tensors="pt", padding=True), flat


def test_llava_boxes_match_the_pixels_each_token_sees(llava):
    model, processor = llava
    # Wide and tall images (the center crop cuts their long side), one smaller than the crop (upscaled), a square.
    samples = [[ramp(120, 200), ramp(40, 60)], [ramp(200, 90)], [ramp(128, 128)]]
    inputs, flat = _llava_inputs(processor, samples)
    boxes = geometry.token_boxes(model, inputs, flat, processor)
    tokens = visual_tokens(model, inputs)
    assert [len(per_sample) for per_sample in boxes] == [2, 1, 1]
    checked = 0
    for b, per_sample in enumerate(boxes):
        rgb = decode(tokens[b], processor.image_processor)
        offsets = np.cumsum([0] + [len(x) for x in per_sample])
        assert offsets[-1] == len(tokens[b]) == 256 * len(per_sample)
        for i, image_boxes in enumerate(per_sample):
            image = samples[b][i]
            size = (image.height, image.width)
            part = rgb[offsets[i] : offsets[i + 1]]
            assert not bool(image_boxes.isnan().any())
            checked += check_centres(image_boxes, part, size, torch.ones(len(part), dtype=torch.bool))
    assert checked == 4 * 256


def test_llava_crop_cuts_off_the_sides(llava):
    """A 120 x 200 image: resized to 128 x 213, center-cropped to 128 x 128. Only x in [39.4, 159.6] is seen."""
    model, processor = llava
    boxes = geometry.image_token_boxes(model, (120, 200), processor)
    left, right = 42 * 200 / 213, (42 + 128) * 200 / 213
    assert boxes[:, 0].min().item() == pytest.approx(left)
    assert boxes[:, 2].max().item() == pytest.approx(right)
    assert (boxes[:, 1].min().item(), boxes[:, 3].max().item()) == (0.0, 120.0)
    assert geometry.union_area(boxes) == pytest.approx((right - left) * 120)
    # The tokens tile the seen part: same-size boxes, no overlap.
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert torch.allclose(areas, areas[0].expand_as(areas))
    assert areas.sum().item() == pytest.approx(geometry.union_area(boxes))


def test_llava_painted_region_reaches_exactly_the_tokens_whose_boxes_cover_it(llava):
    """Paint magenta in the middle and in the part the crop cuts off: the tokens whose boxes lie inside the painted
    middle carry magenta, tokens whose boxes miss it carry none, and no token sees the cut-off paint."""
    model, processor = llava
    pixels = np.full((120, 200, 3), (90, 140, 60), dtype=np.uint8)  # olive background
    inside = (70, 30, 130, 80)  # x0, y0, x1, y1
    cut_off = (2, 10, 30, 110)  # left of x = 39.4: cropped away
    for x0, y0, x1, y1 in (inside, cut_off):
        pixels[y0:y1, x0:x1] = (255, 0, 255)
    image = Image.fromarray(pixels)
    inputs, flat = _llava_inputs(processor, [[image]])
    boxes = geometry.token_boxes(model, inputs, flat, processor)[0][0]
    rgb = decode(visual_tokens(model, inputs)[0], processor.image_processor)
    magenta = (rgb[:, 1] < 60) & (rgb[:, 0] > 150) & (rgb[:, 2] > 150)
    within = (
        (boxes[:, 0] >= inside[0])
        & (boxes[:, 2] <= inside[2])
        & (boxes[:, 1] >= inside[1])
        & (boxes[:, 3] <= inside[3])
    )
    apart = (
        (boxes[:, 2] <= inside[0] - 2) | (boxes[:, 0] >= inside[2] + 2) | (boxes[:, 3] <= inside[1] - 2)
        | (boxes[:, 1] >= inside[3] + 2)
    )  # fmt: skip
    assert int(within.sum()) >= 40
    assert bool(magenta[within].all())
    assert not bool(magenta[apart].any())
    assert bool((within | apart).sum() < len(boxes))  # the border tokens in between are not asserted either way
    assert not bool((boxes[:, 0] < cut_off[2]).any())  # nothing covers the cut-off paint


def test_llava_pad_to_square_processor():
    """LlavaImageProcessor(do_pad=True) pads to a square (mean colour) before resizing: tokens over the padding
    get empty boxes, tokens across the border the clipped part, in proportion to the image pixels they see."""
    from transformers import LlavaImageProcessor

    try:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as Processor
    except ImportError:
        Processor = LlavaImageProcessor
    tokenizer = build.tokenizer("llava")
    model = build.model("llava", len(tokenizer)).eval()
    clip_probe(model)
    image_processor = Processor(
        do_pad=True,
        size={"shortest_edge": 128},
        crop_size={"height": 128, "width": 128},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    size = (100, 250)
    pixel_values = image_processor(images=[ramp(*size)], return_tensors="pt")["pixel_values"]
    inputs = {
        "input_ids": torch.tensor([[1] + [model.config.image_token_id] * 256 + [10, 11]]),
        "pixel_values": pixel_values,
    }
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    boxes = geometry.token_boxes(model, inputs, [size], image_processor)[0][0]
    rgb = decode(visual_tokens(model, inputs)[0], image_processor)
    pad_blue = int(image_processor.image_mean[2] * 255)
    fraction = (rgb[:, 2] - pad_blue) / (255 - pad_blue)  # share of image pixels in each patch
    nominal = 250 / 16  # every patch covers 250 / 16 px of the 250 px square
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / nominal**2
    assert int((area == 0).sum()) >= 64  # whole rows of padding above and below
    assert torch.allclose(area, fraction, atol=0.2)
    check_centres(boxes, rgb, size, fraction > 0.995)
    assert geometry.union_area(boxes) == pytest.approx(100 * 250)  # nothing cut off: the pad keeps the whole image


def test_llava_default_preprocessing_without_a_processor(llava):
    model, processor = llava
    for size in ((120, 200), (200, 90), (37, 300)):
        assert torch.equal(geometry.image_token_boxes(model, size), geometry.image_token_boxes(model, size, processor))


# -- LLaVA-NeXT -----------------------------------------------------------------------------------------


def _llava_next_processor(model):
    try:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil as P
    except ImportError:
        from transformers import LlavaNextImageProcessor as P
    side = model.config.vision_config.image_size
    return P(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def test_llava_next_boxes_follow_anyres_crops_unpadding_and_newlines():
    from vtc.tiny import llava_next_image_tokens

    model = tiny_llava_next()  # 56 px crops, 14 px patches, pinpoints 1x2 2x1 2x2 1x3 3x1
    clip_probe(model)
    image_processor = _llava_next_processor(model)
    samples = [[(50, 130), (150, 60)], [(100, 100)], [(30, 170)]]  # wide, tall, square, very wide
    flat = [size for sizes in samples for size in sizes]
    processed = image_processor(images=[ramp(*size) for size in flat], return_tensors="pt")
    rows = []
    for sizes in samples:
        ids = [BOS_TOKEN_ID]
        for height, width in sizes:
            ids += [IMAGE_TOKEN_ID] * llava_next_image_tokens(model, height, width) + [20, 21]
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": (input_ids != 0).long(),
        "pixel_values": processed["pixel_values"],
        "image_sizes": processed["image_sizes"],
    }
    boxes = geometry.token_boxes(model, inputs, [ramp(*size) for size in flat], image_processor)
    assert geometry.token_boxes(model, inputs) is not None  # image_sizes suffice for NeXT
    tokens = visual_tokens(model, inputs)
    checked = 0
    for b, per_sample in enumerate(boxes):
        all_boxes = torch.cat(per_sample)
        assert len(all_boxes) == len(tokens[b])
        newline = (tokens[b][:, 0] == NEWLINE_MARK) & (tokens[b][:, 1] == NEWLINE_MARK)
        assert torch.equal(all_boxes.isnan().any(-1), newline)  # NaN rows exactly at the newline tokens
        assert int(newline.sum()) > 0
        rgb = decode(tokens[b], image_processor)
        start = 0
        for i, image_boxes in enumerate(per_sample):
            size = samples[b][i]
            part, end = rgb[start : start + len(image_boxes)], start + len(image_boxes)
            is_newline = newline[start:end]
            content = ~is_newline & (part[:, 2] > 254)  # every pixel from the image (no zero padding)
            checked += check_centres(image_boxes, part, size, content)
            # Base tokens (the first 16) see the whole image squeezed: together they cover it exactly.
            assert geometry.union_area(image_boxes[:16]) == pytest.approx(size[0] * size[1])
            # Tokens over padding only have empty boxes.
            padding = ~is_newline & (part[:, 2] < 1)
            empty = (image_boxes[:, 2] <= image_boxes[:, 0]) | (image_boxes[:, 3] <= image_boxes[:, 1])
            assert bool(empty[padding].all())
            start = end
    assert checked >= 200, checked


def _llava_onevision_processor(model):
    try:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as P,
        )
    except ImportError:
        from transformers import LlavaOnevisionImageProcessor as P
    side = model.config.vision_config.image_size
    return P(
        size={"height": side, "width": side},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def test_llava_onevision_boxes_follow_crops_downsampling_and_one_crop_images():
    """LLaVA-OneVision's real image processor: images of single-image samples are cut into AnyRes crops, packed with
    unpadding and, above the tiny model's cap of 2 crops' worth of tokens, bilinear downsampling; the images of a
    sample with several images are padded to a square and kept as one crop (batch_num_images)."""
    model = tiny_llava_onevision()  # 56 px crops, 14 px patches, pinpoints 1x1 .. 3x3, anyres_max_2
    clip_probe(model)
    image_processor = _llava_onevision_processor(model)
    # Downsampled (rows cut) | two images of one sample, one crop each | downsampled (columns cut) | not downsampled
    samples = [[(120, 150)], [(100, 130), (140, 90)], [(168, 100)], [(30, 170)]]
    processed = image_processor(images=[[ramp(*size) for size in sizes] for sizes in samples], return_tensors="pt")
    rows = []
    for sizes in samples:
        ids = [BOS_TOKEN_ID]
        for height, width in sizes:
            ids += [IMAGE_TOKEN_ID] * llava_onevision_image_tokens(model, height, width, len(sizes) == 1) + [20, 21]
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    inputs = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), **processed}
    assert inputs["batch_num_images"].tolist() == [1, 2, 1, 1]
    flat = [size for sizes in samples for size in sizes]
    boxes = geometry.token_boxes(model, inputs, [ramp(*size) for size in flat], image_processor)
    tokens = visual_tokens(model, inputs)
    side, checked, resampled = 4, 0, 0
    uncapped = tiny_llava_onevision(max_crops=100)  # the same crops and unpadding, never downsampled
    for b, per_sample in enumerate(boxes):
        all_boxes = torch.cat(per_sample)
        assert len(all_boxes) == len(tokens[b])
        newline = (tokens[b][:, 0] == NEWLINE_MARK) & (tokens[b][:, 1] == NEWLINE_MARK)
        assert torch.equal(all_boxes.isnan().any(-1), newline)  # NaN rows exactly at the newline tokens
        rgb = decode(tokens[b], image_processor)
        start = 0
        for i, image_boxes in enumerate(per_sample):
            height, width = samples[b][i]
            part, end = rgb[start : start + len(image_boxes)], start + len(image_boxes)
            is_newline = newline[start:end]
            content = ~is_newline & (part[:, 2] > 254)  # every pixel from the image (no padding)
            checked += check_centres(image_boxes, part, (height, width), content)
            base = image_boxes[: side * side]  # the whole image, squeezed (one crop) or padded to a square
            assert geometry.union_area(base) == pytest.approx(height * width)
            if len(samples[b]) == 1:  # cut into crops: the big grid's tokens tile what its unpadded patches cover
                grid = image_boxes[side * side :][~is_newline[side * side :]]
                patches = geometry.image_token_boxes(uncapped, (height, width), image_processor)[side * side :]
                patches = patches[~patches.isnan().any(-1)]
                areas = (grid[:, 2] - grid[:, 0]) * (grid[:, 3] - grid[:, 1])
                assert float(areas.sum()) == pytest.approx(geometry.union_area(grid))  # no overlap
                assert geometry.union_area(grid) == pytest.approx(geometry.union_area(patches))
                resampled += len(grid) < len(patches)
            else:  # one crop: the square-padded image's tokens, then a newline; its inner tokens were checked
                assert len(image_boxes) == side * side + 1 and bool(is_newline[-1]) and int(content.sum()) >= 4
            start = end
    assert checked >= 100, checked  # tokens whose pixels all come from the image (no padding)
    assert resampled == 2


# -- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------------


def test_qwen2_vl_boxes_with_the_organism_processor():
    """The shapes-qwen2vl architecture (4 px patches, 2 x 2 merge) and its processor: images of any aspect ratio
    are smart-resized to about 128 x 128 pixels, a multiple of 8."""
    tokenizer = build.tokenizer("qwen2vl")
    processor = QwenProcessor(tokenizer, build.image_processor("qwen2vl"), build.chat_template("qwen2vl"))
    model = build.model("qwen2vl", len(tokenizer)).eval()
    qwen_probe(model)
    samples = [[ramp(120, 200), ramp(60, 40)], [ramp(255, 90)]]
    prompts = []
    for images in samples:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what color is the square ?"}]
        prompts.append(
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        )
    flat = [image for images in samples for image in images]
    inputs = processor(images=flat, text=prompts, return_tensors="pt", padding=True)
    boxes = geometry.token_boxes(model, inputs, flat, processor)
    tokens = visual_tokens(model, inputs)
    checked = 0
    for b, per_sample in enumerate(boxes):
        rgb = decode(tokens[b], processor.image_processor)
        start = 0
        for i, image_boxes in enumerate(per_sample):
            image = samples[b][i]
            part = rgb[start : start + len(image_boxes)]
            checked += check_centres(image_boxes, part, (image.height, image.width), torch.ones(len(part), dtype=bool))
            # The whole image is seen, once: the boxes tile it.
            assert geometry.union_area(image_boxes) == pytest.approx(image.height * image.width)
            areas = (image_boxes[:, 2] - image_boxes[:, 0]) * (image_boxes[:, 3] - image_boxes[:, 1])
            assert areas.sum().item() == pytest.approx(image.height * image.width)
            start += len(image_boxes)
        assert start == len(tokens[b])
    assert checked == sum(len(x) for per_sample in boxes for x in per_sample)
    # Without the grid, the processor's smart_resize settings give the same boxes.
    for image, image_boxes in zip(flat, [x for per_sample in boxes for x in per_sample], strict=True):
        assert torch.equal(geometry.image_token_boxes(model, (image.height, image.width), processor), image_boxes)


def test_qwen2_5_vl_window_attention_keeps_row_major_token_order():
    """Qwen2.5-VL runs patches in window order inside the tower; the tokens still come out row-major."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as P
    except ImportError:
        from transformers import Qwen2VLImageProcessor as P
    import inspect

    model = tiny_qwen2_5_vl()  # 14 px patches, windows of 2 x 2 merged tokens
    qwen_probe(model)
    options = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    low, high = 56 * 56, 28 * 28 * 80
    if "size" in inspect.signature(P.__init__).parameters:
        options["size"] = {"shortest_edge": low, "longest_edge": high}
    else:
        options.update(min_pixels=low, max_pixels=high)
    image_processor = P(**options, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    sizes = [(150, 230), (90, 60)]
    processed = image_processor(images=[ramp(*s) for s in sizes], return_tensors="pt")
    grids = processed["image_grid_thw"]
    assert grids[0].tolist() == [1, 10, 16]  # several windows per image
    ids = [BOS_TOKEN_ID]
    for t, h, w in grids.tolist():
        ids += [QWEN_VISION_START_TOKEN_ID] + [QWEN_IMAGE_TOKEN_ID] * (t * h * w // 4) + [QWEN_VISION_END_TOKEN_ID, 9]
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **processed}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (input_ids == QWEN_IMAGE_TOKEN_ID).long()
    boxes = geometry.token_boxes(model, inputs, sizes)
    rgb = decode(visual_tokens(model, inputs)[0], image_processor)
    start = 0
    for size, image_boxes in zip(sizes, boxes[0], strict=True):
        part = rgb[start : start + len(image_boxes)]
        check_centres(image_boxes, part, size, torch.ones(len(part), dtype=torch.bool))
        start += len(image_boxes)
    assert start == len(rgb)


# -- API errors -----------------------------------------------------------------------------------------


# -- InternVL -------------------------------------------------------------------------------------------


@torch.no_grad()
def internvl_probe(model) -> None:
    """InternVL: each visual token = the mean normalised RGB of the 2 x 2 patches the pixel shuffle puts into it."""
    base = model.model
    embeddings = base.vision_tower.embeddings
    conv = embeddings.patch_embeddings.projection  # Conv2d [C, 3, p, p]
    weight = torch.zeros_like(conv.weight)
    for c in range(3):
        weight[c, c] = 1 / weight[c, c].numel()
    conv.weight.copy_(weight)
    conv.bias.zero_()
    embeddings.cls_token.zero_()
    embeddings.position_embeddings.zero_()
    for layer in base.vision_tower.encoder.layer:
        _pass_through(layer)
    projector = base.multi_modal_projector
    _pass_through(projector.layer_norm)
    # Which vision channel each input channel of the projector holds: channel ids pushed through the pixel shuffle.
    width = base.vision_tower.config.hidden_size
    channel = torch.arange(width, dtype=torch.float64).expand(1, 2, 2, width)
    source = base.pixel_shuffle(channel.contiguous(), scale_factor=model.config.downsample_ratio).flatten().long()
    first, last = projector.linear_1, projector.linear_2
    for linear in (first, last):
        linear.weight.zero_()
        linear.bias.zero_()
    for c in range(3):  # average channel c over the token's patches (+10 keeps GELU linear; the second undoes it)
        members = (source == c).nonzero().squeeze(1)
        first.weight[c, members] = 1 / len(members)
        first.bias[c] = 10.0
        last.weight[c, c] = 1.0
        last.bias[c] = -10.0


def test_internvl_boxes_follow_the_tiles_the_thumbnail_and_the_pixel_shuffle():
    try:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    except ImportError:  # transformers 4.x
        from transformers import GotOcr2ImageProcessor as GotOcr2ImageProcessorPil

    from vtc.tiny import INTERNVL_END_TOKEN_ID, INTERNVL_START_TOKEN_ID, tiny_internvl

    model = tiny_internvl()  # 112 px tiles, 14 px patches: 4 x 4 tokens per tile
    internvl_probe(model)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 112, "width": 112}, crop_to_patches=True, min_patches=1, max_patches=6
    )
    samples = [[ramp(100, 250), ramp(200, 90)], [ramp(112, 112), ramp(200, 250)], [ramp(40, 230), ramp(200, 200)]]
    flat = [image for images in samples for image in images]
    processed = image_processor(images=flat, return_tensors="pt")
    tiles = processed["num_patches"].tolist()
    # cols x rows (+ the thumbnail): 3 x 1, 1 x 2, a single tile, 3 x 2, 6 x 1, 2 x 2
    assert tiles == [4, 3, 1, 7, 7, 5]
    rows, start = [], 0
    for images in samples:
        ids = [BOS_TOKEN_ID]
        for k in tiles[start : start + len(images)]:
            ids += [INTERNVL_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * 16 * k + [INTERNVL_END_TOKEN_ID, 20]
        start += len(images)
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = (input_ids != 0).long()
    inputs = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": processed["pixel_values"]}
    boxes = geometry.token_boxes(model, inputs, flat, image_processor)
    tokens = visual_tokens(model, inputs)
    checked = 0
    for b, per_sample in enumerate(boxes):
        rgb = decode(tokens[b], image_processor)
        start = 0
        for i, image_boxes in enumerate(per_sample):
            image = samples[b][i]
            part = rgb[start : start + len(image_boxes)]
            checked += check_centres(image_boxes, part, (image.height, image.width), torch.ones(len(part), dtype=bool))
            # The tiles cover the image once, and so does the thumbnail (the last 16 tokens of a tiled image).
            area = image.height * image.width
            areas = (image_boxes[:, 2] - image_boxes[:, 0]) * (image_boxes[:, 3] - image_boxes[:, 1])
            assert areas.sum().item() == pytest.approx(area * (1 if len(image_boxes) == 16 else 2))
            assert geometry.union_area(image_boxes[-16:]) == pytest.approx(area)
            start += len(image_boxes)
        assert start == len(tokens[b])
    assert checked == 16 * sum(tiles)
    with pytest.raises(ValueError, match=r"has 4 tiles in the inputs, but the processor settings"):
        geometry.image_token_boxes(model, (100, 250), GotOcr2ImageProcessorPil(size={"height": 112, "width": 112},
                                   max_patches=2), tiles=4)  # fmt: skip


def test_errors_are_clear(llava):
    model, processor = llava
    inputs, flat = _llava_inputs(processor, [[ramp(40, 40)]])
    with pytest.raises(ValueError, match="needs the images"):
        geometry.token_boxes(model, inputs)
    with pytest.raises(ValueError, match="images given but the prompts hold placeholders for 1"):
        geometry.token_boxes(model, inputs, flat + flat, processor)
    with pytest.raises(TypeError, match="cannot tell the size"):
        geometry.token_boxes(model, inputs, ["photo.jpg"], processor)
    with pytest.raises(ValueError, match="vision tower takes 128 x 128"):
        from transformers import CLIPImageProcessor

        geometry.token_boxes(model, inputs, flat, CLIPImageProcessor())  # 224 px crops
    with pytest.raises(ValueError, match="supports model_types"):

        class Config:
            model_type = "idefics3"

        geometry.token_boxes(type("M", (), {"config": Config()})(), inputs, flat)


def test_image_size_accepts_pil_arrays_and_pairs():
    assert geometry.image_size(Image.new("RGB", (30, 20))) == (20, 30)
    assert geometry.image_size(np.zeros((20, 30, 3))) == (20, 30)
    assert geometry.image_size(torch.zeros(3, 20, 30)) == (20, 30)  # channels first
    assert geometry.image_size(np.zeros((20, 30))) == (20, 30)
    assert geometry.image_size((20, 30)) == (20, 30)
    assert math.isclose(geometry.union_area(torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3.0]])), 7.0)
