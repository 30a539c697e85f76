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
from vllm.multimodal.parse import ImageEmbeddingItems
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import recompute_mrope_positions

from vtc.methods.base import check_signals
from vtc.vllm_plugin import POSITIONS_FROM_EMBEDDINGS, Settings, settings

logger = logging.getLogger("vllm.vtc")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply

POSITION_CHANNELS = 4  # (t, h, w) of each kept token from its image's first position, and the text's offset after it


# -- processors: fewer placeholders ------------------------------------------------------------------------------


def fewer_placeholders(updates: Sequence[Any], mm_items: Any, setting: Settings) -> list[Any]:
    """The processor's prompt updates with each image's placeholder run cut to the kept count."""
    out = []
    for update in updates:
        if update.modality != "image":
            out.append(update)
            continue
        if isinstance(mm_items.get("image"), ImageEmbeddingItems):
            raise ValueError(
                "vtc compresses images from their pixels (it needs the vision tower's signals); image embeddings "
                "cannot be compressed: send the image, or serve without vtc"
            )

        def replacement(item_idx: int, full: Any = update.replacement) -> list[int]:
            tokens = full(item_idx) if callable(full) else full
            return list(tokens[: setting.count(len(tokens))])

        out.append(PromptReplacement(modality="image", target=update.target, replacement=replacement))
    return out


class _FewerPlaceholders:
    """Processor mixin: with a vtc setting, each image gets the kept count of placeholders."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        setting = settings(self.info.get_hf_config())
        return updates if setting is None else fewer_placeholders(updates, mm_items, setting)


class VtcLlavaMultiModalProcessor(_FewerPlaceholders, LlavaMultiModalProcessor):
    pass


class VtcQwen2VLMultiModalProcessor(_FewerPlaceholders, Qwen2VLMultiModalProcessor):
    pass


class VtcQwen2_5_VLMultiModalProcessor(_FewerPlaceholders, Qwen2_5_VLMultiModalProcessor):
    pass


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
            b, t, _ = hidden.shape
            qkv, _ = module.qkv_proj(hidden)
            query, keys, _ = qkv.chunk(3, dim=-1)
            heads, head_dim = module.num_heads, module.head_dim
            query = query[:, :1].reshape(b, 1, heads, head_dim).transpose(1, 2)
            keys = keys.reshape(b, t, heads, head_dim).transpose(1, 2)
            logits = query.float() @ keys.float().transpose(-1, -2) * module.scale  # [B, H, 1, T]
            self.rows[index] = logits.softmax(dim=-1).mean(dim=1)[:, 0]

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
        features = self.multi_modal_projector(self._process_image_pixels(image_input))  # [B, N, D]
        signals = {"grid": self.grid}
        rows = self.cls_rows.take()[..., 1:] if self.cls_rows is not None else None  # the [CLS] column dropped
        kept, self.last_kept = [], []
        for i in range(features.shape[0]):
            if rows is not None:
                signals.update(cls_attention=rows[i, -1], cls_attention_layers=rows[i])
            tokens, plan = select(self.vtc, features[i], **signals)
            kept.append(tokens)
            self.last_kept.append(plan.kept[0].cpu())
        _log(self.vtc, [features.shape[1]] * len(kept), [len(k) for k in kept])
        return torch.stack(kept)


# -- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------------------------


class _VtcQwen:
    """Qwen mixin: kept tokens carry their M-RoPE positions, which the pruning hook writes into the prompt's."""

    def _start_vtc(self, vllm_config: Any) -> None:
        self.vtc = settings(self.config)
        if self.vtc is None:
            return
        if vllm_config.compilation_config.cudagraph_mm_encoder:
            raise ValueError(
                "vtc selects tokens in embed_multimodal, which the vision encoder's CUDA graph bypasses: serve without "
                "cudagraph_mm_encoder"
            )
        # vLLM calls recompute_mrope_positions only when multimodal pruning is on (vtc.vllm_plugin).
        setattr(self.multimodal_config, POSITIONS_FROM_EMBEDDINGS, True)
        self.is_multimodal_pruning_enabled = True  # vLLM's Qwen2.5-VL then keeps the encoder's CUDA graph off
        logger.info("vtc: %s on %s", self.vtc, type(self).__name__)

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
        grids = image_input["image_grid_thw"].tolist()
        out, before, self.last_kept = [], [], []
        for features, (t, h, w) in zip(self._process_image_input(image_input), grids, strict=True):
            rows, cols = h // merge, w // merge
            kept, plan = select(self.vtc, features, grid=(rows, cols))
            index = plan.kept[0].to(features.device)
            self.last_kept.append(index.cpu())
            positions = torch.stack(
                [
                    index // (rows * cols),
                    (index // cols) % rows,
                    index % cols,
                    torch.full_like(index, max(t, rows, cols)),
                ],
                dim=1,
            )  # (t, h, w) from the image's first position; the text after it starts max(t, h, w) further
            out.append(torch.cat([kept, positions.to(kept.dtype)], dim=1))
            before.append(features.shape[0])
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
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        embeddings = [e[:, :-POSITION_CHANNELS] for e in multimodal_embeddings]
        positions = [e[:, -POSITION_CHANNELS:].round().long().T for e in multimodal_embeddings]  # [4, K] each
        config = self.config
        new, delta = recompute_mrope_positions(
            ids,
            positions,
            mrope_positions,
            num_computed_tokens,
            config.vision_start_token_id,
            config.image_token_id,
            config.video_token_id,
        )
        return embeddings, new, delta


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class VtcQwen2VLForConditionalGeneration(_VtcQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL; with a vtc setting, images reach the language model compressed at their grid positions."""

    supports_multimodal_pruning = True  # only acted on while vtc is on (see _VtcQwen._start_vtc)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._start_vtc(vllm_config)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        if self.vtc is None:  # vLLM's Qwen2-VL does not prune: positions stay as computed
            length = len(input_ids)
            return multimodal_embeddings, mrope_positions, int(mrope_positions.max()) + 1 - length
        return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VtcQwen2_5_VLForConditionalGeneration(_VtcQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with a vtc setting, images reach the language model compressed at their grid positions."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._start_vtc(vllm_config)
