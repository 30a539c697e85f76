"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration).

Where things happen in the model (transformers 4.57 and 5.x):
  visual(pixel_values, grid_thw): patch embedding, vision blocks (Qwen2.5-VL: window attention, with
  the patches permuted into window order, except in ``fullatt_block_indexes``), then the PatchMerger
  merges each 2 x 2 group of patches into one token (Qwen2.5-VL undoes the window order after it)
  -> masked_scatter at the <|image_pad|> placeholders -> 3-D (M-RoPE) position ids -> language_model.

Each image is one run of <|image_pad|> tokens of (h / 2) x (w / 2) tokens, so images in a batch
differ in size. ``keep`` is a per-image cap: an image with fewer tokens is kept whole.

Signals: these towers have no [CLS] token. vtc provides ``attention_received``: the mean attention
each patch receives (column mean of the softmax over all queries of its image, mean over heads) at the
last full-attention vision block, averaged over each 2 x 2 merge group (as in EffiVLM-Bench's
VisionZip port); for Qwen2.5-VL the window permutation is undone first. It is recomputed in a hook
from the block's input, so no eager attention is needed. Methods that need ``cls_attention`` are
refused unless the user opts in to a substitute: ``fastervlm`` with ``signal="attention_received"``,
or an auxiliary open_clip CLIP passed as ``cls_model=...`` whose [CLS] attention is resampled onto
each image's token grid. ``handle.stats["signal_sources"]`` says where each signal came from.

Videos (``pixel_values_videos``, ``video_grid_thw``; runs of <|video_pad|> tokens, one per video on Qwen2-VL / 2.5-VL,
one per frame between timestamps on Qwen3-VL) are compressed like images, alone or mixed with images in a batch. A
video's merged tokens are (t, h, w) = (temporal patches, rows, columns) in raster order, frame after frame, and keep
their original M-RoPE positions (the model computes them before vtc drops anything). What a budget means for a video:

* ``video_budget="per_video"`` (default): ``keep`` / ``ratio`` per video, one selection over all its frames, so
  tokens repeated from frame to frame compete with each other; the method gets the video's (t, h, w) grid.
* ``video_budget="per_frame"``: ``keep`` / ``ratio`` per temporal patch, each planned on its own (h, w) grid.

Images are planned as above whatever the budget. The transformers models encode images, then videos, in two vision
passes (in forward(), or in transformers 5's generate() before it); vtc tells them apart by the model method that runs
the vision tower (``get_video_features``). Temporal methods (``vtc.methods.base.Method.temporal``, e.g. ``evs``) need
videos with ``video_budget="per_video"``: images and per-frame budgets are refused. The auxiliary CLIP
(``cls_model=``) maps images only: videos are refused with it.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from vtc.adapters.base import Adapter, Image, Unit
from vtc.llm.prefill import kv_cache
from vtc.methods.base import Budget, Method
from vtc.probes import QwenVisionReceived, probe
from vtc.registry import register_family


@register_family
class Qwen2VLAdapter(Adapter):
    """Adapter for Qwen2-VL and Qwen2.5-VL (config.model_type "qwen2_vl" / "qwen2_5_vl")."""

    model_types = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
    layout = "merged_grid"
    options = ("cls_model", "video_budget")
    modules = ("visual", "language_model")
    compresses_video = True
    pil_processor: ClassVar[bool] = True  # vtc.loading may rebuild its processor without torchvision (QwenProcessor)
    compact_refused = (
        "its M-RoPE gives an image's tokens (t, h, w) grid positions and starts the text after the image at the grid's "
        "extent, whatever the image's token count, so dropping tokens leaves no gap to close; renumbering the kept "
        "tokens would move them off their grid positions"
    )

    def __init__(self, model: nn.Module, method: Method, budget: Budget, options: dict | None = None, **layerwise):
        super().__init__(model, method, budget, options, **layerwise)
        base = self.base
        vision = model.config.vision_config
        self.merge = vision.spatial_merge_size
        blocks = base.visual.blocks
        full = getattr(vision, "fullatt_block_indexes", None)
        self.signal_block = max(full) if full else len(blocks) - 1  # the last full-attention block
        self.windowed = full is not None  # Qwen2.5-VL: patches run in window order through the blocks
        self.aux = None
        cls_model = (options or {}).get("cls_model")
        if cls_model is not None:
            from vtc.aux_clip import AuxiliaryCLIP

            self.aux = AuxiliaryCLIP.create(cls_model)
            self.vision_layers_used = self.aux.num_layers  # the [CLS] rows come from the auxiliary tower
        self.provides = ("features", "attention_received") + (
            ("cls_attention", "cls_attention_layers") if self.aux is not None else ()
        )
        self.signal_sources = {"features": "merged visual tokens (language-model input)"}
        if "attention_received" in method.requires:
            scope = "full attention" if not self.windowed or full else "window attention: no full-attention block"
            self.signal_sources["attention_received"] = f"vision block {self.signal_block} ({scope})"
            purpose = "the attention received in the vision tower"
            self._received_probe = probe(QwenVisionReceived, blocks[self.signal_block].attn, purpose)
        if self.aux is not None:
            self.signal_sources["cls_attention"] = f"auxiliary open_clip {self.aux.name}, last block"
            self.signal_sources["cls_attention_layers"] = f"auxiliary open_clip {self.aux.name}, every block"
        self._vision_signature = inspect.signature(base.visual.forward)
        # What the vision side recorded for each encoder output still alive, by kind: generate() (transformers 5)
        # encodes before the forward and passes the outputs back as mm_encoder_outputs, to every prefill (beams,
        # use_cache=False); the forward plans with the record of exactly the outputs it gets.
        self._encodings: list[tuple[weakref.ref, str, list[dict[str, Any]]]] = []
        self._records_lock = threading.RLock()
        self._given: dict[str, Any] = {}  # the encoder outputs the forward in progress was passed, by kind

    def check(self) -> None:
        if {"cls_attention", "cls_attention_layers"} & set(self.requires) and self.aux is None:
            raise ValueError(
                f"method {self.method_names!r} needs [CLS] attention, but {type(self.model).__name__}'s vision tower "
                "has no [CLS] token. Choose a substitute explicitly: vtc.compress(model, 'fastervlm', "
                "signal='attention_received', ...) ranks tokens by the attention they receive in the vision "
                "tower, or cls_model='ViT-B-16' (any open_clip ViT) adds an auxiliary CLIP [CLS] attention map"
            )
        super().check()

    @property
    def _needs_received(self) -> bool:
        return "attention_received" in self.method.requires

    @property
    def _needs_cls(self) -> bool:
        return self.aux is not None and bool({"cls_attention", "cls_attention_layers"} & set(self.requires))

    # -- hooks ------------------------------------------------------------------------------------

    def _vision_hooks(self) -> None:
        self._hook(self.base.visual, self._vision_pre_hook, pre=True)
        self._hook(self.base.visual, self._vision_post_hook, pre=False)
        if self._needs_received:
            self._hook(self.base.visual.blocks[self.signal_block].attn, self._attention_hook, pre=True)

    def _refuse_inputs(self, images: bool, videos: bool) -> None:
        """Refuse what this attachment cannot compress, before any work on it (the model's forward, or the vision
        pass that transformers 5's generate() runs before it)."""
        if videos and not self.compresses_video:
            raise ValueError(
                f"vtc does not compress video inputs on {type(self.model).__name__} (pixel_values_videos / "
                "<|video_pad|> tokens); call handle.remove() to run video prompts uncompressed"
            )
        if videos and self._needs_cls:
            raise ValueError(
                "the auxiliary CLIP (cls_model=) maps images only, and this input holds videos; use a method that "
                "needs no [CLS] attention for videos (divprune, dart, uniform, evs, or fastervlm with "
                "signal='attention_received'), or call handle.remove() to run them uncompressed"
            )
        if images:
            self._refuse_temporal_on_images()

    def _read_inputs(self, bound: dict[str, Any]) -> None:
        encoded = bound.get("mm_encoder_outputs") or {}
        images = bound.get("pixel_values") is not None or encoded.get("image") is not None
        videos = bound.get("pixel_values_videos") is not None or encoded.get("video") is not None
        self._refuse_inputs(images, videos)
        # Encoded outside this forward: planned with the record of those very outputs (see _vision_record).
        self._given = {kind: encoded[kind] for kind in ("image", "video") if encoded.get(kind) is not None}
        cache = kv_cache(bound)
        if cache is None:  # passed under the name the signature no longer declares (past_key_values on 5.24+)
            cache = kv_cache(bound.get("kwargs") or {})
        positioned = bound.get("position_ids") is not None or bound.get("cache_position") is not None  # (4.x)
        images = images or videos  # refused as such, later
        if cache is not None and cache in self._shortened and not positioned and not images:
            name = type(self.model).__name__
            raise ValueError(
                f"this forward continues a KV cache that vtc shortened, without position_ids: {name} would number the "
                "new tokens from the shortened cache's length, not from the original prompt's (M-RoPE). Decode with "
                "generate(), or pass the position_ids (transformers 4.x: cache_position) generate() computes"
            )

    def _vision_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        video = self._encoding_video()
        self._refuse_inputs(not video, video)
        bound = self._vision_signature.bind_partial(*args, **kwargs).arguments
        grid_thw = bound["grid_thw"]
        if video and self.video_budget == "per_video":  # a budget the method cannot keep: before the tower runs
            for t, h, w in grid_thw.tolist():
                grid = (t, h // self.merge, w // self.merge)
                self.method.check_video(grid, self.budget.cap(t * h * w // self.merge**2))
        images = self.captured.get("images") if video else None  # the image pass of this call comes first
        self._vision_starts(module)
        if images is not None:
            self.captured["images"] = images
        self.captured["encoding"] = "videos" if video else "images"
        self.captured["grid_thw"] = grid_thw
        if self._needs_received and self.windowed:
            self.captured["window_index"] = self._windows(module, grid_thw)
        if self._needs_cls:
            self.captured["aux_rows"] = self._aux_cls(bound["hidden_states"], grid_thw)

    def _attention_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad():
            self.captured["received"] = self._received_probe.received(
                hidden, kwargs["position_embeddings"], kwargs["cu_seqlens"]
            )

    def _vision_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        merged = getattr(output, "pooler_output", output)  # [tokens, D] in original order
        if isinstance(merged, tuple):  # Qwen3-VL on transformers 4.x: (merged tokens, DeepStack features)
            merged = merged[0]
        grid_thw = self.captured["grid_thw"]
        tokens = (grid_thw.prod(-1) // self.merge**2).tolist()
        received = None
        if "received" in self.captured:
            received = self.captured["received"].view(-1, self.merge**2).mean(dim=1)  # per merged token, block order
            if "window_index" in self.captured:
                received = received[torch.argsort(self.captured["window_index"].to(received.device))]
            received = received.split(tokens)
        video = self.captured.pop("encoding") == "videos"
        images = self.captured["videos" if video else "images"] = []  # per image / video: what the vision side knows
        for i, (count, (t, h, w)) in enumerate(zip(tokens, grid_thw.tolist(), strict=True)):
            info: dict[str, Any] = {"grid": (h // self.merge, w // self.merge) if t == 1 else None, "length": count}
            if video:
                info["frames"] = (t, h // self.merge, w // self.merge)
            info["first"] = merged[sum(tokens[:i])].detach()
            if received is not None:
                info["attention_received"] = received[i]
            if "aux_rows" in self.captured:
                info["cls_attention"] = self.captured["aux_rows"][i][-1]
                info["cls_attention_layers"] = self.captured["aux_rows"][i]
            images.append(info)
        try:  # a ModelOutput; Qwen3-VL's tuple on transformers 4.x, which never comes back as mm_encoder_outputs
            ref = weakref.ref(output, self._forget_encoding)
        except TypeError:
            return
        with self._records_lock:
            self._encodings.append((ref, "video" if video else "image", images))

    def _forget_encoding(self, ref: weakref.ref) -> None:
        """A recorded encoder output is gone (the callback may run in any thread, or in a garbage collection)."""
        with self._records_lock:
            self._encodings[:] = [entry for entry in self._encodings if entry[0] is not ref]

    def _windows(self, visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's window order of the merged groups (transformers 4.57 method, 5.x function)."""
        if hasattr(visual, "get_window_index"):
            return visual.get_window_index(grid_thw)[0]
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
            kwargs={},
        )[0]

    def _aux_cls(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per image, [V, n] auxiliary-CLIP [CLS] attention resampled onto the image's token grid."""
        from vtc.aux_clip import images_from_qwen_patches

        vision = self.model.config.vision_config
        images = images_from_qwen_patches(
            pixel_values.float(),
            grid_thw,
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=self.merge,
        )  # Qwen2-VL's image processor normalises with CLIP's mean / std, the default
        rows = []
        for image, (_, h, w) in zip(images, grid_thw.tolist(), strict=True):
            maps = self.aux.cls_attention(image.unsqueeze(0))  # [1, V, gh, gw]
            rows.append(self.aux.resample(maps, (h // self.merge, w // self.merge))[0].to(pixel_values.device))
        return rows

    # -- the plan ---------------------------------------------------------------------------------

    def _units(self, embeds: torch.Tensor, images: list[Image]) -> list[Unit]:
        units = []
        for image in images:
            signals = {name: image.vision[name] for name in self.requires if name != "features"}
            if image.video:
                units += self._video_units(image, signals)
            else:
                count = self.budget.cap(image.positions.numel())
                units.append(Unit(image.sample, image.positions, count, image.vision.get("grid"), signals))
        return units

    def _locate_images(self, visual: torch.Tensor, embeds: torch.Tensor) -> list[Image]:
        """Images are the <|image_pad|> tokens, videos the <|video_pad|> ones (see :meth:`_locate`), in sequence
        order."""
        videos, self._video_marks = self._video_marks, None
        given, self._given = self._given, {}
        found = self._locate(visual if videos is None else visual & ~videos, embeds, given.get("image"), video=False)
        if videos is not None:
            found += self._locate(videos, embeds, given.get("video"), video=True)
        return sorted(found, key=lambda image: (image.sample, int(image.positions[0])))

    def _vision_record(self, kind: str, given: Any) -> list[dict[str, Any]] | None:
        """What the vision side recorded of this call's images (videos): of the encoder outputs it was passed
        (``given``), or of its own vision pass; None if they were encoded without vtc."""
        if given is None:
            return self.captured.get(f"{kind}s")
        with self._records_lock:
            return next((record for ref, k, record in self._encodings if k == kind and ref() is given), None)

    def _locate(self, marks: torch.Tensor, embeds: torch.Tensor, given: Any, video: bool) -> list[Image]:
        """The images (videos) of one kind: each sample's placeholders of that kind, in sequence order, cut into the
        vision tower's images (videos) in order. When generate() repeated every row for beams (transformers 5 encodes
        before it expands: each row's images, its ``copies`` rows in a row), each copy takes its row's images. Each
        one's first token must be the one the vision tower gave it, or the call is refused."""
        kind = "video" if video else "image"
        per_sample = [marks[b].nonzero().squeeze(1) for b in range(marks.shape[0])]
        total = sum(cols.numel() for cols in per_sample)
        if not total:
            return []
        vision = self._vision_record(kind, given)
        if vision is None:
            needs_vision = set(self.requires) - {"features"}
            if needs_vision or video:
                what = f"vision-side signals {sorted(needs_vision)}" if needs_vision else "each video's (t, h, w) grid"
                raise ValueError(
                    f"method {self.method.name!r} needs {what}, but the {kind} features of this call were not computed "
                    f"while vtc was attached (by this forward, or by generate() or get_{kind}_features into the "
                    "mm_encoder_outputs it passes; or a chunked prefill cut them); let the model encode them with vtc "
                    "attached, and prefill whole prompts (no prefill_chunk_size)"
                )
            return [Image(b, run) for b, cols in enumerate(per_sample) for run in _runs(cols)]
        lengths = [info["length"] for info in vision]
        copies = total // sum(lengths) if total % sum(lengths) == 0 else 0
        if not copies or len(per_sample) % copies:
            raise ValueError(
                f"the prompt holds {total} {kind} tokens, which are not the {sum(lengths)} tokens of the "
                f"{len(lengths)} {kind}(s) the vision encoder gave ({lengths}), nor a whole number of copies of them"
            )
        found: list[Image] = []
        taken = 0
        for b, cols in enumerate(per_sample):
            if b % copies:  # a beam's copy of row b - b % copies
                first = b - b % copies
                if not torch.equal(cols, per_sample[first]):
                    raise ValueError(f"rows {first} and {b} should be copies of one sample (beams) but differ")
                found += [Image(b, image.positions, image.vision, video) for image in found if image.sample == first]
                continue
            start = 0
            while start < cols.numel():
                info = vision[taken] if taken < len(vision) else None
                if info is None or start + info["length"] > cols.numel():
                    raise ValueError(
                        f"the {kind} placeholders of sample {b} ({cols.numel()} tokens) do not split into whole "
                        f"{kind}s of the {lengths} tokens the vision encoder gave"
                    )
                positions = cols[start : start + info["length"]]
                if not torch.equal(embeds[b, positions[0]], info["first"].to(embeds.dtype)):
                    raise ValueError(
                        f"{kind} {taken} of this call is not the one the vision encoder gave vtc ({kind} features from "
                        "another call?); let the model encode this call's inputs with vtc attached"
                    )
                found.append(Image(b, positions, info, video))
                start += info["length"]
                taken += 1
        return found


def _runs(cols: torch.Tensor) -> list[torch.Tensor]:
    """Consecutive runs of sorted column indices."""
    breaks = ((cols[1:] - cols[:-1]) != 1).nonzero().squeeze(1) + 1
    return [run for run in torch.tensor_split(cols, breaks.tolist()) if run.numel()]
