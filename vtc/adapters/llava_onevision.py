"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration): AnyRes images, big grids downsampled.

Where things happen in the model (transformers 4.57 and 5.x): as LLaVA-NeXT (vtc.adapters.llava_next), except
  * the vision tower is SigLIP: no [CLS] token, vision_feature_select_strategy "full" (every patch is a token), the
    features of its last layer;
  * ``pack_image_features`` puts the base crop's tokens first, tiles the crops into one big grid, cuts the rows /
    columns that only cover padding and then, when the grid holds more than 1.1^2 * N crops' worth of tokens
    (``vision_aspect_ratio="anyres_max_N"``, N = 9 for the released models), downsamples it bilinearly
    (nn.functional.interpolate) to about N crops' worth, before an ``image_newline`` token ends every row. A
    downsampled token mixes up to four patches, of up to four crops: it is no one (crop, patch) any more;
  * the images of a sample with several images (``batch_num_images``) are not cut into crops: each is one crop,
    base tokens then one newline;
  * the language model is Qwen2 (in-LLM methods score through its attention as for any Qwen2).

How vtc maps the packed tokens, exactly: it pushes per-patch values through the model's own ``pack_image_features``
as feature channels; they are packed as the features are (unpadding, interpolation and all), so a packed token's
value is the same mix of the same patches as its features:
  * signals: the attention each patch receives in its crop, [crops, T, 1], packs into the signal of every packed
    token; newline tokens get 0;
  * crops: one-hot crop indicators, [crops, T, crops], pack into each token's weights on the crops; a token belongs
    to the crop of its largest weight (the first on a tie), newline tokens weigh nothing. Packed without the
    downsampling (a cap no grid reaches), the same indicators give the crop of every cell of the unpadded big grid.

Signals: ``features`` and ``attention_received``: the mean attention each patch receives from all patches of its
crop (mean over heads), at the feature layer, recomputed from that layer's input (no eager attention needed) and
packed as above. No [CLS] token: methods that need [CLS] attention (fastervlm's default, vtc_cls, adaptive with
``protect``) are refused, naming the substitute ``signal="attention_received"``.

Budgets, as for LLaVA-NeXT (``keep`` counts an image's content tokens, newlines follow their rows): ``"global"``;
``"per_crop"`` plans the base and each crop's tokens (the tokens it weighs most in) separately, ``keep`` split in
proportion to their counts; ``"thumbnail"`` keeps the base's proportional share and weights each crop's share of the
rest by how much of the base image's attention received falls on its area, read on the unpadded big grid (the crop
under the centre of each base token), so in place of LLaVA-NeXT's [CLS] attention.

transformers 5.x generate() encodes the images before the prefill, and the prefill gets neither image_sizes nor
batch_num_images. vtc then recovers, per image, a size that the model's own ``pack_image_features`` packs, from the
image's crops as the projector gave them, into exactly (bit for bit) the tokens in the prompt. Candidates: one crop,
and every pinpoint at its own size and cut by every unpadding it allows. An image cut to k rows of tokens is, resized
into its pinpoint, as wide as the pinpoint and less than k + 1 rows high; the candidate is the highest such image (a
smaller pinpoint that held it whole would have held the real image whole, and been chosen for it); columns alike.
Where two candidates pack alike (an image whose crops are bit-identical, e.g. a blank one), the first is taken.

Videos (``pixel_values_videos`` [videos, frames, C, H, W], one run of <video> tokens each): every frame is one crop
through the tower and projector, pooled 2 x 2 (bilinearly, to ceil(side / 2) per axis: 14 x 14 for the released
384 px / 14 px tower), frame after frame, and one ``image_newline`` token ends the video. vtc plans over the frames'
tokens with ``video_budget="per_video"`` (default: the (frames, h, w) grid at once) or ``"per_frame"`` (each frame's
(h, w) grid), and always keeps the video's newline. The frame count comes from the call (``pixel_values_videos``, or
the encoded videos that transformers 5's generate() passes); the vision passes of videos leave the images' captures
alone (vtc tells them apart by the model method that runs the tower, ``get_video_features``). Methods that read
``attention_received`` are refused on videos (it is not yet carried through the pooling); images in the same batch
are planned as above, with their ``budget``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtc.adapters.base import Image, Unit
from vtc.adapters.llava_next import LlavaNextAdapter, _bits, _grid
from vtc.methods.base import Budget, Method
from vtc.probes import VisionReceived, probe
from vtc.registry import register_family

_UNCAPPED = "anyres_max_1000000000"  # a vision_aspect_ratio no big grid exceeds: packed without downsampling
_CHECK_CHANNELS = 8  # feature channels compared first, before a candidate's packing is compared in full


@dataclass(frozen=True)
class Packing:
    """How the model packs one image's crops (base first) into its visual tokens."""

    size: tuple[int, int]  # (height, width) the model packs with: the image's, or one it packs the same way
    crops: int  # crops the vision tower saw, base included
    crop: torch.Tensor  # [L] the crop of each packed token (its largest weight): 0 = base, -1 = newline
    big: torch.Tensor  # [H', W'] the crop of every cell of the unpadded big grid (before any downsampling)


@register_family
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """Adapter for LLaVA-OneVision models (config.model_type "llava_onevision")."""

    model_types = {"llava_onevision": "LLaVA-OneVision"}
    options = ("budget", "video_budget")
    compresses_video = True
    feature_strategy = "full"
    thumbnail_signal = "attention_received"

    def __init__(self, model: nn.Module, method: Method, budget: Budget, options: dict | None = None, **layerwise):
        super().__init__(model, method, budget, options, **layerwise)
        vision = getattr(self.base.vision_tower, "vision_model", self.base.vision_tower)
        if hasattr(getattr(vision, "embeddings", None), "class_embedding"):
            raise ValueError(
                f"vtc supports LLaVA-OneVision with a vision tower without a [CLS] token (SigLIP, the released "
                f"models), got {type(vision).__name__}"
            )
        config = model.config
        self.aspect_ratio = config.vision_aspect_ratio
        self.provides = ("features",) + (("attention_received",) if self.feature_layer is not None else ())
        self.signal_sources = {"features": "packed visual tokens (language-model input)"}
        if self._needs_received and self.feature_layer is not None:
            self.signal_sources["attention_received"] = (
                f"vision layer {self.feature_layer} (all patches of each crop), packed as the features"
            )
        self._patched: list[bool] = []
        self._packings: dict[tuple[tuple[int, int], int], Packing] = {}
        self._lengths_of: dict[tuple[tuple[int, int], int], int] = {}
        self._candidates: list[tuple[int, tuple[int, int]]] | None = None
        self._received_probe: VisionReceived | None = None
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.frame_grid = (math.ceil(side / 2), math.ceil(side / 2))  # a video frame's tokens, after the 2 x 2 pooling
        self._frames: int | None = None  # frames per video of the forward in progress

    @property
    def _needs_received(self) -> bool:
        return "attention_received" in self.requires or self.crop_budget == "thumbnail"

    def _needed_vision_layers(self) -> list[int]:
        return []  # no [CLS] rows: the tower has no [CLS] token

    def check(self) -> None:
        if {"cls_attention", "cls_attention_layers"} & set(self.requires):
            raise ValueError(
                f"method {self.method_names!r} needs [CLS] attention, but {type(self.model).__name__}'s vision tower "
                "(SigLIP) has no [CLS] token. Use vtc.compress(model, 'fastervlm', signal='attention_received', ...), "
                "which ranks tokens by the attention they receive in the vision tower, or a method that needs no "
                "[CLS] attention (divprune, dart, uniform, random, or an in-LLM method; adaptive with protect=0)"
            )
        super().check()
        if self._needs_received:
            attention = self.vision_attention[self.feature_layer]
            self._received_probe = probe(VisionReceived, attention, "the attention received in the vision tower")

    # -- hooks ------------------------------------------------------------------------------------

    def _vision_hooks(self) -> None:
        self._hook(self.base.vision_tower, self._vision_pre_hook, pre=True)
        if self._needs_received:
            self._hook(self.vision_attention[self.feature_layer], self._received_hook, pre=True)
        self._hook(self.base.multi_modal_projector, self._projector_hook, pre=False, with_kwargs=False)

    def _vision_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """An image pass starts afresh; a video pass (after the images' in the same call) keeps the images' captures
        and captures nothing itself."""
        if not self._encoding_video():
            self._refuse_temporal_on_images()
            super()._vision_pre_hook(module, args, kwargs)
            return
        self._refuse_video_signals()
        self._claim(module)
        self.captured["video_pass"] = True

    def _projector_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self.captured.get("video_pass"):
            super()._projector_hook(module, args, output)

    def _refuse_video_signals(self) -> None:
        if "attention_received" in self.requires:
            raise ValueError(
                f"{self.method_names!r} reads the attention received in the vision tower, which vtc does not yet carry "
                f"through {type(self.model).__name__}'s 2 x 2 pooling of video frames; for videos use a method that "
                "reads the features (divprune, dart, uniform, random, evs), or call handle.remove()"
            )

    def _received_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.captured.get("video_pass"):
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad():
            self.captured["received"] = self._received_probe.received(hidden)  # [crops of all images, T]

    def _read_inputs(self, bound: dict[str, Any]) -> None:
        encoded = bound.get("mm_encoder_outputs") or {}
        videos, self._frames = bound.get("pixel_values_videos"), None
        if videos is not None or encoded.get("video") is not None:
            self._refuse_video_signals()
            if videos is not None:  # [videos, frames, C, H, W]
                self._frames = int(videos.shape[1])
                grid = (self._frames, *self.frame_grid)
                if self.video_budget == "per_video":  # before the vision tower runs (in forward())
                    self.method.check_video(grid, self.budget.cap(math.prod(grid)))
            else:  # pooled tokens [videos, frames * h * w + 1, D], the newline last
                length = int(encoded["video"].pooler_output.shape[1]) - 1
                self._frames = length // math.prod(self.frame_grid)
        if bound.get("pixel_values") is not None or encoded.get("image") is not None:
            self._refuse_temporal_on_images()
        super()._read_inputs(bound)
        counts = bound.get("batch_num_images")
        if counts is None:  # transformers' reading: every image is a single-image sample's
            self._patched = [True] * len(self._image_sizes)
        else:  # as transformers' get_image_features: only the image of a single-image sample is cut into crops
            counts = counts.tolist() if torch.is_tensor(counts) else list(counts)
            self._patched = [int(n) == 1 for n in counts for _ in range(int(n))]

    # -- geometry ---------------------------------------------------------------------------------

    def crop_count(self, size: tuple[int, int], patched: bool = True) -> int:
        """Crops (base included) the vision tower sees of an image of ``size``; one if it is not cut into crops."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        if not patched:
            return 1
        config = self.model.config
        return image_size_to_num_patches(
            image_size=tuple(size),
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        )

    def pack(
        self,
        values: torch.Tensor,
        size: tuple[int, int],
        newline: torch.Tensor | None = None,
        aspect_ratio: str | None = None,
    ) -> torch.Tensor:
        """``values`` [crops, T, C] (base first) packed by the model's own ``pack_image_features`` as it packs the
        features of an image of ``size``: [L, C], newline rows ``newline`` [C] (default 0)."""
        newline = values.new_zeros(values.shape[-1]) if newline is None else newline
        packed, _ = self.base.pack_image_features(
            [values],
            torch.tensor([tuple(size)]),
            image_newline=newline,
            vision_aspect_ratio=aspect_ratio or self.aspect_ratio,
        )
        return packed[0]

    def packing(self, size: tuple[int, int], crops: int | None = None) -> Packing:
        """How the model packs an image of (height, width) ``size`` cut into ``crops`` crops (default: as many as
        AnyRes cuts it into): pushes one-hot crop indicators through :meth:`pack`, so it is exact for any
        transformers version, downsampling included."""
        size = (int(size[0]), int(size[1]))
        crops = self.crop_count(size) if crops is None else crops
        if (size, crops) not in self._packings:
            t = self.patch_tokens
            onehot = torch.eye(crops, dtype=torch.float64).unsqueeze(1).repeat(1, t, 1)  # [crops, T, crops]
            weights = self.pack(onehot, size)  # [L, crops]: newline rows 0, token rows sum to 1
            crop = torch.where(weights.sum(-1) > 0.5, weights.argmax(-1), -1)
            cells = self.pack(onehot, size, aspect_ratio=_UNCAPPED)  # one-hot rows: the unpadded grid, not resampled
            rows = int((cells.sum(-1) < 0.5).sum())  # a newline ends every row
            big = _grid(cells.argmax(-1)[t:][cells[t:].sum(-1) > 0.5], rows)
            self._packings[(size, crops)] = Packing(size, crops, crop, big)
        return self._packings[(size, crops)]

    def pack_boxes(self, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[L, 4] box of each packed token of an image of ``size`` from ``boxes`` [crops, T, 4] (base first; one crop
        for an image that is not cut); NaN rows for the newline tokens (vtc.geometry).

        The box coordinates are packed as the features are: a downsampled token gets the box its patches'
        boxes interpolate to, a patch-sized box centred where it samples the big grid, which is widened to the
        sampling step (the unpadded grid's extent over the packed one's, on each axis) so that the tokens tile the
        image as the patches do."""
        crops = boxes.shape[0]
        expected = self.crop_count(size)
        if crops not in (1, expected):
            raise ValueError(
                f"the model packs {expected} crops for a {size} image but the processor settings give {crops}; "
                "pass the processor the model was used with"
            )
        packing = self.packing(size, crops)
        packed = self.pack(boxes.double(), size)  # [L, 4] (x0, y0, x1, y1)
        newline = packing.crop < 0
        t = self.patch_tokens
        rows = int(newline.sum())
        cols = (len(packed) - t) // rows - 1 if rows else 0  # an image so thin that unpadding keeps no row: base only
        if crops > 1 and rows and packing.big.shape != (rows, cols):  # downsampled
            steps = packed.new_tensor([packing.big.shape[1] / cols, packing.big.shape[0] / rows]).repeat(2)
            grid = packed[t:]
            centre, half = (grid[:, :2] + grid[:, 2:]) / 2, (grid[:, 2:] - grid[:, :2]) / 2
            packed[t:] = torch.cat([centre, centre], dim=-1) + torch.cat([-half, half], dim=-1) * steps
        packed[newline] = float("nan")
        return packed

    def _locate_images(self, visual: torch.Tensor, embeds: torch.Tensor) -> list[Image]:
        """The images in sequence order, then the videos."""
        videos, self._video_marks = self._video_marks, None
        images = self._locate_only_images(visual if videos is None else visual & ~videos, embeds)
        return images + ([] if videos is None else self._locate_videos(videos))

    def _locate_videos(self, marks: torch.Tensor) -> list[Image]:
        """Each sample's <video> tokens, cut into videos of frames * h * w tokens and the newline."""
        if self._frames is None:
            raise ValueError("vtc found <video> tokens in a call without videos (pixel_values_videos)")
        frames = (self._frames, *self.frame_grid)
        length = math.prod(frames) + 1
        found = []
        for b in range(marks.shape[0]):
            cols = marks[b].nonzero().squeeze(1)
            if cols.numel() % length:
                raise ValueError(
                    f"sample {b} holds {cols.numel()} <video> tokens, not whole videos of {self._frames} frames x "
                    f"{self.frame_grid[0]} x {self.frame_grid[1]} tokens + 1 newline ({length})"
                )
            found += [Image(b, run, {"frames": frames}, True) for run in cols.split(length)]
        return found

    def _locate_only_images(self, visual: torch.Tensor, embeds: torch.Tensor) -> list[Image]:
        """Images in sequence order; also sets ``self._layout``: per image (Packing, row of its base crop among the
        crops the vision tower saw, or None if unknown)."""
        if not bool(visual.any()):
            self._layout = []
            return []
        if self._image_sizes:
            if len(self._patched) != len(self._image_sizes):
                raise ValueError(
                    f"batch_num_images lists {len(self._patched)} images but image_sizes {len(self._image_sizes)}"
                )
            packings = [
                self.packing(size, self.crop_count(size, patched))
                for size, patched in zip(self._image_sizes, self._patched, strict=True)
            ]
            self._lengths = [p.crop.numel() for p in packings]
            images = super(LlavaNextAdapter, self)._locate_images(visual, embeds)
            self._layout = [(p, None) for p in packings[: len(images)]]
        elif self._packed_lengths:
            self._lengths = self._packed_lengths
            images = super(LlavaNextAdapter, self)._locate_images(visual, embeds)
            self._layout = [self._recover(embeds[image.sample, image.positions]) for image in images]
        else:
            raise ValueError(
                "vtc needs the image_sizes of LLaVA-OneVision images: pass the processor's image_sizes (and "
                "batch_num_images)"
            )
        return images

    def _geometry(self, image: int) -> tuple[torch.Tensor, torch.Tensor]:
        packing = self._layout[image][0]
        return packing.crop, packing.big

    def _recover(self, tokens: torch.Tensor) -> tuple[Packing, int]:
        """(Packing, base crop row) of one packed image, found from its tokens ``tokens`` [L, D] and the projector's
        output: a candidate size whose packing of the image's crops gives exactly these tokens (module docstring)."""
        table = self.captured.get("projected")  # [crops of all images, T, D]
        if table is None:
            raise ValueError(
                "vtc could not locate the AnyRes crops of the images: pass image_sizes (and batch_num_images), or "
                "let the vision encoder run while vtc is attached"
            )
        t, length = self.patch_tokens, len(tokens)
        newline = self.base.image_newline
        expected, few = _bits(tokens), tokens[:, :_CHECK_CHANNELS].float()
        first = (_bits(table[:, 0].to(tokens.dtype)) == expected[0]).all(-1).nonzero().flatten().tolist()
        for row in first:
            if length < t or not torch.equal(_bits(table[row].to(tokens.dtype)), expected[:t]):
                continue
            for crops, size in self._candidate_sizes():
                if row + crops > len(table) or self._length(size, crops) != length:
                    continue
                crops_of_image = table[row : row + crops]
                # A few channels first (cheap; a tolerance, as the arithmetic of a channel subset may round
                # differently), then every channel, bit for bit.
                trial = self.pack(crops_of_image[..., :_CHECK_CHANNELS], size, newline[:_CHECK_CHANNELS])
                if not torch.allclose(trial.to(tokens.dtype).float(), few, rtol=1e-2, atol=1e-3):
                    continue
                if torch.equal(_bits(self.pack(crops_of_image, size, newline).to(tokens.dtype)), expected):
                    return self.packing(size, crops), row
        raise ValueError(
            "vtc could not find how the model packed an image's crops (no AnyRes size packs them into the prompt's "
            "tokens): pass image_sizes (and batch_num_images) to the forward"
        )

    def _candidate_sizes(self) -> list[tuple[int, tuple[int, int]]]:
        """(crops, size) pairs between which every way the model packs an image occurs (module docstring)."""
        if self._candidates is None:
            config = self.model.config
            crop_px, side = config.vision_config.image_size, self.grid[0]
            found = [(1, (crop_px, crop_px))]
            for height, width in config.image_grid_pinpoints:
                rows, cols = math.ceil(height / crop_px), math.ceil(width / crop_px)
                crops = self.crop_count((height, width))
                # Unpadding rounds the image's extent, resized into the pinpoint, down to k whole tokens: the largest
                # such extent (k + 1 tokens less a pixel) is the one that no smaller pinpoint holds whole.
                sizes = [(height, width)]
                sizes += [(height, math.ceil((k + 1) * height / (rows * side)) - 1) for k in range(cols * side)]
                sizes += [(math.ceil((k + 1) * width / (cols * side)) - 1, width) for k in range(rows * side)]
                found += [(crops, size) for size in sizes if self.crop_count(size) == crops]
            self._candidates = found
        return self._candidates

    def _length(self, size: tuple[int, int], crops: int) -> int:
        """Tokens an image of ``size`` cut into ``crops`` crops packs into (zeros packed, cached)."""
        if (size, crops) not in self._lengths_of:
            self._lengths_of[(size, crops)] = len(self.pack(torch.zeros(crops, self.patch_tokens, 1), size))
        return self._lengths_of[(size, crops)]

    # -- units ------------------------------------------------------------------------------------

    def _units(self, embeds: torch.Tensor, images: list[Image]) -> list[Unit]:
        images, videos = [i for i in images if not i.video], [i for i in images if i.video]
        received = self._packed_received(embeds, images) if self._needs_received and images else None
        units = []
        for i, image in enumerate(images):
            signals = {} if received is None else {"attention_received": received[i]}
            units += self._image_units(image.sample, image.positions, i, signals)
        for video in videos:
            units += self._video_units(video, {})
        return units

    def _complete_keep(self, keep: torch.Tensor, images: list[Image]) -> torch.Tensor:
        """Newlines as LLaVA-NeXT's for the images; a video's newline is always kept."""
        keep = super()._complete_keep(keep, [image for image in images if not image.video])
        for video in (image for image in images if image.video):
            keep[video.sample, video.positions[-1]] = True
        return keep

    def _packed_received(self, embeds: torch.Tensor, images: list[Image]) -> list[torch.Tensor]:
        """Per image, [L] the attention received of its packed tokens (newlines: 0), packed as its features."""
        rows = self.captured.get("received")  # [crops of all images, T]
        if rows is None:
            raise ValueError(
                f"{self.method_names!r} needs the attention received in the vision encoder, but the vision encoder did "
                "not run while vtc was attached (were image features computed before vtc.compress?)"
            )
        packings = [packing for packing, _ in self._layout]
        crops = [packing.crops for packing in packings]
        if all(row is not None for _, row in self._layout):
            offsets = [row for _, row in self._layout]
        elif sum(crops) == rows.shape[0]:
            offsets = torch.tensor([0] + crops[:-1]).cumsum(0).tolist()
        else:  # generate() repeated images (beams): find each image's base crop by its first token
            offsets = self._match_images(embeds, images)
        return [
            self.pack(rows[offset : offset + p.crops].unsqueeze(-1), p.size)[:, 0]
            for offset, p in zip(offsets, packings, strict=True)
        ]
