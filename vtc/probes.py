"""Attention probes: the attention rows vtc needs, from an attention module's input or its projections' outputs.

vtc never asks a model for attention maps (only eager attention returns them, as [L, L] per layer and head). A hook
on the attention module recomputes the one row, or the column means, a method needs, with the module's own
projections; a decoder layer that drops nothing hands over the key and query projections it computes anyway
(``DecoderAttention.rotated_keys`` / ``rotated_queries`` take those outputs). That reads the module's internals
(fused or separate projections, QK-norm, which rotary embedding), so each supported attention implementation has a
probe, found by the module's class: an attention class without one is refused when vtc attaches, never scored with
the wrong arithmetic. Each probe is tested against its classes' eager attention weights (tests/test_probes.py;
open_clip's in tests/test_aux_clip.py).
"""

from __future__ import annotations

import sys
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn


class Probe:
    """Binds one attention module; a subclass lists the transformers attention classes whose internals it reads."""

    classes: ClassVar[tuple[str, ...]]
    modules: ClassVar[tuple[str, ...]] = ("transformers.models.",)  # where those classes are defined

    def __init__(self, attn: nn.Module):
        self.attn = attn


P = TypeVar("P", bound=Probe)


def probe(kind: type[P], attn: nn.Module, purpose: str) -> P:
    """``kind`` bound to ``attn``, or a ValueError saying which attention classes ``kind`` supports."""
    cls = type(attn)
    if cls.__name__ in kind.classes and cls.__module__.startswith(kind.modules):
        return kind(attn)
    raise ValueError(
        f"vtc cannot compute {purpose} on attention class {cls.__module__}.{cls.__name__}: it recomputes attention "
        f"rows with a probe per attention implementation, and here it knows {list(kind.classes)} (defined in "
        f"{kind.modules[0].rstrip('.')}). "
        "Choose a method that needs no attention scores (e.g. 'divprune', 'dart', 'uniform'), or add a probe in "
        "vtc/probes.py"
    )


class ClsRow(Probe):
    """CLIP-style vision attention (q_proj, k_proj, num_heads, head_dim, scale; no rotary embedding); InternViT's
    adds an optional QK-norm over the whole width (``q_norm`` / ``k_norm``, identities when off)."""

    classes = ("CLIPAttention", "InternVLVisionAttention")

    def row(self, hidden: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the first ([CLS]) query over all keys, mean over heads: [B, T, C] -> [B, T] fp32.

        Row 0 of the module's eager attention weights, at O(T * C) cost instead of O(T^2 * C). ``hidden`` is the
        module's input (already layer-normed)."""
        attn = self.attn
        heads, head_dim = attn.num_heads, attn.head_dim
        query, keys = attn.q_proj(hidden[:, :1]), attn.k_proj(hidden)
        if hasattr(attn, "q_norm"):
            query, keys = attn.q_norm(query), attn.k_norm(keys)
        return cls_row(query, keys, heads, head_dim, attn.scale)


def cls_row(query: torch.Tensor, keys: torch.Tensor, heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """Softmax attention of one query over all keys, mean over heads, in fp32: [B, 1, C], [B, T, C] -> [B, T].
    Shared by :class:`ClsRow` and vtc's vLLM plugin (vtc.vllm_models.ClsRows)."""
    b, t, _ = keys.shape
    query = query.reshape(b, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, d]
    keys = keys.reshape(b, t, heads, head_dim).transpose(1, 2)  # [B, H, T, d]
    logits = query.float() @ keys.float().transpose(-1, -2) * scale  # [B, H, 1, T]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


class MultiheadClsRow(Probe):
    """torch's nn.MultiheadAttention (open_clip's vision towers, for vtc.aux_clip)."""

    classes = ("MultiheadAttention",)
    modules = ("torch.nn.",)

    def row(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the first query token over all keys, mean over heads: [B, L, D] -> [B, L] fp32.

        Equal to row 0 of ``attn(query, key, key, need_weights=True)[1]`` (batch-first inputs). The key
        projection is folded into the query: per head, q_h . (W_kh x + b_kh) = (W_kh^T q_h) . x + q_h . b_kh,
        and the last term is the same for every key, which softmax ignores. Cost O(L * D * heads), without
        projecting the keys (O(L * D^2)) or forming the [L, L] matrix (O(L^2 * D)).
        """
        attn = self.attn
        b = query.shape[0]
        heads = attn.num_heads
        head_dim = attn.embed_dim // heads
        if attn._qkv_same_embed_dim:
            w_q = attn.in_proj_weight[: attn.embed_dim]
            w_k = attn.in_proj_weight[attn.embed_dim : 2 * attn.embed_dim]
        else:
            w_q, w_k = attn.q_proj_weight, attn.k_proj_weight
        b_q = None if attn.in_proj_bias is None else attn.in_proj_bias[: attn.embed_dim].float()
        q = F.linear(query[:, 0].float(), w_q.float(), b_q).view(b, heads, head_dim) * head_dim**-0.5  # [B, H, d]
        folded = torch.einsum("bhd,hdk->bhk", q, w_k.float().view(heads, head_dim, -1))  # [B, H, Dk]
        logits = torch.einsum("bhk,blk->bhl", folded, key.float())  # [B, H, L]
        return logits.softmax(dim=-1).mean(dim=1)


class VisionReceived(Probe):
    """SigLIP vision attention (q_proj, k_proj, num_heads, head_dim, scale; no rotary embedding, no [CLS] token)."""

    classes = ("SiglipAttention",)

    def received(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean softmax attention each token receives from all queries of its image, mean over heads: [B, T, C] ->
        [B, T] fp32 (the column means of the module's eager attention weights). ``hidden`` is the module's input
        (already layer-normed); the vision tower attends without a mask. O(T^2) per image, in blocks of queries so
        that memory stays O(B * heads * block * T)."""
        attn = self.attn
        b, t, _ = hidden.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        queries = attn.q_proj(hidden).view(b, t, heads, head_dim).transpose(1, 2).float()  # [B, H, T, d]
        keys = attn.k_proj(hidden).view(b, t, heads, head_dim).transpose(1, 2).float()
        received = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)
        block = max(1, (1 << 24) // max(1, b * heads * t))
        for first in range(0, t, block):
            logits = queries[:, :, first : first + block] @ keys.transpose(-1, -2) * attn.scale  # [B, H, block, T]
            received += logits.softmax(dim=-1).sum(dim=(1, 2))
        return received / (t * heads)


class QwenVisionReceived(Probe):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 vision attention (fused qkv, 2-D rotary embedding, chunks by
    ``cu_seqlens``)."""

    classes = (
        "VisionAttention",
        "Qwen2_5_VLVisionAttention",
        "Qwen3VLVisionAttention",
        "Qwen3VLMoeVisionAttention",
        "Qwen3_5VisionAttention",
        "Qwen3_5MoeVisionAttention",
    )

    def received(self, hidden: torch.Tensor, cos_sin: tuple, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """[seq] mean softmax attention each patch receives from the queries of its own chunk (image), mean over
        heads, from the module's input ``hidden`` [seq, C] (already normed) and rotary ``cos_sin``. fp32; O(n^2)
        per chunk, in blocks of queries so that memory stays O(block * n)."""
        attn = self.attn
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        seq = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotate(q, k, *cos_sin)
        q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [H, seq, d]
        received = torch.zeros(seq, dtype=torch.float32, device=hidden.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            n = end - start
            block = max(1, (1 << 24) // max(1, attn.num_heads * n))
            keys = k[:, start:end]
            for first in range(start, end, block):
                last = min(end, first + block)
                probs = (q[:, first:last] @ keys.transpose(1, 2) * attn.scaling).softmax(dim=-1)  # [H, b, n]
                received[start:end] += probs.sum(dim=(0, 1))
            received[start:end] /= n * attn.num_heads
        return received


class DecoderAttention(Probe):
    """Llama-style decoder self-attention: q_proj / k_proj on the layer-normed input, optional QK-norm on the head
    dim (Qwen3), then the module's own rotary embedding (1-D RoPE, or Qwen2-VL's M-RoPE)."""

    classes = (
        "LlamaAttention",
        "MistralAttention",
        "Qwen2Attention",
        "Qwen2VLAttention",
        "Qwen2_5_VLAttention",
        "Qwen3Attention",
        "Qwen3MoeAttention",
        "Qwen3VLTextAttention",
        "Qwen3VLMoeTextAttention",
    )

    def __init__(self, attn: nn.Module):
        super().__init__(attn)
        config = attn.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling

    def keys(self, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[B, L, C] layer-normed input, the layer's rotary (cos, sin) -> [B, kv_heads, L, d] rotated keys."""
        return self.rotated_keys(self.attn.k_proj(normed), cos, sin)

    def queries(self, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[B, l, C] (some positions' layer-normed input) and their (cos, sin) -> [B, heads, l, d] rotated queries."""
        return self.rotated_queries(self.attn.q_proj(normed), cos, sin)

    def rotated_keys(self, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The same from ``k_proj``'s output [B, L, kv_heads * d] (one the module computed itself)."""
        return self._shaped(projected, getattr(self.attn, "k_norm", None), self.kv_heads, cos, sin)

    def rotated_queries(self, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The same from ``q_proj``'s output [B, l, heads * d]."""
        return self._shaped(projected, getattr(self.attn, "q_norm", None), self.heads, cos, sin)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The module's own rotary embedding applied to ``x`` [B, H, L, d]."""
        module = sys.modules[type(self.attn).__module__]
        multimodal = getattr(module, "apply_multimodal_rotary_pos_emb", None)
        nothing = x[:, :0]  # the function rotates a query and a key: here the key has no heads, so costs nothing
        if multimodal is not None and cos.ndim == 4:  # Qwen2-VL's M-RoPE on transformers 4.x
            return multimodal(x, nothing, cos, sin, self.attn.rope_scaling["mrope_section"])[0]
        return module.apply_rotary_pos_emb(x, nothing, cos, sin)[0]

    def _shaped(self, projected, norm, heads, cos, sin) -> torch.Tensor:
        b, length, _ = projected.shape
        x = projected.view(b, length, heads, self.head_dim)
        if norm is not None:
            x = norm(x)
        return self.rotate(x.transpose(1, 2), cos, sin)
