"""Auxiliary open_clip CLIP: a [CLS] attention map for vision towers that have no [CLS] token.

Qwen2-VL's vision tower has no class token, so methods that rank visual tokens by [CLS] attention
(FasterVLM, ...) have no signal there. ``AuxiliaryCLIP`` runs a separate open_clip ViT on the same
image and resamples its [CLS] -> patch attention map onto the VLM's visual-token grid:

    aux = AuxiliaryCLIP.create(("ViT-B-16", "/models/clip_b16.safetensors"))
    images = images_from_qwen_patches(pixel_values, image_grid_thw)  # list of [3, H, W] in [0, 1]
    maps = aux.cls_attention(images)  # [B, V, gh, gw], one map per tower block
    rows = AuxiliaryCLIP.resample(maps[:1], (h // 2, w // 2))  # [1, V, h/2 * w/2] on Qwen's merged token grid

The attention row is recomputed in forward pre-hooks from each block's attention input (the output of
``ln_1``), so the tower runs with its fast attention path and no [N, N] matrix is ever built.

Needs the optional dependency ``open_clip_torch`` (imported lazily; ``vtc`` itself never imports it).
open_clip imports torchvision, whose build must match torch's; see ``_import_open_clip``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vtc.probes import MultiheadClsRow

__all__ = ["AuxiliaryCLIP", "images_from_qwen_patches"]

# open_clip.constants.OPENAI_DATASET_MEAN / _STD; also Qwen2-VL's image processor defaults.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip model names that carry their own weights
_INSTALL = (
    "install it with `pip install 'vtc[clip]'` or `pip install open_clip_torch torch==<your torch version>` "
    "(name torch in the same command, or pip may replace it). open_clip imports torchvision, whose build must "
    "match torch's: PyPI's torchvision does not load beside a CPU-only (+cpu) torch"
)
_NEEDS_VIT = (
    "AuxiliaryCLIP needs an open_clip ViT visual tower whose class token is the image summary "
    "(e.g. 'ViT-B-16', 'ViT-B-32', 'ViT-L-14')"
)


class _OpenCLIPUnavailable(ValueError, ImportError):
    """open_clip cannot be imported. A ValueError like every other bad-``spec`` error, and an ImportError so
    that ``except ImportError`` around optional features still works."""


class _Done(Exception):
    """Raised by the hook of the last block we need: the rest of the tower would not change any recorded row."""


def _import_open_clip():
    try:
        import open_clip
    # A torchvision built for another torch raises RuntimeError ("operator torchvision::nms does not
    # exist") or OSError (missing CUDA libraries) at import, not ImportError.
    except (ImportError, RuntimeError, OSError) as err:
        raise _OpenCLIPUnavailable(
            f"the auxiliary CLIP needs open_clip, which could not be imported ({type(err).__name__}: {err}); "
            + _INSTALL
        ) from err
    return open_clip


class AuxiliaryCLIP:
    """An open_clip ViT visual tower used only for its [CLS] -> patch attention maps (eval mode, no grad).

    Build it with ``AuxiliaryCLIP.create(spec)``; the constructor takes a visual tower directly.

    Attributes:
        visual: the open_clip ``VisionTransformer``; only this tower is kept, the text tower is dropped.
        name: a readable name for the tower (for logs and ``handle.stats``).
        image_size: (H, W) the tower's input size; every image is resized to it.
        grid_size: (gh, gw) the tower's patch grid.
        num_layers: number of transformer blocks.
        mean, std: the per-channel normalisation applied after resizing.
    """

    def __init__(self, visual: nn.Module, *, name: str | None = None):
        _check_tower(visual)
        tower: Any = visual  # open_clip's VisionTransformer, duck-typed: open_clip is optional, its types unknown here
        self.visual = tower
        self.name = name or type(visual).__name__
        self.image_size = _pair(tower.image_size)
        self.grid_size = _pair(tower.grid_size)
        self.num_layers = len(tower.transformer.resblocks)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        mean = cfg.get("mean", getattr(visual, "image_mean", None))
        std = cfg.get("std", getattr(visual, "image_std", None))
        self.mean: tuple[float, ...] = tuple(float(m) for m in (mean if mean is not None else OPENAI_CLIP_MEAN))
        self.std: tuple[float, ...] = tuple(float(s) for s in (std if std is not None else OPENAI_CLIP_STD))
        visual.eval()

    def __repr__(self) -> str:
        return (
            f"AuxiliaryCLIP(name={self.name!r}, image_size={self.image_size}, grid_size={self.grid_size}, "
            f"num_layers={self.num_layers})"
        )

    @classmethod
    def create(
        cls,
        spec: str | tuple[str, str | os.PathLike | None] | nn.Module | AuxiliaryCLIP,
        *,
        device: str | torch.device | None = None,
    ) -> AuxiliaryCLIP:
        """Build the auxiliary CLIP from ``spec``:

        * ``"ViT-B-16"``: an open_clip model name (``open_clip.list_models()``) with RANDOM weights
          (``pretrained=None``): fine for tests, meaningless attention for real use.
        * ``"ViT-B-16:openai"`` or ``("ViT-B-16", "openai")``: a name and a pretrained tag
          (``open_clip.list_pretrained()``). open_clip downloads the weights, or reads them from the Hugging
          Face cache: offline (``HF_HUB_OFFLINE=1``) they must already be there.
        * ``("ViT-B-16", "/path/to/checkpoint.safetensors")`` (or ``.bin`` / ``.pt``): a local open_clip
          checkpoint of the whole CLIP model for that architecture; no network needed.
        * ``"hf-hub:org/repo"`` or ``"local-dir:/path"``: open_clip's own schemas (config and weights together).
        * a built open_clip model (anything with ``.visual``), a bare open_clip ``VisionTransformer``, or an
          ``AuxiliaryCLIP`` (returned as is). Only the instance's visual tower is used, switched to eval mode.

        ``device`` is where the tower runs (default: CPU for new models, unchanged for instances).

        Raises:
            ValueError: open_clip not importable, ``spec`` of the wrong type, unknown model name or pretrained
                tag, or a tower without a class token / transformer attention (ResNet, timm, CoCa towers).
        """
        if isinstance(spec, AuxiliaryCLIP):
            return spec
        if isinstance(spec, nn.Module):
            visual: Any = getattr(spec, "visual", spec)
            if not isinstance(visual, nn.Module):
                raise ValueError(f"{type(spec).__name__}.visual is a {type(visual).__name__}, not a module")
            if device is not None:
                visual.to(device)
            return cls(visual, name=type(spec).__name__)
        name, pretrained = _parse_spec(spec)
        open_clip = _import_open_clip()
        model = _create_model(open_clip, name, pretrained, device)
        label = name if pretrained is None else f"{name}:{pretrained}"
        return cls(model.visual, name=label)

    def cls_attention(
        self, images: torch.Tensor | Sequence[torch.Tensor], layers: int | Sequence[int] | None = None
    ) -> torch.Tensor:
        """[CLS] -> patch attention maps: [B, V, gh, gw] fp32 on the tower's device.

        Args:
            images: float RGB in [0, 1], a [B, 3, H, W] tensor or a sequence of [3, H, W] tensors of any sizes.
                Each image is resized (bilinear, antialiased) to the tower's ``image_size`` WITHOUT cropping,
                so the aspect ratio is distorted: the map must cover the whole image, because every visual
                token of the VLM needs a score (a centre crop, as in CLIP's own preprocessing, would leave the
                border tokens unscored). Then it is normalised with ``mean`` / ``std``.
            layers: block indices (negative counts from the end) in the order wanted, one map each;
                None (default) = every block. The tower stops after the last block needed.

        Each map is the softmax attention of the [CLS] query over all keys at that block, mean over heads,
        restricted to the patch keys (the [CLS] -> [CLS] entry is dropped), so a map sums to 1 minus the
        [CLS] self-attention. Patch order is raster order of the tower's grid.
        """
        wanted = self._layer_indices(layers)
        pixels = self._preprocess(images)
        needed = sorted(set(wanted))
        blocks = self.visual.transformer.resblocks
        patches = self.grid_size[0] * self.grid_size[1]
        rows: dict[int, torch.Tensor] = {}

        def make_hook(index: int):
            def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
                query, key = _attention_inputs(module, args, kwargs)
                if key.shape[1] != patches + 1:
                    raise ValueError(
                        f"block {index} of {self.name} sees {key.shape[1]} tokens where [CLS] + {patches} patches "
                        "were expected (patch dropout or extra tokens are not supported)"
                    )
                rows[index] = MultiheadClsRow(module).row(query, key)[:, 1:]
                if index == needed[-1]:
                    raise _Done

            return hook

        was_training = self.visual.training
        handles = []
        try:
            for index in needed:
                handles.append(blocks[index].attn.register_forward_pre_hook(make_hook(index), with_kwargs=True))
            self.visual.eval()
            with torch.no_grad():
                self.visual(pixels)
        except _Done:
            pass
        finally:
            for handle in handles:
                handle.remove()
            self.visual.train(was_training)
        missing = [i for i in needed if i not in rows]
        if missing:
            raise RuntimeError(f"{self.name}'s forward never called the attention of blocks {missing}")
        maps = torch.stack([rows[i] for i in wanted], dim=1)  # [B, V, gh * gw]
        return maps.view(pixels.shape[0], len(wanted), *self.grid_size)

    @staticmethod
    def resample(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Resample attention maps [B, V, gh, gw] onto a target token grid (h, w): [B, V, h * w] fp32.

        The map is treated as a density over the image: bilinear interpolation (antialiased, so shrinking
        averages over each target token's area instead of sampling it) gives its value at every target
        token's centre, in raster order of the (h, w) grid. Each output map is then rescaled to the total
        mass of its input map (1 minus the [CLS] self-attention), so scores keep the same scale whatever the
        target grid and stay comparable with other attention signals. For Qwen2-VL the grid of an image is
        (grid_h // merge_size, grid_w // merge_size) from ``image_grid_thw``.
        """
        if maps.ndim != 4:
            raise ValueError(f"maps must be [B, V, gh, gw]; got shape {tuple(maps.shape)}")
        if len(grid) != 2 or any(int(s) != s or s < 1 for s in grid):
            raise ValueError(f"grid must be two positive integers (h, w); got {grid}")
        maps = maps.float()
        out = F.interpolate(
            maps, size=(int(grid[0]), int(grid[1])), mode="bilinear", align_corners=False, antialias=True
        )
        mass_in = maps.sum(dim=(-2, -1), keepdim=True)
        mass_out = out.sum(dim=(-2, -1), keepdim=True)
        out = out * torch.where(mass_out > 0, mass_in / mass_out, torch.zeros_like(mass_out))
        return out.flatten(2)

    def _layer_indices(self, layers: int | Sequence[int] | None) -> list[int]:
        n = self.num_layers
        if layers is None:
            return list(range(n))
        wanted = [layers] if isinstance(layers, int) else list(layers)
        if not wanted:
            raise ValueError("layers is empty; pass None for every block")
        for layer in wanted:
            if not isinstance(layer, int) or not -n <= layer < n:
                raise ValueError(
                    f"layer {layer!r} is out of range for {self.name}'s {n} blocks (0..{n - 1} or -{n}..-1)"
                )
        return [layer % n for layer in wanted]

    def _preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Images in [0, 1] -> normalised [B, 3, H, W] at the tower's image size, dtype and device."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
            batch = [images]
        else:
            batch = list(images)
            if not batch or any(not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] != 3 for x in batch):
                raise ValueError("images must be a [B, 3, H, W] tensor or a non-empty sequence of [3, H, W] tensors")
            batch = [x.unsqueeze(0) for x in batch]
        if not all(x.is_floating_point() for x in batch):
            raise ValueError("images must be float RGB in [0, 1]")
        weight = self.visual.conv1.weight
        resized = []
        for x in batch:
            x = x.to(device=weight.device, dtype=torch.float32)
            if tuple(x.shape[-2:]) != self.image_size:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
            resized.append(x)
        pixels = torch.cat(resized)
        mean = torch.tensor(self.mean, device=weight.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=weight.device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(weight.dtype)


def _attention_inputs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) of an nn.MultiheadAttention call, batch first: [B, L, D] each."""
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    # Positional order: query, key, value, key_padding_mask, need_weights, attn_mask, ...
    masks = [kwargs.get("key_padding_mask"), kwargs.get("attn_mask"), *args[3:4], *args[5:6]]
    if any(mask is not None for mask in masks) or kwargs.get("is_causal"):
        raise ValueError("masked attention is not supported (open_clip vision towers use none)")
    if not module.batch_first:  # older open_clip releases ran the blocks sequence-first: [L, B, D]
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    return query, key


def _check_tower(visual: nn.Module) -> None:
    kind = type(visual).__name__
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if (
        getattr(visual, "class_embedding", None) is None
        or blocks is None
        or not all(hasattr(visual, a) for a in ("conv1", "image_size", "grid_size"))
    ):
        raise ValueError(
            f"{_NEEDS_VIT}; got a {kind} tower without a class token or transformer blocks. ResNet ('RN50', ...) "
            "and timm towers (SigLIP, ConvNeXt, EVA, ...) are not supported"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError(f"{_NEEDS_VIT}; this {kind} pools with attentional pooling (CoCa), not its class token")
    pool = getattr(visual, "pool_type", "tok")
    if pool != "tok":
        raise ValueError(
            f"{_NEEDS_VIT}; this {kind} pools with pool_type={pool!r} (e.g. CLIPA), so its class token is not the "
            "image summary"
        )
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            raise ValueError(
                f"{_NEEDS_VIT}; block {i} uses {type(attn).__name__} attention (open_clip's custom block, for "
                "qk_norm / scaled cosine attention), which vtc cannot recompute"
            )
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError(f"{_NEEDS_VIT}; block {i}'s attention adds bias_k / zero-attention keys")


def _parse_spec(spec: object) -> tuple[str, str | None]:
    """-> (model name, pretrained tag or checkpoint path or None)."""
    allowed = (
        "a model name ('ViT-B-16'), 'name:pretrained_tag', a (name, pretrained_tag_or_checkpoint_path) tuple, "
        "an open_clip model instance (with .visual) or an AuxiliaryCLIP"
    )
    if isinstance(spec, str):
        if spec.startswith(_SCHEMAS):
            return spec, None
        name, _, pretrained = spec.partition(":")
        if not name or (":" in spec and not pretrained):
            raise ValueError(f"bad CLIP spec {spec!r}; expected {allowed}")
        return name, pretrained or None
    if (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], str | os.PathLike | type(None))
    ):
        model_name, path = spec
        weights = None if path is None else str(os.fspath(path))
        if model_name.startswith(_SCHEMAS) and weights is not None:
            raise ValueError(f"{model_name!r} carries its own weights; pass it alone, not with pretrained={weights!r}")
        return model_name, weights or None
    raise ValueError(f"bad CLIP spec of type {type(spec).__name__}: {spec!r}; expected {allowed}")


def _create_model(open_clip: Any, name: str, pretrained: str | None, device: str | torch.device | None) -> Any:
    if not name.startswith(_SCHEMAS):
        known = open_clip.list_models()
        cleaned = name.replace("/", "-")  # open_clip accepts "ViT-B/16" for "ViT-B-16"
        if cleaned not in known:
            close = difflib.get_close_matches(cleaned, known, n=6, cutoff=0.4)
            vits = [m for m in known if m.startswith("ViT-")][:6]
            raise ValueError(
                f"unknown open_clip model {name!r}; close names: {close or vits} "
                f"(open_clip.list_models() lists all {len(known)})"
            )
        if pretrained is not None and not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(cleaned)
            if pretrained not in tags:
                raise ValueError(
                    f"pretrained {pretrained!r} for {name!r} is neither one of its tags {tags} nor an existing "
                    "checkpoint file (.safetensors / .bin / .pt)"
                )
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device or "cpu")
    except (RuntimeError, OSError) as err:
        if pretrained is None and not name.startswith(_SCHEMAS):
            raise
        raise RuntimeError(
            f"open_clip could not load the weights of {name!r} (pretrained={pretrained!r}): {err}. Without network "
            "access the weights must already be in the Hugging Face cache, or pass (name, '/path/to/checkpoint')"
        ) from err
    return model.eval()


def images_from_qwen_patches(
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> list[torch.Tensor]:
    """Undo Qwen2-VL's image-processor patch flattening: one [3, H, W] fp32 RGB image in [0, 1] per grid row.

    Args:
        pixel_values: [sum(t * h * w), 3 * temporal_patch_size * patch_size**2], the processor's output.
            Rows are patches in the order (t, h / m, w / m, m, m) (merge groups of m x m neighbouring patches
            are consecutive); each row is one patch flattened as (C, T, P, P).
        grid_thw: [n, 3] (t, h, w) in patches per image (``image_grid_thw``).
        patch_size, temporal_patch_size, merge_size: from the model's vision config (Qwen2-VL: 14, 2, 2).
        mean, std: the processor's ``image_mean`` / ``image_std`` (defaults: Qwen2-VL's, OpenAI CLIP's).

    Returns images of H = h * patch_size, W = w * patch_size, un-normalised and clamped to [0, 1]. For video
    grids (t > 1) only the first frame of the first temporal group is returned.
    """
    grid = [tuple(int(v) for v in row) for row in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
    p, tp, m = patch_size, temporal_patch_size, merge_size
    total = sum(t * h * w for t, h, w in grid)
    if pixel_values.ndim != 2 or tuple(pixel_values.shape) != (total, 3 * tp * p * p):
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}; grid_thw {grid} with patch_size={p}, "
            f"temporal_patch_size={tp} needs ({total}, {3 * tp * p * p})"
        )
    bad = [(h, w) for _, h, w in grid if h % m or w % m]
    if bad:
        raise ValueError(f"grid sizes {bad} are not multiples of merge_size={m}")
    mean_t = torch.tensor(tuple(mean), dtype=torch.float32, device=pixel_values.device).view(3, 1, 1)
    std_t = torch.tensor(tuple(std), dtype=torch.float32, device=pixel_values.device).view(3, 1, 1)
    images = []
    start = 0
    for t, h, w in grid:
        x = pixel_values[start : start + t * h * w].float()
        start += t * h * w
        x = x.view(t, h // m, w // m, m, m, 3, tp, p, p)[0, ..., 0, :, :]  # [h/m, w/m, m, m, C, P, P]
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)  # rows (h/m, m, P), columns (w/m, m, P)
        images.append((x * std_t + mean_t).clamp_(0.0, 1.0))
    return images


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    """open_clip stores sizes as an int, a tuple or (from JSON configs) a list."""
    height, width = (value, value) if isinstance(value, int) else value
    return int(height), int(width)
