"""LLaVA-NeXT / LLaVA-1.6 (transformers' LlavaNextForConditionalGeneration), AnyRes images.

Each image reaches the vision tower as a base ("thumbnail") crop of the whole image plus a grid of
high-resolution crops. ``pack_image_features`` then re-tiles the crops into one large grid, cuts the
rows / columns that only cover padding, appends an ``image_newline`` token after every row, and puts
the base crop's tokens first. The packed order is therefore not crop / patch order. vtc asks the model
itself for that order: it packs a tensor of (crop, patch) indices through ``pack_image_features``, so
every signal (e.g. [CLS] attention of each crop) is mapped exactly onto the packed tokens.

What a budget means here (``keep`` or ``ratio`` per image, counted over the image's CONTENT tokens,
base + crops; newline tokens are not counted):

* ``budget="global"`` (default): the method picks ``keep`` tokens among all content tokens of the
  image at once (base and crops compete).
* ``budget="per_crop"``: the base and each crop are planned separately; ``keep`` is split over them in
  proportion to their token counts (largest remainder, so the parts sum to ``keep`` exactly).
* ``budget="thumbnail"``: in the spirit of GlobalCom2 (arXiv 2501.05179): the base keeps its
  proportional share, and the crops share the rest by how much of the thumbnail's [CLS] attention
  falls on the area each crop covers: crop j's weight is N_j * (1 + s_j - 1/n) with s_j its share of
  the thumbnail attention and n crops (GlobalCom2's retention rule r_j = R (1 + sigma_j - 1/n) with
  sigma = that share instead of a softmax of summed logits). Each crop is then planned separately.

Newline tokens follow their row: a newline is kept exactly when at least one token of its row is
kept, so no newline is orphaned and no kept row loses its end marker. ``handle.last_kept`` and
``visual_tokens_after`` include the kept newlines. An image with fewer content tokens than ``keep`` is
kept whole (``keep`` is a per-image cap, since AnyRes images differ in size).

Differences from the originals: FasterVLM gives every crop the same count and keeps all newlines;
GlobalCom2 keeps all newlines, floors each crop's count and ignores padding when it assigns
thumbnail tokens to crops (vtc maps them through the unpadded geometry). vtc keeps exactly ``keep``.
"""

from __future__ import annotations

import torch
from torch import nn

from vtc.adapters.base import Image, Unit
from vtc.adapters.llava import LlavaAdapter
from vtc.methods.base import Budget, Method
from vtc.registry import register_family

BUDGETS = ("global", "per_crop", "thumbnail")


@register_family
class LlavaNextAdapter(LlavaAdapter):
    """Adapter for LLaVA-NeXT models (config.model_type "llava_next")."""

    model_types = {"llava_next": "LLaVA-NeXT"}
    layout = "anyres"
    options = ("budget",)
    watches_projector = True
    feature_strategy = "default"  # the vision_feature_select_strategy of the released models, the one vtc supports
    thumbnail_signal = "cls_attention"  # the base image's signal that budget="thumbnail" shares the crops' budget by

    def __init__(self, model: nn.Module, method: Method, budget: Budget, options: dict | None = None, **layerwise):
        options = options or {}
        self.crop_budget = options.get("budget") or "global"
        family = " / ".join(self.model_types.values())
        if self.crop_budget not in BUDGETS:
            raise ValueError(f"budget must be one of {list(BUDGETS)} for {family}, got {self.crop_budget!r}")
        super().__init__(model, method, budget, options, **layerwise)
        if self.strategy != self.feature_strategy:
            raise ValueError(
                f"vtc supports {family} with vision_feature_select_strategy {self.feature_strategy!r} (the released "
                f"models), got {self.strategy!r}"
            )
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)  # one crop's patch tokens
        self.tokens_per_image = None  # varies with each image's size
        self.patch_tokens = self.grid[0] * self.grid[1]  # tokens per crop (CLS dropped)
        self._image_sizes: list[tuple[int, int]] = []
        self._packed_lengths: list[int] = []
        self._lengths: list[int] = []
        self._layout: list[tuple[torch.Tensor, int | None]] = []
        self._packings: dict[tuple[int, int], torch.Tensor] = {}

    def check(self) -> None:
        if self.crop_budget == "thumbnail" and self.thumbnail_signal not in self.provides:
            what = {"cls_attention": "[CLS] attention", "attention_received": "attention received"}
            raise ValueError(
                f"budget='thumbnail' needs the vision tower's {what[self.thumbnail_signal]}, which this model lacks"
            )
        super().check()

    def _needed_vision_layers(self) -> list[int]:
        layers = super()._needed_vision_layers()
        if self.crop_budget == "thumbnail" and self.feature_layer not in layers:
            layers.append(self.feature_layer)
        return layers

    # -- geometry ---------------------------------------------------------------------------------

    def _read_inputs(self, bound: dict) -> None:
        super()._read_inputs(bound)
        sizes = bound.get("image_sizes")
        self._image_sizes = [] if sizes is None else [tuple(int(v) for v in size) for size in sizes.tolist()]
        # transformers 5.x generate() encodes images before the prefill and drops image_sizes; the packed
        # features of each image then arrive in mm_encoder_outputs.
        encoded = (bound.get("mm_encoder_outputs") or {}).get("image")
        packed = getattr(encoded, "pooler_output", None)
        self._packed_lengths = [] if packed is None or torch.is_tensor(packed) else [len(p) for p in packed]

    def _projector_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        super()._projector_hook(module, args, output)
        self.captured["projected"] = output.detach()  # [crops of all images, T, D]

    def packing(self, size: tuple[int, int]) -> torch.Tensor:
        """[L] for an image of (height, width) pixels: the source of each packed token, crop * T + patch
        (crop 0 = base, T tokens per crop), or -1 for an image_newline token. Computed by the model's own
        ``pack_image_features``, so it is exact for any transformers version."""
        if size not in self._packings:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            config = self.model.config
            crops = image_size_to_num_patches(
                image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
            )
            index = torch.arange(crops * self.patch_tokens, dtype=torch.float64).view(crops, self.patch_tokens, 1)
            newline = torch.full((1,), -1.0, dtype=torch.float64)
            packed, _ = self.base.pack_image_features([index], torch.tensor([size]), "default", image_newline=newline)
            self._packings[size] = packed[0][:, 0].long()
        return self._packings[size]

    def pack_boxes(self, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[L, 4] box of each packed token of an image of ``size`` from ``boxes`` [crops, T, 4], the box of every
        patch of the base image (crop 0) and of each crop; NaN rows for the newline tokens (vtc.geometry)."""
        source = self.packing(size).cpu()
        flat = boxes.flatten(0, 1)
        if int(source.max()) >= flat.shape[0]:
            raise ValueError(
                f"the model packs {int(source.max()) // boxes.shape[1] + 1} crops for a {size} image but the processor "
                f"settings give {boxes.shape[0]}; pass the processor the model was used with"
            )
        packed = flat[source.clamp(min=0)]
        packed[source < 0] = float("nan")
        return packed

    def _locate_images(self, visual: torch.Tensor, embeds: torch.Tensor) -> list[Image]:
        """Images in sequence order; also sets ``self._layout``: per image (source [L] as in :meth:`packing`,
        row of its base crop among the crops the vision tower saw, or None if unknown)."""
        if self._image_sizes:
            self._lengths = [self.packing(size).numel() for size in self._image_sizes]
        elif self._packed_lengths:
            self._lengths = self._packed_lengths
        else:
            raise ValueError("vtc needs the image_sizes of LLaVA-NeXT images: pass the processor's image_sizes")
        images = super()._locate_images(visual, embeds)
        if self._image_sizes:
            self._layout = [(self.packing(size), None) for size in self._image_sizes[: len(images)]]
        else:
            self._layout = [self._match_tokens(embeds[image.sample, image.positions]) for image in images]
        return images

    def _image_length(self, image: int) -> int:
        if image >= len(self._lengths):
            raise ValueError(self._bad_token_count_message([]))
        return self._lengths[image]

    def _bad_token_count_message(self, counts: list[int]) -> str:
        return (
            f"the image tokens per sample {counts} do not split into whole images of {self._lengths} tokens "
            f"(the images of image_sizes {self._image_sizes}, in order)"
        )

    def _match_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(source [L], base crop row) of one packed image, found by matching its tokens to the projector's
        output (every packed token is an exact copy of one, except the newline tokens)."""
        table = self.captured.get("projected")
        if table is None:
            raise ValueError(
                "vtc could not locate the AnyRes crops of the images: pass image_sizes, or let the vision encoder "
                "run while vtc is attached"
            )
        flat = table.flatten(0, 1)  # [R * T, D]
        tokens = tokens.to(flat.dtype)
        keys = _bit_keys(flat)
        order = keys.argsort()
        found = torch.searchsorted(keys[order], _bit_keys(tokens)).clamp(max=len(order) - 1)
        candidate = order[found]
        exact = (_bits(flat[candidate]) == _bits(tokens)).all(-1)  # bit for bit: a copied NaN matches itself
        newline = (_bits(tokens) == _bits(self.base.image_newline.to(tokens.dtype))).all(-1)
        if not bool((exact | newline).all()):
            raise ValueError("vtc could not match the packed image tokens to the vision encoder's output")
        base_row = int(candidate[0]) // self.patch_tokens
        return torch.where(exact, candidate - base_row * self.patch_tokens, -1), base_row

    # -- units ------------------------------------------------------------------------------------

    def _units(self, embeds: torch.Tensor, images: list[Image]) -> list[Unit]:
        rows = self._packed_cls_rows(embeds, images) if self._cls_layers else None
        units = []
        for i, image in enumerate(images):
            signals = {} if rows is None else {"cls_attention": rows[i][-1], "cls_attention_layers": rows[i]}
            units += self._image_units(image.sample, image.positions, i, signals)
        return units

    def _geometry(self, image: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop [L]: the crop each packed token of the image-th image comes from, 0 = base, -1 = newline; big
        [H', W']: the crop of every token of its unpadded big grid), from ``self._layout``."""
        source = self._layout[image][0]
        crop = torch.where(source >= 0, source // self.patch_tokens, -1)
        rows = int((crop == -1).sum())  # a newline ends every row of the big grid
        return crop, _grid(crop[crop >= 1], rows)

    def _image_units(self, b: int, positions: torch.Tensor, image: int, signals: dict) -> list[Unit]:
        crop, big = self._geometry(image)
        crop = crop.to(positions.device)
        content = crop >= 0
        keep = self.budget.cap(int(content.sum()))
        if self.crop_budget == "global":
            return [self._unit(b, positions, content, keep, None, signals)]
        crops = int(crop.max()) + 1
        present = [c for c in range(crops) if bool((crop == c).any())]  # unpadding can remove whole crops
        masks = [crop == c for c in present]
        sizes = [int(m.sum()) for m in masks]
        grids = [self.grid] + [self._crop_grid(crop, m) for m in masks[1:]]
        if self.crop_budget == "per_crop" or len(present) == 1:
            counts = distribute(keep, sizes, sizes)
        else:
            base_count = distribute(keep, sizes, sizes)[0]
            mass = self._thumbnail_share(big, signals[self.thumbnail_signal][crop == 0])  # crop c at c - 1
            share = [float(mass[c - 1]) for c in present[1:]]
            weights = [size * (1 + s - 1 / len(share)) for size, s in zip(sizes[1:], share, strict=True)]
            counts = [base_count] + distribute(keep - base_count, weights, sizes[1:])
        return [
            self._unit(b, positions, mask, count, grid, signals)
            for mask, count, grid in zip(masks, counts, grids, strict=True)
        ]

    @staticmethod
    def _unit(b, positions, mask, keep, grid, signals) -> Unit:
        picked = {name: value[..., mask] for name, value in signals.items()}
        return Unit(b, positions[mask], keep, grid, picked)

    @staticmethod
    def _crop_grid(crop: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of a crop's packed tokens (a rectangle of the packed grid)."""
        row = (crop == -1).long().cumsum(0)  # packed-grid row of each crop token (a newline ends a row)
        rows = int(row[mask].unique().numel())
        return rows, int(mask.sum()) // rows

    def _thumbnail_share(self, big: torch.Tensor, thumb: torch.Tensor) -> torch.Tensor:
        """[max crop id] share of the base image's signal ``thumb`` [T] (crop 0's tokens) that falls on each crop's
        area of the unpadded big grid ``big`` [H', W'] (crop c at c - 1)."""
        height, width = self.grid
        thumb = thumb.view(height, width)
        # Crop id under the centre of every thumbnail token (the unpadded grid covers exactly the image, as the base).
        ys = ((torch.arange(height) + 0.5) * big.shape[0] / height).long()
        xs = ((torch.arange(width) + 0.5) * big.shape[1] / width).long()
        owner = big[ys.unsqueeze(1), xs.unsqueeze(0)].to(thumb.device) - 1  # [H, W] in 0..crops-2
        crops = int(big.max())
        mass = torch.zeros(crops, device=thumb.device).index_add_(0, owner.flatten(), thumb.flatten().float())
        return mass / mass.sum().clamp(min=1e-12)

    def _packed_cls_rows(self, embeds: torch.Tensor, images: list[Image]) -> list[torch.Tensor]:
        """Per image, [V, L] [CLS] rows of the crop each packed token comes from (newlines: 0)."""
        rows = self._take_cls_rows()[..., 1:]  # [crops of all images, V, T], [CLS] column dropped
        sources = [source.to(rows.device) for source, _ in self._layout]
        crops = [int(s.max()) // self.patch_tokens + 1 for s in sources]
        if all(row is not None for _, row in self._layout):
            offsets = [row for _, row in self._layout]
        elif sum(crops) == rows.shape[0]:
            offsets = torch.tensor([0] + crops[:-1]).cumsum(0).tolist()
        else:  # generate() repeated images (beams): find each image's base crop by its first token
            offsets = self._match_images(embeds, images)
        packed = []
        for offset, source in zip(offsets, sources, strict=True):
            safe = source.clamp(min=0)
            rows_of_image = rows[offset + safe // self.patch_tokens, :, safe % self.patch_tokens]  # [L, V]
            packed.append((rows_of_image * (source >= 0).unsqueeze(1)).transpose(0, 1))
        return packed

    def _complete_keep(self, keep: torch.Tensor, images: list[Image]) -> torch.Tensor:
        """Keep each newline exactly when its row keeps a token."""
        for i, image in enumerate(images):
            b, positions = image.sample, image.positions
            crop = self._geometry(i)[0].to(positions.device)
            newline = crop == -1
            if not bool(newline.any()):
                continue
            row = newline.long().cumsum(0) - newline.long()  # row of each token; a newline ends its row
            # Rows are made of crop tokens; only an image without crops has its newline after the base.
            crops = int(crop.max()) >= 1 or int(newline.sum()) > 1
            members = (crop >= 1) if crops else (crop >= 0)
            kept = keep[b, positions] & members
            row_kept = torch.zeros(int(newline.sum()), dtype=torch.bool, device=keep.device)
            row_kept[row[kept]] = True
            keep[b, positions[newline]] = row_kept[row[newline]]
        return keep


def _grid(cells: torch.Tensor, rows: int) -> torch.Tensor:
    """The big grid's cells [H' * W'] as [H', W']; [0, 0] for an image so thin that unpadding keeps no row."""
    return cells.view(rows, -1) if rows else cells.new_zeros(0, 0)


def _bits(values: torch.Tensor) -> torch.Tensor:
    """The raw bits of fp32 / fp16 / bf16 values as integers of the same width."""
    return values.contiguous().view(torch.int16 if values.element_size() == 2 else torch.int32)


def _bit_keys(rows: torch.Tensor) -> torch.Tensor:
    """[R, D] -> [R] int64 hash of each row's exact bits. Integer arithmetic, so equal rows get equal keys
    whatever the shapes (a float mat-vec may round the same row differently in differently shaped calls)."""
    bits = _bits(rows).long()
    weights = torch.randint(1, 1 << 16, (bits.shape[-1],), generator=torch.Generator().manual_seed(0))
    return (bits * weights.to(bits.device)).sum(-1)  # |bits * weights| < 2**47: no overflow below 2**16 columns


def distribute(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights``, part i at most ``caps[i]``, summing
    to ``total`` (at most sum(caps)). Largest remainder; what a capped part cannot take goes to the others."""
    if total > sum(caps):
        raise ValueError(f"cannot split {total} into parts capped at {caps} (at most {sum(caps)} in all)")
    counts = [0] * len(weights)
    while total - sum(counts) > 0:
        remaining = total - sum(counts)
        open_parts = [i for i in range(len(weights)) if counts[i] < caps[i]]
        weight_sum = sum(weights[i] for i in open_parts)
        fraction = {i: weights[i] / weight_sum if weight_sum > 0 else 1 / len(open_parts) for i in open_parts}
        exact = {i: remaining * fraction[i] for i in open_parts}
        share = {i: min(int(exact[i]), caps[i] - counts[i]) for i in open_parts}
        left = remaining - sum(share.values())
        for i in sorted(open_parts, key=lambda i: (share[i] - exact[i], i)):  # largest remainder first
            if left > 0 and share[i] < caps[i] - counts[i]:
                share[i] += 1
                left -= 1
        for i in open_parts:
            counts[i] += share[i]
    return counts
