"""Removing visual tokens from the language model's input, and decoding over the KV cache that leaves.

A forward pre-hook on the language model (the decoder stack) receives ``inputs_embeds``, ``attention_mask``,
``position_ids`` and the KV cache (``past_key_values``; ``cache`` from transformers 5.24) as keyword arguments.
:func:`drop` removes the dropped visual tokens and keeps the ORIGINAL position ids of the survivors; during decoding
generate() keeps passing a full-length attention mask, which :func:`remap_decode` maps onto the shortened cache.
Family-independent: the adapters (vtc.adapters) decide what to keep.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Dropped:
    """How the prefill sequence was shortened, kept to remap masks and positions while decoding."""

    source: torch.Tensor  # [B, L'] index of each new position in the original sequence, -1 = padding
    prefill_mask: torch.Tensor  # [B, L'] attention mask of the shortened prefill
    original_length: int  # L0
    last_position: torch.Tensor  # [B] the largest ORIGINAL position id of each row's prompt
    cache: weakref.ref | None = None
    # positions="compact": [B] tokens removed from each row, subtracted from later positions; None: original positions
    removed: torch.Tensor | None = None


def declared_arguments(module: nn.Module) -> frozenset[str]:
    """The keyword arguments ``module``'s forward names (not those a ``**kwargs`` would swallow)."""
    parameters = inspect.signature(module.forward).parameters.values()
    return frozenset(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def refuse_unknown_token_axes(
    kwargs: dict, shape: tuple[int, int], handled: tuple[str, ...], declared: frozenset[str] | None, where: str
) -> None:
    """Raise if an argument the module declares (``declared``; None: any) has a [B, L] token axis of ``shape`` and
    is not ``handled``: dropping tokens would leave it at its full length, misaligned with them."""
    for name, value in kwargs.items():
        if name in handled or (declared is not None and name not in declared):
            continue
        if torch.is_tensor(value) and value.ndim >= 2 and tuple(value.shape[:2]) == tuple(shape):
            raise ValueError(
                f"vtc cannot drop tokens {where}: its argument {name!r} has a token axis {tuple(value.shape)} that "
                "vtc does not shorten (a family names such arguments in Adapter.token_aligned)"
            )


def drop(
    kwargs: dict,
    embeds: torch.Tensor,
    keep: torch.Tensor,
    token_aligned: tuple[str, ...] = (),
    declared: frozenset[str] | None = None,
    compact: bool = False,
) -> tuple[dict, Dropped]:
    """The language model's keyword arguments with the tokens where ``keep`` [B, L] is False removed, re-padded on
    the left when rows keep different counts, the survivors at their ORIGINAL positions (``compact``: each position
    less the tokens removed before it, as if they had never been in the prompt; 1-D positions only); and how, for
    decoding.

    ``embeds`` replaces ``kwargs["inputs_embeds"]`` (merging methods write into it). ``token_aligned`` names further
    arguments with a [B, L, ...] token axis to shorten alike; any other argument the language model declares
    (``declared``, see :func:`declared_arguments`) with that axis is refused."""
    b, length, _ = embeds.shape
    handled = ("inputs_embeds", "attention_mask", "position_ids", *token_aligned)
    refuse_unknown_token_axes(kwargs, (b, length), handled, declared, "before the language model")
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
    source = source_index(keep)  # [B, L']
    valid = source >= 0
    safe = source.clamp(min=0)
    new_embeds = embeds.gather(1, safe.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    new_embeds = new_embeds * valid.unsqueeze(-1).to(new_embeds.dtype)
    new_mask = mask.gather(1, safe) * valid.to(mask.dtype)
    lead = positions.shape[:-2]  # () for [B, L], (3,) for M-RoPE [3, B, L]
    positions = positions.expand(*lead, b, length)
    new_positions = positions.gather(-1, safe.expand(*lead, -1, -1)) * valid.to(positions.dtype)
    last_position = new_positions.reshape(-1, b, new_positions.shape[-1]).amax(dim=(0, 2))
    removed = None
    if compact:
        if lead:
            raise ValueError("positions='compact' renumbers 1-D position ids; these are multi-dimensional (M-RoPE)")
        removed_before = (~keep).long().cumsum(1)  # at a kept token: the tokens removed before it
        new_positions = new_positions - take(removed_before, source)
        removed = removed_before[:, -1]

    out = dict(kwargs)
    out["inputs_embeds"] = new_embeds
    # Always explicit: gapped position ids without a mask are read as packed sequences.
    out["attention_mask"] = new_mask
    out["position_ids"] = new_positions
    for name in token_aligned:
        value = kwargs.get(name)
        if value is not None:
            index = safe.view(b, -1, *([1] * (value.ndim - 2))).expand(-1, -1, *value.shape[2:])
            kept = value.gather(1, index)
            out[name] = torch.where(valid.view(b, -1, *([1] * (value.ndim - 2))), kept, torch.zeros_like(kept))
    if kwargs.get("cache_position") is not None:  # transformers 4.x indexes the cache with it
        out["cache_position"] = torch.arange(source.shape[1], device=embeds.device)
    cache = kv_cache(kwargs)
    reference = weakref.ref(cache) if cache is not None else None
    return out, Dropped(source, new_mask, length, last_position, reference, removed)


def remap_decode(kwargs: dict, dropped: Dropped, past: int, q_len: int) -> dict:
    """A decode step's keyword arguments, its full-length mask and default positions mapped onto the shortened cache
    (``past`` tokens in it, ``q_len`` new ones)."""
    short = dropped.source.shape[1]
    new_tokens = past - short + q_len  # tokens after the prefill, this step's included
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    new_turn = (
        "a new turn cannot reuse a compressed cache (given the whole conversation and this cache, generate() "
        "re-feeds history the cache holds in compressed form). Start the turn from an empty cache: pass the "
        "whole conversation without past_key_values"
    )
    if positions is not None and q_len > 1:  # a new turn re-feeds more than one token (a decode step: one)
        first = positions.reshape(-1, *positions.shape[-2:])[..., 0]  # [rows, B] the first new token's positions
        if first.shape[0] == 4:  # transformers 5's Qwen rows: row 0 is the token's index in the whole sequence
            restarts = first[0] < dropped.original_length
        else:
            restarts = first.amax(dim=0) <= dropped.last_position
        if bool(restarts.any()):
            raise ValueError(
                f"this forward continues a KV cache that vtc shortened from {dropped.original_length} to "
                f"{short} prompt tokens, but its positions restart inside that prompt: {new_turn}"
            )
    if mask is not None and (mask.ndim != 2 or mask.shape[1] != dropped.original_length + new_tokens):
        raise ValueError(
            f"during decoding vtc expects the full 2-D attention_mask of length "
            f"{dropped.original_length + new_tokens} (prompt + generated), got shape {tuple(mask.shape)}. If "
            f"this forward starts a new turn over the cache of an earlier one: {new_turn}"
        )
    out = dict(kwargs)
    if mask is None:
        if not bool(dropped.prefill_mask.all()):
            prefill = dropped.prefill_mask
            tail = torch.ones(prefill.shape[0], new_tokens, dtype=prefill.dtype, device=prefill.device)
            out["attention_mask"] = torch.cat([dropped.prefill_mask, tail], dim=1)
    else:
        valid = dropped.source >= 0
        prefix = mask.gather(1, dropped.source.clamp(min=0)) * valid.to(mask.dtype)
        out["attention_mask"] = torch.cat([prefix, mask[:, dropped.original_length :]], dim=1)
    if kwargs.get("cache_position") is not None:  # transformers 4.x: slots in the shortened cache
        out["cache_position"] = torch.arange(past, past + q_len, device=dropped.source.device)
    if positions is None:
        # What the uncompressed model would use: continue after the ORIGINAL prompt length.
        start = dropped.original_length + past - short
        positions = torch.arange(start, start + q_len, device=dropped.source.device).unsqueeze(0)
        out["position_ids"] = positions
    if dropped.removed is not None:  # compact: the prompt is shorter by the removed tokens, row by row
        out["position_ids"] = positions - dropped.removed.to(positions.device).unsqueeze(1)
    return out


def source_index(keep: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B, L'] index of each kept position, right-aligned, -1 for left padding."""
    counts = keep.sum(dim=1)
    short = int(counts.max()) if keep.numel() else 0
    rank_from_right = keep.flip(1).cumsum(1).flip(1)
    column = short - rank_from_right
    source = torch.full((keep.shape[0], short), -1, dtype=torch.long, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    source[rows, column[rows, cols]] = cols
    return source


def take(values: torch.Tensor, index: torch.Tensor, fill: int | float | bool = 0) -> torch.Tensor:
    """values [B, L] gathered at index [B, L'] (-1 -> ``fill``)."""
    out = values.gather(1, index.clamp(min=0))
    return out.masked_fill(index < 0, fill)


def kv_cache(kwargs: dict) -> Any:
    """The KV cache a forward was called with: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` from 5.24 on, ``output.past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
