"""Attention probes against each supported class's eager attention weights, and the refusal of any other class.

The Qwen vision probe (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) is checked against the vision blocks' eager weights in
tests/adapters/test_qwen2_vl.py::test_attention_received_equals_the_models_attention_weights.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.llama.modeling_llama import LlamaAttention

import vtc
from tests.helpers import count_hooks
from vtc.probes import ClsRow, DecoderAttention, MultiheadClsRow, VisionReceived, probe
from vtc.tiny import tiny_llava, tiny_llava_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl, tiny_qwen_inputs

TEXT = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}


def causal_lm(config):
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1, so that a skipped QK-norm shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def language_layers(model):
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    return inner.layers


def attention_layers_inputs(layers):
    """Record each decoder attention module's input (normed hidden states and rotary cos / sin)."""
    captured = {}

    def record(i):
        return lambda m, a, kw: captured.__setitem__(i, (kw["hidden_states"], kw["position_embeddings"]))

    hooks = [layer.self_attn.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return captured, hooks


DECODERS = {
    "llama": lambda: causal_lm(LlamaConfig(**TEXT, **HEADS)),
    "mistral": lambda: causal_lm(MistralConfig(**TEXT, **HEADS)),
    "qwen2": lambda: causal_lm(Qwen2Config(**TEXT, **HEADS)),
    "qwen3 (QK-norm)": lambda: causal_lm(Qwen3Config(**TEXT, **HEADS, head_dim=8)),
    "qwen3_moe (QK-norm; InternVL3.5's MoE LMs)": lambda: causal_lm(
        Qwen3MoeConfig(**TEXT, **HEADS, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    ),
    "qwen2_vl (M-RoPE)": lambda: tiny_qwen2_vl(attn_implementation="eager"),
    "qwen2_5_vl (M-RoPE)": lambda: tiny_qwen2_5_vl(attn_implementation="eager"),
    "qwen3_vl (QK-norm, interleaved M-RoPE)": lambda: tiny_qwen3_vl(attn_implementation="eager"),
    "qwen3_vl_moe (QK-norm, interleaved M-RoPE)": lambda: tiny_qwen3_vl(moe=True, attn_implementation="eager"),
}


@pytest.mark.parametrize("family", list(DECODERS))
def test_decoder_probe_equals_the_eager_attention_weights(family):
    """M-RoPE families get an image, so that the t / h / w positions differ and a wrong section split shows."""
    model = DECODERS[family]()
    layers = language_layers(model)
    if "M-RoPE" in family:
        inputs = tiny_qwen_inputs(model, image_grids=(((8, 12),),), seed=1)
    else:
        inputs = {"input_ids": torch.randint(10, 60, (2, 9), generator=torch.Generator().manual_seed(1))}
    captured, hooks = attention_layers_inputs(layers)
    try:
        with torch.no_grad():
            weights = model(**inputs, output_attentions=True).attentions
    finally:
        for hook in hooks:
            hook.remove()
    assert len(weights) == len(layers)
    for i, expected in enumerate(weights):  # [B, H, L, L]
        hidden, (cos, sin) = captured[i]
        attention = probe(DecoderAttention, layers[i].self_attn, "a test")
        queries = attention.queries(hidden, cos, sin)
        keys = attention.keys(hidden, cos, sin).repeat_interleave(attention.heads // attention.kv_heads, dim=1)
        logits = queries.float() @ keys.float().transpose(-1, -2) * attention.scaling
        future = torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1)
        probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
        torch.testing.assert_close(probs, expected.float(), rtol=1e-5, atol=1e-6)


def test_the_qk_norm_is_part_of_the_scores():
    """Without Qwen3's q_norm / k_norm the rows differ: the test above would catch a probe that skipped them."""
    model = DECODERS["qwen3 (QK-norm)"]()
    layer = language_layers(model)[0]
    hidden = torch.randn(1, 5, TEXT["hidden_size"])
    cos, sin = model.model.rotary_emb(hidden, torch.arange(5).unsqueeze(0))
    attention = DecoderAttention(layer.self_attn)
    with_norm = attention.keys(hidden, cos, sin)
    layer.self_attn.k_norm = torch.nn.Identity()
    assert not torch.allclose(with_norm, attention.keys(hidden, cos, sin))


@pytest.mark.parametrize("layers", [2, 4])
def test_cls_probe_equals_clip_eager_attention_weights(layers):
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, image_size=56,
        patch_size=14, attn_implementation="eager",
    )  # fmt: skip
    tower = CLIPVisionModel(config).eval()
    encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
    rows = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: rows.__setitem__(i, ClsRow(m).row(kw["hidden_states"])), with_kwargs=True
        )
        for i, layer in enumerate(encoder_layers)
    ]
    try:
        with torch.no_grad():
            out = tower(torch.randn(2, 3, 56, 56), output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    for i, weights in enumerate(out.attentions):
        torch.testing.assert_close(rows[i], weights[:, :, 0].mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cls_probe_equals_internvit_eager_attention_weights(qk_norm):
    """InternViT (InternVL's tower): the same [CLS] row, with its optional QK-norm over the whole width (6B tower)."""
    from vtc.tiny import tiny_internvl

    tower = tiny_internvl(attn_implementation="eager", use_qk_norm=qk_norm).model.vision_tower
    rows, weights = {}, {}
    hooks = []
    for i, layer in enumerate(tower.encoder.layer):
        attention = layer.attention
        assert isinstance(attention.q_norm, torch.nn.Identity) != qk_norm
        hooks.append(attention.register_forward_pre_hook(lambda m, a, i=i: rows.__setitem__(i, ClsRow(m).row(a[0]))))
        hooks.append(attention.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1])))
    try:
        with torch.no_grad():
            tower(pixel_values=torch.randn(2, 3, 112, 112))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(rows) == len(weights) == 3
    for i, weight in weights.items():
        torch.testing.assert_close(rows[i], weight[:, :, 0].mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch, side", [(2, 4), (3, 7)])
def test_received_probe_equals_siglip_eager_attention_weights(batch, side):
    """SigLIP (LLaVA-OneVision's tower): the column means of every layer's eager weights, over queries and heads."""
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=14 * side,
        patch_size=14, vision_use_head=False, attn_implementation="eager",
    )  # fmt: skip
    tower = SiglipVisionModel(config).eval()
    encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
    received = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: received.__setitem__(i, VisionReceived(m).received(kw["hidden_states"])),
            with_kwargs=True,
        )
        for i, layer in enumerate(encoder_layers)
    ]
    try:
        with torch.no_grad():
            out = tower(torch.randn(batch, 3, 14 * side, 14 * side), output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(out.attentions) == len(encoder_layers)
    for i, weights in enumerate(out.attentions):  # [B, H, T, T]
        assert weights.shape[-1] == side * side  # no [CLS] token
        torch.testing.assert_close(received[i], weights.mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)
        assert not torch.allclose(received[i], weights[:, :, 0].mean(1))  # not one query's row


class PatchedAttention(LlamaAttention):
    """A user's own attention class: vtc has no probe for it."""


def test_an_attention_class_without_a_probe_is_refused_at_attach_time():
    model = tiny_llava(text_layers=4)
    for layer in model.model.language_model.layers:
        layer.self_attn.__class__ = PatchedAttention
    inputs = tiny_llava_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = count_hooks(model)
    for method in ("fastv", "pdrop", "dart_llm"):
        with pytest.raises(ValueError, match=r"vtc cannot compute the in-LLM signals of .*PatchedAttention"):
            vtc.compress(model, method, keep=4)
        assert count_hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    # Pre-LLM methods do not score the language model's attention: they still attach.
    with vtc.compress(model, "divprune", keep=4) as handle:
        model(**inputs)
    assert handle.last_kept[0].numel() == 4


def test_the_refusal_names_the_supported_classes():
    module = PatchedAttention(LlamaConfig(**TEXT, **HEADS), layer_idx=0)
    with pytest.raises(ValueError, match=r"knows \['LlamaAttention', 'MistralAttention'.*add a probe in vtc/probes.py"):
        probe(DecoderAttention, module, "a test")


@pytest.mark.parametrize("same_dims", [True, False])
def test_multihead_probe_equals_torch_attention_weights(same_dims):
    """open_clip's towers use torch's nn.MultiheadAttention (vtc.aux_clip)."""
    torch.manual_seed(0)
    kdim = None if same_dims else 24
    attn = torch.nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=kdim).eval()
    query, key = torch.randn(2, 7, 32), torch.randn(2, 7, kdim or 32)
    _, weights = attn(query, key, key, need_weights=True)  # averaged over heads
    row = probe(MultiheadClsRow, attn, "a test").row(query, key)
    torch.testing.assert_close(row, weights[:, 0], rtol=1e-5, atol=1e-6)


def test_a_vision_attention_class_without_a_probe_is_refused_at_attach_time():
    from transformers.models.clip.modeling_clip import CLIPAttention

    class OwnVisionAttention(CLIPAttention):
        pass

    model = tiny_llava()
    tower = model.model.vision_tower
    for layer in getattr(tower, "vision_model", tower).encoder.layers:
        layer.self_attn.__class__ = OwnVisionAttention
    hooks = count_hooks(model)
    for method in ("fastervlm", "vtc_cls"):
        with pytest.raises(ValueError, match=r"the \[CLS\] attention of the vision tower on .*OwnVisionAttention"):
            vtc.compress(model, method, keep=4)
        assert count_hooks(model) == hooks
    with vtc.compress(model, "dart", keep=4) as handle:  # needs no vision attention
        model(**tiny_llava_inputs(model))
    assert handle.last_kept[0].numel() == 4


@pytest.mark.skipif(not hasattr(transformers, "Qwen3_5ForConditionalGeneration"), reason="Qwen3.5 needs transformers 5")
def test_the_gated_qwen3_5_attention_has_no_decoder_probe():
    """Qwen3.5's full-attention layers project a query and an output gate together (q_proj is twice as wide): a
    Llama-style probe would score them wrong, so there is none (its in-LLM methods are refused earlier, at attach)."""
    from vtc.tiny import tiny_qwen3_5

    model = tiny_qwen3_5()
    attention = next(layer.self_attn for layer in model.model.language_model.layers if hasattr(layer, "self_attn"))
    assert attention.q_proj.out_features == 2 * model.config.text_config.num_attention_heads * attention.head_dim
    with pytest.raises(ValueError, match=r"cannot compute a test on attention class .*Qwen3_5Attention"):
        probe(DecoderAttention, attention, "a test")
