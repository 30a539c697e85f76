"""In-LLM methods: drop visual tokens between decoder layers during prefill.

A layerwise method names the decoder layers at whose INPUT tokens are dropped (its schedule), the
signals it needs from inside the language model and at which layer (from that layer's own q/k
projections, one query row or one key norm per token, never an N x N map), and chooses, per image
and stage, which of the image's surviving visual tokens go on (``choose``; ``choose_all`` for all
images of a batch at once, which a method may batch). The adapter does the removal: hidden states,
positions, masks and the KV cache of every later layer shrink.

Signals a method can ask for (``signal_layers``), each [L] over the current sequence of one row:
  * ``"last_row"``: softmax attention of the last token's query over all keys at that layer (its
    input norm, q/k projections and RoPE), mean over heads.
  * ``"key_norm"``: L1 norm of each token's key at that layer (post-RoPE, heads concatenated), with positions
    counted from the row's first real token, as for the sample alone (an L1 norm is not rotation-invariant, so
    a left-padded row numbered from its padding would otherwise pick other pivots).
The ``hidden`` states at the drop layer, after the model's final norm, are given to methods that set ``uses_hidden``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch


@dataclass
class Stage:
    """What a method sees when it chooses the survivors of one image at one drop layer."""

    index: int  # stage number (0 = first drop layer)
    keep: int  # tokens to keep (fixed-count methods); the floor for adaptive ones
    visual: torch.Tensor  # [n] positions of the image's surviving visual tokens in the current sequence
    text: torch.Tensor  # [t] positions of the row's valid text tokens after its last visual token
    signals: dict[str, torch.Tensor]  # name -> [L] over the current sequence of this row
    hidden: torch.Tensor | None  # [L, D] input of the drop layer after the final norm (None: not uses_hidden)
    protected: torch.Tensor | None = None  # [n] bool, tokens that must survive (Adaptive's key set)


class LayerwiseMethod(ABC):
    """Base of in-LLM methods. Subclasses are dataclasses whose fields are the hyper-parameters."""

    name: ClassVar[str]
    stage: ClassVar[str] = "llm"  # where it runs: between decoder layers
    requires: ClassVar[tuple[str, ...]] = ()  # vision-side signals (none for the methods here)
    exact: ClassVar[bool] = True  # keeps exactly the scheduled count (False: adaptive)
    uses_hidden: ClassVar[bool] = True  # reads Stage.hidden (False spares the final norm at every drop)
    temporal: ClassVar[bool] = False  # as Method.temporal: none of the in-LLM methods needs a video's frames

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

    def choose_all(self, stages: list[Stage]) -> list[torch.Tensor]:
        """:meth:`choose` for every image of a batch at one drop layer. Default: one call per image; a method
        overrides it to choose for images of one shape in one batched call (same result)."""
        return [self.choose(stage) for stage in stages]

    def survivors(self, stages: list[Stage]) -> list[torch.Tensor]:
        """What the dropper calls: :meth:`choose_all`, unless ``choose`` is overridden below the class (or on the
        instance) that batches it - a subclass's own ``choose`` is never bypassed by its parent's batching."""
        if _defined_at(self, "choose") < _defined_at(self, "choose_all"):
            return [self.choose(stage) for stage in stages]
        return self.choose_all(stages)

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

    def key_set(self, score: torch.Tensor) -> torch.Tensor | None:
        """[n] bool: the tokens of one image (at the language model's input) that no stage may drop, from their
        vision-side ``score`` (a signal in ``requires``); None: none. Default: None."""
        return None


def _defined_at(method: LayerwiseMethod, name: str) -> int:
    """How specific ``method``'s ``name`` is: -1 set on the instance, else its defining class's place in the MRO."""
    if name in vars(method):
        return -1
    return next(i for i, cls in enumerate(type(method).__mro__) if name in vars(cls))


def check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return scores.topk(min(keep, scores.numel())).indices.sort().values


def top_all(stages: list[Stage], signal: str) -> list[torch.Tensor]:
    """For each stage, the sorted indices of its ``keep`` visual tokens with the highest ``signal``: one topk per
    group of stages with the same token count and budget."""
    chosen: list[torch.Tensor] = [torch.empty(0)] * len(stages)
    for members in same_shape([(stage.visual.numel(), stage.keep) for stage in stages]):
        scores = torch.stack([stages[i].signals[signal][stages[i].visual] for i in members])  # [G, n]
        kept = scores.topk(min(stages[members[0]].keep, scores.shape[1]), dim=1).indices.sort(dim=1).values
        for i, row in zip(members, kept, strict=True):
            chosen[i] = row
    return chosen


def same_shape(keys: list[tuple]) -> list[list[int]]:
    """Indices grouped by equal ``keys`` (what must be equal to stack them), in order of first appearance: the
    groups of one batched call (in-LLM choices here, pre-LLM plans in vtc.adapters.base)."""
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def scaled(layers: tuple[int, ...], num_layers: int, reference: int = 32) -> list[int]:
    """PyramidDrop's layers for a 32-layer model, at the same relative depth of ``num_layers``."""
    scaled = [max(1, min(num_layers - 1, round(layer * num_layers / reference))) for layer in layers]
    return sorted(set(scaled))


def flops_per_layer(config: Any, tokens: int) -> float:
    """Approximate prefill FLOPs of one decoder layer over ``tokens`` tokens (multiply-add = 2 FLOPs):
    q/k/v/o projections and the MLP (gate, up, down) per token, plus causal attention scores and values."""
    return total_flops(config, [tokens])


def total_flops(config: Any, tokens_per_layer: list[float]) -> float:
    """:func:`flops_per_layer` summed over layers that see ``tokens_per_layer`` tokens (the config read once)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mlp = getattr(config, "intermediate_size", None)
    if mlp is None:  # a MoE config without a dense width (Qwen3.5-MoE): the active experts' and the shared expert's
        mlp = config.num_experts_per_tok * config.moe_intermediate_size
        mlp += getattr(config, "shared_expert_intermediate_size", None) or 0
    per_token = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * mlp
    per_pair = heads * head_dim  # per token: QK^T and AV over ~tokens/2 keys each (causal)
    return math.fsum(2.0 * t * (per_token + per_pair * t) for t in tokens_per_layer)
