"""Arguments of the language model with a token axis: shortened with the tokens when the family declares them,
refused when it does not (keeping their full length would misalign them with the tokens)."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.llm.prefill import drop
from vtc.tiny import tiny_llava, tiny_llava_inputs


def test_a_declared_token_aligned_argument_is_shortened_with_the_tokens():
    embeds = torch.randn(2, 5, 3)
    extra = torch.arange(2 * 5 * 4, dtype=torch.float32).view(2, 5, 4)
    flags = torch.ones(2, 5, dtype=torch.bool)
    keep = torch.tensor([[True, False, True, True, False], [True, True, True, True, False]])
    kwargs = {"inputs_embeds": embeds, "extra": extra, "flags": flags}
    out, dropped = drop(kwargs, embeds, keep, token_aligned=("extra", "flags"))
    # Row 0 keeps 3 tokens, row 1 keeps 4: row 0 is left-padded by one.
    assert out["extra"].shape == (2, 4, 4) and out["flags"].shape == (2, 4)
    assert torch.equal(out["extra"][0, 1:], extra[0, [0, 2, 3]]) and not out["extra"][0, 0].any()
    assert torch.equal(out["extra"][1], extra[1, :4])
    assert out["flags"].tolist() == [[False, True, True, True], [True, True, True, True]]
    assert torch.equal(out["inputs_embeds"][1], embeds[1, :4])
    assert dropped.source.tolist() == [[-1, 0, 2, 3], [0, 1, 2, 3]]


def test_an_undeclared_token_aligned_argument_is_refused():
    embeds = torch.randn(1, 4, 3)
    keep = torch.tensor([[True, False, True, True]])
    with pytest.raises(ValueError, match=r"argument 'visual_pos_masks' has a token axis \(1, 4\)"):
        drop({"inputs_embeds": embeds, "visual_pos_masks": torch.ones(1, 4, dtype=torch.bool)}, embeds, keep)


def declaring(module, name):
    """Make ``module``'s forward declare (and ignore) a keyword argument ``name``, as Qwen3-VL's text model declares
    ``visual_pos_masks``."""
    inner = module.forward

    def forward(*args, visual_pos_masks=None, **kwargs):
        return inner(*args, **kwargs)

    assert name == "visual_pos_masks"
    module.forward = forward


def add_mask(module, args, kwargs):
    hidden = kwargs.get("inputs_embeds", kwargs.get("hidden_states", args[0] if args else None))
    return args, {**kwargs, "visual_pos_masks": torch.ones(hidden.shape[:2], dtype=torch.bool)}


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_the_model_refuses_an_undeclared_token_aligned_argument(method):
    """E.g. Qwen3-VL's visual_pos_masks reaching an adapter that does not shorten it: a clear error, not a
    language model that reads a mask of the wrong length."""
    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    module = model.model.language_model if method == "divprune" else model.model.language_model.layers[1]
    declaring(module, "visual_pos_masks")
    with vtc.compress(model, method, keep=4, **({"layer": 1} if method == "fastv" else {})):
        extra = module.register_forward_pre_hook(add_mask, with_kwargs=True, prepend=True)
        try:
            with pytest.raises(ValueError, match="'visual_pos_masks' has a token axis"):
                model(**inputs)
        finally:
            extra.remove()


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_a_token_aligned_argument_the_module_does_not_declare_passes(method):
    """An extra [B, L] keyword that the module's forward only swallows in **kwargs (a processor's token_type_ids)
    does not reach its computation: vtc lets it through, as the model does without vtc."""
    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    module = model.model.language_model if method == "divprune" else model.model.language_model.layers[1]
    options = {"layer": 1} if method == "fastv" else {}
    with torch.no_grad(), vtc.compress(model, method, keep=4, **options):
        expected = model(**inputs).logits
        extra = module.register_forward_pre_hook(add_mask, with_kwargs=True, prepend=True)
        try:
            assert torch.equal(model(**inputs).logits, expected)
        finally:
            extra.remove()


def test_in_llm_dropping_takes_flash_attentions_2d_padding_mask():
    """flash_attention_2 hands the decoder layers a 2-D [B, L] padding mask: it is shortened, not refused. Emulated
    on CPU by an attention implementation with transformers' own flash-attention mask function."""
    masking = pytest.importorskip("transformers.masking_utils")
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not hasattr(masking, "AttentionMaskInterface"):
        pytest.skip("this transformers has no pluggable mask functions")

    def padding_mask_attention(module, query, key, value, attention_mask, **kwargs):
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril(key.shape[2] - query.shape[2])
        if attention_mask is not None:  # [B, S] over keys, as flash attention takes it
            causal = causal[None, None] & attention_mask.bool()[:, None, None, -key.shape[2] :]
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, causal, is_causal=False, **kwargs)

    AttentionInterface.register("vtc_padding_mask_test", padding_mask_attention)
    masking.AttentionMaskInterface.register("vtc_padding_mask_test", masking.flash_attention_mask)
    model = tiny_llava()
    model.config._attn_implementation = model.config.text_config._attn_implementation = "vtc_padding_mask_test"
    inputs = tiny_llava_inputs(model, images_per_sample=(1, 2))
    assert not bool(inputs["attention_mask"].all())  # left padding
    seen = []
    layer = model.model.language_model.layers[1]
    spy = layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    try:
        with torch.no_grad(), vtc.compress(model, "fastv", keep=8, layer=1) as handle:
            model(**inputs)
    finally:
        spy.remove()
    assert seen[0] is not None and seen[0].ndim == 2
    assert [k.numel() for k in handle.last_kept] == [8, 16]
