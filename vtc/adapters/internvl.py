"""InternVL3 / InternVL3.5 (transformers' InternVLForConditionalGeneration), dynamic tiles.

Where things happen in the model (transformers 4.57 and 5.x):
  vision_tower (InternViT, a [CLS] token first) -> hidden_states[vision_feature_layer] ([CLS] dropped, strategy
  "default") -> ``pixel_shuffle``: each 2 x 2 block of patches becomes one token (``downsample_ratio`` 0.5, so a
  448 px tile of 32 x 32 patches gives 16 x 16 = 256 tokens) -> multi_modal_projector -> masked_scatter at the
  image placeholders -> language_model.

Tiles: InternVL's processor cuts an image into k - 1 tiles of the vision tower's size (the grid that fits its aspect
ratio best) and appends a thumbnail of the whole image when k > 1; the prompt holds ``<img>``, T * k placeholders
and ``</img>`` per image. The model receives the tiles of all images stacked in ``pixel_values``, with no image
boundaries, so vtc takes an image to be one run of consecutive placeholders (its tile count k = run length / T) and
the tiles in the order of the runs. generate() may repeat images (beam search): tiles are then matched by their first
projected token.

[CLS] attention of a token: the sum of the [CLS] query's attention over the token's 2 x 2 patches (the attention
mass the token carries, so a tile's tokens share what its patches shared). vtc pushes patch indices through the
model's own ``pixel_shuffle`` to know which patches each token holds, so the grouping is the model's for any
transformers version. Each tile (the thumbnail too) is a separate vision pass with its own [CLS] query.

What a budget means here (``keep`` or ``ratio`` per image, over all its tiles' tokens; an image with fewer tokens
than ``keep`` is kept whole, as images differ in tile count):

* ``budget="global"`` (default): the method picks among all tokens of the image at once (the tiles and the
  thumbnail compete; with [CLS] attention, by the mass each token holds of its own tile's [CLS] attention).
* ``budget="per_crop"``: each tile, the thumbnail included, is planned separately on its token grid; ``keep`` is
  split evenly over the tiles (largest remainder, first tiles first, summing to ``keep`` exactly).

The budget splits a pre-LLM method's budget; an in-LLM method chooses over each image's tokens at once. Methods that
read a token grid (``uniform``) see a global unit's tiles stacked top to bottom (the thumbnail last), which is the
row-major order of its tokens.

GlobalCom2's thumbnail-guided split (LLaVA-NeXT's ``budget="thumbnail"``) is not offered: it needs to know which part
of the thumbnail each tile covers, and the model's inputs do not say how the tiles were arranged (6 high-resolution
tiles are 2 x 3, 3 x 2, 1 x 6 or 6 x 1 depending on the image's size, which the model never sees).

Video: InternVLProcessor puts each frame in its own ``<img> ... </img>`` run of one tile, with the image placeholder,
so the model (and vtc) cannot tell frames from images: each frame is compressed as a 1-tile image with its own budget.

transformers 4.57 reads only ``vision_feature_layer=-1`` (other layers fail inside its ``get_image_features``); 5.x
any layer.
"""

from __future__ import annotations

import torch
from torch import nn

from vtc.adapters.base import Image, Unit, match_images
from vtc.adapters.llava import LlavaAdapter
from vtc.adapters.llava_next import distribute
from vtc.methods.base import Budget, Method
from vtc.registry import register_family

BUDGETS = ("global", "per_crop")


@register_family
class InternVLAdapter(LlavaAdapter):
    """Adapter for InternVL3 / InternVL3.5 models (config.model_type "internvl")."""

    model_types = {"internvl": "InternVL"}
    layout = "tiles"
    options = ("budget",)
    watches_projector = True  # the projector's first token per tile matches tiles to images

    def __init__(self, model: nn.Module, method: Method, budget: Budget, options: dict | None = None, **layerwise):
        self.tile_budget = (options or {}).get("budget") or "global"
        if self.tile_budget == "thumbnail":
            raise ValueError(
                "budget='thumbnail' needs to know which part of the thumbnail each tile covers, and InternVL's "
                "inputs do not say how an image's tiles were arranged; use budget='global' or 'per_crop'"
            )
        if self.tile_budget not in BUDGETS:
            raise ValueError(f"budget must be one of {list(BUDGETS)} for InternVL, got {self.tile_budget!r}")
        super().__init__(model, method, budget, options, **layerwise)

    def _vision_setup(self, config) -> None:
        self.strategy = config.vision_feature_select_strategy
        if self.strategy != "default":
            raise ValueError(
                "vtc supports InternVL with vision_feature_select_strategy 'default' (the released models, whose "
                f"pixel shuffle needs the [CLS] token dropped), got {self.strategy!r}"
            )
        vision_config = config.vision_config
        size, patch = _pair(vision_config.image_size), _pair(vision_config.patch_size)
        patches = (size[0] // patch[0], size[1] // patch[1])
        # Which patches each token holds: patch indices pushed through the model's own pixel shuffle.
        index = torch.arange(patches[0] * patches[1], dtype=torch.float64).view(1, *patches, 1)
        shuffled = self.base.pixel_shuffle(index, scale_factor=config.downsample_ratio)  # [1, h, w, group]
        self.grid = tuple(shuffled.shape[1:3])
        self.groups = shuffled.reshape(-1, shuffled.shape[-1]).long()  # [T, patches per token]
        self.tile_tokens = self.groups.shape[0]
        self.tokens_per_image = None  # varies with each image's tile count
        attention = [layer.attention for layer in self.base.vision_tower.encoder.layer]
        self._vision_signals(attention, has_cls=True)  # InternViT always prepends a [CLS] token

    # -- the plan ---------------------------------------------------------------------------------

    def _locate_images(self, visual: torch.Tensor, embeds: torch.Tensor) -> list[Image]:
        """Each run of consecutive placeholders is one image of a whole number of tiles."""
        images = []
        for b in range(visual.shape[0]):
            cols = visual[b].nonzero().squeeze(1)
            if cols.numel() == 0:  # a text-only row
                continue
            breaks = (cols.diff() != 1).nonzero().squeeze(1) + 1
            for run in torch.tensor_split(cols, breaks.tolist()):
                if run.numel() % self.tile_tokens:
                    lengths = [len(r) for r in torch.tensor_split(cols, breaks.tolist())]
                    raise ValueError(
                        f"sample {b} has runs of {lengths} image placeholders; each image must be a whole number of "
                        f"tiles of {self.tile_tokens} tokens (the model's image_seq_length)"
                    )
                images.append(Image(b, run, {"tiles": run.numel() // self.tile_tokens}))
        return images

    def _units(self, embeds: torch.Tensor, images: list[Image]) -> list[Unit]:
        rows = self._token_cls_rows(embeds, images) if self._cls_layers else None
        units = []
        for i, image in enumerate(images):
            signals = {} if rows is None else {"cls_attention": rows[i][-1], "cls_attention_layers": rows[i]}
            tiles = image.vision["tiles"]
            keep = self.budget.cap(image.positions.numel())
            if self.tile_budget == "global" or tiles == 1:
                # The tiles' grids stacked top to bottom: token t * T + i * w + j is row t * h + i, column j.
                grid = (tiles * self.grid[0], self.grid[1])
                units.append(Unit(image.sample, image.positions, keep, grid, signals))
                continue
            counts = distribute(keep, [1.0] * tiles, [self.tile_tokens] * tiles)
            for tile, count in enumerate(counts):
                part = slice(tile * self.tile_tokens, (tile + 1) * self.tile_tokens)
                picked = {name: value[..., part] for name, value in signals.items()}
                units.append(Unit(image.sample, image.positions[part], count, self.grid, picked))
        return units

    def _token_cls_rows(self, embeds: torch.Tensor, images: list[Image]) -> list[torch.Tensor]:
        """Per image, [V, n] the [CLS] attention mass of each of its tokens, tile after tile."""
        rows = self._take_cls_rows()[..., 1:]  # [tiles seen, V, patches], the [CLS] column dropped
        rows = rows[..., self.groups.to(rows.device)].sum(-1)  # [tiles seen, V, T]
        counts = [image.vision["tiles"] for image in images]
        if sum(counts) != rows.shape[0]:  # generate() repeated images (beams): match tiles by their first token
            first = torch.stack(
                [
                    embeds[image.sample, image.positions[tile * self.tile_tokens]]
                    for image in images
                    for tile in range(image.vision["tiles"])
                ]
            )
            seen = self.captured.get("first_tokens")
            if seen is None:
                raise ValueError("vtc could not match vision signals to images: the projector did not run under vtc")
            rows = rows[match_images(first, seen)]
        per_image = rows.split(counts)
        return [tiles.permute(1, 0, 2).flatten(1) for tiles in per_image]  # [V, k * T]


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
