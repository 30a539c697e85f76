"""A tiny ViT with open_clip's VisionTransformer layout, so the AuxiliaryCLIP tests run without open_clip.

open_clip cannot be installed beside a CPU-only torch (its torchvision dependency does not load), so CI has
no open_clip. ``AuxiliaryCLIP`` is duck-typed on open_clip's ViT visual tower; this module rebuilds that
tower from torch alone: the same attribute names (so state dicts load across, key for key), the same
submodules in the same order and the same forward (pre-norm residual blocks around a batch-first
``nn.MultiheadAttention``, class token first). ``tests/test_aux_clip.py`` checks it against open_clip's own
``VisionTransformer`` wherever open_clip is importable.

Only what a plain CLIP ViT uses is rebuilt: no patch dropout, layer scale, attentional pooling or custom
attention blocks (those attributes hold ``nn.Identity`` / None / "tok" as in open_clip's defaults).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); ``ls_1`` / ``ls_2`` are open_clip's
    (disabled) layer scales."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, batch_first: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ls_1 = nn.Identity()
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )
        self.ls_2 = nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.ln_1(x)
        # Called as open_clip calls it: query, key, value positionally, the rest as keywords.
        attended = self.attn(normed, normed, normed, need_weights=False, attn_mask=attn_mask)[0]
        x = x + self.ls_1(attended)
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """The block stack. Input and output are [B, L, D]; with ``batch_first=False`` (older open_clip releases)
    the blocks run on [L, B, D], and their attention must be built sequence-first too."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, batch_first: bool = True):
        super().__init__()
        self.width = width
        self.layers = layers
        self.batch_first = batch_first
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, batch_first) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x if self.batch_first else x.transpose(0, 1)


class VisionTransformer(nn.Module):
    """A CLIP ViT image tower: patches -> [CLS] + patches + positions -> ln_pre -> blocks -> ln_post([CLS]) @ proj.

    Args:
        image_size, patch_size: (H, W) or one int; the patch grid is image_size // patch_size.
        width, layers, heads, mlp_ratio: transformer size (open_clip: heads = width // head_width).
        output_dim: size of the projected [CLS] embedding that ``forward`` returns ([B, output_dim]).
        seed: every parameter is drawn from a generator with this seed, independent of torch's global RNG.
            The init is deliberately far from CLIP's: attention logits are large enough for peaky maps, and
            the attention biases, output biases and LayerNorm affines are non-zero, so a weight that lands in
            the wrong place changes the output.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = (32, 48),
        patch_size: int | tuple[int, int] = 8,
        width: int = 64,
        layers: int = 3,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        output_dim: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.output_dim = output_dim
        self.pool_type = "tok"  # the class token is the image summary
        self.attn_pool = None
        self.conv1 = nn.Conv2d(3, width, kernel_size=self.patch_size, stride=self.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.patch_dropout = nn.Identity()
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        self._randomise(seed)

    @torch.no_grad()
    def _randomise(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        width = self.class_embedding.numel()
        for name, param in self.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if ".ln_" in f".{name}":  # LayerNorm affine: near the identity, but not it
                value = 1 + 0.1 * noise if leaf == "weight" else 0.1 * noise
            elif leaf == "in_proj_weight":
                value = noise * 2 * width**-0.5  # large q . k logits: peaky attention
            elif leaf == "in_proj_bias":
                value = 0.5 * noise  # open_clip initialises it to zero: the bias path would go untested
            elif leaf == "bias":
                value = 0.1 * noise
            elif param.ndim == 1 or leaf in ("positional_embedding", "proj"):
                value = noise * width**-0.5
            else:  # linear / conv weights
                value = noise * (param[0].numel()) ** -0.5
            param.copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, output_dim]."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, gh * gw, D], patches in raster order
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1 + gh * gw, D]
        x = self.ln_pre(self.patch_dropout(x))
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


@torch.no_grad()
def eager_attention(visual: nn.Module, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A hand-written forward of an open_clip-layout ViT (this stand-in or open_clip's own, batch-first) that asks
    every block's ``nn.MultiheadAttention`` for its eager weights: ([B, L, L] head-mean weights per block,
    [B, output_dim] pooled output). Check the pooled output against ``visual(pixels)`` before trusting the weights.
    """
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    weights = []
    for block in visual.transformer.resblocks:
        normed = block.ln_1(x)
        attended, w = block.attn(normed, normed, normed, need_weights=True, average_attn_weights=True)
        weights.append(w)
        x = x + block.ls_1(attended)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return weights, visual.ln_post(x[:, 0]) @ visual.proj
