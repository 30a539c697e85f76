"""Tiny random-weight models built from configs: offline, seconds on a CPU, real transformers classes.

LLaVA-1.5, LLaVA-NeXT (AnyRes), LLaVA-OneVision (AnyRes with downsampling, SigLIP, Qwen2), Qwen2-VL, Qwen2.5-VL,
Qwen3-VL and Qwen3.5 (dense and MoE; Qwen3.5 on transformers 5.x only) and InternVL. Used by the tests, the benchmarks
and ``python -m vtc``.
They have the real token geometry (a 336 px CLIP-style tower with 14 px patches gives LLaVA-1.5's 576 visual
tokens per image) but random weights, so they exercise every code path without downloading anything.
"""

from __future__ import annotations

import inspect
import math

import torch
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLTextConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
ONEVISION_VIDEO_TOKEN_ID = 4  # LLaVA-OneVision's <video>; its text tokens are drawn from 5 on
# Qwen2-VL / Qwen2.5-VL special tokens (pad, bos and eos as above); text tokens are drawn from QWEN_FIRST_TEXT_ID on.
QWEN_IMAGE_TOKEN_ID = 3
QWEN_VIDEO_TOKEN_ID = 4
QWEN_VISION_START_TOKEN_ID = 5
QWEN_VISION_END_TOKEN_ID = 6
QWEN_FIRST_TEXT_ID = 7
_QwenModel = (
    Qwen2VLForConditionalGeneration
    | Qwen2_5_VLForConditionalGeneration
    | Qwen3VLForConditionalGeneration
    | Qwen3VLMoeForConditionalGeneration
)


def _text_options(hidden: int, intermediate: int, layers: int, heads: int, vocab: int, positions: int) -> dict:
    """The keyword arguments every tiny model's Llama-style text config shares (GQA with half the heads)."""
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "pad_token_id": PAD_TOKEN_ID,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }


def tiny_llava_config(
    *,
    hidden_size: int = 64,
    vision_layers: int = 3,
    text_layers: int = 2,
    image_size: int = 336,
    patch_size: int = 14,
    vocab_size: int = 256,
    vision_feature_layer: int = -2,
    attn_implementation: str = "sdpa",
    intermediate_size: int | None = None,
    heads: int = 4,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config ((image_size / patch_size)^2 visual tokens, CLS dropped)."""
    intermediate = intermediate_size or 2 * hidden_size
    vision = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )
    text = LlamaConfig(**_text_options(hidden_size, intermediate, text_layers, heads, vocab_size, 4096))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> LlavaForConditionalGeneration:
    """A random-weight LlavaForConditionalGeneration in eval mode (weights depend only on ``seed``)."""
    config = tiny_llava_config(attn_implementation=attn_implementation, **config_options)
    return llava_from_config(config, seed, dtype)


def llava_from_config(
    config: LlavaConfig | LlavaNextConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """A random-weight LLaVA (or LLaVA-NeXT, from a LlavaNextConfig) in eval mode, initialised as the tiny models are
    (weights depend only on ``seed``): for shapes that the ``tiny_llava*`` options do not reach (e.g. the
    benchmarks' separate vision and text widths)."""
    is_next = isinstance(config, LlavaNextConfig)
    model_class = LlavaNextForConditionalGeneration if is_next else LlavaForConditionalGeneration
    torch.manual_seed(seed)
    # Larger-than-default init so that random tokens are distinguishable and greedy decoding has no ties.
    config.text_config.initializer_range = 0.2
    config.vision_config.initializer_factor = 4.0
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():
        # Special tokens (pad, bos, eos, <image>) get logit 0, below the max of the random ones, so greedy
        # decoding never emits an <image> placeholder or stops early.
        model.lm_head.weight[: IMAGE_TOKEN_ID + 1] = 0
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_llava_inputs(
    model: LlavaForConditionalGeneration,
    *,
    images_per_sample: tuple[int, ...] = (1,),
    text_lengths: tuple[tuple[int, int], ...] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / pixel_values for a batch, left-padded like a real processor.

    Sample b is ``<bos> text <image>xN ... text`` with ``images_per_sample[b]`` images, text before
    and after of the lengths in ``text_lengths[b]`` (default: lengths that differ per sample).
    """
    config = model.config
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    rows = []
    for b, count in enumerate(images_per_sample):
        before, after = text_lengths[b] if text_lengths else (3 + 2 * b, 5 + b)
        ids = [BOS_TOKEN_ID] + torch.randint(4, vocab, (before,), generator=generator).tolist()
        for _ in range(count):
            ids += [IMAGE_TOKEN_ID] * n + torch.randint(4, vocab, (2,), generator=generator).tolist()
        ids += torch.randint(4, vocab, (after,), generator=generator).tolist()
        rows.append(ids)
    input_ids, attention_mask = _left_pad(rows)
    total_images = sum(images_per_sample)
    pixel_values = torch.randn(total_images, 3, vision.image_size, vision.image_size, generator=generator)
    dtype = next(model.parameters()).dtype
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values.to(dtype)}


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids / attention_mask for token lists, left-padded with PAD_TOKEN_ID like a real processor."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, length - len(ids) :] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT


def tiny_llava_next_config(
    *,
    hidden_size: int = 64,
    vision_layers: int = 3,
    text_layers: int = 2,
    image_size: int = 56,
    patch_size: int = 14,
    vocab_size: int = 256,
    vision_feature_layer: int = -2,
    attn_implementation: str = "sdpa",
    intermediate_size: int | None = None,
    heads: int = 4,
    image_grid_pinpoints: list[list[int]] | None = None,
) -> LlavaNextConfig:
    """A LLaVA-NeXT-shaped config: AnyRes crops of ``image_size`` px (CLS dropped), unpadding and image_newline.

    The default pinpoints are LLaVA-1.6's (1x2, 2x1, 2x2, 1x3, 3x1 crops) scaled to ``image_size``.
    """
    base = tiny_llava_config(
        hidden_size=hidden_size,
        vision_layers=vision_layers,
        text_layers=text_layers,
        image_size=image_size,
        patch_size=patch_size,
        vocab_size=vocab_size,
        vision_feature_layer=vision_feature_layer,
        intermediate_size=intermediate_size,
        heads=heads,
    )
    if image_grid_pinpoints is None:
        crops = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]
        image_grid_pinpoints = [[rows * image_size, cols * image_size] for rows, cols in crops]
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=image_grid_pinpoints,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava_next(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> LlavaNextForConditionalGeneration:
    """A random-weight LlavaNextForConditionalGeneration in eval mode (weights depend only on ``seed``)."""
    config = tiny_llava_next_config(attn_implementation=attn_implementation, **config_options)
    return llava_from_config(config, seed, dtype)


def _llava_next_patches(model: LlavaNextForConditionalGeneration, height: int, width: int) -> int:
    """Crops (base image included) the AnyRes preprocessing makes of a ``height`` x ``width`` image."""
    config = model.config
    return image_size_to_num_patches((height, width), config.image_grid_pinpoints, config.vision_config.image_size)


def llava_next_image_tokens(model: LlavaNextForConditionalGeneration, height: int, width: int) -> int:
    """Visual tokens (base + unpadded crops + newlines) the model makes of a ``height`` x ``width`` px image.

    Asks the model itself: packs dummy features of the right crop count with ``pack_image_features``.
    """
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    features = [torch.zeros(_llava_next_patches(model, height, width), side * side, 1)]
    _, lengths = model.model.pack_image_features(
        features,
        torch.tensor([[height, width]]),
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_newline=torch.zeros(1),
    )
    return int(lengths[0])


def tiny_llava_next_inputs(
    model: LlavaNextForConditionalGeneration,
    *,
    image_sizes: tuple[tuple[tuple[int, int], ...], ...] = (((56, 112),),),
    text_lengths: tuple[tuple[int, int], ...] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / pixel_values / image_sizes for a batch, laid out like LlavaNextProcessor's.

    ``image_sizes[b]`` lists the (height, width) in pixels of each image of sample b (any number, any sizes).
    Sample b is ``<bos> text [<image>xN_i text text]... text``, left-padded, N_i from ``llava_next_image_tokens``.
    pixel_values is [num_images, max_crops, 3, S, S], zero past each image's crop count (the processor's
    padding); pixel_values and image_sizes are left out when the batch has no image.
    """
    vision = model.config.vision_config
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    rows = []
    for b, sizes in enumerate(image_sizes):
        before, after = text_lengths[b] if text_lengths else (3 + 2 * b, 5 + b)
        ids = [BOS_TOKEN_ID] + torch.randint(4, vocab, (before,), generator=generator).tolist()
        for height, width in sizes:
            n = llava_next_image_tokens(model, height, width)
            ids += [IMAGE_TOKEN_ID] * n + torch.randint(4, vocab, (2,), generator=generator).tolist()
        ids += torch.randint(4, vocab, (after,), generator=generator).tolist()
        rows.append(ids)
    input_ids, attention_mask = _left_pad(rows)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    flat = [size for sizes in image_sizes for size in sizes]
    if flat:
        crops = [_llava_next_patches(model, height, width) for height, width in flat]
        side = vision.image_size
        pixel_values = torch.zeros(len(flat), max(crops), 3, side, side)
        for i, count in enumerate(crops):
            pixel_values[i, :count] = torch.randn(count, 3, side, side, generator=generator)
        inputs["pixel_values"] = pixel_values.to(next(model.parameters()).dtype)
        inputs["image_sizes"] = torch.tensor(flat, dtype=torch.long)
    return inputs


# ---------------------------------------------------------------------------------------------- LLaVA-OneVision


def tiny_llava_onevision_config(
    *,
    hidden_size: int = 64,
    vision_layers: int = 3,
    text_layers: int = 2,
    image_size: int = 56,
    patch_size: int = 14,
    vocab_size: int = 256,
    vision_feature_layer: int = -1,
    attn_implementation: str = "sdpa",
    intermediate_size: int | None = None,
    heads: int = 4,
    image_grid_pinpoints: list[list[int]] | None = None,
    max_crops: int = 2,
) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision-shaped config: a SigLIP tower (no [CLS], vision_feature_select_strategy "full", features of
    its last layer), a Qwen2 text model, AnyRes crops of ``image_size`` px with unpadding and image_newline, and the
    big grid of crop tokens downsampled (bilinear) once it holds more than 1.1^2 * ``max_crops`` crops' worth of
    tokens (``vision_aspect_ratio="anyres_max_<max_crops>"``; the released models: 9).

    The default pinpoints (1x1, 1x2, 2x1, 2x2, 1x3, 3x1 and 3x3 crops) with ``max_crops=2`` downsample a 2x2, 1x3 or
    3x3 grid and leave a 1x1 or 1x2 grid, or one that unpadding shrinks enough, as it is.
    """
    intermediate = intermediate_size or 2 * hidden_size
    vision = SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(**_text_options(hidden_size, intermediate, text_layers, heads, vocab_size, 16384))
    if image_grid_pinpoints is None:
        crops = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (3, 3)]
        image_grid_pinpoints = [[rows * image_size, cols * image_size] for rows, cols in crops]
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=ONEVISION_VIDEO_TOKEN_ID,
        image_grid_pinpoints=image_grid_pinpoints,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_crops}",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava_onevision(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> LlavaOnevisionForConditionalGeneration:
    """A random-weight LlavaOnevisionForConditionalGeneration in eval mode (weights depend only on ``seed``)."""
    config = tiny_llava_onevision_config(attn_implementation=attn_implementation, **config_options)
    torch.manual_seed(seed)
    config.text_config.initializer_range = 0.2  # random tokens distinguishable, no greedy ties
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():  # pad, bos, eos, <image>, <video> get logit 0: greedy decoding never emits them
        model.lm_head.weight[: ONEVISION_VIDEO_TOKEN_ID + 1] = 0
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def llava_onevision_crops(model: LlavaOnevisionForConditionalGeneration, height: int, width: int, patched: bool) -> int:
    """Crops (base image included) the vision tower sees of a ``height`` x ``width`` image: one if it is not cut into
    AnyRes crops (LLaVA-OneVision's processor cuts only the image of a single-image sample)."""
    config = model.config
    if not patched:
        return 1
    return image_size_to_num_patches((height, width), config.image_grid_pinpoints, config.vision_config.image_size)


def llava_onevision_image_tokens(
    model: LlavaOnevisionForConditionalGeneration, height: int, width: int, patched: bool = True
) -> int:
    """Visual tokens (base + unpadded, possibly downsampled, crops + newlines) the model makes of a ``height`` x
    ``width`` px image: packs dummy features of the right crop count with the model's own ``pack_image_features``."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    features = [torch.zeros(llava_onevision_crops(model, height, width, patched), side * side, 1)]
    _, lengths = model.model.pack_image_features(
        features,
        torch.tensor([[height, width]]),
        image_newline=torch.zeros(1),
        vision_aspect_ratio=model.config.vision_aspect_ratio,
    )
    return int(lengths[0])


def tiny_llava_onevision_inputs(
    model: LlavaOnevisionForConditionalGeneration,
    *,
    image_sizes: tuple[tuple[tuple[int, int], ...], ...] = (((56, 112),),),
    text_lengths: tuple[tuple[int, int], ...] | None = None,
    seed: int = 0,
    batch_num_images: bool = True,
    videos: tuple[int, ...] | None = None,
    frames: int = 4,
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / pixel_values / image_sizes / batch_num_images for a batch, laid out like
    LlavaOnevisionProcessor's (see ``tiny_llava_next_inputs``; text tokens from 5 on, after <video>).

    ``videos[b]`` optionally gives sample b that many videos of ``frames`` frames each, after its images, each a run of
    frames * ceil(side / 2)^2 + 1 <video> tokens (side = image_size / patch_size: the 2 x 2 pooling, then a newline),
    followed by two text tokens; they come as ``pixel_values_videos`` [videos, frames, 3, image_size, image_size].

    ``batch_num_images`` (as the processor gives it) makes the images of a sample with several images one crop
    each, not cut into AnyRes crops; ``batch_num_images=False`` leaves it out, and every image is cut (transformers'
    single-image reading).
    """
    vision = model.config.vision_config
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    first_text = ONEVISION_VIDEO_TOKEN_ID + 1
    rows, crops = [], []
    for b, sizes in enumerate(image_sizes):
        before, after = text_lengths[b] if text_lengths else (3 + 2 * b, 5 + b)
        ids = [BOS_TOKEN_ID] + torch.randint(first_text, vocab, (before,), generator=generator).tolist()
        patched = len(sizes) == 1 or not batch_num_images
        for height, width in sizes:
            n = llava_onevision_image_tokens(model, height, width, patched)
            ids += [IMAGE_TOKEN_ID] * n + torch.randint(first_text, vocab, (2,), generator=generator).tolist()
            crops.append(llava_onevision_crops(model, height, width, patched))
        pooled = math.ceil(vision.image_size // vision.patch_size / 2) ** 2
        for _ in range(videos[b] if videos else 0):
            ids += [ONEVISION_VIDEO_TOKEN_ID] * (frames * pooled + 1)
            ids += torch.randint(first_text, vocab, (2,), generator=generator).tolist()
        ids += torch.randint(first_text, vocab, (after,), generator=generator).tolist()
        rows.append(ids)
    input_ids, attention_mask = _left_pad(rows)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if videos and sum(videos):
        side = vision.image_size
        clips = torch.randn(sum(videos), frames, 3, side, side, generator=generator)
        inputs["pixel_values_videos"] = clips.to(next(model.parameters()).dtype)
    flat = [size for sizes in image_sizes for size in sizes]
    if flat:
        side = vision.image_size
        pixel_values = torch.zeros(len(flat), max(crops), 3, side, side)
        for i, count in enumerate(crops):
            pixel_values[i, :count] = torch.randn(count, 3, side, side, generator=generator)
        inputs["pixel_values"] = pixel_values.to(next(model.parameters()).dtype)
        inputs["image_sizes"] = torch.tensor(flat, dtype=torch.long)
        if batch_num_images:
            inputs["batch_num_images"] = torch.tensor([len(sizes) for sizes in image_sizes], dtype=torch.long)
    return inputs


# ---------------------------------------------------------------------------------------------- Qwen2-VL / 2.5-VL


def qwen_text_config(
    hidden_size: int, text_layers: int, heads: int, vocab_size: int, intermediate: int, mrope_section: list[int] | None
) -> dict:
    """Text-config kwargs shared by Qwen2-VL and Qwen2.5-VL (M-RoPE sections summing to head_dim / 2), under the rope
    key this transformers reads."""
    half = hidden_size // heads // 2
    if mrope_section is None:  # the real models split 64 = 16 + 24 + 24 (t, h, w)
        temporal = half // 4
        mrope_section = [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]
    if sum(mrope_section) != half:
        raise ValueError(f"sum(mrope_section) must be head_dim / 2 = {half}, got {mrope_section}")
    rope = {"rope_type": "default", "mrope_section": list(mrope_section)}
    # transformers 5.x reads rope_parameters, 4.x rope_scaling.
    rope_key = (
        "rope_parameters" if "rope_parameters" in inspect.signature(Qwen2VLTextConfig).parameters else "rope_scaling"
    )
    return {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "pad_token_id": PAD_TOKEN_ID,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "initializer_range": 0.2,  # random tokens distinguishable, no greedy ties
        rope_key: rope,
    }


def _qwen_special_tokens() -> dict[str, int]:
    return {
        "image_token_id": QWEN_IMAGE_TOKEN_ID,
        "video_token_id": QWEN_VIDEO_TOKEN_ID,
        "vision_start_token_id": QWEN_VISION_START_TOKEN_ID,
        "vision_end_token_id": QWEN_VISION_END_TOKEN_ID,
    }


def tiny_qwen2_vl_config(
    *,
    hidden_size: int = 64,
    vision_layers: int = 3,
    text_layers: int = 2,
    heads: int = 4,
    vocab_size: int = 256,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    spatial_merge_size: int = 2,
    intermediate_size: int | None = None,
    mrope_section: list[int] | None = None,
    attn_implementation: str = "sdpa",
) -> Qwen2VLConfig:
    """A Qwen2-VL-shaped config: 14 px patches, 2x2 patch merger (h * w / 4 tokens per image), M-RoPE."""
    intermediate = intermediate_size or 2 * hidden_size
    vision = {
        "depth": vision_layers,
        "embed_dim": hidden_size,
        "hidden_size": hidden_size,  # the merger's output size = the text hidden size
        "mlp_ratio": max(1, intermediate // hidden_size),
        "num_heads": heads,
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "spatial_merge_size": spatial_merge_size,
        "initializer_range": 0.2,
    }
    text = qwen_text_config(hidden_size, text_layers, heads, vocab_size, intermediate, mrope_section)
    config = Qwen2VLConfig(vision_config=vision, text_config=text, **_qwen_special_tokens())
    config._attn_implementation = attn_implementation
    return config


def tiny_qwen2_5_vl_config(
    *,
    hidden_size: int = 64,
    vision_layers: int = 3,
    text_layers: int = 2,
    heads: int = 4,
    vocab_size: int = 256,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    spatial_merge_size: int = 2,
    window_size: int = 56,
    fullatt_block_indexes: list[int] | None = None,
    intermediate_size: int | None = None,
    mrope_section: list[int] | None = None,
    attn_implementation: str = "sdpa",
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL-shaped config: as Qwen2-VL plus window attention in the vision tower.

    ``window_size`` is in pixels: 56 = 2x2 merged tokens (4x4 patches) per window, so images of 8x8
    patches or more really get several windows; only the last block attends globally by default.
    """
    intermediate = intermediate_size or 2 * hidden_size
    vision = {
        "depth": vision_layers,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "out_hidden_size": hidden_size,
        "num_heads": heads,
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "spatial_merge_size": spatial_merge_size,
        "window_size": window_size,
        "fullatt_block_indexes": [vision_layers - 1] if fullatt_block_indexes is None else list(fullatt_block_indexes),
        "initializer_range": 0.2,
    }
    text = qwen_text_config(hidden_size, text_layers, heads, vocab_size, intermediate, mrope_section)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_qwen_special_tokens())
    config._attn_implementation = attn_implementation
    return config


def tiny_qwen3_vl_config(
    *,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    vision_layers: int = 3,
    text_layers: int = 2,
    heads: int = 4,
    vocab_size: int = 256,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    spatial_merge_size: int = 2,
    deepstack_visual_indexes: list[int] | None = None,
    intermediate_size: int | None = None,
    mrope_section: list[int] | None = None,
    moe: bool = False,
    attn_implementation: str = "sdpa",
) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """A Qwen3-VL-shaped config: 16 px patches, 2x2 patch merger, learned vision position embeddings, QK-norm and
    interleaved M-RoPE in the text model, DeepStack features of ``deepstack_visual_indexes`` (default: the vision
    block before the last, added after decoder layer 0). ``moe=True``: Qwen3-VL-MoE, 4 experts of which 2 per token."""
    intermediate = intermediate_size or 2 * hidden_size
    vision = {
        "depth": vision_layers,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 2 * vision_hidden_size,
        "num_heads": max(1, heads // 2),
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "spatial_merge_size": spatial_merge_size,
        "out_hidden_size": hidden_size,
        "num_position_embeddings": 64,  # an 8 x 8 learned grid, interpolated to each image
        "deepstack_visual_indexes": [vision_layers - 2]
        if deepstack_visual_indexes is None
        else deepstack_visual_indexes,
        "initializer_range": 0.2,
    }
    text = qwen_text_config(hidden_size, text_layers, heads, vocab_size, intermediate, mrope_section)
    text["head_dim"] = hidden_size // heads
    rope = text.get("rope_parameters", text.get("rope_scaling"))
    rope["mrope_interleaved"] = True
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate // 2)
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    config = config_class(vision_config=vision, text_config=text, **_qwen_special_tokens())
    config._attn_implementation = attn_implementation
    return config


def qwen3_5_classes(moe: bool = False) -> tuple[type, type]:
    """(config class, model class) of Qwen3.5 (``moe=True``: Qwen3.5-MoE), or an ImportError saying that this
    transformers has none (4.57)."""
    import transformers

    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    names = (f"{prefix}Config", f"{prefix}ForConditionalGeneration")
    if not all(hasattr(transformers, name) for name in names):
        raise ImportError(f"Qwen3.5 needs transformers 5 ({names[1]}); this is transformers {transformers.__version__}")
    return getattr(transformers, names[0]), getattr(transformers, names[1])


def tiny_qwen3_5_config(
    *,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    vision_layers: int = 3,
    text_layers: int = 4,
    heads: int = 4,
    vocab_size: int = 256,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    spatial_merge_size: int = 2,
    full_attention_interval: int = 4,
    intermediate_size: int | None = None,
    moe: bool = False,
    attn_implementation: str = "sdpa",
):
    """A Qwen3.5-shaped config: Qwen3-VL's vision tower without DeepStack (16 px patches, 2x2 patch merger, learned
    position embeddings) and a hybrid text model: every ``full_attention_interval``-th decoder layer full attention
    (gated output, QK-norm, interleaved M-RoPE on half of the head dim; the real models rotate a quarter of 256), the
    others Gated DeltaNet linear attention (convolution of width 4, then a gated delta-rule recurrence).
    ``moe=True``: Qwen3.5-MoE, 4 experts of which 2 per token, plus a shared expert. transformers 5.x only."""
    config_class, _ = qwen3_5_classes(moe)
    if text_layers < full_attention_interval:
        raise ValueError(
            f"text_layers={text_layers} < full_attention_interval={full_attention_interval}: no full-attention layer"
        )
    intermediate = intermediate_size or 2 * hidden_size
    vision = {
        "depth": vision_layers,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 2 * vision_hidden_size,
        "num_heads": max(1, heads // 2),
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "spatial_merge_size": spatial_merge_size,
        "out_hidden_size": hidden_size,
        "num_position_embeddings": 64,  # an 8 x 8 learned grid, interpolated to each image
        "initializer_range": 0.2,
    }
    head_dim = 2 * hidden_size // heads
    frequencies = head_dim // 4  # rotary on half of the head dim: head_dim / 4 frequencies, interleaved t h w t h w ...
    mrope_section = [frequencies - (frequencies + 1) // 3 - frequencies // 3, (frequencies + 1) // 3, frequencies // 3]
    text = qwen_text_config(hidden_size, text_layers, heads, vocab_size, intermediate, None)
    text["rope_parameters"] = {  # as the real [11, 11, 10] of 32 frequencies: [3, 3, 2] of 8
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_interleaved": True,
        "mrope_section": mrope_section,
    }
    text.update(
        head_dim=head_dim,
        layer_types=[
            "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
            for i in range(text_layers)
        ],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=hidden_size // heads,
        linear_value_head_dim=hidden_size // heads,
        linear_num_key_heads=max(1, heads // 2),
        linear_num_value_heads=heads,
    )
    if moe:
        del text["intermediate_size"]
        text.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=intermediate // 2,
            shared_expert_intermediate_size=intermediate // 2,
        )
    config = config_class(vision_config=vision, text_config=text, **_qwen_special_tokens())
    config._attn_implementation = attn_implementation
    return config


def _finish_qwen(model: _QwenModel) -> _QwenModel:
    """Eval mode, special-token logits zeroed so greedy decoding never emits them, pad id for generate()."""
    model.eval()
    with torch.no_grad():
        model.lm_head.weight[:QWEN_FIRST_TEXT_ID] = 0
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_qwen2_vl(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> Qwen2VLForConditionalGeneration:
    """A random-weight Qwen2VLForConditionalGeneration in eval mode (weights depend only on ``seed``).

    No-cache greedy reference equal to ``generate()`` (4.57 and 5.x): each step call the model on the full
    sequence with the full attention_mask, the inputs' pixel_values / image_grid_thw (and mm_token_type_ids
    right-padded with 0 for the new tokens, 5.x), ``use_cache=False`` and no position_ids: without a cache
    it recomputes M-RoPE positions and rope_deltas itself, no reset of ``model.model.rope_deltas`` needed.
    """
    config = tiny_qwen2_vl_config(attn_implementation=attn_implementation, **config_options)
    torch.manual_seed(seed)
    return _finish_qwen(Qwen2VLForConditionalGeneration(config).to(dtype))


def tiny_qwen2_5_vl(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> Qwen2_5_VLForConditionalGeneration:
    """A random-weight Qwen2_5_VLForConditionalGeneration in eval mode (see ``tiny_qwen2_vl``)."""
    config = tiny_qwen2_5_vl_config(attn_implementation=attn_implementation, **config_options)
    torch.manual_seed(seed)
    return _finish_qwen(Qwen2_5_VLForConditionalGeneration(config).to(dtype))


def tiny_qwen3_vl(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration:
    """A random-weight Qwen3VLForConditionalGeneration (``moe=True``: Qwen3VLMoe...) in eval mode (see
    ``tiny_qwen2_vl``; inputs from ``tiny_qwen_inputs``)."""
    config = tiny_qwen3_vl_config(attn_implementation=attn_implementation, **config_options)
    torch.manual_seed(seed)
    model_class = Qwen3VLMoeForConditionalGeneration if config_options.get("moe") else Qwen3VLForConditionalGeneration
    return _finish_qwen(model_class(config).to(dtype))


def tiny_qwen3_5(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> torch.nn.Module:
    """A random-weight Qwen3_5ForConditionalGeneration (``moe=True``: Qwen3_5Moe...) in eval mode (see
    ``tiny_qwen2_vl``; inputs from ``tiny_qwen_inputs``). transformers 5.x only (an ImportError on 4.57)."""
    config = tiny_qwen3_5_config(attn_implementation=attn_implementation, **config_options)
    _, model_class = qwen3_5_classes(config_options.get("moe", False))
    torch.manual_seed(seed)
    return _finish_qwen(model_class(config).to(dtype))


def tiny_qwen_inputs(
    model: _QwenModel,
    *,
    image_grids: tuple[tuple[tuple[int, int], ...], ...] = (((8, 12),),),
    text_lengths: tuple[tuple[int, int], ...] | None = None,
    seed: int = 0,
    video_grids: tuple[tuple[tuple[int, int, int], ...], ...] | None = None,
    videos_first: bool = False,
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / pixel_values / image_grid_thw for a Qwen2(.5)-VL batch, like its processor.

    ``image_grids[b]`` lists the (h, w) in patches (even numbers) of each image of sample b. Sample b is
    ``<bos> text [<|vision_start|> <|image_pad|>x(h*w/4) <|vision_end|> text text]... text``, left-padded.
    ``video_grids[b]`` optionally lists (t, h, w) grids of videos (t = frames / temporal_patch_size), placed
    after the images the same way with <|video_pad|>, giving pixel_values_videos and video_grid_thw. Qwen3-VL and
    Qwen3.5 lay a video out frame by frame, as their processor does: per temporal patch, two text tokens (its
    timestamp) and its own <|vision_start|> <|video_pad|>x(h*w/4) <|vision_end|>. ``videos_first`` puts each
    sample's videos before its images.
    ``mm_token_type_ids`` (1 image, 2 video, 0 text) is returned only where the model's forward takes it (5.x).
    """
    vision = model.config.vision_config
    merge = vision.spatial_merge_size**2
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    vocab = model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    video_grids = video_grids or tuple(() for _ in image_grids)
    if len(video_grids) != len(image_grids):
        raise ValueError("video_grids needs one entry per sample")

    def text(n: int) -> list[int]:
        return torch.randint(QWEN_FIRST_TEXT_ID, vocab, (n,), generator=generator).tolist()

    timestamps = model.config.model_type.startswith(("qwen3_vl", "qwen3_5"))

    def block(pad_id: int, grid: tuple[int, ...]) -> list[int]:
        t, h, w = grid
        if h % vision.spatial_merge_size or w % vision.spatial_merge_size:
            raise ValueError(f"grid {grid}: h and w must be multiples of {vision.spatial_merge_size}")
        if pad_id == QWEN_VIDEO_TOKEN_ID and timestamps:
            frame = [QWEN_VISION_START_TOKEN_ID] + [pad_id] * (h * w // merge) + [QWEN_VISION_END_TOKEN_ID]
            return [token for _ in range(t) for token in text(2) + frame] + text(2)
        return [QWEN_VISION_START_TOKEN_ID] + [pad_id] * (t * h * w // merge) + [QWEN_VISION_END_TOKEN_ID] + text(2)

    rows = []
    for b, grids in enumerate(image_grids):
        before, after = text_lengths[b] if text_lengths else (3 + 2 * b, 5 + b)
        ids = [BOS_TOKEN_ID] + text(before)
        images = [block(QWEN_IMAGE_TOKEN_ID, (1, h, w)) for h, w in grids]
        videos = [block(QWEN_VIDEO_TOKEN_ID, grid) for grid in video_grids[b]]
        for part in videos + images if videos_first else images + videos:
            ids += part
        rows.append(ids + text(after))
    input_ids, attention_mask = _left_pad(rows)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    dtype = next(model.parameters()).dtype
    images = [(1, h, w) for grids in image_grids for h, w in grids]
    if images:
        inputs["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), patch_dim, generator=generator)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        inputs["image_grid_thw"] = torch.tensor(images, dtype=torch.long)
    videos = [tuple(grid) for grids in video_grids for grid in grids]
    if videos:
        pixels = torch.randn(sum(t * h * w for t, h, w in videos), patch_dim, generator=generator)
        inputs["pixel_values_videos"] = pixels.to(dtype)
        inputs["video_grid_thw"] = torch.tensor(videos, dtype=torch.long)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        types = torch.zeros_like(input_ids)
        types[input_ids == QWEN_IMAGE_TOKEN_ID] = 1
        types[input_ids == QWEN_VIDEO_TOKEN_ID] = 2
        inputs["mm_token_type_ids"] = types
    return inputs


# ---------------------------------------------------------------------------------------------- InternVL

# InternVL's <img> / </img> around each image's context tokens (IMAGE_TOKEN_ID); text tokens from 6 on.
INTERNVL_START_TOKEN_ID = 4
INTERNVL_END_TOKEN_ID = 5


def tiny_internvl_config(
    *,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    vision_layers: int = 3,
    text_layers: int = 2,
    image_size: int = 112,
    patch_size: int = 14,
    vocab_size: int = 256,
    heads: int = 4,
    use_qk_norm: bool = False,
    vision_feature_layer: int = -1,
    sliding_window: int | None = None,
    attn_implementation: str = "sdpa",
) -> InternVLConfig:
    """An InternVL3-shaped config: an InternViT tower with a [CLS] token on ``image_size`` px tiles, pixel shuffle
    (2 x 2 patches into one token, ``(image_size / patch_size / 2)^2`` tokens per tile), a Qwen2 language model
    (``sliding_window``: its even layers attend to that many tokens, as InternVL3.5-GPT-OSS's)."""
    vision = InternVLVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=[image_size, image_size],
        patch_size=[patch_size, patch_size],
        use_qk_norm=use_qk_norm,
        norm_type="rms_norm" if use_qk_norm else "layer_norm",
        initializer_range=0.2,
    )
    text = {"model_type": "qwen2", "initializer_range": 0.2}
    text.update(_text_options(hidden_size, 2 * hidden_size, text_layers, heads, vocab_size, 4096))
    if sliding_window is not None:
        text["use_sliding_window"], text["sliding_window"] = True, sliding_window
        text["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)]
    tokens = (image_size // patch_size // 2) ** 2
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=tokens,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_internvl(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> InternVLForConditionalGeneration:
    """A random-weight InternVLForConditionalGeneration in eval mode (weights depend only on ``seed``)."""
    config = tiny_internvl_config(attn_implementation=attn_implementation, **config_options)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():  # special tokens get logit 0 (as in llava_from_config): greedy decoding never emits them
        model.lm_head.weight[: INTERNVL_END_TOKEN_ID + 1] = 0
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_internvl_inputs(
    model: InternVLForConditionalGeneration,
    *,
    tiles: tuple[tuple[int, ...], ...] = ((3,),),
    text_lengths: tuple[tuple[int, int], ...] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / pixel_values for a batch, laid out like InternVLProcessor's.

    ``tiles[b]`` lists the tile count of each image of sample b (InternVL's dynamic tiling: an image of k > 1 tiles
    is k - 1 high-resolution tiles and its thumbnail last). Sample b is ``<bos> text [<img> <image>xT*k </img>
    text]... text``, left-padded; pixel_values is [all tiles, 3, S, S] in sequence order (batch row 0 first).
    """
    config = model.config
    side = config.vision_config.image_size[0]
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    first_text = INTERNVL_END_TOKEN_ID + 1
    rows = []
    for b, counts in enumerate(tiles):
        before, after = text_lengths[b] if text_lengths else (3 + 2 * b, 5 + b)
        ids = [BOS_TOKEN_ID] + torch.randint(first_text, vocab, (before,), generator=generator).tolist()
        for count in counts:
            ids += [INTERNVL_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * config.image_seq_length * count
            ids += [INTERNVL_END_TOKEN_ID] + torch.randint(first_text, vocab, (2,), generator=generator).tolist()
        ids += torch.randint(first_text, vocab, (after,), generator=generator).tolist()
        rows.append(ids)
    input_ids, attention_mask = _left_pad(rows)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    total = sum(sum(counts) for counts in tiles)
    if total:
        pixel_values = torch.randn(total, 3, side, side, generator=generator)
        inputs["pixel_values"] = pixel_values.to(next(model.parameters()).dtype)
    return inputs


_WORDS = (  # noqa: SIM905 - a sentence reads better than 37 quoted words
    "<pad> <s> </s> <image> <unk> USER: ASSISTANT: what is in the image ? describe it briefly . "
    "a an of on and red green blue yellow circle square triangle cat dog how many left right yes no"
).split()
# The chat template of save_tiny_llava's processor: "USER: <image> question ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}USER: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "ASSISTANT:"
)


def save_tiny_llava(directory: str, seed: int = 0, **config_options) -> str:
    """Save a tiny LLaVA and a real LlavaProcessor (word-level tokenizer, CLIP image processor, chat
    template) to ``directory``, loadable offline with ``from_pretrained`` / ``AutoProcessor``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_WORDS)}
    assert vocab["<image>"] == IMAGE_TOKEN_ID and vocab["<pad>"] == PAD_TOKEN_ID and vocab["<s>"] == BOS_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_input_names=["input_ids", "attention_mask"],
    )
    config_options.setdefault("vocab_size", 64)
    model = tiny_llava(seed=seed, **config_options)
    vision = model.config.vision_config
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size}, crop_size={"height": vision.image_size, "width": vision.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------- one per family

# The models of ``python -m vtc --model tiny-...`` and ``benchmarks/e2e.py --model tiny-...``: one per family, wide
# enough (256) and with real-sized images that timings mean something on a CPU.
TINY_MODELS = (
    "tiny",
    "tiny-llava-next",
    "tiny-llava-onevision",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-qwen3-vl",
    "tiny-qwen3-5",
    "tiny-internvl",
)


def tiny_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(random-weight model, a one-image prompt's inputs) for a name of :data:`TINY_MODELS`."""
    shape = {"hidden_size": 256, "text_layers": 4, "vision_layers": 6, "heads": 8, "vocab_size": 1024}
    if name == "tiny":
        model = tiny_llava(**shape)
        return model, tiny_llava_inputs(model, seed=seed)
    if name == "tiny-llava-next":  # 336 px crops of 24 x 24 tokens, a 672 x 672 image: 2928 visual tokens
        model = tiny_llava_next(image_size=336, **shape)
        return model, tiny_llava_next_inputs(model, image_sizes=(((672, 672),),), seed=seed)
    if name == "tiny-llava-onevision":  # the released geometry: 384 px crops of 27 x 27 tokens, pinpoints up to 6 x 6
        # crops, anyres_max_9; a 1536 x 1536 image: 4 x 4 crops, 108 x 108 tokens downsampled to 81 x 81, 7371 in all
        pinpoints = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]
        model = tiny_llava_onevision(image_size=384, image_grid_pinpoints=pinpoints, max_crops=9, **shape)
        return model, tiny_llava_onevision_inputs(model, image_sizes=(((1536, 1536),),), seed=seed)
    if name == "tiny-internvl":  # 448 px tiles of 16 x 16 tokens, an image of 2 x 2 tiles + thumbnail: 1280 tokens
        model = tiny_internvl(image_size=448, vision_hidden_size=shape["hidden_size"], **shape)
        return model, tiny_internvl_inputs(model, tiles=((5,),), seed=seed)
    if name == "tiny-qwen3-vl":  # 16 px patches: a 512 x 768 image, 32 x 48 patches, 384 visual tokens
        model = tiny_qwen3_vl(vision_hidden_size=shape["hidden_size"], **shape)
    elif name == "tiny-qwen3-5":  # the same image; text layers 0-2 linear attention, 3 full attention
        model = tiny_qwen3_5(vision_hidden_size=shape["hidden_size"], **shape)
    elif name in ("tiny-qwen2-vl", "tiny-qwen2.5-vl"):  # 14 px patches: a 448 x 672 image
        model = (tiny_qwen2_vl if name == "tiny-qwen2-vl" else tiny_qwen2_5_vl)(**shape)
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {list(TINY_MODELS)}")
    return model, tiny_qwen_inputs(model, image_grids=(((32, 48),),), seed=seed)
