"""vtc's subclasses of vLLM's model classes, registered by :func:`vtc.vllm_plugin.register` (imports vLLM).

Each behaves exactly as vLLM's class unless the model's config has a ``vtc`` entry (see :mod:`vtc.vllm_plugin`).
With one, its processor cuts each image's placeholders to the kept count, and ``embed_multimodal`` returns only the
kept (or merged) tokens, chosen by the method from the projected features and, on LLaVA, the CLIP tower's [CLS]
attention. The Qwen classes append each kept token's M-RoPE (t, h, w) position to its embedding, which vLLM's
multimodal-pruning hook (``recompute_mrope_positions``) strips off and writes into the prompt's positions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vtc.methods.base import check_signals
from vtc.probes import cls_row
from vtc.vllm_plugin import POSITIONS_FROM_EMBEDDINGS, Settings, settings

logger = logging.getLogger("vllm.vtc")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply

# Each kept Qwen token's (t, h, w) position from its image's first position and its index k among the image's kept
# tokens, each as two base-256 digits: integers below 256 are exact in bfloat16 and float16 too.
POSITION_VALUES = 4
POSITION_CHANNELS = 2 * POSITION_VALUES
DIGIT = 256


# -- processors: fewer placeholders ------------------------------------------------------------------------------


def fewer_placeholders(updates: Sequence[Any], setting: Settings) -> list[Any]:
    """The processor's prompt updates with each image's placeholder run cut to the kept count."""
    out = []
    for update in updates:
        if update.modality != "image":
            out.append(update)
            continue

        def replacement(item_idx: int, full: Any = update.replacement) -> list[int]:
            tokens = full(item_idx) if callable(full) else full
            return list(tokens[: setting.count(len(tokens))])

        out.append(PromptReplacement(modality="image", target=update.target, replacement=replacement))
    return out


class _FewerPlaceholders:
    """Processor mixin: with a vtc setting, each image gets the kept count of placeholders. Requests vtc cannot
    compress are refused in ``apply``, before anything of them is processed or cached (an error raised later would
    leave vLLM's processor cache believing the receiving side holds the item)."""

    text_after_images = False  # Qwen: a prompt must not end with an image placeholder (see _VtcQwen)

    def apply(self, inputs: Any, *args: Any, **kwargs: Any):
        config = self.info.get_hf_config()
        if settings(config) is not None:
            images = inputs.mm_data_items.get("image")
            if images is not None and not isinstance(images, ImageProcessorItems):  # embeddings, in any format
                raise ValueError(
                    "vtc compresses images from their pixels (it needs the vision tower's signals); image embeddings "
                    "cannot be compressed: send the image, or serve without vtc"
                )
            prompt = inputs.prompt
            if self.text_after_images and isinstance(prompt, list) and prompt and prompt[-1] == config.image_token_id:
                raise ValueError(
                    "vtc needs text after the last image of a Qwen prompt (the chat template's <|vision_end|>); this "
                    "prompt ends with the image placeholder"
                )
        return super().apply(inputs, *args, **kwargs)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        setting = settings(self.info.get_hf_config())
        return updates if setting is None else fewer_placeholders(updates, setting)


class VtcLlavaMultiModalProcessor(_FewerPlaceholders, LlavaMultiModalProcessor):
    pass


class VtcQwen2VLMultiModalProcessor(_FewerPlaceholders, Qwen2VLMultiModalProcessor):
    text_after_images = True


class VtcQwen2_5_VLMultiModalProcessor(_FewerPlaceholders, Qwen2_5_VLMultiModalProcessor):
    text_after_images = True


def _llava_processor(info, dummy_inputs):
    """vLLM's LLaVA processor factory, with vtc's processor for CLIP-style LLaVA (Pixtral-HF stays vLLM's)."""
    if type(info) is LlavaProcessingInfo:
        return VtcLlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


# -- selection ------------------------------------------------------------------------------------------------------


def select(setting: Settings, features: torch.Tensor, **signals: torch.Tensor | tuple) -> tuple[torch.Tensor, Any]:
    """One image's kept (or merged) tokens [K, D] from its projected ``features`` [N, D], and the Plan."""
    batched = {"features": features.unsqueeze(0)}
    for name, value in signals.items():
        batched[name] = value.unsqueeze(0) if torch.is_tensor(value) else value
    count = setting.count(features.shape[0])
    plan = setting.method.plan(check_signals(setting.method, batched), count)
    return plan.apply(batched["features"])[0], plan


def batches(sizes: Sequence[int], budget: int) -> list[slice]:
    """Consecutive groups of items whose sizes add up to at most ``budget`` (an item larger than it alone). vLLM's
    scheduler charges an image only its kept tokens, so it may hand the encoder N / K times more images than its
    budget of vision tokens: the tower runs on at most a budget's worth of the images' full tokens at a time."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            groups.append(slice(start, i))
            start, total = i, 0
        total += size
    if sizes:
        groups.append(slice(start, len(sizes)))
    return groups


def _log(setting: Settings, before: list[int], after: list[int]) -> None:
    """One line per encoder batch, e.g. "vtc divprune: visual tokens per image [256, 256] -> [64, 64]"; each model
    also keeps ``last_kept``, the kept indices of the last batch's images (``LLM.apply_model`` reads them)."""
    logger.info("vtc %s: visual tokens per image %s -> %s", setting.method.name, before, after)


class ClsRows:
    """Forward hooks on a vLLM CLIP tower's attention modules recording, per layer, the softmax attention of the [CLS]
    query over all tokens, mean over heads ([B, T] fp32; as :class:`vtc.probes.ClsRow` computes it off Hugging Face's
    CLIP)."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.rows: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(layers):
            attention = layer.self_attn
            if attention.num_heads_per_partition != attention.num_heads:
                raise ValueError(
                    "vtc's [CLS] methods need every head of the vision tower's attention in one process; with the "
                    "tower split by tensor parallelism use a method without [CLS] attention (divprune, dart, random, "
                    "uniform)"
                )
            attention.register_forward_hook(self._hook(index), with_kwargs=True)

    def _hook(self, index: int):
        def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, C], already layer-normed
            qkv, _ = module.qkv_proj(hidden)
            query, keys, _ = qkv.chunk(3, dim=-1)
            self.rows[index] = cls_row(query[:, :1], keys, module.num_heads, module.head_dim, module.scale)

        return record

    def take(self) -> torch.Tensor:
        """[B, V, T] the rows of the last tower pass, one per layer, and forget them."""
        rows = torch.stack([self.rows[i] for i in sorted(self.rows)], dim=1)
        self.rows = {}
        return rows


# -- LLaVA-1.5 --------------------------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(
    _llava_processor, info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder
)
class VtcLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with a vtc setting, images reach the language model compressed (positions numbered compactly)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtc = settings(self.config)
        self.cls_rows = None
        if self.vtc is None:
            return
        vision = self.config.vision_config
        if vision.model_type != "clip_vision_model" or not isinstance(self.config.vision_feature_layer, int):
            raise ValueError(
                f"vtc's vLLM plugin supports LLaVA with a CLIP tower and one feature layer, got a "
                f"{vision.model_type!r} tower with vision_feature_layer={self.config.vision_feature_layer!r}"
            )
        self.grid = (vision.image_size // vision.patch_size,) * 2
        self.encoder_budget = vllm_config.scheduler_config.max_num_encoder_input_tokens
        if {"cls_attention", "cls_attention_layers"} & set(self.vtc.method.requires):
            if self.config.vision_feature_select_strategy != "default":
                raise ValueError("vtc's [CLS] methods need the [CLS] token dropped (vision_feature_select_strategy)")
            self.cls_rows = ClsRows(self.vision_tower.vision_model.encoder.layers)  # built up to the feature layer
        logger.info("vtc: %s on %s", self.vtc, type(self).__name__)

    def embed_multimodal(self, **kwargs: object):
        if self.vtc is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        pixels = image_input["pixel_values"]
        tokens = self.grid[0] * self.grid[1]
        kept, self.last_kept = [], []
        for group in batches([tokens] * len(pixels), self.encoder_budget):
            features = self.multi_modal_projector(self._image_pixels_to_features(self.vision_tower, pixels[group]))
            rows = self.cls_rows.take()[..., 1:] if self.cls_rows is not None else None  # the [CLS] column dropped
            for i in range(features.shape[0]):
                signals = {"grid": self.grid}
                if rows is not None:
                    signals.update(cls_attention=rows[i, -1], cls_attention_layers=rows[i])
                chosen, plan = select(self.vtc, features[i], **signals)
                kept.append(chosen)
                self.last_kept.append(plan.kept[0].cpu())
        _log(self.vtc, [tokens] * len(kept), [len(k) for k in kept])
        return torch.stack(kept)


# -- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------------------------


def encode_positions(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[K, POSITION_VALUES] integers in [0, 65536) -> [K, POSITION_CHANNELS] base-256 digits, exact in ``dtype``."""
    if int(values.max()) >= DIGIT * DIGIT:
        raise ValueError(f"vtc carries kept-token positions below {DIGIT * DIGIT}, got {int(values.max())}")
    return torch.cat([values // DIGIT, values % DIGIT], dim=1).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`encode_positions`: [K, POSITION_CHANNELS] -> [K, POSITION_VALUES] long."""
    digits = channels.float().round().long()
    return digits[:, :POSITION_VALUES] * DIGIT + digits[:, POSITION_VALUES:]


def image_runs(is_image: torch.Tensor, first_positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each image's placeholders in a prompt, from its [L] image-placeholder mask and the [L] temporal
    M-RoPE row: every token of an image has the image's first position there (an image's t is 0, provisional or
    written), and the next image starts further on, so images apart or back to back split alike."""
    previous = torch.nn.functional.pad(first_positions[:-1], (1, 0), value=-1)
    previous_image = torch.nn.functional.pad(is_image[:-1], (1, 0), value=False)
    starts = (is_image & (~previous_image | (first_positions != previous))).nonzero().flatten().tolist()
    ends = [*starts[1:], len(is_image)][: len(starts)]
    return [
        (start, start + int(is_image[start:end].long().cumprod(0).sum()))
        for start, end in zip(starts, ends, strict=True)
    ]


class _VtcQwen:
    """Qwen mixin. The prompt's M-RoPE positions are laid out when a request arrives, before the vision tower runs:
    the text at its final positions (the text after an image starts max(t, h, w) after the image's first position,
    whatever its kept count) and the kept tokens provisionally at the image's first position. Each kept token's
    embedding carries its own position (:func:`encode_positions`), which ``recompute_mrope_positions`` (vLLM's
    multimodal-pruning hook, called with the embeddings of each prefill chunk) writes in. A prefix-cache hit over an
    image needs nothing: its tokens' keys were cached with their positions, and the text after it is already right."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # vLLM's Qwen class, next in the MRO
        self.vtc = settings(self.config)
        if self.vtc is None:
            return
        if vllm_config.compilation_config.cudagraph_mm_encoder:
            raise ValueError(
                "vtc selects tokens in embed_multimodal, which the vision encoder's CUDA graph bypasses: serve without "
                "cudagraph_mm_encoder"
            )
        self.encoder_budget = vllm_config.scheduler_config.max_num_encoder_input_tokens
        # vLLM calls recompute_mrope_positions only for a model that supports pruning and while its multimodal config
        # has pruning on, which vLLM ties to video pruning: vtc.vllm_plugin extends it to this flag.
        self.supports_multimodal_pruning = True
        setattr(self.multimodal_config, POSITIONS_FROM_EMBEDDINGS, True)
        self.is_multimodal_pruning_enabled = True  # vLLM's Qwen2.5-VL then keeps the encoder's CUDA graph off
        logger.info("vtc: %s on %s", self.vtc, type(self).__name__)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        if self.vtc is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        pieces, start, position = [], 0, 0  # start: sequence index, position: the next position id
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            t, h, w = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
            offset, length = feature.mm_position.offset, feature.mm_position.length
            text = offset - start
            pieces += [torch.arange(position, position + text).expand(3, -1), torch.full((3, length), position + text)]
            position += text + max(t, h // merge, w // merge)
            start = offset + length
        text = len(input_tokens) - start
        pieces.append(torch.arange(position, position + text).expand(3, -1))
        return torch.cat(pieces, dim=1), position + text - len(input_tokens)

    def embed_multimodal(self, **kwargs: object):
        if self.vtc is None:
            return super().embed_multimodal(**kwargs)
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not modalities:
            return []
        if "videos" in modalities or "video" in modalities:
            raise ValueError("vtc compresses images only; video inputs are disabled while vtc is on")
        image_input = modalities.get("images", modalities.get("image"))
        merge = self.config.vision_config.spatial_merge_size
        grids = image_input["image_grid_thw"]
        patches = grids.prod(-1).tolist()
        bounds = [0, *torch.tensor(patches).cumsum(0).tolist()]
        out, before, self.last_kept = [], [], []
        for group in batches([p // merge**2 for p in patches], self.encoder_budget):
            part = type(image_input)(
                type="pixel_values",
                pixel_values=image_input["pixel_values"][bounds[group.start] : bounds[group.stop]],
                image_grid_thw=grids[group],
            )
            for features, (_, h, w) in zip(self._process_image_input(part), grids[group].tolist(), strict=True):
                rows, cols = h // merge, w // merge
                kept, plan = select(self.vtc, features, grid=(rows, cols))
                index = plan.kept[0].to(features.device)
                values = torch.stack([index // (rows * cols), (index // cols) % rows, index % cols], dim=1)
                values = torch.cat([values, torch.arange(len(index), device=index.device)[:, None]], dim=1)
                out.append(torch.cat([kept, encode_positions(values, kept.dtype)], dim=1))
                before.append(features.shape[0])
                self.last_kept.append(index.cpu())
        _log(self.vtc, before, [len(k) for k in out])
        return tuple(out)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        if self.vtc is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        if not multimodal_embeddings:  # vLLM's V1 runner asks for every request at every step, text-only ones too
            return [], mrope_positions, int(mrope_positions[:, -1].max()) + 1 - mrope_positions.shape[1]
        positions = mrope_positions.clone()
        ids = torch.as_tensor(input_ids, device=positions.device)
        # The embeddings given are those of the images this chunk reaches, in prompt order, the first possibly a part
        # of its image (the rest before num_computed_tokens); images entirely before it are computed already.
        runs = image_runs(ids == self.config.image_token_id, positions[0])
        pending = [run for run in runs if run[1] > num_computed_tokens]
        out = []
        for embedding, (start, _) in zip(multimodal_embeddings, pending, strict=False):
            values = decode_positions(embedding[:, -POSITION_CHANNELS:]).to(positions.device)
            first = positions[0, start]  # the image's first position (an image's t is 0, provisional or written)
            positions[:, start + values[:, 3]] = values[:, :3].T + first
            out.append(embedding[:, :-POSITION_CHANNELS])
        # The prompt ends with text (vtc's processor refuses others), so decoding goes on after its last token.
        return out, positions, int(positions[:, -1].max()) + 1 - positions.shape[1]


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class VtcQwen2VLForConditionalGeneration(_VtcQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL; with a vtc setting, images reach the language model compressed at their grid positions."""


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VtcQwen2_5_VLForConditionalGeneration(_VtcQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with a vtc setting, images reach the language model compressed at their grid positions."""
