"""vtc.compress(positions=...): "original" keeps the kept tokens' position ids, "compact" numbers them as if the dropped
tokens had never been in the prompt (what FasterVLM's, DivPrune's and VisionZip's reference code does, and vLLM)."""

from __future__ import annotations

import pytest
import torch

import vtc
from tests.helpers import count_hooks, greedy_generate
from vtc.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs, tiny_llava_next, tiny_llava_next_inputs, tiny_model

STEPS = 5


@pytest.fixture(scope="module")
def model():
    return tiny_llava(vision_layers=2)


@pytest.fixture(scope="module")
def batch(model):
    """Two samples, one and two images, left-padded."""
    return tiny_llava_inputs(model, images_per_sample=(1, 2), seed=4)


def full_embeds(model, inputs) -> torch.Tensor:
    """The language model's uncompressed inputs_embeds for ``inputs`` (recorded off a plain forward)."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["inputs_embeds"]


def removed_by_hand(model, inputs, kept: list[torch.Tensor]) -> list[dict]:
    """Per sample, unpadded: the prompt with the dropped visual tokens taken out before the model, as the reference
    repositories do (inputs_embeds, no image inputs, so the model numbers the survivors 0..L'-1)."""
    embeds = full_embeds(model, inputs)
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        real = inputs["attention_mask"][b].bool()
        visual = (inputs["input_ids"][b] == IMAGE_TOKEN_ID) & real
        keep = real & ~visual
        keep[visual.nonzero().squeeze(1)[kept[b]]] = True
        out.append({"inputs_embeds": embeds[b][keep].unsqueeze(0), "attention_mask": torch.ones(1, int(keep.sum()))})
    return out


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "random"])
def test_compact_equals_removing_the_tokens_before_the_model(model, batch, name):
    with vtc.compress(model, name, keep=40, positions="compact") as handle, torch.no_grad():
        compressed = model(**batch).logits[:, -1]
        generated = greedy_generate(model, batch, STEPS)
        kept = [k.clone() for k in handle.last_kept]
    assert [len(k) for k in kept] == [40, 80]
    for b, reference in enumerate(removed_by_hand(model, batch, kept)):
        with torch.no_grad():
            expected = model(**reference).logits[:, -1]
        torch.testing.assert_close(compressed[b : b + 1], expected, rtol=1e-4, atol=1e-4)
        by_hand = model.generate(**reference, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        assert torch.equal(generated[b : b + 1], by_hand[:, -STEPS:])


def test_compact_positions_are_consecutive_and_original_ones_keep_their_gaps(model, batch):
    positions_given = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for positions in ("original", "compact"):
        seen = {}
        with vtc.compress(model, "divprune", keep=8, positions=positions), torch.no_grad():
            spy = model.model.language_model.register_forward_pre_hook(  # after vtc's hook: what the model receives
                lambda module, args, kwargs, seen=seen: seen.update(kwargs), with_kwargs=True
            )
            try:
                model(**batch, position_ids=positions_given)
            finally:
                spy.remove()
        for b in range(2):
            row = seen["position_ids"][b][seen["attention_mask"][b].bool()]
            if positions == "compact":
                assert torch.equal(row, torch.arange(len(row)))
            else:  # the last token keeps its position: the dropped tokens leave gaps
                assert int(row[-1]) == int(positions_given[b, -1]) > len(row) - 1


def test_compact_batch_with_left_padding_equals_each_sample_alone(model, batch):
    with vtc.compress(model, "dart", keep=24, positions="compact"):
        batched = greedy_generate(model, batch, STEPS)
        first = sum([1, 2][:1])
        for b, images in enumerate([slice(0, first), slice(first, 3)]):
            real = batch["attention_mask"][b].bool()
            single = {
                "input_ids": batch["input_ids"][b][real].unsqueeze(0),
                "attention_mask": batch["attention_mask"][b][real].unsqueeze(0),
                "pixel_values": batch["pixel_values"][images],
            }
            assert torch.equal(greedy_generate(model, single, STEPS), batched[b : b + 1])


def test_compact_on_anyres_equals_removing_the_tokens():
    model = tiny_llava_next()
    inputs = tiny_llava_next_inputs(model, image_sizes=(((40, 60),),), seed=2)
    with vtc.compress(model, "divprune", ratio=0.25, positions="compact") as handle, torch.no_grad():
        compressed = model(**inputs).logits[:, -1]
    image_token = model.config.image_token_id
    embeds = full_embeds(model, inputs)
    keep = inputs["input_ids"][0] != image_token
    keep[(inputs["input_ids"][0] == image_token).nonzero().squeeze(1)[handle.last_kept[0]]] = True
    with torch.no_grad():
        expected = model(inputs_embeds=embeds[0][keep].unsqueeze(0)).logits[:, -1]
    torch.testing.assert_close(compressed, expected, rtol=1e-4, atol=1e-4)


def test_bad_positions_are_refused_before_anything_is_attached(model):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"positions must be one of \['original', 'compact'\], got 'consecutive'"):
        vtc.compress(model, "divprune", keep=8, positions="consecutive")
    with pytest.raises(ValueError, match="'fastv' drops tokens inside it"):
        vtc.compress(model, "fastv", keep=8, positions="compact")
    with pytest.raises(ValueError, match="'fastv' drops tokens inside it"):
        vtc.compress(model, ["divprune", "fastv"], keep=[64, 8], positions="compact")
    assert count_hooks(model) == hooks


@pytest.mark.parametrize("family", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_compact_is_refused_on_mrope_families(family):
    model, _ = tiny_model(family)
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match="positions='compact' is not supported on Qwen.*M-RoPE.*no gap to close"):
        vtc.compress(model, "divprune", keep=8, positions="compact")
    assert count_hooks(model) == hooks
