"""LLaVA-OneVision video inputs on a tiny random model: the adapter bar on batches that mix videos and images, with
budgets per video and per frame.

The tiny tower has 56 px crops of 4 x 4 patches, so a video frame is pooled (2 x 2, bilinearly) to 2 x 2 tokens; a
video of 4 frames is 16 tokens and its newline. Sample 0 holds a 120 x 150 image (AnyRes crops, downsampled) and one
video; sample 1 holds two videos and no image. Counts are written out here from that geometry, not taken from the
adapter.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import vtc
from tests.helpers import (
    Replay,
    assert_each_sample_alone_equals_its_row,
    assert_remove_restores_the_model,
    greedy_generate,
    greedy_no_cache,
)
from vtc.methods import FastV
from vtc.tiny import IMAGE_TOKEN_ID, ONEVISION_VIDEO_TOKEN_ID, tiny_llava_onevision, tiny_llava_onevision_inputs

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
STEPS = 4
K = 3
FRAMES = 4
FRAME = 4  # tokens per frame: 2 x 2 after pooling
VIDEO = FRAMES * FRAME  # + 1 newline
SIZES = (((120, 150),), ())
VIDEOS = (1, 2)
BUDGETS = ("per_video", "per_frame")
CASES = [pytest.param(name, {}, id=name) for name in ("divprune", "dart", "random", "uniform")] + [
    pytest.param("dart", {"merge": True}, id="dart-merge")
]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


@pytest.fixture(scope="module")
def batch(model):
    return tiny_llava_onevision_inputs(model, image_sizes=SIZES, videos=VIDEOS, frames=FRAMES, seed=3)


@pytest.fixture(scope="module")
def image_tokens(batch) -> int:
    return int((batch["input_ids"][0] == IMAGE_TOKEN_ID).sum())


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def video_kept(budget: str, keep: int) -> int:
    """Tokens a video keeps, its newline included."""
    return (min(keep, VIDEO) if budget == "per_video" else FRAMES * min(keep, FRAME)) + 1


def video_columns(inputs: dict, b: int) -> torch.Tensor:
    return (inputs["input_ids"][b] == ONEVISION_VIDEO_TOKEN_ID).nonzero().squeeze(1)


def sample(inputs: dict, b: int) -> dict:
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b][keep].unsqueeze(0) for k in ("input_ids", "attention_mask")}
    first = sum(VIDEOS[:b])
    out["pixel_values_videos"] = inputs["pixel_values_videos"][first : first + VIDEOS[b]]
    if SIZES[b]:
        out["pixel_values"] = inputs["pixel_values"][:1]
        out["image_sizes"] = inputs["image_sizes"][:1]
        out["batch_num_images"] = inputs["batch_num_images"][b : b + 1]
    return out


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_remove_restores_the_model_bit_for_bit(model, batch, name, options, budget):
    attach = functools.partial(vtc.compress, model, name, keep=K, video_budget=budget, **options)
    compressed = assert_remove_restores_the_model(model, batch, attach)
    assert compressed.shape[1] < batch["input_ids"].shape[1]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_keep_all_is_the_identity(model, batch, name, options, budget, image_tokens):
    before = logits(model, batch)
    with vtc.compress(model, name, ratio=1.0, video_budget=budget, **options) as handle:
        after = logits(model, batch)
    assert torch.equal(after, before)
    assert [len(k) for k in handle.last_kept] == [image_tokens + VIDEO + 1, 2 * (VIDEO + 1)]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_generate_with_cache_equals_no_cache_reference_with_exact_counts(model, batch, name, options, budget):
    with vtc.compress(model, name, keep=K, video_budget=budget, **options) as handle:
        cached = greedy_generate(model, batch, STEPS)
        stats, kept = handle.stats, [k.clone() for k in handle.last_kept]
        reference = greedy_no_cache(model, batch, STEPS)
    assert torch.equal(cached, reference)
    assert stats["images"] == [1, 0] and stats["videos"] == [1, 2]
    for b in range(2):
        videos = video_columns(batch, b)
        visual = (
            (batch["input_ids"][b] == IMAGE_TOKEN_ID) | (batch["input_ids"][b] == ONEVISION_VIDEO_TOKEN_ID)
        ).nonzero()
        kept_cols = visual.squeeze(1)[kept[b]]
        for v in range(VIDEOS[b]):
            columns = videos[v * (VIDEO + 1) : (v + 1) * (VIDEO + 1)]
            inside = torch.isin(kept_cols, columns)
            assert int(inside.sum()) == video_kept(budget, K)
            assert columns[-1] in kept_cols  # the newline
            if budget == "per_frame":
                frame = torch.searchsorted(columns, kept_cols[inside]) // FRAME
                assert torch.bincount(frame, minlength=FRAMES + 1).tolist() == [min(K, FRAME)] * FRAMES + [1]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), [c for c in CASES if c.values[0] != "random"])
def test_a_batch_mixing_videos_and_images_equals_each_sample_alone(model, batch, name, options, budget):
    with vtc.compress(model, name, keep=K, video_budget=budget, **options) as handle:
        assert_each_sample_alone_equals_its_row(model, batch, handle, [sample(batch, b) for b in range(2)], STEPS)


@pytest.mark.parametrize("budget", BUDGETS)
def test_removal_at_original_positions_equals_masking_the_dropped_tokens(model, batch, budget):
    with vtc.compress(model, "divprune", keep=K, video_budget=budget) as handle:
        compressed = logits(model, batch)[:, -1]
        kept = handle.last_kept
    mask = batch["attention_mask"].clone()
    for b, chosen in enumerate(kept):
        ids = batch["input_ids"][b]
        visual = ((ids == IMAGE_TOKEN_ID) | (ids == ONEVISION_VIDEO_TOKEN_ID)).nonzero().squeeze(1)
        dropped = torch.ones(len(visual), dtype=torch.bool)
        dropped[chosen] = False
        mask[b, visual[dropped]] = 0
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # the unmasked prompt's positions
    masked = logits(model, {**batch, "attention_mask": mask, "position_ids": positions})[:, -1]
    torch.testing.assert_close(compressed, masked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(compressed, logits(model, batch)[:, -1], rtol=1e-4, atol=1e-4)


def test_in_llm_method_on_video_equals_the_no_cache_reference(model, batch):
    method = FastV(layer=1)
    replay = Replay(method)
    with vtc.compress(model, method, keep=K) as handle:
        generated = greedy_generate(model, batch, STEPS)
        replay.replay()
        reference = greedy_no_cache(model, batch, STEPS)
    assert torch.equal(generated, reference)
    assert handle.stats["visual_tokens_per_layer"][1][-1] == 2 * K


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 5.x encodes videos before the prefill")
def test_generate_encodes_videos_before_the_prefill(model, batch):
    calls = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    try:
        with vtc.compress(model, "divprune", keep=K) as handle:
            greedy_generate(model, batch, 2)
    finally:
        hook.remove()
    assert calls[0].get("pixel_values_videos") is None and calls[0]["mm_encoder_outputs"]["video"] is not None
    assert handle.stats["videos"] == [1, 2]
    assert handle.stats["visual_tokens_after"][1] == 2 * (K + 1)


@pytest.mark.parametrize("via", ["forward", "generate"])
def test_attention_received_on_videos_is_refused_before_the_language_model(model, batch, via):
    before = logits(model, batch)
    with vtc.compress(model, "fastervlm", keep=K, signal="attention_received") as handle:
        calls = []
        hook = model.model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            with pytest.raises(ValueError, match=r"does not yet carry .* 2 x 2 pooling of video frames"):
                if via == "forward":
                    logits(model, batch)
                else:
                    greedy_generate(model, batch, 2)
        finally:
            hook.remove()
        assert not calls
        images_only = tiny_llava_onevision_inputs(model, image_sizes=(((120, 150),),), seed=3)
        logits(model, images_only)  # still attached and working
        assert handle.stats["videos"] == [0]
    assert torch.equal(logits(model, batch), before)


def test_evs_keeps_what_evs_chooses_on_each_videos_frames_and_the_newline(model):
    """Videos only: evs gets each video's pooled frame tokens (newline excluded) with its (frames, 2, 2) grid."""
    inputs = tiny_llava_onevision_inputs(model, image_sizes=((), ()), videos=VIDEOS, frames=FRAMES, seed=4)
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        logits(model, inputs)
    finally:
        hook.remove()
    keep = 6
    with vtc.compress(model, "evs", keep=keep) as handle:
        generated = greedy_generate(model, inputs, STEPS)
        assert torch.equal(generated, greedy_no_cache(model, inputs, STEPS))
    for b in range(2):
        columns, expected = video_columns(inputs, b), []
        for v in range(VIDEOS[b]):
            start = v * (VIDEO + 1)
            features = calls[0][b, columns[start : start + VIDEO]].unsqueeze(0)
            chosen = vtc.select("evs", keep=keep, features=features, grid=(FRAMES, 2, 2))[0]
            expected += (chosen + start).tolist() + [start + VIDEO]  # and the newline
        assert handle.last_kept[b].tolist() == expected


def test_beams_keep_each_rows_choice_on_videos_and_images(model):
    """Beam search (transformers 5 encodes before it repeats the rows) over AnyRes images and videos: each beam keeps
    what its row keeps in a plain forward. (On 4.57, transformers itself hands beams the wrong videos when a sample
    has several; that sample has one here.)"""
    inputs = tiny_llava_onevision_inputs(model, image_sizes=(((120, 150),), ((56, 112),)), videos=(1, 1), seed=3)
    with vtc.compress(model, "divprune", keep=6) as handle:
        logits(model, inputs)
        alone = [k.tolist() for k in handle.last_kept]
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
    assert [k.tolist() for k in handle.last_kept] == [row for row in alone for _ in range(2)]


@pytest.mark.parametrize("via", ["forward", "generate"])
def test_evs_refuses_images_and_small_budgets_before_the_vision_tower_runs(model, via):
    images = tiny_llava_onevision_inputs(model, image_sizes=(((120, 150),),), seed=3)
    videos = tiny_llava_onevision_inputs(model, image_sizes=((),), videos=(1,), frames=FRAMES, seed=3)
    calls = []
    for inputs, keep, message in ((images, 6, "this input holds images"), (videos, 3, "whole first frame")):
        if via == "generate" and inputs is videos:
            continue  # transformers 5's generate() encodes first: the budget is refused when evs plans
        with vtc.compress(model, "evs", keep=keep):
            spy = model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))  # after vtc's
            try:
                with pytest.raises(ValueError, match=message):
                    logits(model, inputs) if via == "forward" else greedy_generate(model, inputs, 2)
            finally:
                spy.remove()
    assert not calls
