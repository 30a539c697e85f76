"""Video inputs of Qwen2-VL, Qwen2.5-VL and Qwen3-VL on tiny random models: the adapter bar on batches that mix videos
and images, with budgets per video and per frame.

The batch: sample 0 holds an image of 8x8 patches (16 tokens) and a video of 2 temporal patches of 4x8 (2 x 8 tokens);
sample 1 holds no image and two videos, 3 x (4x4) and 2 x (8x4) (3 x 4 and 2 x 8 tokens). The vision tower encodes the
images of the whole batch, then its videos; Qwen3-VL lays each frame out between its own timestamp tokens.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import vtc
from tests import helpers
from tests.adapters.test_qwen2_vl import (  # noqa: F401 - the autouse fixture applies here too
    CASES,
    FAMILIES,
    _merging_is_refused_with_deepstack,
    logits,
    recording_calls,
)
from tests.helpers import (
    Replay,
    assert_each_sample_alone_equals_its_row,
    assert_remove_restores_the_model,
    count_hooks,
    greedy_generate,
)
from vtc.methods import FastV
from vtc.tiny import QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, tiny_qwen_inputs

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
STEPS = 4
K = 6
IMAGES = (((8, 8),), ())
VIDEOS = (((2, 4, 8),), ((3, 4, 4), (2, 8, 4)))
# Per sample, its images and videos in sequence order: (tokens per frame, frames).
UNITS = [[(16, 1, False), (8, 2, True)], [(4, 3, True), (8, 2, True)]]
BUDGETS = ("per_video", "per_frame")
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return FAMILIES[family]()


@pytest.fixture(scope="module")
def batch(model):
    return tiny_qwen_inputs(model, image_grids=IMAGES, video_grids=VIDEOS, seed=3)


def greedy_no_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    return helpers.greedy_no_cache(model, inputs, steps, positions=False)


def expected(budget: str, keep: int | None = None, ratio: float | None = None) -> list[list[int]]:
    """Kept tokens of each image / video of each sample: a cap per image, per video or per frame."""

    def cap(n: int) -> int:
        return min(keep, n) if keep is not None else max(1, round(ratio * n))

    return [
        [cap(n * frames) if not video or budget == "per_video" else frames * cap(n) for n, frames, video in row]
        for row in UNITS
    ]


def split(kept: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """A sample's kept indices (into its visual tokens, images and videos in sequence order) by unit, as indices into
    each."""
    out, start = [], 0
    for n in sizes:
        out.append(kept[(kept >= start) & (kept < start + n)] - start)
        start += n
    return out


def visual_columns(inputs: dict, b: int) -> torch.Tensor:
    ids = inputs["input_ids"][b]
    return ((ids == QWEN_IMAGE_TOKEN_ID) | (ids == QWEN_VIDEO_TOKEN_ID)).nonzero().squeeze(1)


def sample(inputs: dict, b: int) -> dict:
    """Sample b alone, unpadded, with its own images' and videos' patches and grids."""
    keep = inputs["attention_mask"][b].bool()
    out = {
        k: inputs[k][b][keep].unsqueeze(0) for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs
    }
    for pixels, grids, per_sample in (
        ("pixel_values", "image_grid_thw", [[(1, *g) for g in row] for row in IMAGES]),
        ("pixel_values_videos", "video_grid_thw", [list(row) for row in VIDEOS]),
    ):
        first = sum(len(row) for row in per_sample[:b])
        start = sum(t * h * w for row in per_sample[:b] for t, h, w in row)
        stop = start + sum(t * h * w for t, h, w in per_sample[b])
        if per_sample[b]:
            out[pixels] = inputs[pixels][start:stop]
            out[grids] = inputs[grids][first : first + len(per_sample[b])]
    return out


# -------------------------------------------------------------------------------------------- the adapter bar


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_remove_restores_the_model_bit_for_bit(model, batch, name, options, budget):
    attach = functools.partial(vtc.compress, model, name, keep=K, video_budget=budget, **options)
    compressed = assert_remove_restores_the_model(model, batch, attach)
    kept = expected(budget, keep=K)
    dropped = [sum(n * f for n, f, _ in row) - sum(k) for row, k in zip(UNITS, kept, strict=True)]
    assert compressed.shape[1] == batch["input_ids"].shape[1] - min(dropped)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_keep_all_is_the_identity(model, batch, name, options, budget):
    before = logits(model, batch)
    with vtc.compress(model, name, ratio=1.0, video_budget=budget, **options) as handle:
        after = logits(model, batch)
    assert torch.equal(after, before)
    assert [k.tolist() for k in handle.last_kept] == [list(range(32)), list(range(28))]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_generate_with_cache_equals_no_cache_reference_with_exact_counts(model, batch, name, options, budget):
    with vtc.compress(model, name, keep=K, video_budget=budget, **options) as handle:
        cached = greedy_generate(model, batch, STEPS)
        stats, kept_in_generate = handle.stats, [k.clone() for k in handle.last_kept]
        reference = greedy_no_cache(model, batch, STEPS)
    assert torch.equal(cached, reference)
    assert [k.tolist() for k in handle.last_kept] == [k.tolist() for k in kept_in_generate]
    counts = expected(budget, keep=K)
    assert stats["images"] == [1, 0] and stats["videos"] == [1, 2]
    assert stats["visual_tokens_before"] == [32, 28]
    assert stats["visual_tokens_after"] == [sum(row) for row in counts]
    for kept, units, row in zip(kept_in_generate, UNITS, counts, strict=True):
        parts = split(kept, [n * frames for n, frames, _ in units])
        assert [len(part) for part in parts] == row
        if budget == "per_frame":  # every frame of a video keeps its own share
            for part, (n, frames, _) in zip(parts, units, strict=True):
                assert torch.bincount(part // n, minlength=frames).tolist() == [min(K, n)] * frames


@pytest.mark.parametrize("budget", BUDGETS)
def test_ratio_budgets_count_per_video_or_per_frame(model, batch, budget):
    with vtc.compress(model, "divprune", ratio=0.3, video_budget=budget) as handle:
        logits(model, batch)
    assert handle.stats["visual_tokens_after"] == [sum(row) for row in expected(budget, ratio=0.3)]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), [c for c in CASES if c.values[0] != "random"])
def test_a_batch_mixing_videos_and_images_equals_each_sample_alone(model, batch, name, options, budget):
    """(random draws one score row per unit of a shape, so its choice depends on the batch: left out.)"""
    with vtc.compress(model, name, keep=K, video_budget=budget, **options) as handle:
        assert_each_sample_alone_equals_its_row(model, batch, handle, [sample(batch, b) for b in range(2)], STEPS)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "options"), [("divprune", {}), ("fastervlm", {"signal": "attention_received"})])
def test_removal_at_original_positions_equals_masking_the_dropped_tokens(model, batch, name, options, budget):
    """The language model on the shortened prompt, kept tokens at their original (t, h, w) positions, equals the
    language model on the whole prompt (same positions, same DeepStack features) with the dropped tokens masked out."""
    with recording_calls(model.model.language_model) as calls:
        logits(model, batch)
    full = calls[0]
    with vtc.compress(model, name, keep=K, video_budget=budget, **options) as handle:
        compressed = logits(model, batch)[:, -1]
        kept = handle.last_kept
    mask = full["attention_mask"].clone()
    for b, chosen in enumerate(kept):
        visual = visual_columns(batch, b)
        dropped = torch.ones(len(visual), dtype=torch.bool)
        dropped[chosen] = False
        mask[b, visual[dropped]] = 0
    with torch.no_grad():
        hidden = model.model.language_model(**{**full, "attention_mask": mask}).last_hidden_state
        masked = model.lm_head(hidden)[:, -1]
    torch.testing.assert_close(compressed, masked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(compressed, logits(model, batch)[:, -1], rtol=1e-4, atol=1e-4)  # dropping mattered


@pytest.mark.parametrize("budget", BUDGETS)
def test_kept_video_tokens_keep_their_original_mrope_positions(model, batch, budget):
    with recording_calls(model.model.language_model) as calls:
        logits(model, batch)
    positions = calls[0]["position_ids"]
    with (
        vtc.compress(model, "divprune", keep=K, video_budget=budget) as handle,
        recording_calls(model.model.language_model) as calls,
    ):
        logits(model, batch)
    short = calls[0]["position_ids"]
    for b in range(2):
        visual = visual_columns(batch, b)
        keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
        keep[visual] = False
        keep[visual[handle.last_kept[b]]] = True
        cols = keep.nonzero().squeeze(1)
        assert torch.equal(short[:, b, -cols.numel() :], positions[:, b, cols])
    # Two frames of a video differ in their temporal position.
    video = visual_columns(batch, 1)[:12]
    assert positions[-3, 1, video].unique().numel() == 3


def test_in_llm_method_on_video_equals_the_no_cache_reference(model, batch):
    """FastV at layer 1 (after the tiny Qwen3-VL's one DeepStack layer) keeps K tokens per video (one image id)."""
    layer = 1
    method = FastV(layer=layer)
    replay = Replay(method)
    with vtc.compress(model, method, keep=K) as handle:
        generated = greedy_generate(model, batch, STEPS)
        replay.replay()
        reference = greedy_no_cache(model, batch, STEPS)
    assert torch.equal(generated, reference)
    assert handle.stats["visual_tokens_per_layer"][1][layer:] == [K * 2] * (
        len(model.model.language_model.layers) - layer
    )


def test_beam_search_repeats_videos_and_their_signals_follow(model, batch, family):
    if TRANSFORMERS_4 and family == "qwen3_vl":
        pytest.skip("transformers 4.57's Qwen3-VL cannot expand videos for beam search (it counts frames as videos)")
    with vtc.compress(model, "fastervlm", signal="attention_received", keep=K) as handle:
        logits(model, batch)
        greedy_kept = handle.last_kept
        out = model.generate(**batch, max_new_tokens=2, num_beams=2, do_sample=False)
    assert out.shape[0] == 2
    assert handle.stats["videos"] == [1, 1, 2, 2]
    for b in range(2):
        for beam in range(2):
            assert torch.equal(handle.last_kept[2 * b + beam], greedy_kept[b])


@pytest.mark.skipif(TRANSFORMERS_4, reason="mm_encoder_outputs exists from transformers 5.0")
def test_generate_encodes_videos_before_the_prefill(model, batch):
    with vtc.compress(model, "divprune", keep=K) as handle, recording_calls(model.model) as calls:
        greedy_generate(model, batch, 2)
    prefill = calls[0]
    assert prefill.get("pixel_values_videos") is None and prefill["mm_encoder_outputs"]["video"] is not None
    assert handle.stats["videos"] == [1, 2]


# -------------------------------------------------------------------------------------------- refusals


def test_an_unknown_budget_is_refused_with_the_choices(model):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"video_budget must be one of \['per_video', 'per_frame'\].*got 'global'"):
        vtc.compress(model, "divprune", keep=K, video_budget="global")
    assert count_hooks(model) == hooks


@pytest.mark.skipif(TRANSFORMERS_4, reason="mm_encoder_outputs exists from transformers 5.0")
def test_videos_encoded_before_attach_are_refused(model, batch):
    with torch.no_grad():
        encoded = {"video": model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])}
    inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw", "pixel_values_videos")}
    inputs["input_ids"] = torch.where(inputs["input_ids"] == QWEN_IMAGE_TOKEN_ID, 9, inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.where(inputs["mm_token_type_ids"] == 1, 0, inputs["mm_token_type_ids"])
    refused = r"needs each video's \(t, h, w\) grid.*not computed while vtc was attached"
    with vtc.compress(model, "divprune", keep=K), pytest.raises(ValueError, match=refused):
        model(**inputs, mm_encoder_outputs=encoded)


def test_a_per_frame_budget_without_a_pre_llm_method_is_refused(model):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"video_budget='per_frame' says how a pre-LLM.*'fastv' keeps its budget"):
        vtc.compress(model, "fastv", keep=K, video_budget="per_frame", layer=1)
    assert count_hooks(model) == hooks
    with vtc.compress(model, ["divprune", FastV(layer=1)], keep=[8, K], video_budget="per_frame"):
        pass


def test_video_budget_is_refused_where_videos_are_not_compressed():
    from vtc.tiny import tiny_llava

    llava = tiny_llava(image_size=56)
    with pytest.raises(ValueError, match=r"\['video_budget'\] do not apply.*video_budget= applies to model_types"):
        vtc.compress(llava, "divprune", keep=8, video_budget="per_frame")
    assert count_hooks(llava) == 0


# -------------------------------------------------------------------------------------------- which video is which


def video_pair(model, grids, pixels) -> dict:
    """Two samples of one video each, with the given patches."""
    inputs = tiny_qwen_inputs(model, image_grids=((), ()), video_grids=tuple((grid,) for grid in grids), seed=6)
    inputs["pixel_values_videos"] = torch.cat(pixels).to(inputs["pixel_values_videos"].dtype)
    return inputs


def patches(model, n: int, seed: int) -> torch.Tensor:
    vision = model.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_videos_before_images_keep_what_they_keep_after_them(model):
    """A sample's videos and images in either order: each keeps the same tokens (the vision tower encodes all images
    of the batch, then all videos, whatever their order in the prompt)."""
    grids = {"image_grids": (((8, 8),), ((4, 4),)), "video_grids": (((2, 4, 8),), ((3, 4, 4),)), "seed": 9}
    after = tiny_qwen_inputs(model, **grids)
    before = tiny_qwen_inputs(model, **grids, videos_first=True)
    assert torch.equal(before["pixel_values_videos"], after["pixel_values_videos"])
    kept = []
    for inputs, images_first in ((after, True), (before, False)):
        with vtc.compress(model, "fastervlm", signal="attention_received", keep=K) as handle:
            generated = greedy_generate(model, inputs, STEPS)
            assert torch.equal(generated, greedy_no_cache(model, inputs, STEPS))
        sizes = [[16, 16], [4, 12]]  # per sample: image, video
        parts = [split(k, s if images_first else s[::-1]) for k, s in zip(handle.last_kept, sizes, strict=True)]
        kept.append([[p.tolist() for p in (row if images_first else row[::-1])] for row in parts])
    assert kept[0] == kept[1]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_beams_keep_each_videos_own_choice_when_videos_share_their_first_frames(model, family, num_beams):
    """Two videos of one size whose first temporal patch is the same, then differs: each beam keeps what its own
    video keeps alone (transformers 5 encodes before it repeats the rows for beams)."""
    if TRANSFORMERS_4 and family == "qwen3_vl" and num_beams > 1:
        pytest.skip("transformers 4.57's Qwen3-VL cannot expand videos for beam search (it counts frames as videos)")
    a, b = patches(model, 32, 1), patches(model, 32, 2)
    b[:16] = a[:16]
    inputs = video_pair(model, [(2, 4, 4), (2, 4, 4)], [a, b])
    with vtc.compress(model, "fastervlm", signal="attention_received", keep=2, video_budget="per_frame") as handle:
        logits(model, inputs)
        alone = [k.tolist() for k in handle.last_kept]
        assert alone[0] != alone[1]
        model.generate(**inputs, max_new_tokens=2, num_beams=num_beams, do_sample=False)
    assert [k.tolist() for k in handle.last_kept] == [row for row in alone for _ in range(num_beams)]


def test_beams_keep_a_still_video_whole_when_a_shorter_one_repeats_its_frames(model, family):
    """A still video of 2 temporal patches and one of 4 with the same frame: each stays one video under beams."""
    if TRANSFORMERS_4 and family == "qwen3_vl":
        pytest.skip("transformers 4.57's Qwen3-VL cannot expand videos for beam search (it counts frames as videos)")
    frame = patches(model, 16, 1)
    inputs = video_pair(model, [(2, 4, 4), (4, 4, 4)], [frame.repeat(2, 1), frame.repeat(4, 1)])
    with vtc.compress(model, "divprune", keep=3) as handle:
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
    assert handle.stats["videos"] == [1, 1, 1, 1]
    assert handle.stats["visual_tokens_after"] == [3, 3, 3, 3]


@pytest.mark.skipif(TRANSFORMERS_4, reason="mm_encoder_outputs exists from transformers 5.0")
def test_each_forward_plans_with_the_record_of_the_encoder_outputs_it_gets(model):
    """Videos encoded while attached (get_video_features), in another order than they are used: each forward plans
    with its own video's grid (per frame: 2 frames x 3, not the other video's 4 x 3)."""
    v1 = tiny_qwen_inputs(model, image_grids=((),), video_grids=(((2, 4, 8),),), seed=1)
    v2 = tiny_qwen_inputs(model, image_grids=((),), video_grids=(((4, 4, 4),),), seed=2)
    with vtc.compress(model, "divprune", keep=3, video_budget="per_frame") as handle, torch.no_grad():
        encoded = [model.model.get_video_features(v["pixel_values_videos"], v["video_grid_thw"]) for v in (v1, v2)]
        for inputs, video, kept in ((v1, encoded[0], 6), (v2, encoded[1], 12), (v1, encoded[0], 6)):
            rest = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
            model(**rest, mm_encoder_outputs={"video": video})
            assert handle.stats["visual_tokens_after"] == [kept]
        # The record of these outputs, but other features in them: refused, not planned with the wrong record.
        encoded[1].pooler_output = tuple(p + 1 for p in encoded[1].pooler_output)
        rest = {k: v for k, v in v2.items() if k != "pixel_values_videos"}
        with pytest.raises(ValueError, match=r"video 0 of this call is not the one the vision encoder gave vtc"):
            model(**rest, mm_encoder_outputs={"video": encoded[1]})


def test_generate_without_a_cache_equals_generate_with_it(model, batch):
    """use_cache=False: every step is a prefill of the whole sequence, with the same encoded videos (transformers 5)
    or the pixels (4.57)."""
    with vtc.compress(model, "fastervlm", signal="attention_received", keep=K) as handle:
        cached = greedy_generate(model, batch, STEPS)
        kept = [k.clone() for k in handle.last_kept]
        uncached = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, use_cache=False)
    assert torch.equal(uncached[:, -STEPS:], cached)
    assert all(torch.equal(a, b) for a, b in zip(kept, handle.last_kept, strict=True))


def test_sdpa_and_eager_attention_agree_on_videos(family):
    results = []
    for implementation in ("sdpa", "eager"):
        model = FAMILIES[family](attn_implementation=implementation)
        inputs = tiny_qwen_inputs(model, image_grids=IMAGES, video_grids=VIDEOS, seed=3)
        with vtc.compress(model, "fastervlm", signal="attention_received", keep=K) as handle:
            results.append((logits(model, inputs)[:, -1], greedy_generate(model, inputs, STEPS), handle.last_kept))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))


# -------------------------------------------------------------------------------------------- evs (temporal)


@pytest.fixture(scope="module")
def videos_only(model):
    return tiny_qwen_inputs(model, image_grids=((), ()), video_grids=VIDEOS, seed=3)


def test_evs_keeps_what_evs_chooses_on_each_videos_features_and_grid(model, videos_only):
    """The adapter hands evs each video's merged tokens in raster order, frame after frame, with its (T, H, W) grid:
    the kept tokens are vtc.select('evs') on the features the language model receives."""
    keep = 10
    with recording_calls(model.model.language_model) as calls:
        logits(model, videos_only)
    embeds = calls[0]["inputs_embeds"]
    with vtc.compress(model, "evs", keep=keep) as handle:
        generated = greedy_generate(model, videos_only, STEPS)
        assert torch.equal(generated, greedy_no_cache(model, videos_only, STEPS))
    grids = [[(2, 2, 4)], [(3, 2, 2), (2, 4, 2)]]  # merged (T, H, W) of each video
    for b, row in enumerate(grids):
        cols, start, expected = visual_columns(videos_only, b), 0, []
        for grid in row:
            n = grid[0] * grid[1] * grid[2]
            features = embeds[b, cols[start : start + n]].unsqueeze(0)
            expected += (vtc.select("evs", keep=min(keep, n), features=features, grid=grid)[0] + start).tolist()
            start += n
        assert handle.last_kept[b].tolist() == expected


def test_evs_refuses_images_and_per_frame_budgets_and_keeps_below_a_frame(model, batch, videos_only):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"'evs' compares each frame.*video_budget='per_frame'"):
        vtc.compress(model, "evs", keep=10, video_budget="per_frame")
    assert count_hooks(model) == hooks
    with vtc.compress(model, "evs", keep=10) as handle:
        for run in (lambda: logits(model, batch), lambda: greedy_generate(model, batch, 2)):
            with (
                recording_calls(model.model.language_model) as calls,
                pytest.raises(ValueError, match=r"'evs' compares each frame.*this input holds images"),
            ):
                run()
            assert not calls
        logits(model, videos_only)  # still attached and working
        assert handle.stats["videos"] == [1, 2]
    with vtc.compress(model, "evs", keep=6), pytest.raises(ValueError, match=r"whole first frame.*keep >= 8"):
        logits(model, videos_only)


@pytest.mark.parametrize("via", ["forward", "generate"])
def test_evs_refuses_a_budget_below_one_frame_before_the_vision_tower_runs(model, videos_only, via):
    calls = []
    for budget in ({"keep": 6}, {"ratio": 0.2}):  # a 4 x 8 patch frame is 8 tokens; 0.2 of 16 is 3
        with vtc.compress(model, "evs", **budget):
            spy = model.model.visual.register_forward_pre_hook(lambda *args: calls.append(1))  # after vtc's
            try:
                with pytest.raises(ValueError, match=r"whole first frame"):
                    logits(model, videos_only) if via == "forward" else greedy_generate(model, videos_only, 2)
            finally:
                spy.remove()
    assert not calls
