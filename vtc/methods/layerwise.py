"""In-LLM methods: drop visual tokens between decoder layers during prefill.

A layerwise method names the decoder layers at whose INPUT tokens are dropped (its schedule), the
signals it needs from inside the language model and at which layer (computed in hooks from the
layer inputs, one query row or one key norm per token, never an N x N map), and chooses, per image
and stage, which of the image's surviving visual tokens go on. The adapter does the removal: hidden
states, positions, masks and the KV cache of every later layer shrink.

Signals a method can ask for (``signal_layers``), each [L] over the current sequence of one row:
  * ``"last_row"``: softmax attention of the last token's query over all keys at that layer (its
    input norm, q/k projections and RoPE), mean over heads.
  * ``"key_norm"``: L1 norm of each token's key at that layer (post-RoPE, heads concatenated), with positions
    counted from the row's first real token, as for the sample alone (an L1 norm is not rotation-invariant, so
    a left-padded row numbered from its padding would otherwise pick other pivots).
The ``hidden`` states at the drop layer are always available, after the model's final norm.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from vtc.kernels import reference as ops


@dataclass
class Stage:
    """What a method sees when it chooses the survivors of one image at one drop layer."""

    index: int  # stage number (0 = first drop layer)
    keep: int  # tokens to keep (fixed-count methods); the floor for adaptive ones
    visual: torch.Tensor  # [n] positions of the image's surviving visual tokens in the current sequence
    text: torch.Tensor  # [t] positions of the row's valid text tokens after its last visual token
    signals: dict[str, torch.Tensor]  # name -> [L] over the current sequence of this row
    hidden: torch.Tensor  # [L, D] input of the drop layer after the final norm
    protected: torch.Tensor | None = None  # [n] bool, tokens that must survive (Adaptive's key set)


class LayerwiseMethod(ABC):
    """Base of in-LLM methods. Subclasses are dataclasses whose fields are the hyper-parameters."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()  # vision-side signals (none for the methods here)
    exact: ClassVar[bool] = True  # keeps exactly the scheduled count (False: adaptive)

    @abstractmethod
    def schedule(self, num_layers: int) -> list[int]:
        """Ascending decoder layers (>= 1) at whose input tokens are dropped."""

    @abstractmethod
    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        """Layer -> signals to compute at its input (the layer itself or an earlier one)."""

    def stage_counts(self, tokens: int, keep: int, stages: int) -> list[int]:
        """Visual tokens of an image left after each stage, for an image of ``tokens`` at the LLM input and a
        final budget ``keep`` (default: ``keep`` after the only stage)."""
        return [keep] * stages

    @abstractmethod
    def choose(self, stage: Stage) -> torch.Tensor:
        """Sorted indices into ``stage.visual`` of the tokens that survive."""

    def check_depth(self, num_layers: int) -> None:
        """Raise if the schedule does not fit a language model of ``num_layers`` layers."""
        layers = self.schedule(num_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= num_layers:
            raise ValueError(
                f"{self.name}: drop layers {layers} must be distinct, ascending and within 1..{num_layers - 1} "
                f"(the language model has {num_layers} layers)"
            )

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return scores.topk(min(keep, scores.numel())).indices.sort().values


@dataclass
class FastV(LayerwiseMethod):
    """FastV: drop at the input of layer ``layer``, keep the visual tokens the last token attends to most.

    Based on arXiv:2403.06764 (pkunlp-icler/FastV). Score = attention of the last token's query at
    layer ``layer - 1`` (the layer just before), mean over heads; the top ``keep`` visual tokens of each
    image go on at their original positions.

    Fields:
        layer: the drop layer K (default 2, the paper's).

    Differences from the original: the attention row is recomputed in a hook from layer K-1's input
    instead of asking for eager attention maps; tokens are removed (hidden states, positions, masks,
    KV cache of later layers), not masked; ``keep`` is per image (the paper's R=50% is ``ratio=0.5``).
    """

    layer: int = 2
    name = "fastv"

    def __post_init__(self) -> None:
        _check_int("layer", self.layer, 1)

    def schedule(self, num_layers: int) -> list[int]:
        return [self.layer]

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        return {self.layer - 1: ("last_row",)}

    def choose(self, stage: Stage) -> torch.Tensor:
        return _top(stage.signals["last_row"][stage.visual], stage.keep)


def _scaled(layers: tuple[int, ...], num_layers: int, reference: int = 32) -> list[int]:
    """PyramidDrop's layers for a 32-layer model, at the same relative depth of ``num_layers``."""
    scaled = [max(1, min(num_layers - 1, round(layer * num_layers / reference))) for layer in layers]
    return sorted(set(scaled))


@dataclass
class PDrop(LayerwiseMethod):
    """PyramidDrop: several drop stages, each keeping a fraction of the visual tokens that reach it.

    Based on arXiv:2410.17247 (Cooperx521/PyramidDrop). Score at each stage = attention of the last
    (instruction) token's query at the drop layer itself (its input norm, q/k projections and RoPE),
    mean over heads. With the default schedule (layers 8/16/24 of a 32-layer model, scaled to the
    model's depth) and ``keep = N / 8``, an image keeps N/2, N/4, N/8 tokens - the paper's 0.5 / 0.25 /
    0.125. ``keep`` is the count after the last stage; stage s keeps keep / lambda^(S-1-s).

    Fields:
        layers: drop layers for a 32-layer model (scaled to the actual depth); None = (8, 16, 24).
        lam: the ratio between consecutive stages (default 0.5, the paper's lambda).

    Differences from the original: batches of any size and any attention implementation; tokens are
    removed, and the last instruction token is the last token of the prompt.
    """

    layers: tuple[int, ...] | None = None
    lam: float = 0.5
    name = "pdrop"

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(self.layers)
            for layer in self.layers:
                _check_int("every entry of layers", layer, 1)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 < self.lam < 1:
            raise ValueError(f"lam must be a number in (0, 1), got {self.lam!r}")

    def schedule(self, num_layers: int) -> list[int]:
        return _scaled(self.layers if self.layers is not None else (8, 16, 24), num_layers)

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        return {layer: ("last_row",) for layer in self.schedule(num_layers)}

    def stage_counts(self, tokens: int, keep: int, stages: int) -> list[int]:
        return [min(tokens, max(keep, round(keep / self.lam ** (stages - 1 - s)))) for s in range(stages)]

    def choose(self, stage: Stage) -> torch.Tensor:
        return _top(stage.signals["last_row"][stage.visual], stage.keep)


@dataclass
class DARTLLM(LayerwiseMethod):
    """DART in its paper form: duplication-aware pruning at the input of layer ``layer``.

    Based on arXiv:2502.11494 (ZichenWen1/DART). Pivots = the 4 visual and 4 text tokens (text after
    the image) with the largest key L1 norm at layer ``layer - 1`` (post-RoPE, heads concatenated);
    each pivot, in descending norm order, takes the not-yet-chosen visual tokens least cosine-similar
    to it in the drop layer's input after the final norm; the text pivots are removed at the end.

    Fields:
        layer: the drop layer K (default 2, the paper's).
        visual_pivots / text_pivots: pivot counts (default 4 / 4).

    Differences from the original: exactly ``keep`` visual tokens per image (the original keeps
    4 + 8 * floor(M / 8)); pivots visited in descending norm order (the original iterates a set);
    several images per prompt get their own pivots (text pivots: the text after the row's last image).
    """

    layer: int = 2
    visual_pivots: int = 4
    text_pivots: int = 4
    name = "dart_llm"

    def __post_init__(self) -> None:
        _check_int("layer", self.layer, 1)
        _check_int("visual_pivots", self.visual_pivots, 1)
        _check_int("text_pivots", self.text_pivots, 0)

    def schedule(self, num_layers: int) -> list[int]:
        return [self.layer]

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        return {self.layer - 1: ("key_norm",)}

    def choose(self, stage: Stage) -> torch.Tensor:
        norm = stage.signals["key_norm"]
        n = stage.visual.numel()
        visual_pivots = min(self.visual_pivots, stage.keep)
        order = norm[stage.visual].argsort(descending=True, stable=True)[:visual_pivots]
        text = stage.text[norm[stage.text].argsort(descending=True, stable=True)[: self.text_pivots]]
        features = torch.cat([stage.hidden[stage.visual], stage.hidden[text]]).unsqueeze(0)  # [1, n + t, D]
        pivots = torch.cat([order, torch.arange(n, n + text.numel(), device=order.device)])
        pivots = pivots[torch.cat([norm[stage.visual][order], norm[text]]).argsort(descending=True, stable=True)]
        pivots = pivots.unsqueeze(0)  # visual and text pivots visited in descending norm order
        kept = ops.pivot_select(features, pivots, stage.keep + text.numel())[0]
        return kept[kept < n]


@dataclass
class Adaptive(LayerwiseMethod):
    """Instance-adaptive dropping: keep the fewest visual tokens that carry a fraction of the attention.

    Training-free, in the spirit of ATP-LLaVA (arXiv 2412.00447) and MustDrop (arXiv 2411.10803): at
    each scheduled layer, the last token's attention over an image's surviving visual tokens (drop
    layer's own weights, head mean) is sorted, and the smallest set whose attention sums to at least
    ``mass`` of the image's total survives, but never fewer than the budget (``keep`` / ``ratio`` is the
    floor). How many tokens survive therefore depends on the image and the question.

    Fields:
        layers: drop layers for a 32-layer model, scaled to the actual depth (default (2, 6, 10, 14),
            MustDrop's).
        mass: fraction of the attention mass to keep at each stage (default 0.9).
        protect: fraction of each image's tokens (at the LLM input) with the highest vision-side [CLS]
            attention that are never dropped - MustDrop's key set (it protects ~8%: ``protect=0.08``).
            Default 0: none. Needs a model that provides ``cls_attention``.
    """

    layers: tuple[int, ...] = (2, 6, 10, 14)
    mass: float = 0.9
    protect: float = 0.0
    name = "adaptive"
    exact = False

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        for layer in self.layers:
            _check_int("every entry of layers", layer, 1)
        if isinstance(self.mass, bool) or not isinstance(self.mass, (int, float)) or not 0 < self.mass <= 1:
            raise ValueError(f"mass must be a number in (0, 1], got {self.mass!r}")
        if isinstance(self.protect, bool) or not isinstance(self.protect, (int, float)) or not 0 <= self.protect < 1:
            raise ValueError(f"protect must be a number in [0, 1), got {self.protect!r}")
        self.requires = ("cls_attention",) if self.protect > 0 else ()

    def schedule(self, num_layers: int) -> list[int]:
        return _scaled(self.layers, num_layers)

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        return {layer: ("last_row",) for layer in self.schedule(num_layers)}

    def choose(self, stage: Stage) -> torch.Tensor:
        scores = stage.signals["last_row"][stage.visual].double()
        protected = stage.protected if stage.protected is not None else torch.zeros_like(scores, dtype=torch.bool)
        # Protected tokens first, then by attention: the kept set is always a prefix of this order.
        ranking = torch.where(protected, scores + scores.sum() + 1, scores)
        order = ranking.argsort(descending=True, stable=True)
        cumulative = scores[order].cumsum(0)
        needed = int((cumulative < self.mass * cumulative[-1]).sum()) + 1  # smallest prefix reaching the mass
        count = min(scores.numel(), max(stage.keep, needed, int(protected.sum())))
        return order[:count].sort().values


def flops_per_layer(config: Any, tokens: int) -> float:
    """Approximate prefill FLOPs of one decoder layer over ``tokens`` tokens (multiply-add = 2 FLOPs):
    q/k/v/o projections and the MLP (gate, up, down) per token, plus causal attention scores and values."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * config.intermediate_size
    attention = heads * head_dim * tokens  # per token: QK^T and AV over ~tokens/2 keys each (causal)
    return 2.0 * tokens * (projections + mlp + attention)


def total_flops(config: Any, tokens_per_layer: list[float]) -> float:
    return math.fsum(flops_per_layer(config, t) for t in tokens_per_layer)
