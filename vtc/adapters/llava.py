"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration / LlavaModel).

Where things happen in the model (transformers 4.57 and 5.x):
  vision_tower -> hidden_states[vision_feature_layer] (CLS dropped for strategy "default")
  -> multi_modal_projector -> masked_scatter into inputs_embeds at the <image> placeholders
  -> language_model(inputs_embeds=..., attention_mask=..., position_ids=..., past_key_values=...)

Hooks (all removable, no transformers code copied or patched):
  * LlavaModel pre-hook: records which positions hold image tokens (input_ids == image_token_id).
  * vision attention pre-hooks (only if the method needs [CLS] attention): recompute the one [CLS]
    query row from the layer's (already layer-normed) input, so any attention implementation works.
  * projector forward hook: remembers each image's first projected token, to match vision-side
    signals to images when generate() repeats images (beam search, num_return_sequences).
  * language-model pre/post hooks (base class): drop tokens, keep decoding consistent.
"""

from __future__ import annotations

import torch
from torch import nn

from vtc.adapters.base import Adapter, Image, Unit, match_images
from vtc.methods.base import Budget, Method
from vtc.probes import ClsRow, probe
from vtc.registry import register_family

_CLS_SIGNALS = ("cls_attention", "cls_attention_layers")


def tokens_per_image(config) -> int:
    """LLaVA-1.5's visual tokens per image: the patch grid, and the [CLS] token unless the strategy drops it."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return side * side + (0 if config.vision_feature_select_strategy == "default" else 1)


@register_family
class LlavaAdapter(Adapter):
    """Adapter for LLaVA-1.5-style models (config.model_type "llava")."""

    model_types = {"llava": "LLaVA-1.5"}
    layout = "grid"
    modules = ("vision_tower", "multi_modal_projector", "language_model")
    watches_projector = False  # hook the projector even when no [CLS] signal is needed

    def __init__(self, model: nn.Module, method: Method, budget: Budget, options: dict | None = None, **layerwise):
        super().__init__(model, method, budget, options, **layerwise)
        self._vision_setup(model.config)

    def _vision_setup(self, config) -> None:
        """What the vision tower gives: token grid, tokens per image, [CLS] signals (CLIP-style towers)."""
        vision = getattr(self.base.vision_tower, "vision_model", self.base.vision_tower)
        vision_config = config.vision_config
        side = vision_config.image_size // vision_config.patch_size
        self.strategy = config.vision_feature_select_strategy
        self.grid = (side, side) if self.strategy == "default" else None
        self.tokens_per_image = tokens_per_image(config)
        has_cls = hasattr(getattr(vision, "embeddings", None), "class_embedding")
        self._vision_signals([layer.self_attn for layer in vision.encoder.layers], has_cls)

    def _vision_signals(self, attention: list[nn.Module], has_cls: bool) -> None:
        """The vision tower's attention modules (one per layer) and whether it has a [CLS] token: the feature layer,
        the signals provided, and the layers whose [CLS] rows the method needs."""
        self.vision_attention = attention
        self.feature_layer = self._feature_layer(self.model.config.vision_feature_layer, len(attention))
        self.vision_layers_used = None if self.feature_layer is None else self.feature_layer + 1
        self.provides = ("features",) + (_CLS_SIGNALS if has_cls and self.feature_layer is not None else ())
        if "cls_attention" in self.provides:
            self.signal_sources = {
                "cls_attention": f"vision layer {self.feature_layer} ([CLS] query row)",
                "cls_attention_layers": f"vision layers 0..{self.feature_layer} ([CLS] query rows)",
            }
        self._cls_layers = self._needed_vision_layers()
        self._cls_probes: dict[int, ClsRow] = {}

    def check(self) -> None:
        super().check()
        purpose = "the [CLS] attention of the vision tower"
        self._cls_probes = {i: probe(ClsRow, self.vision_attention[i], purpose) for i in self._cls_layers}

    @staticmethod
    def _feature_layer(vision_feature_layer: int | list[int], num_layers: int) -> int | None:
        """Index of the vision layer whose output LLaVA uses (the deepest one for a list); None = embeddings."""
        layers = vision_feature_layer if isinstance(vision_feature_layer, (list, tuple)) else [vision_feature_layer]
        # hidden_states[h] is the output of layer h - 1 (hidden_states[0] = embeddings).
        outputs = [h if h >= 0 else num_layers + 1 + h for h in layers]
        deepest = max(outputs) - 1
        return deepest if deepest >= 0 else None

    def _needed_vision_layers(self) -> list[int]:
        if "cls_attention_layers" in self.requires:
            return list(range(self.feature_layer + 1))
        if "cls_attention" in self.requires:
            return [self.feature_layer]
        return []

    def _read_inputs(self, bound: dict) -> None:
        """A call that picks another vision feature layer or strategy than the config (what vtc planned its signals
        and token counts with) is refused before anything runs."""
        config = self.model.config
        for name in ("vision_feature_layer", "vision_feature_select_strategy"):
            value = bound.get(name)
            if value is None and name in bound.get("kwargs", {}):
                value = bound["kwargs"][name]
            if value is not None and value != getattr(config, name):
                raise ValueError(
                    f"this call passes {name}={value!r}, but vtc reads its signals and token layout at the model's "
                    f"configured {name}={getattr(config, name)!r}; set it in model.config before vtc.compress (vtc "
                    "then plans with it), or leave it out of the call"
                )

    # -- hooks ------------------------------------------------------------------------------------

    def _vision_hooks(self) -> None:
        if self._cls_layers or self.watches_projector:
            self._hook(self.base.vision_tower, self._vision_pre_hook, pre=True)
            for i in self._cls_layers:
                self._hook(self.vision_attention[i], self._cls_hook(i), pre=True)
            self._hook(self.base.multi_modal_projector, self._projector_hook, pre=False, with_kwargs=False)

    def _vision_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._vision_starts(module)

    def _cls_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            with torch.no_grad():
                self.captured.setdefault("cls_rows", {})[layer] = self._cls_probes[layer].row(hidden)

        return hook

    def _projector_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.captured["first_tokens"] = output[:, 0].detach()

    # -- the plan ---------------------------------------------------------------------------------

    def _image_length(self, image: int) -> int:
        """Visual tokens of the image-th image of the prefill (sequence order over the batch)."""
        return self.tokens_per_image

    def _locate_images(self, visual: torch.Tensor, embeds: torch.Tensor) -> list[Image]:
        """Each sample's placeholders, cut into images of their token counts."""
        images: list[Image] = []
        for b in range(visual.shape[0]):
            cols = visual[b].nonzero().squeeze(1)
            start = 0
            while start < cols.numel():
                length = self._image_length(len(images))
                if start + length > cols.numel():
                    counts = visual.sum(dim=1).tolist()
                    raise ValueError(self._bad_token_count_message(counts))
                images.append(Image(b, cols[start : start + length]))
                start += length
        return images

    def _bad_token_count_message(self, counts: list[int]) -> str:
        return (
            f"found {counts} image tokens per sample, not a multiple of the {self.tokens_per_image} tokens per "
            "image this model uses"
        )

    def _units(self, embeds: torch.Tensor, images: list[Image]) -> list[Unit]:
        count = self.budget.tokens(self.tokens_per_image)
        rows = self._cls_rows_per_image(embeds, images) if self._cls_layers else None
        units = []
        for i, image in enumerate(images):
            signals = {} if rows is None else {"cls_attention": rows[i, -1], "cls_attention_layers": rows[i]}
            units.append(Unit(image.sample, image.positions, count, self.grid, signals))
        return units

    def _cls_rows_per_image(self, embeds: torch.Tensor, images: list[Image]) -> torch.Tensor:
        """[I, V, N] [CLS] rows captured during the vision forward, matched to the images of this prefill."""
        rows = self._take_cls_rows()
        if self.strategy == "default":
            rows = rows[..., 1:]  # the [CLS] column is not a visual token
        if rows.shape[0] != len(images):
            rows = rows[self._match_images(embeds, images)]
        return rows

    def _take_cls_rows(self) -> torch.Tensor:
        """[I_vision, V, T] the [CLS] rows of the last vision forward, one row per layer used."""
        captured = self.captured.get("cls_rows", {})
        if not all(i in captured for i in self._cls_layers):
            raise ValueError(
                f"method {self.method.name!r} needs the vision encoder's [CLS] attention, but the vision encoder "
                "did not run while vtc was attached (were image features computed before vtc.compress?)"
            )
        return torch.stack([captured[i] for i in self._cls_layers], dim=1)

    def _match_images(self, embeds: torch.Tensor, images: list[Image]) -> list[int]:
        """The vision-side image behind each prefill image, by its first projected token (generate() may repeat
        images for beams)."""
        seen = self.captured.get("first_tokens")
        if seen is None:
            raise ValueError("vtc could not match vision signals to images: the projector did not run under vtc")
        first = torch.stack([embeds[image.sample, image.positions[0]] for image in images])
        return match_images(first, seen)
