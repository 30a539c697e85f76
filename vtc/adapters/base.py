"""What every model adapter shares: hook bookkeeping and dropping tokens from the language model's input.

An adapter knows where a model family places its visual tokens and how to obtain signals for the
methods. The dropping itself is the same for every family: a forward pre-hook on the language
model (the decoder stack) receives ``inputs_embeds``, ``attention_mask``, ``position_ids`` and
``past_key_values`` as keyword arguments, removes the dropped visual tokens, keeps the ORIGINAL
position ids of the survivors, and during decoding remaps the full-length attention mask that
generate() keeps passing onto the shortened KV cache.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vtc.methods.base import Budget, Method, Plan


@dataclass
class Compression:
    """One prefill's outcome, per batch sample (what ``handle.last_kept`` / ``handle.stats`` show)."""

    kept: list[torch.Tensor]  # per sample: sorted indices into that sample's visual tokens
    tokens_before: list[int]
    tokens_after: list[int]
    images: list[int]
    plan: Plan | None  # over all units of the batch in sequence order, when they share one shape
    signals_used: tuple[str, ...]
    signal_sources: dict[str, str] = field(default_factory=dict)


@dataclass
class Unit:
    """A set of visual tokens that one method call plans over: an image, or one AnyRes crop of it.

    ``signals`` holds the vision-side signals of these tokens without the batch dimension
    (``cls_attention`` [n], ``cls_attention_layers`` [V, n], ...); features come from the prefill.
    """

    sample: int  # batch row
    positions: torch.Tensor  # [n] sequence positions of the tokens in that row
    keep: int  # tokens to keep, 0..n
    grid: tuple[int, int] | None = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Dropped:
    """How the prefill sequence was shortened, kept to remap masks and positions while decoding."""

    source: torch.Tensor  # [B, L'] index of each new position in the original sequence, -1 = padding
    prefill_mask: torch.Tensor  # [B, L'] attention mask of the shortened prefill
    original_length: int  # L0
    cache: weakref.ref | None = None


class Adapter(ABC):
    """Base class of model-family adapters. Subclasses find modules, register signal hooks and
    implement :meth:`_plan_prefill`; the base drops tokens and keeps decoding consistent."""

    model_types: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()  # adapter options accepted by vtc.compress (e.g. "budget")

    def __init__(self, model: nn.Module, method: Method, budget: Budget, options: dict[str, Any] | None = None):
        unknown = sorted(set(options or {}) - set(self.options))
        if unknown:
            from vtc.registry import adapter_options

            raise ValueError(
                f"option(s) {unknown} do not apply to {type(model).__name__}; "
                + "; ".join(f"{name}= applies to model_types {types}" for name, types in adapter_options().items())
            )
        self.model = model
        self.method = method
        self.budget = budget
        self.provides: tuple[str, ...] = ()
        self.tokens_per_image: int | None = None
        self.vision_layers_used: int | None = None  # vision layers up to the feature layer, if known
        self.signal_sources: dict[str, str] = {}  # signal name -> where it comes from, for handle.stats
        self.last: Compression | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._dropped: _Dropped | None = None
        self._visual: torch.Tensor | None = None  # [B, L] image placeholders of the forward in progress

    # -- attach / detach --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise if the method cannot run on this model; called before any hook is attached."""
        missing = [s for s in self.method.requires if s not in self.provides]
        if missing:
            from vtc.registry import METHODS

            usable = sorted(name for name, cls in METHODS.items() if set(cls.requires) <= set(self.provides))
            raise ValueError(
                f"method {self.method.name!r} needs signal(s) {missing}, which {type(self).__name__} cannot "
                f"provide for this model (it provides {list(self.provides)}); methods that work here: {usable}"
            )
        if self.tokens_per_image is not None:
            self.budget.tokens(self.tokens_per_image)  # raises if keep > N
        self.method.check_geometry(self.tokens_per_image, self.vision_layers_used)

    def attach(self) -> None:
        try:
            self._register_hooks()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._dropped = None

    def _hook(self, module: nn.Module, fn: Callable, *, pre: bool, with_kwargs: bool = True) -> None:
        if pre:
            self._hooks.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        else:
            self._hooks.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    @abstractmethod
    def _register_hooks(self) -> None:
        """Register every hook through :meth:`_hook`, including :meth:`_language_pre_hook` and
        :meth:`_language_post_hook` on the decoder stack."""

    @abstractmethod
    def _plan_prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a prefill's ``inputs_embeds`` [B, L, D]: None when it holds no visual tokens, else
        (keep [B, L] bool, embeds with merged values written at kept positions). Sets ``self.last``."""

    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None:
            raise ValueError(
                "vtc compression is for inference: the logits cover only the kept tokens, so labels cannot be "
                "scored; call handle.remove() (or leave the `with` block) before computing a loss"
            )

    # -- the language-model hooks -----------------------------------------------------------------

    def _language_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self._dropped = None
            planned = self._plan_prefill(embeds)
            if planned is None:
                return None
            keep, embeds = planned
            return args, self._drop(kwargs, embeds, keep)
        if self._continues_prefill(embeds):
            raise ValueError(
                "vtc cannot compress images in a forward that continues an existing KV cache "
                "(chunked prefill or a multi-turn cache); start generation from an empty cache"
            )
        dropped = self._dropped
        if dropped is None or dropped.cache is None or dropped.cache() is not cache:
            return None
        return args, self._remap_decode(kwargs, dropped, past, embeds.shape[1])

    def _language_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._dropped is not None and self._dropped.cache is None:
            cache = getattr(output, "past_key_values", None)
            if cache is not None:
                self._dropped.cache = weakref.ref(cache)

    def _plan_units(
        self, embeds: torch.Tensor, visual: torch.Tensor, units: list[Unit]
    ) -> tuple[torch.Tensor, torch.Tensor, Plan | None]:
        """Run the method on every unit; units of one shape and budget share a batched call.

        Returns (keep [B, L] bool: non-visual tokens and kept visual ones, embeds with merged values
        written at kept positions, the Plan when all units formed one call else None).
        """
        keep = ~visual
        groups: dict[tuple, list[int]] = {}
        for i, unit in enumerate(units):
            groups.setdefault((unit.positions.numel(), unit.keep, unit.grid), []).append(i)
        plans = []
        for (_, count, grid), members in groups.items():
            if count == 0:
                continue
            rows = torch.tensor([units[i].sample for i in members], device=embeds.device).unsqueeze(1)
            cols = torch.stack([units[i].positions for i in members])  # [U, n]
            features = embeds[rows, cols]  # [U, n, D]
            signals: dict[str, Any] = {"features": features}
            for name in self.method.requires:
                if name != "features":
                    signals[name] = torch.stack([units[i].signals[name] for i in members])
            if grid is not None:
                signals["grid"] = grid
            plan = self.method.plan(signals, count)
            plans.append(plan)
            kept_cols = cols.gather(1, plan.kept)
            keep[rows.expand_as(kept_cols), kept_cols] = True
            if plan.merge_into is not None and not plan.is_identity:
                embeds = embeds.clone()
                embeds[rows.expand_as(kept_cols), kept_cols] = plan.apply(features)
        single = plans[0] if len(groups) == 1 and len(plans) == 1 else None
        return keep, embeds, single

    def _compression(
        self, visual: torch.Tensor, keep: torch.Tensor, images: list[int], plan: Plan | None
    ) -> Compression:
        """What the handle reports: per sample, the indices (among its visual tokens) that survive."""
        rank = visual.long().cumsum(dim=1) - 1
        survives = keep & visual
        kept = [rank[b][survives[b]] for b in range(visual.shape[0])]
        return Compression(
            kept,
            visual.sum(dim=1).tolist(),
            survives.sum(dim=1).tolist(),
            images,
            plan,
            tuple(self.method.requires),
            dict(self.signal_sources),
        )

    def _no_images(self, embeds: torch.Tensor) -> None:
        b = embeds.shape[0]
        empty = torch.empty(0, dtype=torch.long, device=embeds.device)
        self.last = Compression([empty] * b, [0] * b, [0] * b, [0] * b, None, ())

    def _record_placeholders(self, bound: dict[str, Any], has_images: bool) -> None:
        """Called by the family's model pre-hook: remember where the image placeholders of this forward are
        (from input_ids, or by comparing inputs_embeds with the placeholder's embedding)."""
        if not has_images:
            self._visual = None
            return
        input_ids = bound.get("input_ids")
        if input_ids is not None:
            self._visual = input_ids == self.image_token_id
            return
        embeds = bound["inputs_embeds"]
        token = torch.tensor(self.image_token_id, device=embeds.device)
        self._visual = (embeds == self.base.get_input_embeddings()(token)).all(-1)

    def _take_placeholders(self, embeds: torch.Tensor) -> torch.Tensor | None:
        """The placeholder mask of this forward, once (None if it holds no image tokens)."""
        visual, self._visual = self._visual, None
        if visual is None or visual.shape != embeds.shape[:2] or not bool(visual.any()):
            return None
        return visual

    def _continues_prefill(self, embeds: torch.Tensor) -> bool:
        """True when a forward over a non-empty cache carries visual tokens."""
        return self._take_placeholders(embeds) is not None

    def _drop(self, kwargs: dict, embeds: torch.Tensor, keep: torch.Tensor) -> dict:
        """Remove the tokens where ``keep`` is False; re-pad on the left when rows keep different counts."""
        b, length, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError(
                f"vtc needs a 2-D attention_mask [batch, seq] (or None) to drop tokens, got {mask.ndim}-D; "
                "pass the processor's attention_mask"
            )
        mask = torch.ones(b, length, dtype=torch.long, device=embeds.device) if mask is None else mask
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=embeds.device).unsqueeze(0)
        source = _source_index(keep)  # [B, L']
        valid = source >= 0
        safe = source.clamp(min=0)
        new_embeds = embeds.gather(1, safe.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        new_embeds = new_embeds * valid.unsqueeze(-1).to(new_embeds.dtype)
        new_mask = mask.gather(1, safe) * valid.to(mask.dtype)
        lead = positions.shape[:-2]  # () for [B, L], (3,) for M-RoPE [3, B, L]
        positions = positions.expand(*lead, b, length)
        new_positions = positions.gather(-1, safe.expand(*lead, -1, -1)) * valid.to(positions.dtype)

        out = dict(kwargs)
        out["inputs_embeds"] = new_embeds
        # Always explicit: gapped position ids without a mask are read as packed sequences.
        out["attention_mask"] = new_mask
        out["position_ids"] = new_positions
        if kwargs.get("cache_position") is not None:  # transformers 4.x indexes the cache with it
            out["cache_position"] = torch.arange(source.shape[1], device=embeds.device)
        cache = kwargs.get("past_key_values")
        self._dropped = _Dropped(source, new_mask, length, weakref.ref(cache) if cache is not None else None)
        return out

    def _remap_decode(self, kwargs: dict, dropped: _Dropped, past: int, q_len: int) -> dict:
        """Map a decode step's full-length mask / default positions onto the shortened cache."""
        short = dropped.source.shape[1]
        new_tokens = past - short + q_len  # tokens after the prefill, this step's included
        out = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is None:
            if not bool(dropped.prefill_mask.all()):
                prefill = dropped.prefill_mask
                tail = torch.ones(prefill.shape[0], new_tokens, dtype=prefill.dtype, device=prefill.device)
                out["attention_mask"] = torch.cat([dropped.prefill_mask, tail], dim=1)
        else:
            if mask.ndim != 2 or mask.shape[1] != dropped.original_length + new_tokens:
                raise ValueError(
                    f"during decoding vtc expects the full 2-D attention_mask of length "
                    f"{dropped.original_length + new_tokens} (prompt + generated), got shape {tuple(mask.shape)}"
                )
            valid = dropped.source >= 0
            prefix = mask.gather(1, dropped.source.clamp(min=0)) * valid.to(mask.dtype)
            out["attention_mask"] = torch.cat([prefix, mask[:, dropped.original_length :]], dim=1)
        if kwargs.get("cache_position") is not None:  # transformers 4.x: slots in the shortened cache
            out["cache_position"] = torch.arange(past, past + q_len, device=dropped.source.device)
        if kwargs.get("position_ids") is None:
            # What the uncompressed model would use: continue after the ORIGINAL prompt length.
            start = dropped.original_length + past - short
            out["position_ids"] = torch.arange(start, start + q_len, device=dropped.source.device).unsqueeze(0)
        return out


def _source_index(keep: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B, L'] original index of each kept token, right-aligned, -1 for left padding."""
    b, length = keep.shape
    counts = keep.sum(dim=1)
    short = int(counts.max())
    # Rank kept tokens from the right so every row ends at column L' - 1.
    rank_from_right = keep.flip(1).cumsum(1).flip(1)  # [B, L], 1 for the last kept token
    column = short - rank_from_right
    source = torch.full((b, short), -1, dtype=torch.long, device=keep.device)
    index = torch.arange(length, device=keep.device).expand(b, length)
    rows, cols = keep.nonzero(as_tuple=True)
    source[rows, column[rows, cols]] = index[rows, cols]
    return source
