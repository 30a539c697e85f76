"""Dropping visual tokens between decoder layers (in-LLM methods), with hooks only.

The decoder builds the attention mask, position ids and rotary embeddings once and hands the same
objects to every layer. So a forward pre-hook on every layer from the first drop layer on replaces
them with versions gathered to the surviving tokens; at a drop layer it also gathers the hidden
states. Later layers then compute, and store in their KV-cache layer, only the survivors (a
DynamicCache keeps one tensor per layer, so layers simply hold different lengths). While decoding,
each layer's mask is re-indexed onto its own shorter cache (once per stage and step: the layers of a
stage share it; not at all where no row holds padding). Rows that keep different counts (several
images, adaptive methods) are re-padded on the left, with an explicit mask.

What it costs beyond the layers' own work (issue 20): a method's signals at a layer that drops nothing
are taken from that layer's own k_proj / q_proj outputs (forward hooks), not projected a second time;
only a drop layer's scores over the tokens it is about to drop need vtc's own projection (PyramidDrop's
and the adaptive schedule's definition). The survivors of every image are chosen in one batched call
per group of same-shaped images (``LayerwiseMethod.choose_all``), and layers that drop nothing read
nothing back to the host: the per-layer token counts are read once the prefill is through.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from vtc.llm.prefill import declared_arguments, kv_cache, refuse_unknown_token_axes, source_index, take
from vtc.methods.base import Budget
from vtc.methods.layerwise import LayerwiseMethod, Stage
from vtc.probes import DecoderAttention, probe


def layer_signals(
    probe: DecoderAttention,
    projected_keys: torch.Tensor,
    last_queries: torch.Tensor | None,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor,
    names: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """Signals at a decoder layer (see vtc.methods.layerwise), each [B, L] fp32, from its ``k_proj`` output
    [B, L, kv_heads * d] and (for ``last_row``) its ``q_proj`` output at each row's last real token [B, 1, heads * d]
    (:func:`last_positions`)."""
    b, length, _ = projected_keys.shape
    cos, sin = cos_sin
    keys = probe.rotated_keys(projected_keys, cos, sin)
    out = {}
    if "key_norm" in names:
        # An L1 norm is not rotation-invariant: count positions from each row's first real token, as for the row
        # alone (a plain forward of a left-padded batch numbers pads too). Rotating back by that token's angle
        # is exact where positions already start there (generate(): cos 1, sin 0).
        first = valid.int().argmax(dim=1, keepdim=True)  # [B, 1]
        offset_sin = gather_tokens(sin, first)
        row_keys = keys
        if bool(offset_sin.any()):
            row_keys = probe.rotate(keys, gather_tokens(cos, first), -offset_sin)
        out["key_norm"] = row_keys.transpose(1, 2).reshape(b, length, -1).float().abs().sum(-1)
    if "last_row" in names:
        last = last_positions(valid)
        query = probe.rotated_queries(last_queries, gather_tokens(cos, last), gather_tokens(sin, last))
        keys = keys.repeat_interleave(probe.heads // probe.kv_heads, dim=1)
        logits = (query.float() @ keys.float().transpose(-1, -2)) * probe.scaling  # [B, H, 1, L]
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        out["last_row"] = logits.softmax(dim=-1).mean(dim=1)[:, 0]
    return out


def last_positions(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1] each row's last real token (with right padding, position -1 is a pad)."""
    return valid.shape[1] - 1 - valid.flip(1).int().argmax(dim=1, keepdim=True)


def rows_at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, L, d] at index [B, l] -> [B, l, d]."""
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def gather_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [..., B|1, L, d] gathered along L with index [B, L'] -> [..., B, L', d]."""
    b, short = index.shape
    lead = values.shape[:-3]
    values = values.expand(*lead, b, values.shape[-2], values.shape[-1])
    index = index.view(*([1] * len(lead)), b, short, 1).expand(*lead, b, short, values.shape[-1])
    return values.gather(-2, index)


def _recompute_runs_hooks(layers: nn.ModuleList) -> bool:
    """Whether a checkpointed decoder layer's backward recompute would call its forward hooks again: transformers 4.x
    checkpoints the layer's ``__call__`` (hooks included), 5.x its ``forward``."""
    checkpointed = any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in layers)
    return checkpointed and int(transformers.__version__.split(".")[0]) < 5


@dataclass
class _Stages:
    order: torch.Tensor  # [B, L] LM-input position of each current position, -1 = padding
    image: torch.Tensor  # [B, L] image id of each current position, -1 = not visual
    valid: torch.Tensor  # [B, L] bool
    targets: dict[int, list[int]]  # image id -> kept count after each stage
    protected: torch.Tensor  # [B, L] bool, tokens the method must keep
    stage_kwargs: dict[str, Any] | None = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_counts: list = field(default_factory=list)  # per layer, per sample ([B] tensors until the last layer)
    token_counts: list = field(default_factory=list)
    maps: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first layer, order) per stage
    capture: _Capture | None = None  # a signal layer's projections, taken during its forward


@dataclass
class _Capture:
    """What a signal layer that drops nothing computes anyway (its ``k_proj`` over every token, its ``q_proj`` at
    the last ones), taken from its own forward by hooks on the projections instead of projected a second time."""

    index: int
    names: tuple[str, ...]
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    valid: torch.Tensor
    last: torch.Tensor  # [B, 1]
    keys: torch.Tensor | None = None
    last_queries: torch.Tensor | None = None


class LayerDropper:
    """Runs one :class:`LayerwiseMethod` inside a decoder stack (``language_model.layers``)."""

    def __init__(self, method: LayerwiseMethod, budget: Budget, language_model: nn.Module):
        self.method = method
        self.budget = budget
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.config = language_model.config
        depth = len(self.layers)
        method.check_depth(depth)
        self.schedule = method.schedule(depth)
        self.declared = [declared_arguments(self.layers[i]) for i in self.schedule]  # per drop layer
        self.signal_at = method.signal_layers(depth)
        purpose = f"the in-LLM signals of {method.name!r}"
        self.probes = {i: probe(DecoderAttention, self.layers[i].self_attn, purpose) for i in self.signal_at}
        # A drop layer scores the tokens it is about to drop, so it projects them itself; any other signal layer
        # still sees every token, and its own projections are taken as it computes them.
        self.captured_at = [i for i in self.signal_at if i not in self.schedule]
        self._projections = {i: self._projections_of(i) for i in self.captured_at}  # the modules hooked
        self._prefill: _Stages | None = None
        self._maps: list[tuple[int, torch.Tensor]] = []  # of the last finished prefill
        self._padded: list[bool] = []  # per stage of it: whether some row's order holds padding (-1)
        self._decode_mask: tuple | None = None  # (decoder's mask, (stage, length), vtc's mask) of this decode step
        self._lm_length = 0
        self._cache: weakref.ref | None = None
        self._decoding = False
        self.finished: _Stages | None = None

    def hooks(self) -> list[tuple[nn.Module, Any, bool]]:
        """(module, hook, is a pre-hook) to register, all with keyword arguments."""
        # Layer 0 only computes signals (for a drop at layer 1); the counts start at layer 1 (layer 0 = LM input).
        hooked = [i for i in range(len(self.layers)) if i >= 1 or i in self.signal_at]
        hooks = [(self.layers[i], self._pre_hook(i), True) for i in hooked]
        for i, (k_proj, q_proj) in self._projections.items():
            hooks.append((k_proj, self._capture_hook(i, "keys"), False))
            if "last_row" in self.signal_at[i]:
                hooks.append((q_proj, self._capture_hook(i, "last_queries"), False))
        return hooks

    def _projections_of(self, index: int) -> tuple[nn.Module, nn.Module]:
        attn = self.layers[index].self_attn
        return attn.k_proj, attn.q_proj

    # -- driven by the adapter's language-model hooks ------------------------------------------------

    def begin(
        self, image: torch.Tensor, valid: torch.Tensor, cache: Any, vision_score: torch.Tensor | None = None
    ) -> None:
        """A prefill starts: ``image`` [B, L] image id per LM-input position (-1 = text), ``valid`` [B, L],
        ``vision_score`` [B, L] the vision-side [CLS] attention of visual positions (if the method needs it)."""
        ids, sizes = image[image >= 0].unique(return_counts=True)
        targets = {}
        for image_id, size in zip(ids.tolist(), sizes.tolist(), strict=True):
            targets[image_id] = self.method.stage_counts(size, self.budget.cap(size), len(self.schedule))
        order = torch.arange(image.shape[1], device=image.device).expand_as(image)
        for i, hooked in self._projections.items():
            if self._projections_of(i) != hooked:
                raise ValueError(
                    f"decoder layer {i}'s attention projections (k_proj / q_proj) were replaced after "
                    f"vtc.compress attached to them (e.g. by a quantisation or an adapter such as LoRA), so "
                    f"{self.method.name!r} would score with the old ones. Attach vtc after modifying the model: "
                    "handle.remove(), then vtc.compress again"
                )
        protected = self._key_set(image, vision_score, ids.tolist())
        if targets and torch.is_grad_enabled() and _recompute_runs_hooks(self.layers):
            raise ValueError(
                f"in-LLM method {self.method.name!r} cannot run under gradient checkpointing on transformers "
                f"{transformers.__version__}: its recompute in backward runs vtc's layer hooks again, after the "
                "prefill, on the full-length inputs. Use transformers >= 5 (it checkpoints the layers' forward, "
                "outside their hooks), a pre-LLM method, or model.gradient_checkpointing_disable()"
            )
        self._prefill = _Stages(order, image, valid, targets, protected) if targets else None
        # Nothing of an earlier generation carries over: its maps index a sequence this prefill does not have.
        self._maps, self._padded, self._decode_mask = [], [], None
        self._decoding = False
        self._lm_length = image.shape[1]
        self._cache = weakref.ref(cache) if cache is not None else None
        self.finished = None

    def _key_set(self, image: torch.Tensor, score: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
        """[B, L] bool: per image, the tokens the method protects from its vision-side score (its key_set)."""
        protected = torch.zeros_like(image, dtype=torch.bool)
        if score is None:
            return protected
        for image_id in ids:
            rows, cols = (image == image_id).nonzero(as_tuple=True)
            chosen = self.method.key_set(score[rows, cols])
            if chosen is not None:
                protected[rows[chosen], cols[chosen]] = True
        return protected

    def bind_cache(self, cache: Any) -> None:
        if self._cache is None and cache is not None and self._maps:
            self._cache = weakref.ref(cache)

    def holds_state_of(self, cache: Any) -> bool:
        """Whether the last prefill shortened this cache's later layers (its maps are kept to decode it)."""
        return bool(self._maps) and self._cache is not None and self._cache() is cache

    def decoding(self, cache: Any) -> None:
        self._prefill = None
        self._decoding = self.holds_state_of(cache)

    # -- the layer hooks ----------------------------------------------------------------------------

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._prefill is not None:
                return self._prefill_step(index, module, args, kwargs)
            if self._decoding and index >= self.schedule[0]:
                return args, self._decode_kwargs(index, kwargs)
            return None

        return hook

    def _prefill_step(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state = self._prefill
        hidden = args[0] if args else kwargs["hidden_states"]
        original = kwargs
        if state.stage_kwargs is not None:
            kwargs = {**kwargs, **state.stage_kwargs}
        if state.capture is not None:  # the signal layer before this one has run: its projections are in
            state.signals = self._captured_signals(state)
        if index in self.signal_at:
            names = self.signal_at[index]
            if index in self.captured_at:
                last = last_positions(state.valid)
                state.capture = _Capture(index, names, kwargs["position_embeddings"], state.valid, last)
            else:
                state.signals = self._own_signals(index, layer, hidden, kwargs["position_embeddings"], names)
        if index in self.schedule:
            hidden, kwargs = self._drop(self.schedule.index(index), layer, hidden, original)
        if index >= 1:  # read once the prefill is through, not a sync per layer
            state.visual_counts.append(((state.image >= 0) & state.valid).sum(dim=1))
            state.token_counts.append(state.valid.sum(dim=1))
        if index == len(self.layers) - 1:
            state.visual_counts = torch.stack(state.visual_counts).tolist()
            state.token_counts = torch.stack(state.token_counts).tolist()
            self._maps = state.maps
            self._padded = [bool((order < 0).any()) for _, order in state.maps]  # read once, not per decode step
            self.finished = state
            self._prefill = None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _own_signals(
        self, index: int, layer: nn.Module, hidden: torch.Tensor, cos_sin: tuple, names: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """Signals at a drop layer's input, over the tokens it is about to drop: projected here."""
        state = self._prefill
        attn = layer.self_attn
        with torch.no_grad():
            normed = layer.input_layernorm(hidden)
            last = attn.q_proj(rows_at(normed, last_positions(state.valid))) if "last_row" in names else None
            return layer_signals(self.probes[index], attn.k_proj(normed), last, cos_sin, state.valid, names)

    def _capture_hook(self, index: int, part: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            state = self._prefill
            capture = state.capture if state is not None else None
            if capture is None or capture.index != index or getattr(capture, part) is not None:
                return
            if not torch.is_tensor(output) or output.shape[:2] != capture.valid.shape:
                return  # not the layer's own projection of its tokens (e.g. a user's hook projecting one row)
            if part == "keys":
                capture.keys = output.detach()
            else:
                capture.last_queries = rows_at(output.detach(), capture.last)

        return hook

    def _captured_signals(self, state: _Stages) -> dict[str, torch.Tensor]:
        capture, state.capture = state.capture, None
        if capture.keys is None or ("last_row" in capture.names and capture.last_queries is None):
            attn = self.layers[capture.index].self_attn
            self._prefill = None  # this prefill cannot go on: nothing of it may steer a later forward
            raise RuntimeError(
                f"vtc: decoder layer {capture.index}'s attention ({type(attn).__name__}) ran without calling its "
                "k_proj / q_proj on the layer's tokens, so the in-LLM signals could not be taken from it"
            )
        with torch.no_grad():
            probe, names = self.probes[capture.index], capture.names
            return layer_signals(probe, capture.keys, capture.last_queries, capture.cos_sin, capture.valid, names)

    def _drop(self, stage: int, layer: nn.Module, hidden: torch.Tensor, original: dict) -> tuple[torch.Tensor, dict]:
        """Choose the survivors (no autograd: a choice has no gradient), then gather them (autograd kept, so
        the layers before the drop still get gradients through the tokens that go on)."""
        handled = ("hidden_states", "position_ids", "attention_mask")  # a 2-D mask: flash attention's padding mask
        where = f"for {self.method.name!r} at decoder layer {self.schedule[stage]}"
        refuse_unknown_token_axes(original, hidden.shape[:2], handled, self.declared[stage], where)
        with torch.no_grad():
            source = self._survivors(stage, hidden)
        valid = source >= 0
        safe = source.clamp(min=0)
        hidden = rows_at(hidden, safe)
        hidden = torch.where(valid.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        state = self._prefill
        state.order = take(state.order, source, -1)
        state.image = take(state.image, source, -1)
        state.valid = take(state.valid, source, False)
        state.protected = take(state.protected, source, False)
        state.maps.append((self.schedule[stage], state.order))
        state.stage_kwargs = self._gather_prefill_kwargs(original, state.order, hidden.dtype)
        return hidden, {**original, **state.stage_kwargs}

    def _survivors(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L'] index of each surviving position in the current sequence (see source_index)."""
        state = self._prefill
        keep = state.valid & (state.image < 0)  # text survives
        final_norm = self.norm(hidden) if self.method.uses_hidden else None
        views: list[tuple[int, Stage]] = []  # (row, what the method sees) per image that loses tokens
        for b in range(hidden.shape[0]):
            row_images = state.image[b]
            visual_cols = (row_images >= 0).nonzero().squeeze(1)
            last_visual = int(visual_cols.max()) if visual_cols.numel() else -1
            text = ((row_images < 0) & state.valid[b]).nonzero().squeeze(1)
            text = text[text > last_visual]
            signals = {name: value[b] for name, value in state.signals.items()}
            for image_id in row_images[visual_cols].unique().tolist():
                positions = (row_images == image_id).nonzero().squeeze(1)
                target = state.targets[image_id][stage]
                if target >= positions.numel() and self.method.exact:
                    keep[b, positions] = True
                    continue
                protected = state.protected[b, positions]
                row_hidden = final_norm[b] if final_norm is not None else None
                views.append((b, Stage(stage, target, positions, text, signals, row_hidden, protected)))
        chosen = self.method.survivors([view for _, view in views]) if views else []
        for (b, view), kept in zip(views, chosen, strict=True):
            keep[b, view.visual[kept]] = True
        return source_index(keep)

    # -- gathering the decoder's shared arguments ---------------------------------------------------

    def _gather_prefill_kwargs(self, kwargs: dict, order: torch.Tensor, dtype: torch.dtype) -> dict:
        b, short = order.shape
        valid = order >= 0
        safe = order.clamp(min=0)
        out: dict[str, Any] = {}
        positions = kwargs.get("position_ids")
        if positions is not None:
            lead = positions.shape[:-2]
            positions = positions.expand(*lead, b, positions.shape[-1])
            out["position_ids"] = positions.gather(-1, safe.expand(*lead, b, short))
        embeddings = kwargs.get("position_embeddings")
        if embeddings is not None:
            out["position_embeddings"] = tuple(gather_tokens(t, safe) for t in embeddings)
        if kwargs.get("cache_position") is not None:  # transformers 4.x
            out["cache_position"] = torch.arange(short, device=order.device)
        out["attention_mask"] = self._gather_mask(kwargs.get("attention_mask"), safe, safe, valid, valid, dtype)
        return out

    def _gather_mask(
        self,
        mask: torch.Tensor | None,
        rows: torch.Tensor | None,
        cols: torch.Tensor,
        row_valid: torch.Tensor | None,
        col_valid: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """The decoder's mask re-indexed: queries at ``rows`` (None = keep the query dim), keys at ``cols``."""
        b, keys = cols.shape
        if mask is None:
            if bool(col_valid.all()) and (row_valid is None or bool(row_valid.all())):
                return None
            queries = keys if rows is not None else 1
            allowed = torch.ones(b, 1, queries, keys, dtype=torch.bool, device=cols.device)
            if rows is not None:
                allowed = allowed.tril()
            return self._finish_mask(allowed & col_valid[:, None, None, :], row_valid, dtype, boolean=None)
        if mask.ndim == 2:  # flash attention: a 2-D padding mask
            return mask.gather(1, cols) * col_valid.to(mask.dtype)
        mask = mask.expand(b, *mask.shape[1:])
        if rows is not None:
            mask = mask.gather(2, rows[:, None, :, None].expand(b, mask.shape[1], rows.shape[1], mask.shape[3]))
        mask = mask.gather(3, cols[:, None, None, :].expand(b, mask.shape[1], mask.shape[2], keys))
        boolean = mask.dtype == torch.bool
        allowed = mask if boolean else mask == 0
        return self._finish_mask(allowed & col_valid[:, None, None, :], row_valid, mask.dtype, boolean)

    def _finish_mask(
        self, allowed: torch.Tensor, row_valid: torch.Tensor | None, dtype: torch.dtype, boolean: bool | None
    ) -> torch.Tensor:
        if row_valid is not None:  # padding queries attend to themselves only, so no row is fully masked
            eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
            allowed = allowed | (eye & ~row_valid[:, None, :, None])
        if boolean is None:  # built from scratch: the format this attention implementation expects
            boolean = getattr(self.config, "_attn_implementation", "sdpa") != "eager"
        if boolean:
            return allowed
        floating = dtype if dtype.is_floating_point else torch.float32
        zero = torch.zeros((), dtype=floating, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(floating).min)

    def _decode_kwargs(self, index: int, kwargs: dict) -> dict:
        stage = max(i for i, (first, _) in enumerate(self._maps) if first <= index)  # this layer's stage
        order = self._maps[stage][1]
        mask = kwargs.get("attention_mask")
        if mask is None and not self._padded[stage]:
            return kwargs  # every cached token is real: nothing to mask, as the decoder says
        cache = kv_cache(kwargs)
        total = mask.shape[-1] if mask is not None else cache.get_seq_length()  # layer 0: prompt + new tokens
        memo = self._decode_mask
        if memo is not None and memo[0] is mask and memo[1] == (stage, total):
            return {**kwargs, "attention_mask": memo[2]}  # the layers of a stage share one step's mask
        new = torch.arange(self._lm_length, total, device=order.device).expand(order.shape[0], -1)
        cols = torch.cat([order, new], dim=1)
        valid = cols >= 0
        dtype = mask.dtype if mask is not None and mask.dtype.is_floating_point else torch.float32
        shortened = self._gather_mask(mask, None, cols.clamp(min=0), None, valid, dtype)
        self._decode_mask = (mask, (stage, total), shortened)
        return {**kwargs, "attention_mask": shortened}
