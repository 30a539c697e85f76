"""LLaVA-1.5 adapter on a tiny random model with the real geometry (576 visual tokens per image)."""

from __future__ import annotations

import pytest
import torch
import transformers

import vtc
from tests.helpers import case_id, count_hooks, greedy_generate, greedy_no_cache
from vtc.probes import ClsRow
from vtc.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
N = 576
STEPS = 6
METHODS = vtc.list_methods("pre", images=True)
OPTIONS = {"dart": {}, "dart+merge": {"merge": True}}


def method_cases():
    return [(name, {}) for name in METHODS] + [("dart", {"merge": True})]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(vision_layers=4)


@pytest.fixture(scope="module")
def batch(model):
    """Two samples with different prompt lengths, left-padded."""
    return tiny_llava_inputs(model, images_per_sample=(1, 1), seed=1)


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def vision_layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers  # nested in transformers 4.x


def sample(inputs, b, count_images):
    """Sample b of a batch, unpadded, with its images."""
    keep = inputs["attention_mask"][b].bool()
    first = sum(count_images[:b])
    return {
        "input_ids": inputs["input_ids"][b][keep].unsqueeze(0),
        "attention_mask": inputs["attention_mask"][b][keep].unsqueeze(0),
        "pixel_values": inputs["pixel_values"][first : first + count_images[b]],
    }


def test_remove_restores_the_model_bit_for_bit(model, batch):
    before = logits(model, batch)
    hooks = count_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = vtc.compress(model, "fastervlm", keep=64)
    assert count_hooks(model) > hooks
    compressed = logits(model, batch)
    handle.remove()
    assert count_hooks(model) == hooks
    assert compressed.shape[1] == before.shape[1] - (N - 64)
    assert torch.equal(logits(model, batch), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    handle.remove()  # idempotent


def test_context_manager_removes_hooks_on_error(model, batch):
    hooks = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), vtc.compress(model, "divprune", keep=32):
        raise RuntimeError("boom")
    assert count_hooks(model) == hooks


@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_keep_all_is_the_identity(model, batch, case):
    name, options = case
    before = logits(model, batch)
    with vtc.compress(model, name, keep=N, **options) as handle:
        after = logits(model, batch)
    assert torch.equal(after, before)
    assert [k.tolist() for k in handle.last_kept] == [list(range(N))] * 2


@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_generate_with_cache_equals_no_cache_reference(model, batch, case):
    name, options = case
    with vtc.compress(model, name, keep=48, **options) as handle:
        cached = greedy_generate(model, batch, STEPS)
        kept_in_generate = [k.clone() for k in handle.last_kept]
        reference = greedy_no_cache(model, batch, STEPS)
    assert torch.equal(cached, reference)
    assert [len(k) for k in kept_in_generate] == [48, 48]
    assert handle.stats["visual_tokens_before"] == [N, N]
    assert handle.stats["visual_tokens_after"] == [48, 48]


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "dart"])
def test_batch_with_left_padding_equals_each_sample_alone(model, batch, name):
    with vtc.compress(model, name, keep=40) as handle:
        batched = greedy_generate(model, batch, STEPS)
        batched_kept = handle.last_kept
        batched_last = logits(model, batch)[:, -1]
        for b in range(2):
            single = sample(batch, b, [1, 1])
            assert torch.equal(greedy_generate(model, single, STEPS), batched[b : b + 1])
            assert torch.equal(handle.last_kept[0], batched_kept[b])
            torch.testing.assert_close(logits(model, single)[:, -1], batched_last[b : b + 1], rtol=1e-4, atol=1e-4)


def test_language_model_sees_only_kept_tokens_at_original_positions(model, batch):
    """The compressed forward equals running the language model by hand on the kept tokens."""
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)

    with vtc.compress(model, "fastervlm", keep=64) as handle:
        spy_handle = model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            compressed = logits(model, batch)
        finally:
            spy_handle.remove()
    visual = batch["input_ids"] == IMAGE_TOKEN_ID
    length = batch["input_ids"].shape[1]
    # A plain forward without position_ids numbers every slot 0..L-1 (padding included), as transformers does.
    positions = torch.arange(length).expand(2, length)
    with torch.no_grad():
        full_embeds = model.model.get_input_embeddings()(batch["input_ids"])
        features = model.model.get_image_features(pixel_values=batch["pixel_values"])
        features = getattr(features, "pooler_output", features)  # a list in transformers 4.x
        full_embeds[visual] = torch.cat(list(features))
        keep_rows = []
        for b in range(2):
            image_positions = visual[b].nonzero().squeeze(1)
            keep = ~visual[b]
            keep[image_positions[handle.last_kept[b]]] = True
            keep_rows.append(keep.nonzero().squeeze(1))
        index = torch.stack(keep_rows)  # same count per row here
        assert index.shape[1] == length - (N - 64)
        assert torch.equal(seen["position_ids"].expand_as(index), positions.gather(1, index))
        embeds = full_embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, full_embeds.shape[-1]))
        hidden = model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"].gather(1, index),
            position_ids=positions.gather(1, index),
        ).last_hidden_state
        by_hand = model.lm_head(hidden)
    torch.testing.assert_close(compressed, by_hand, rtol=1e-5, atol=1e-5)


def test_several_images_per_prompt_and_mixed_counts_in_a_batch(model):
    counts = (2, 1)
    inputs = tiny_llava_inputs(model, images_per_sample=counts, seed=3)
    with vtc.compress(model, "divprune", keep=32) as handle:
        batched = greedy_generate(model, inputs, STEPS)
        assert handle.stats["images"] == [2, 1]
        assert handle.stats["visual_tokens_after"] == [64, 32]
        kept = handle.last_kept
        assert len(kept[0]) == 64 and ((kept[0] < N).sum(), (kept[0] >= N).sum()) == (32, 32)
        assert int(kept[0].max()) < 2 * N and torch.equal(kept[0], kept[0].sort().values)
        assert torch.equal(greedy_no_cache(model, inputs, STEPS), batched)
        for b in range(2):
            alone = greedy_generate(model, sample(inputs, b, list(counts)), STEPS)
            assert torch.equal(alone, batched[b : b + 1])
            assert torch.equal(handle.last_kept[0], kept[b])


def test_sdpa_and_eager_agree():
    sdpa, eager = tiny_llava(attn_implementation="sdpa"), tiny_llava(attn_implementation="eager")
    inputs = tiny_llava_inputs(sdpa, images_per_sample=(1, 1), seed=2)
    results = []
    for model in (sdpa, eager):
        with vtc.compress(model, "fastervlm", keep=64) as handle:
            results.append((logits(model, inputs), greedy_generate(model, inputs, STEPS), handle.last_kept))
    # Fully masked (left-padding) query rows differ between implementations in transformers itself:
    # compare the real tokens, which are the last 64 + text of every row.
    torch.testing.assert_close(results[0][0][:, -70:], results[1][0][:, -70:], rtol=1e-4, atol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))


def test_fastervlm_keeps_top_cls_attention_at_the_feature_layer(model):
    """vision_feature_layer -2 of a 4-layer tower is the output of layer 2: its [CLS] row decides."""
    inputs = tiny_llava_inputs(model, seed=5)
    layer = vision_layers(model)[2]
    rows = []
    hook = layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: rows.append(ClsRow(m).row(kw["hidden_states"])), with_kwargs=True
    )
    try:
        with vtc.compress(model, "fastervlm", keep=50) as handle:
            logits(model, inputs)
    finally:
        hook.remove()
    expected = rows[0][0, 1:].topk(50).indices.sort().values
    assert torch.equal(handle.last_kept[0], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype):
    model = tiny_llava(dtype=dtype)
    inputs = tiny_llava_inputs(model, images_per_sample=(1, 1), seed=6)
    for name in ("fastervlm", "divprune", "dart"):
        with vtc.compress(model, name, keep=32) as handle:
            cached = greedy_generate(model, inputs, 4)
            assert [len(k) for k in handle.last_kept] == [32, 32]
            assert torch.equal(greedy_no_cache(model, inputs, 4), cached)


def test_text_only_input_passes_through(model):
    inputs = tiny_llava_inputs(model, seed=7)
    text = {"input_ids": inputs["input_ids"][:, :4], "attention_mask": inputs["attention_mask"][:, :4]}
    before = logits(model, text)
    with vtc.compress(model, "dart", keep=16) as handle:
        assert torch.equal(logits(model, text), before)
        assert [k.numel() for k in handle.last_kept] == [0]
        assert handle.stats["visual_tokens_before"] == [0]


def test_beam_search_repeats_images_and_signals_follow(model, batch):
    with vtc.compress(model, "fastervlm", keep=64) as handle:
        out = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape[0] == 2
    assert handle.stats["visual_tokens_after"] == [64] * 4  # two beams per sample


def test_merge_writes_size_weighted_means(model, batch):
    with vtc.compress(model, "dart", keep=32, merge=True) as handle:
        merged = logits(model, batch)
    plan = handle.last_plan
    assert plan.merge_into is not None and torch.equal(plan.sizes.sum(1), torch.full((2,), N))
    with vtc.compress(model, "dart", keep=32) as handle:
        dropped = logits(model, batch)
    assert torch.equal(handle.last_plan.kept, plan.kept)
    assert not torch.allclose(merged, dropped)


def test_labels_are_refused(model, batch):
    with vtc.compress(model, "random", keep=16), pytest.raises(ValueError, match="inference"):
        model(**batch, labels=batch["input_ids"])


@pytest.mark.skipif(TRANSFORMERS_4, reason="mm_encoder_outputs exists from transformers 5.0")
def test_features_computed_before_attach_are_refused_for_cls_methods(model, batch):
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)}
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    with vtc.compress(model, "fastervlm", keep=16), pytest.raises(ValueError, match="vision encoder did not run"):
        model(**inputs, mm_encoder_outputs=encoded)
    with vtc.compress(model, "divprune", keep=16) as handle:
        model(**inputs, mm_encoder_outputs=encoded)
    assert [len(k) for k in handle.last_kept] == [16, 16]


def test_malformed_inputs_get_clear_errors_before_the_language_model_runs(model, batch):
    length = batch["input_ids"].shape[1]
    ran = []
    spy = model.model.language_model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with vtc.compress(model, "dart", keep=16), torch.no_grad():
            four_d = torch.ones(2, 1, length, length)
            with pytest.raises(ValueError, match="needs a 2-D attention_mask"):
                model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=four_d)
            # 2 images' worth of tokens split 300 / 852 between samples: transformers only checks the total.
            ids = torch.full((2, 860), 7)
            ids[0, 4:304] = IMAGE_TOKEN_ID
            ids[1, 4:856] = IMAGE_TOKEN_ID
            with pytest.raises(ValueError, match="not a multiple of the 576 tokens per image"):
                model(input_ids=ids, pixel_values=batch["pixel_values"])
            assert not ran
            cache = model(**batch, use_cache=True).past_key_values
            ran.clear()
            with pytest.raises(ValueError, match="full 2-D attention_mask of length"):
                model(input_ids=batch["input_ids"][:, -1:], attention_mask=torch.ones(2, 20), past_key_values=cache)
            with pytest.raises(ValueError, match="continues an existing KV cache"):
                model(**batch, past_key_values=cache)
            assert not ran
    finally:
        spy.remove()
