"""What is particular to Qwen3.5 (and Qwen3.5-MoE): a hybrid language model, and the refusals.

The shared Qwen bar (remove, keep-all, generate == no-cache reference, batch == alone, M-RoPE positions, attention
received against the vision tower's eager weights, merging, beams, ...) runs on Qwen3.5 in test_qwen2_vl.py; the
MoE variant differs only in its MLPs, so it gets the end-to-end checks here. Qwen3.5 exists from transformers 5 on:
on 4.57 this file checks only that the command line refuses the tiny model with a clear error.

Removal is not compared with masking here, as for the attention-only families: in a Gated DeltaNet layer a masked
token is a zeroed input that still decays the recurrent state and takes a slot of the convolution window, so masking
is not removal (checked below, against the same model with full attention in every layer, where it is). Instead the
compressed model is compared with the uncompressed model run on the shortened prompt built by hand.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import vtc
from tests.helpers import count_hooks, greedy_generate, refused
from tests.helpers import greedy_no_cache as shared_greedy_no_cache
from vtc.tiny import QWEN_IMAGE_TOKEN_ID, tiny_qwen3_5, tiny_qwen_inputs

QWEN3_5 = hasattr(transformers, "Qwen3_5ForConditionalGeneration")
needs_qwen3_5 = pytest.mark.skipif(not QWEN3_5, reason=f"Qwen3.5 is not in transformers {transformers.__version__}")

GRIDS = (((8, 12),), ((8, 8), (4, 6)))  # 24 | 16 + 6 visual tokens, left-padded
K = 8
CASES = [
    ("divprune", {}),
    ("fastervlm", {"signal": "attention_received"}),
    ("uniform", {}),
    ("dart", {}),
    ("dart", {"merge": True}),
]
SELECTING = [case for case in CASES if not case[1].get("merge")]  # merged values: test_qwen2_vl.py checks them
IN_LLM = ["fastv", "pdrop", "dart_llm", "adaptive", ["divprune", "fastv"]]


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def model(request):
    if not QWEN3_5:
        pytest.skip(f"Qwen3.5 is not in transformers {transformers.__version__}")
    return tiny_qwen3_5(moe=request.param)


@pytest.fixture(scope="module")
def batch(model):
    return tiny_qwen_inputs(model, image_grids=GRIDS, seed=1)


@torch.no_grad()
def shortened_by_hand(model, inputs: dict, kept: list[torch.Tensor]) -> dict:
    """The uncompressed model's arguments for the prompt without the dropped visual tokens, built here from the
    model's own pieces: image features at the placeholders, the full prompt's M-RoPE positions, then per row its
    real tokens that survive (text and the ``kept`` visual ones) at their original positions, left-padded with zeros
    to the longest row under an explicit mask."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = ids == QWEN_IMAGE_TOKEN_ID
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    embeds = model.model.get_input_embeddings()(ids)
    embeds[visual] = torch.cat(features)
    positions, _ = model.model.get_rope_index(
        ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=mask
    )
    rows = []
    for b in range(ids.shape[0]):
        survive = mask[b].bool() & ~visual[b]
        survive[visual[b].nonzero().squeeze(1)[kept[b]]] = True
        rows.append(survive.nonzero().squeeze(1))
    length = max(len(cols) for cols in rows)
    out = {
        "inputs_embeds": embeds.new_zeros(ids.shape[0], length, embeds.shape[-1]),
        "attention_mask": mask.new_zeros(ids.shape[0], length),
        "position_ids": positions.new_zeros(3, ids.shape[0], length),
    }
    for b, cols in enumerate(rows):
        out["inputs_embeds"][b, -len(cols) :] = embeds[b, cols]
        out["attention_mask"][b, -len(cols) :] = 1
        out["position_ids"][:, b, -len(cols) :] = positions[:, b, cols]
    return out


@needs_qwen3_5
@pytest.mark.parametrize(("name", "options"), SELECTING)
def test_compressed_equals_the_model_on_the_shortened_prompt(model, batch, name, options):
    """Logits and every cache layer (convolution and recurrent states of the linear layers, keys and values of the
    full-attention layer) equal the uncompressed model's on the shortened prompt built by hand."""
    with vtc.compress(model, name, keep=K, **options) as handle, torch.no_grad():
        compressed = model(**batch, use_cache=True)
    kept = handle.last_kept
    assert [len(k) for k in kept] == [8, 14]
    assert 0 < handle.stats["prefill_flops"]["ratio"] < 1  # an estimate; the MoE config has no dense MLP width
    short = shortened_by_hand(model, batch, kept)
    with torch.no_grad():
        reference = model(**short, use_cache=True)
    assert compressed.logits.shape == reference.logits.shape
    valid = short["attention_mask"].bool()
    torch.testing.assert_close(compressed.logits[valid], reference.logits[valid], rtol=1e-5, atol=1e-5)
    cache, expected = compressed.cache, reference.cache
    assert int(cache.get_seq_length()) == int(expected.get_seq_length()) == short["attention_mask"].shape[1]
    kinds = model.config.text_config.layer_types
    for layer, other, kind in zip(cache.layers, expected.layers, kinds, strict=True):
        if kind == "linear_attention":
            pairs = [
                (layer.conv_states[0], other.conv_states[0]),
                (layer.recurrent_states[0], other.recurrent_states[0]),
            ]
        else:
            pairs = [(layer.keys, other.keys), (layer.values, other.values)]
        for ours, theirs in pairs:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@needs_qwen3_5
def test_masking_is_not_removal_in_the_linear_layers():
    """Masking the dropped tokens (the full prompt, original positions) gives the shortened prompt's last logits when
    every layer is full attention, but not with the Gated DeltaNet layers: that is why the test above builds the
    shortened prompt instead."""
    kept = [torch.arange(0, 24, 3), torch.arange(0, 22, 2)]
    gaps = []
    for interval in (1, 4):  # every layer full attention; the real pattern (3 linear, then 1 full)
        model = tiny_qwen3_5(full_attention_interval=interval)
        inputs = tiny_qwen_inputs(model, image_grids=GRIDS, seed=1)
        short = shortened_by_hand(model, inputs, kept)
        masked = shortened_by_hand(model, inputs, [torch.arange(24), torch.arange(22)])  # the prompt as it is
        assert torch.equal(masked["attention_mask"], inputs["attention_mask"])
        visual = inputs["input_ids"] == QWEN_IMAGE_TOKEN_ID
        for b in range(2):
            columns = visual[b].nonzero().squeeze(1)
            masked["attention_mask"][b, columns[~torch.isin(torch.arange(len(columns)), kept[b])]] = 0
        with torch.no_grad():
            gaps.append((model(**masked).logits[:, -1] - model(**short).logits[:, -1]).abs().max().item())
    assert gaps[0] < 1e-5, gaps  # attention only: masking is removal
    assert gaps[1] > 1e-2, gaps  # linear attention: it is not


@needs_qwen3_5
@pytest.mark.parametrize(("name", "options"), CASES)
def test_generate_equals_no_cache_reference_and_each_sample_alone(model, batch, name, options):
    with vtc.compress(model, name, keep=K, **options) as handle:
        cached = greedy_generate(model, batch, 4)
        reference = shared_greedy_no_cache(model, batch, 4, positions=False)
        counts = handle.stats["visual_tokens_after"]
        for b in range(2):
            keep = batch["attention_mask"][b].bool()
            first = sum(len(g) for g in GRIDS[:b])
            start = sum(h * w for g in GRIDS[:b] for h, w in g)
            alone = {k: batch[k][b][keep].unsqueeze(0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
            alone["pixel_values"] = batch["pixel_values"][start : start + sum(h * w for h, w in GRIDS[b])]
            alone["image_grid_thw"] = batch["image_grid_thw"][first : first + len(GRIDS[b])]
            assert torch.equal(greedy_generate(model, alone, 4), cached[b : b + 1])
    assert torch.equal(cached, reference)
    assert counts == [8, 14]


@needs_qwen3_5
def test_decode_steps_give_the_linear_layers_no_mask_and_the_full_layer_the_remapped_one(model, batch):
    """During generate(): the linear layers get the shortened prompt's 2-D mask at the prefill (left padding) and none
    for one-token steps; the full-attention layer's mask covers the shortened cache plus the new tokens."""
    layers = model.model.language_model.layers
    kinds = model.config.text_config.layer_types
    linear, full = kinds.index("linear_attention"), kinds.index("full_attention")
    seen = {linear: [], full: []}
    spies = [
        layers[i].register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen[i].append(kwargs["attention_mask"]), with_kwargs=True
        )
        for i in seen
    ]
    try:
        with vtc.compress(model, "divprune", keep=K):
            greedy_generate(model, batch, 3)
    finally:
        for spy in spies:
            spy.remove()
    visual = batch["input_ids"] == QWEN_IMAGE_TOKEN_ID
    after = batch["attention_mask"].sum(1) - visual.sum(1) + torch.tensor([8, 14])  # real tokens of each row
    length = int(after.max())
    prefill = seen[linear][0]
    assert prefill.shape == (2, length)
    assert after[0] != after[1]  # one row is left-padded
    assert torch.equal(prefill.bool(), torch.arange(length) >= (length - after).unsqueeze(1))
    assert all(mask is None for mask in seen[linear][1:])
    assert [mask.shape[-1] for mask in seen[full]] == [length, length + 1, length + 2]


@needs_qwen3_5
def test_remove_restores_the_model_bit_for_bit(model, batch):
    with torch.no_grad():
        before = model(**batch).logits
    hooks = count_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, options in CASES:
        with vtc.compress(model, name, keep=K, **options), torch.no_grad():
            model(**batch)
    assert count_hooks(model) == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


@needs_qwen3_5
@pytest.mark.parametrize("method", IN_LLM, ids=str)
def test_in_llm_methods_are_refused_before_any_hook(model, batch, method):
    with torch.no_grad():
        before = model(**batch).logits
    hooks = count_hooks(model)
    keep = [K, 4] if isinstance(method, list) else K
    name = method[1] if isinstance(method, list) else method
    with pytest.raises(ValueError, match=rf"in-LLM method '{name}' cannot run on Qwen3_5(Moe)?For") as error:
        vtc.compress(model, method, keep=keep)
    message = str(error.value)
    assert "3 of its 4 decoder layers are linear attention" in message
    assert "no attention mask can express" in message
    assert "Use a pre-LLM method" in message and "signal='attention_received'" in message
    assert count_hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


@needs_qwen3_5
def test_cls_methods_and_the_auxiliary_clip_are_refused_with_the_alternative(model):
    hooks = count_hooks(model)
    for name in ("fastervlm", "vtc_cls"):
        with pytest.raises(ValueError, match=r"no \[CLS\] token.*signal='attention_received'"):
            vtc.compress(model, name, keep=K)
    with pytest.raises(ValueError, match=r"\['cls_model'\] do not apply"):
        vtc.compress(model, "fastervlm", keep=K, cls_model="ViT-B-16")
    assert count_hooks(model) == hooks


@needs_qwen3_5
def test_a_video_prompt_through_generate_is_refused_before_the_language_model(model):
    """transformers 5's generate() encodes the videos before the forward: refused when that vision pass starts."""
    video = tiny_qwen_inputs(model, image_grids=((),), video_grids=(((2, 4, 4),),), seed=4)
    with vtc.compress(model, "divprune", keep=K) as handle:
        calls = []
        spy = model.model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            with pytest.raises(ValueError, match="does not compress video inputs on Qwen3_5"):
                model.generate(**video, max_new_tokens=2, do_sample=False)
        finally:
            spy.remove()
        assert not calls
        assert handle.active


@needs_qwen3_5
def test_video_is_refused_before_the_model_runs(model, batch):
    frames = torch.randn(2 * 4 * 4, batch["pixel_values"].shape[1])
    calls = []
    with vtc.compress(model, "divprune", keep=K):
        spy = model.model.visual.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            with pytest.raises(ValueError, match="does not compress video"), torch.no_grad():
                model(**batch, pixel_values_videos=frames, video_grid_thw=torch.tensor([[2, 4, 4]]))
        finally:
            spy.remove()
    assert not calls  # refused before the vision tower


@needs_qwen3_5
@pytest.mark.parametrize(("name", "options"), [("divprune", {}), ("dart", {"merge": True})])
def test_sdpa_and_eager_attention_agree(name, options):
    """The same weights with SDPA and with eager attention keep the same tokens and give the same logits."""
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = tiny_qwen3_5(attn_implementation=implementation)
        inputs = tiny_qwen_inputs(model, image_grids=GRIDS, seed=1)
        with vtc.compress(model, name, keep=K, **options) as handle, torch.no_grad():
            outputs.append((model(**inputs).logits, [k.clone() for k in handle.last_kept]))
    (sdpa_logits, sdpa_kept), (eager_logits, eager_kept) = outputs
    assert all(torch.equal(a, b) for a, b in zip(sdpa_kept, eager_kept, strict=True))
    assert sdpa_logits.shape == eager_logits.shape
    torch.testing.assert_close(sdpa_logits[:, -1], eager_logits[:, -1], rtol=1e-4, atol=1e-5)  # each row's last token


@needs_qwen3_5
def test_both_variants_are_listed_and_run_from_the_command_line(capsys):
    assert {"qwen3_5", "qwen3_5_moe"} <= set(vtc.list_models())
    from vtc.__main__ import main

    argv = ["--model", "tiny-qwen3-5", "--methods", "divprune,fastv", "--keep", "96"]
    assert main([*argv, "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3_5ForConditionalGeneration" in out and "384 -> 96" in out
    assert "skipped fastv: in-LLM method 'fastv' cannot run on Qwen3_5ForConditionalGeneration" in out


@pytest.mark.skipif(QWEN3_5, reason="this transformers has Qwen3.5")
def test_the_command_line_refuses_the_tiny_model_without_qwen3_5(capsys):
    from vtc.__main__ import main

    error = refused(main, ["--model", "tiny-qwen3-5", "--repeats", "1"], capsys)
    assert error.endswith(
        "--model tiny-qwen3-5: Qwen3.5 needs transformers 5 (Qwen3_5ForConditionalGeneration); "
        f"this is transformers {transformers.__version__}"
    )
