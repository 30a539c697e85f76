"""InternVL adapter on a tiny random InternVLForConditionalGeneration: 112 px tiles, 14 px patches, pixel shuffle to
4 x 4 = 16 tokens per tile, images of 1, 3 and 5 tiles (k > 1: k - 1 tiles and a thumbnail)."""

from __future__ import annotations

import pytest
import torch
import transformers

import vtc
from tests.helpers import case_id, count_hooks, greedy_generate, greedy_no_cache
from vtc.adapters.llava_next import distribute
from vtc.tiny import IMAGE_TOKEN_ID, INTERNVL_END_TOKEN_ID, tiny_internvl, tiny_internvl_inputs

T = 16  # tokens per tile
TILES = ((3,), (1, 5))  # sample 0: one image of 3 tiles; sample 1: a single tile, then 5 tiles
KEEP = 12
STEPS = 4
BUDGETS = ("global", "per_crop")


def method_cases():
    return [(name, {}) for name in vtc.list_methods("pre", images=True)] + [("dart", {"merge": True})]


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(scope="module")
def batch(model):
    return tiny_internvl_inputs(model, tiles=TILES, seed=1)


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def sample(inputs, b, tiles=TILES):
    """Sample b of a batch, unpadded, with its tiles."""
    keep = inputs["attention_mask"][b].bool()
    first = sum(sum(counts) for counts in tiles[:b])
    return {
        "input_ids": inputs["input_ids"][b][keep].unsqueeze(0),
        "attention_mask": inputs["attention_mask"][b][keep].unsqueeze(0),
        "pixel_values": inputs["pixel_values"][first : first + sum(tiles[b])],
    }


def expected_counts(keep: int, budget: str, tiles: int) -> list[int]:
    """Per tile of an image of ``tiles`` tiles: what it keeps (global: only the total is fixed)."""
    total = min(keep, tiles * T)
    return distribute(total, [1.0] * tiles, [T] * tiles) if budget == "per_crop" else [total]


def per_tile(kept: torch.Tensor, tiles: int) -> list[int]:
    return torch.bincount(kept // T, minlength=tiles).tolist()


@torch.no_grad()
def reference_cls_mass(model, pixel_values, layer: int = -1, **options) -> torch.Tensor:
    """[tiles, T] the [CLS] query's attention at vision layer ``layer``, from the eager attention weights (a separate
    eager copy of the tower, built with ``options``), summed over each token's 2 x 2 patches found by their
    coordinates."""
    eager = tiny_internvl(attn_implementation="eager", **options)
    eager.load_state_dict(model.state_dict())
    weights = []
    last = eager.model.vision_tower.encoder.layer[layer].attention
    hook = last.register_forward_hook(lambda module, args, output: weights.append(output[1]))
    try:
        eager.model.vision_tower(pixel_values=pixel_values)
    finally:
        hook.remove()
    row = weights[0][:, :, 0, 1:].mean(1)  # [tiles, 64] over the 8 x 8 patches
    grid = row.view(-1, 4, 2, 4, 2)  # token (i, j) holds patches (2i + a, 2j + c)
    return grid.sum(dim=(2, 4)).flatten(1)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_remove_restores_the_model_bit_for_bit(model, batch, case, budget):
    name, options = case
    before = logits(model, batch)
    hooks = count_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = vtc.compress(model, name, keep=KEEP, budget=budget, **options)
    assert count_hooks(model) > hooks
    compressed = logits(model, batch)
    handle.remove()
    assert count_hooks(model) == hooks
    assert compressed.shape[1] < before.shape[1]
    assert torch.equal(logits(model, batch), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_keeping_every_token_is_the_identity(model, batch, case, budget):
    name, options = case
    before = logits(model, batch)
    tokens = [3 * T, 6 * T]
    for amount in ({"keep": 5 * T}, {"keep": 10_000}, {"ratio": 1.0}):
        with vtc.compress(model, name, budget=budget, **amount, **options) as handle:
            after = logits(model, batch)
        assert torch.equal(after, before)
        assert [k.tolist() for k in handle.last_kept] == [list(range(n)) for n in tokens]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_generate_equals_no_cache_reference_with_exact_counts(model, batch, case, budget):
    name, options = case
    with vtc.compress(model, name, keep=KEEP, budget=budget, **options) as handle:
        cached = greedy_generate(model, batch, STEPS)
        kept = [k.clone() for k in handle.last_kept]
        reference = greedy_no_cache(model, batch, STEPS)
    assert torch.equal(cached, reference)
    assert handle.stats["images"] == [1, 2]
    assert handle.stats["visual_tokens_before"] == [3 * T, 6 * T]
    assert handle.stats["visual_tokens_after"] == [KEEP, 2 * KEEP]  # the 1-tile image keeps 12 of its 16
    if budget == "per_crop":
        assert per_tile(kept[0], 3) == expected_counts(KEEP, budget, 3)
        second = kept[1][kept[1] >= T] - T
        assert per_tile(kept[1][kept[1] < T], 1) == [KEEP]
        assert per_tile(second, 5) == expected_counts(KEEP, budget, 5) == [3, 3, 2, 2, 2]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", [c for c in method_cases() if c[0] != "random"], ids=case_id)
def test_batch_with_left_padding_and_different_tile_counts_equals_each_sample_alone(model, batch, case, budget):
    name, options = case
    with vtc.compress(model, name, keep=KEEP, budget=budget, **options) as handle:
        batched = greedy_generate(model, batch, STEPS)
        batched_kept = handle.last_kept
        for b in range(2):
            assert torch.equal(greedy_generate(model, sample(batch, b), STEPS), batched[b : b + 1])
            assert torch.equal(handle.last_kept[0], batched_kept[b])


@pytest.mark.parametrize("budget", BUDGETS)
def test_fastervlm_keeps_the_tokens_holding_the_most_cls_attention(model, batch, budget):
    """Global: the top KEEP tokens of an image by the [CLS] attention mass they hold; per tile: the top of each tile
    with the even split."""
    mass = reference_cls_mass(model, batch["pixel_values"])  # [9 tiles, T] in sequence order
    images = [mass[0:3].flatten(), mass[3:4].flatten(), mass[4:9].flatten()]
    with vtc.compress(model, "fastervlm", keep=KEEP, budget=budget) as handle:
        logits(model, batch)
    second = handle.last_kept[1]
    kept = [handle.last_kept[0], second[second < T], second[second >= T] - T]
    for image, chosen in zip(images, kept, strict=True):
        tiles = image.numel() // T
        counts = expected_counts(KEEP, budget, tiles) if tiles > 1 else [KEEP]
        if len(counts) == 1:
            expected = image.topk(counts[0]).indices
        else:
            expected = torch.cat([t * T + image[t * T : (t + 1) * T].topk(c).indices for t, c in enumerate(counts)])
        assert chosen.tolist() == expected.sort().values.tolist()


@pytest.mark.skipif(transformers.__version__.startswith("4."), reason="transformers 4.57 reads only layer -1")
def test_another_feature_layer_and_qk_norm_choose_by_that_layers_cls_attention():
    """vision_feature_layer=-2 of a 3-layer tower is the output of layer 1: its [CLS] row (through the QK-norm of an
    InternViT-6B-style tower) decides."""
    options = {"vision_feature_layer": -2, "use_qk_norm": True}
    model = tiny_internvl(**options)
    inputs = tiny_internvl_inputs(model, tiles=((3,),), seed=4)
    mass = reference_cls_mass(model, inputs["pixel_values"], layer=1, **options).flatten()
    with vtc.compress(model, "fastervlm", keep=KEEP) as handle:
        logits(model, inputs)
    assert handle.last_kept[0].tolist() == mass.topk(KEEP).indices.sort().values.tolist()
    assert handle.stats["signal_sources"]["cls_attention"] == "vision layer 1 ([CLS] query row)"


def test_uniform_spreads_a_global_budget_over_the_tiles_stacked():
    """4 tiles of 4 x 4 tokens are a 16 x 4 grid: 16 tokens are an 8 x 2 lattice, rows 1, 3, ..., 15 and columns 1, 3:
    tokens 5, 7, 13, 15 of every tile (not the square 8 x 8 grid 64 tokens would otherwise be taken for)."""
    model = tiny_internvl()
    inputs = tiny_internvl_inputs(model, tiles=((4,),), seed=4)
    with vtc.compress(model, "uniform", keep=16) as handle:
        logits(model, inputs)
    assert handle.last_kept[0].tolist() == [t * T + i for t in range(4) for i in (5, 7, 13, 15)]


@pytest.mark.parametrize(("name", "amount"), [("divprune", {"ratio": 0.25}), ("fastv", {"keep": KEEP})])
def test_a_text_only_row_is_no_image(name, amount):
    model = tiny_internvl(text_layers=4)
    tiles = ((3,), ())
    inputs = tiny_internvl_inputs(model, tiles=tiles, seed=2)
    options = {"layer": 1} if name == "fastv" else {}
    with vtc.compress(model, name, **amount, **options) as handle:
        batched = greedy_generate(model, inputs, STEPS)
        assert handle.stats["images"] == [1, 0]
        assert handle.stats["visual_tokens_after"] == [KEEP, 0]
        for b in range(2):
            alone = sample(inputs, b, tiles)
            if b == 1:
                del alone["pixel_values"]
            assert torch.equal(greedy_generate(model, alone, STEPS), batched[b : b + 1])


def test_a_sliding_window_model_is_compressed_only_within_its_window():
    """Sliding-window layers attend to the last W slots of the cache; a cache vtc shortened reaches further back once
    a sequence is longer than W. Within W, removal equals masking; beyond it, the prompt (before the language model
    runs) or the decode step that gets there is refused."""
    inputs = sample(tiny_internvl_inputs(tiny_internvl(), tiles=((3,),), seed=1), 0, ((3,),))
    length = inputs["input_ids"].shape[1]  # 61
    model = tiny_internvl(text_layers=4, sliding_window=length + 2)
    with vtc.compress(model, "fastervlm", keep=KEEP) as handle:
        compressed = logits(model, inputs)[:, -1]
        kept = handle.last_kept[0]
        greedy_generate(model, inputs, 3)  # the model runs over 63 tokens at most (the last new one is not fed back)
        with pytest.raises(ValueError, match=rf"sliding-window attention over {length + 2} tokens and this sequence"):
            greedy_generate(model, inputs, 4)  # the third new token would be the 64th to run through it
    visual = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    dropped = torch.ones(len(visual), dtype=torch.bool)
    dropped[kept] = False
    mask = inputs["attention_mask"].clone()
    mask[0, visual[dropped]] = 0
    masked = logits(model, {**inputs, "attention_mask": mask, "position_ids": torch.arange(length)[None]})[:, -1]
    torch.testing.assert_close(compressed, masked, rtol=1e-5, atol=1e-5)
    short = tiny_internvl(text_layers=4, sliding_window=length - 1)
    with vtc.compress(short, "divprune", keep=KEEP) as handle:
        with pytest.raises(ValueError, match=rf"over {length - 1} tokens and this sequence reaches {length}"):
            logits(short, inputs)
        text = {k: v[:, -8:] for k, v in inputs.items() if k != "pixel_values"}
        logits(short, text)  # a text-only call still runs
        assert handle.stats["images"] == [0]


def test_a_call_with_another_feature_layer_is_refused(model, batch):
    with vtc.compress(model, "fastervlm", keep=KEEP) as handle:
        with pytest.raises(ValueError, match=r"this call passes vision_feature_layer=-2, but vtc reads"):
            logits(model, {**batch, "vision_feature_layer": -2})
        logits(model, batch)
        assert handle.stats["visual_tokens_after"] == [KEEP, 2 * KEEP]


def test_ratio_counts_each_images_tokens(model, batch):
    with vtc.compress(model, "divprune", ratio=0.25) as handle:
        logits(model, batch)
    assert handle.stats["visual_tokens_after"] == [12, 4 + 20]


def test_removal_at_original_positions_equals_masking_the_dropped_tokens(model, batch):
    """The compressed forward's last logits equal the uncompressed model's with the dropped visual tokens masked out
    of attention (keys), every token at its original position."""
    with vtc.compress(model, "fastervlm", keep=KEEP) as handle:
        compressed = logits(model, batch)[:, -1]
    visual = batch["input_ids"] == IMAGE_TOKEN_ID
    mask = batch["attention_mask"].clone()
    for b in range(2):
        dropped = torch.ones(int(visual[b].sum()), dtype=torch.bool)
        dropped[handle.last_kept[b]] = False
        mask[b, visual[b].nonzero().squeeze(1)[dropped]] = 0
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    masked = logits(model, {**batch, "attention_mask": mask, "position_ids": positions})[:, -1]
    torch.testing.assert_close(compressed, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    transformers.__version__.startswith("4."),
    reason="transformers 4.x expands InternVL's pixel_values per tile for beams (repeat_interleave), so each beam row "
    "receives other rows' tiles: the model itself sees other images",
)
def test_beam_search_repeats_images_and_signals_follow(model, batch):
    with vtc.compress(model, "fastervlm", keep=KEEP) as handle:
        logits(model, batch)
        alone = [k.clone() for k in handle.last_kept]
        model.generate(**batch, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
    assert [k.tolist() for k in handle.last_kept] == [k.tolist() for k in alone for _ in range(2)]


def test_sdpa_and_eager_agree(batch):
    results = []
    for implementation in ("sdpa", "eager"):
        model = tiny_internvl(attn_implementation=implementation)
        with vtc.compress(model, "fastervlm", keep=KEEP) as handle:
            results.append((logits(model, batch)[:, -1], greedy_generate(model, batch, STEPS), handle.last_kept))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))


def test_in_llm_methods_run_on_the_qwen2_language_model():
    model = tiny_internvl(text_layers=4)
    inputs = tiny_internvl_inputs(model, tiles=TILES, seed=2)
    with vtc.compress(model, ["divprune", vtc.methods.FastV(layer=1)], keep=[24, KEEP]) as handle:
        cached = greedy_generate(model, inputs, STEPS)
        assert handle.stats["visual_tokens_after"] == [KEEP, 2 * KEEP]
        for b in range(2):
            assert torch.equal(greedy_generate(model, sample(inputs, b), STEPS), cached[b : b + 1])


# -- refusals -------------------------------------------------------------------------------------------------


def test_the_thumbnail_budget_is_refused_with_the_reason(model):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match="do not say how an image's tiles were arranged; use budget='global'"):
        vtc.compress(model, "fastervlm", keep=KEEP, budget="thumbnail")
    with pytest.raises(ValueError, match=r"budget must be one of \['global', 'per_crop'\] for InternVL"):
        vtc.compress(model, "fastervlm", keep=KEEP, budget="tiles")
    assert count_hooks(model) == hooks


def test_a_full_feature_strategy_is_refused():
    model = tiny_internvl()
    model.config.vision_feature_select_strategy = "full"
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'default'"):
        vtc.compress(model, "divprune", keep=KEEP)
    assert count_hooks(model) == hooks


def test_placeholder_runs_that_are_not_whole_tiles_are_refused_and_vtc_stays_usable(model, batch):
    """The 5-tile image's placeholders cut 8 + 72 by a text token: the model itself accepts it (it counts only the
    total), vtc refuses it before the language model runs."""
    inputs = sample(batch, 1)
    ids = inputs["input_ids"].clone()
    positions = (ids[0] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    ids[0, positions[T + 8]] = INTERNVL_END_TOKEN_ID
    ids = torch.cat([ids[:, : positions[-1] + 1], torch.tensor([[IMAGE_TOKEN_ID]]), ids[:, positions[-1] + 1 :]], 1)
    bad = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with vtc.compress(model, "divprune", keep=KEEP) as handle:
        with pytest.raises(ValueError, match=r"runs of \[16, 8, 72\] image placeholders; each image must be a whole"):
            logits(model, bad)
        logits(model, batch)
        assert handle.stats["visual_tokens_after"] == [KEEP, 2 * KEEP]


def test_the_command_line_runs_it_with_a_tile_budget(capsys):
    from vtc.__main__ import main

    argv = ["--model", "tiny-internvl", "--methods", "fastervlm,fastv", "--budget", "per_crop", "--keep", "320"]
    assert main([*argv, "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "InternVLForConditionalGeneration" in out and "1280 visual tokens" in out
    assert "fastervlm    1280 -> 320" in out and "fastv        1280 -> 320" in out
