"""LLaVA-NeXT adapter on a tiny random AnyRes model (56 px crops of 4 x 4 tokens, LLaVA-1.6's pinpoint shapes).

Every expectation is computed here from the LLaVA-NeXT geometry (AnyRes grid, unpadding, one newline per row),
from eager attention weights, or from a plain largest-remainder split, never from the adapter's own helpers.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
import transformers
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

import vtc
from tests.helpers import case_id, count_hooks, greedy_generate, greedy_no_cache
from vtc.adapters.llava_next import distribute
from vtc.tiny import IMAGE_TOKEN_ID, llava_next_image_tokens, tiny_llava, tiny_llava_next, tiny_llava_next_inputs

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
SIDE = 4  # tokens per crop side: 56 px crops, 14 px patches
T = SIDE * SIDE
STEPS = 4
KEEP = 20
BUDGETS = ("global", "per_crop", "thumbnail")
# Sample 0: unpadding removes rows; sample 1: a full 2 x 2 grid, then an image whose unpadding removes columns.
SIZES = (((40, 112),), ((112, 112), (112, 40)))
# (height, width) -> what unpadding removes from the big crop grid.
GEOMETRY = {
    (56, 56): "cols",
    (56, 112): None,
    (112, 56): None,
    (112, 112): None,
    (40, 112): "rows",
    (112, 40): "cols",
    (30, 100): "rows",
    (100, 30): "cols",
    (56, 168): None,
    (168, 56): None,
    (80, 150): "rows",
    (150, 80): "cols",
    (60, 200): None,
    (40, 168): "rows",
    (168, 40): "cols",
}


def method_cases():
    return [(name, {}) for name in vtc.list_methods("pre", images=True)] + [("dart", {"merge": True})]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def eager(model):
    """The same weights with eager attention, for attention weights from output_attentions."""
    copy = tiny_llava_next(attn_implementation="eager")
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values(), strict=True))
    return copy


@pytest.fixture(scope="module")
def batch(model):
    return tiny_llava_next_inputs(model, image_sizes=SIZES, seed=1)


@pytest.fixture(scope="module")
def cls_rows(eager, batch):
    """[all crops, T] eager [CLS] attention row (head mean, [CLS] column dropped) at the feature layer."""
    return reference_cls_rows(eager, batch)


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


# -- independent references -----------------------------------------------------------------------


def packing(model, size) -> list[int]:
    """Source (crop * T + patch, crop 0 = base; -1 = newline) of each packed token, from the LLaVA-NeXT rules:
    base crop first, then the crops tiled into one big grid, rows / columns covering only padding cut
    symmetrically, one newline after every remaining row."""
    rows, cols, (_, grid_cols) = unpadded_grid(model, size)
    source = list(range(T))
    for y in rows:
        for x in cols:
            crop = 1 + (y // SIDE) * grid_cols + x // SIDE
            source.append(crop * T + (y % SIDE) * SIDE + x % SIDE)
        source.append(-1)
    return source


def unpadded_grid(model, size) -> tuple[range, range, tuple[int, int]]:
    """(rows, columns) of the big token grid that survive unpadding, and the crop grid's shape."""
    height, width = size
    config = model.config
    grid_rows, grid_cols = get_anyres_image_grid_shape(
        size, config.image_grid_pinpoints, config.vision_config.image_size
    )
    big_h, big_w = grid_rows * SIDE, grid_cols * SIDE
    rows, cols = range(big_h), range(big_w)
    if width / height > big_w / big_h:
        pad = (big_h - int(round(height * (big_w / width), 7))) // 2
        rows = range(pad, big_h - pad)
    else:
        pad = (big_w - int(round(width * (big_h / height), 7))) // 2
        cols = range(pad, big_w - pad)
    return rows, cols, (grid_rows, grid_cols)


def num_crops(model, size) -> int:
    config = model.config
    return image_size_to_num_patches(tuple(size), config.image_grid_pinpoints, config.vision_config.image_size)


def images_of(model, inputs) -> list[dict]:
    """Per image in batch order: sample, start among the sample's visual tokens, source, first crop row."""
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    tokens = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    images, i, crop = [], 0, 0
    for b, count in enumerate(tokens):
        start = 0
        while start < count:
            source = packing(model, sizes[i])
            images.append({"sample": b, "start": start, "source": source, "crop": crop, "size": sizes[i]})
            start += len(source)
            crop += num_crops(model, sizes[i])
            i += 1
        assert start == count
    return images


def kept_in(kept: torch.Tensor, image: dict) -> list[int]:
    """Positions (within the image) of the image's tokens among a sample's kept visual indices."""
    start, length = image["start"], len(image["source"])
    return [k - start for k in kept.tolist() if start <= k < start + length]


def rows_of(source) -> list[tuple[int, list[int]]]:
    """(newline position, positions of the crop tokens of its row) for every row of the big grid."""
    rows, current = [], []
    for j, s in enumerate(source):
        if s == -1:
            rows.append((j, current))
            current = []
        elif s >= T:
            current.append(j)
    return rows


def crop_counts(local: list[int], source) -> list[int]:
    """Kept content tokens per crop (base first)."""
    counts = Counter(source[j] // T for j in local if source[j] >= 0)
    return [counts[c] for c in range(max(source) // T + 1)]


def crop_sizes(source) -> list[int]:
    return crop_counts(list(range(len(source))), source)


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Hamilton's method: floors of the exact shares, then +1 by largest remainder (ties: lower index)."""
    exact = [total * (w / sum(weights)) for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def crop_pixels(model, inputs) -> torch.Tensor:
    """[all crops, 3, S, S] in the order the vision tower sees them (the processor's padding crops left out)."""
    sizes = inputs["image_sizes"].tolist()
    return torch.cat(
        [pixels[: num_crops(model, size)] for pixels, size in zip(inputs["pixel_values"], sizes, strict=True)]
    )


@torch.no_grad()
def reference_cls_rows(eager, inputs) -> torch.Tensor:
    out = eager.model.vision_tower(crop_pixels(eager, inputs), output_attentions=True, output_hidden_states=True)
    # hidden_states[h] is the output of layer h - 1: the feature layer's attention is attentions[h - 1].
    layer = len(out.hidden_states) + eager.config.vision_feature_layer - 1
    return out.attentions[layer][:, :, 0, 1:].mean(1)  # [crops, T]


def thumbnail_counts(image: dict, keep: int, cls_rows: torch.Tensor, model) -> list[int]:
    """GlobalCom2-style split: base keeps its proportional share; crop j gets weight N_j (1 + s_j - 1/n), s_j the
    share of the base crop's [CLS] attention on thumbnail tokens whose centre lies in crop j's unpadded area."""
    rows, cols, (_, grid_cols) = unpadded_grid(model, image["size"])
    sizes = crop_sizes(image["source"])
    base = largest_remainder(keep, sizes)[0]
    thumb = cls_rows[image["crop"]].double()
    mass = [0.0] * (len(sizes) - 1)
    for y in range(SIDE):
        for x in range(SIDE):
            big_y = rows[int((y + 0.5) * len(rows) / SIDE)]
            big_x = cols[int((x + 0.5) * len(cols) / SIDE)]
            mass[(big_y // SIDE) * grid_cols + big_x // SIDE] += float(thumb[y * SIDE + x])
    share = [m / sum(mass) for m in mass]
    weights = [n * (1 + s - 1 / len(share)) for n, s in zip(sizes[1:], share, strict=True)]
    crops = largest_remainder(keep - base, weights)
    assert all(c <= n for c, n in zip(crops, sizes[1:], strict=True))  # caps do not bind in these cases
    return [base] + crops


def expected_counts(image: dict, budget: str, keep: int, cls_rows: torch.Tensor, model) -> list[int] | None:
    """Kept content tokens per crop, where the budget fixes them (None for global)."""
    sizes = crop_sizes(image["source"])
    if keep >= sum(sizes):
        return sizes
    if budget == "per_crop":
        return largest_remainder(keep, sizes)
    if budget == "thumbnail":
        return thumbnail_counts(image, keep, cls_rows, model)
    return None


def check_kept(handle, model, inputs, keep: int, budget: str, cls_rows: torch.Tensor | None) -> None:
    """Exact counts per sample and per crop, and the newline rule, from last_kept and the reference packing."""
    images = images_of(model, inputs)
    after = [0] * inputs["input_ids"].shape[0]
    for image in images:
        local = kept_in(handle.last_kept[image["sample"]], image)
        source = image["source"]
        content = [j for j in local if source[j] >= 0]
        assert len(content) == min(keep, sum(crop_sizes(source)))
        kept = set(local)
        for newline, members in rows_of(source):
            assert (newline in kept) == any(j in kept for j in members)  # newlines follow their rows
        rows_kept = sum(any(j in kept for j in members) for _, members in rows_of(source))
        assert len(local) == len(content) + rows_kept  # nothing else is kept
        expected = expected_counts(image, budget, keep, cls_rows, model)
        if expected is not None:
            assert crop_counts(local, source) == expected
        after[image["sample"]] += len(content) + rows_kept
    tokens = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert handle.stats["visual_tokens_before"] == tokens
    assert handle.stats["visual_tokens_after"] == after == [len(k) for k in handle.last_kept]
    per_sample = Counter(image["sample"] for image in images)
    assert handle.stats["images"] == [per_sample[b] for b in range(len(tokens))]


def sample(inputs, b, counts):
    """Sample b of a batch, unpadded, with its images."""
    keep = inputs["attention_mask"][b].bool()
    first = sum(counts[:b])
    return {
        "input_ids": inputs["input_ids"][b][keep].unsqueeze(0),
        "attention_mask": inputs["attention_mask"][b][keep].unsqueeze(0),
        "pixel_values": inputs["pixel_values"][first : first + counts[b]],
        "image_sizes": inputs["image_sizes"][first : first + counts[b]],
    }


# -- the shared matrix: every method x every budget -------------------------------------------------


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
    before_after = zip(handle.stats["visual_tokens_before"], handle.stats["visual_tokens_after"], strict=True)
    dropped = [a - b for a, b in before_after]
    assert compressed.shape[1] == before.shape[1] - min(dropped) < before.shape[1]  # rows re-padded to the longest
    assert torch.equal(logits(model, batch), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_keeping_every_content_token_is_the_identity(model, batch, case, budget):
    name, options = case
    before = logits(model, batch)
    tokens = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    largest = max(sum(crop_sizes(image["source"])) for image in images_of(model, batch))
    for amount in ({"keep": largest}, {"keep": 10_000}, {"ratio": 1.0}):
        with vtc.compress(model, name, budget=budget, **amount, **options) as handle:
            after = logits(model, batch)
        assert torch.equal(after, before)
        assert [k.tolist() for k in handle.last_kept] == [list(range(n)) for n in tokens]
        assert handle.stats["visual_tokens_after"] == tokens


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_generate_equals_no_cache_reference_with_exact_counts(model, batch, cls_rows, case, budget):
    name, options = case
    with vtc.compress(model, name, keep=KEEP, budget=budget, **options) as handle:
        cached = greedy_generate(model, batch, STEPS)
        check_kept(handle, model, batch, KEEP, budget, cls_rows)
        kept_in_generate = [k.clone() for k in handle.last_kept]
        reference = greedy_no_cache(model, batch, STEPS)
        check_kept(handle, model, batch, KEEP, budget, cls_rows)
    assert torch.equal(cached, reference)
    assert all(torch.equal(a, b) for a, b in zip(kept_in_generate, handle.last_kept, strict=True))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", [c for c in method_cases() if c[0] != "random"], ids=case_id)
def test_batch_with_left_padding_and_different_sizes_equals_each_sample_alone(model, batch, case, budget):
    """(random draws one score row per image of a shape, so its choice depends on the batch: left out.)"""
    name, options = case
    counts = [len(sizes) for sizes in SIZES]
    with vtc.compress(model, name, keep=KEEP, budget=budget, **options) as handle:
        batched = greedy_generate(model, batch, STEPS)
        batched_kept = handle.last_kept
        batched_last = logits(model, batch)[:, -1]
        for b in range(len(counts)):
            single = sample(batch, b, counts)
            assert torch.equal(greedy_generate(model, single, STEPS), batched[b : b + 1])
            assert torch.equal(handle.last_kept[0], batched_kept[b])
            torch.testing.assert_close(logits(model, single)[:, -1], batched_last[b : b + 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", BUDGETS)
def test_ratio_counts_each_images_content_tokens(model, batch, cls_rows, budget):
    with vtc.compress(model, "divprune", ratio=0.3, budget=budget) as handle:
        logits(model, batch)
    for image in images_of(model, batch):
        content = sum(crop_sizes(image["source"]))
        keep = max(1, round(0.3 * content))
        local = kept_in(handle.last_kept[image["sample"]], image)
        counts = crop_counts(local, image["source"])
        assert sum(counts) == keep
        expected = expected_counts(image, budget, keep, cls_rows, model)
        assert expected is None or counts == expected


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("keep", [1, 3, 33])
def test_newlines_follow_their_rows(model, batch, cls_rows, keep, budget):
    """A newline is kept exactly when its row keeps a token (checked inside check_kept), at extreme budgets too."""
    with vtc.compress(model, "random", keep=keep, budget=budget) as handle:
        logits(model, batch)
    check_kept(handle, model, batch, keep, budget, cls_rows)
    kept_newlines = sum(
        image["source"][j] == -1
        for image in images_of(model, batch)
        for j in kept_in(handle.last_kept[image["sample"]], image)
    )
    assert kept_newlines > 0 or keep == 1


# -- the packing map --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", list(GEOMETRY), ids=lambda size: f"{size[0]}x{size[1]}")
def test_packing_map_follows_the_anyres_geometry(model, size):
    rows, cols, (grid_rows, grid_cols) = unpadded_grid(model, size)
    assert grid_rows * grid_cols == num_crops(model, size) - 1
    removed = "rows" if len(rows) < grid_rows * SIDE else "cols" if len(cols) < grid_cols * SIDE else None
    assert removed == GEOMETRY[size]
    reference = packing(model, size)
    assert len(reference) == llava_next_image_tokens(model, *size)  # the model's own token count
    with vtc.compress(model, "divprune", keep=8) as handle:
        assert handle._adapter.packing(size).tolist() == reference


def test_packed_embeddings_come_from_the_mapped_crop_and_patch(model):
    """What the language model receives at packed position j is the projector output of crop source[j] // T, patch
    source[j] % T of that image (newlines: image_newline), for images whose unpadding removes rows or columns."""
    inputs = tiny_llava_next_inputs(model, image_sizes=(((40, 112), (100, 30)), ((112, 112), (56, 56))), seed=2)
    projected, seen = [], []

    def spy_embeds(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"])

    spies = [
        model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out)),
        model.model.language_model.register_forward_pre_hook(spy_embeds, with_kwargs=True),
    ]
    try:
        with vtc.compress(model, "divprune", keep=10_000) as handle:  # keeps everything: the full sequence
            logits(model, inputs)
            maps = {size: handle._adapter.packing(size) for size in map(tuple, inputs["image_sizes"].tolist())}
    finally:
        for spy in spies:
            spy.remove()
    (table,) = projected  # [all crops, T, D]
    newline = model.model.image_newline
    for image in images_of(model, inputs):
        source = maps[image["size"]]
        b = image["sample"]
        positions = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        embeds = seen[0][b, positions[image["start"] : image["start"] + len(source)]]
        safe = source.clamp(min=0)
        expected = table[image["crop"] + safe // T, safe % T]
        expected[source == -1] = newline
        assert torch.equal(embeds, expected)


# -- [CLS] signals mapped through the pack order -----------------------------------------------------


@pytest.mark.parametrize("budget", [None, "global"])
def test_fastervlm_global_keeps_top_cls_attention_of_each_tokens_crop(model, batch, cls_rows, budget):
    keep = 20
    with vtc.compress(model, "fastervlm", keep=keep, budget=budget) as handle:
        logits(model, batch)
    for image in images_of(model, batch):
        source = torch.tensor(image["source"])
        content = (source >= 0).nonzero().squeeze(1)
        score = cls_rows[image["crop"] + source[content] // T, source[content] % T]  # [content tokens]
        top = score.topk(keep)
        local = torch.tensor(kept_in(handle.last_kept[image["sample"]], image))
        chosen = local[source[local] >= 0]
        chosen_score = cls_rows[image["crop"] + source[chosen] // T, source[chosen] % T]
        torch.testing.assert_close(chosen_score.sort().values, top.values.sort().values, rtol=1e-5, atol=1e-7)
        assert torch.equal(chosen, content[top.indices].sort().values)
        # The test can tell the pack order apart: crop / patch order would pick other tokens.
        naive = cls_rows[image["crop"] : image["crop"] + num_crops(model, image["size"])].flatten()[: len(content)]
        assert not torch.equal(chosen, content[naive.topk(keep).indices].sort().values)


# -- budgets ----------------------------------------------------------------------------------------


def test_thumbnail_gives_more_tokens_to_the_crop_under_more_thumbnail_attention(model, batch, cls_rows):
    """Image 0 (40 x 112) has two crops of 8 tokens; its thumbnail attention favours one of them."""
    image = images_of(model, batch)[0]
    keep = 24  # base 12, the crops share 12
    with vtc.compress(model, "divprune", keep=keep, budget="thumbnail") as handle:
        logits(model, batch)
    counts = crop_counts(kept_in(handle.last_kept[0], image), image["source"])
    assert counts == thumbnail_counts(image, keep, cls_rows, model)
    thumb = cls_rows[image["crop"]].view(SIDE, SIDE)
    left, right = float(thumb[:, : SIDE // 2].sum()), float(thumb[:, SIDE // 2 :].sum())
    assert counts[0] == 12 and counts[1] != counts[2]
    assert (counts[1] > counts[2]) == (left > right)
    with vtc.compress(model, "divprune", keep=keep, budget="per_crop") as handle:
        logits(model, batch)
    assert crop_counts(kept_in(handle.last_kept[0], image), image["source"]) == [12, 6, 6]


@pytest.mark.parametrize("column, expected", [(0, [8, 12, 4]), (SIDE - 1, [8, 4, 12])])
def test_thumbnail_split_follows_the_documented_formula(model, monkeypatch, column, expected):
    """All thumbnail attention on one column: s = (1, 0), weights 16 * (1 + 1 - 1/2) : 16 * (1 + 0 - 1/2) = 3 : 1,
    so after the base's proportional 8 of 24 the two crops of 16 get 12 and 4."""

    def one_column(self, hidden):
        row = torch.zeros(hidden.shape[0], hidden.shape[1])
        row[:, 1 + column + SIDE * torch.arange(SIDE)] = 1.0 / SIDE  # column 0 is [CLS] itself
        return row

    monkeypatch.setattr("vtc.probes.ClsRow.row", one_column)
    inputs = tiny_llava_next_inputs(model, image_sizes=(((56, 112),),), seed=3)
    (image,) = images_of(model, inputs)
    assert crop_sizes(image["source"]) == [16, 16, 16]
    with vtc.compress(model, "uniform", keep=24, budget="thumbnail") as handle:
        logits(model, inputs)
    assert crop_counts(kept_in(handle.last_kept[0], image), image["source"]) == expected


@pytest.mark.parametrize("budget", BUDGETS)
def test_keep_above_an_images_content_keeps_it_whole_while_a_bigger_one_is_compressed(model, eager, budget):
    inputs = tiny_llava_next_inputs(model, image_sizes=(((40, 112),), ((112, 112),)), seed=4)
    small, big = images_of(model, inputs)
    assert sum(crop_sizes(small["source"])) == 32 and sum(crop_sizes(big["source"])) == 80
    with vtc.compress(model, "dart", keep=40, budget=budget) as handle:
        logits(model, inputs)
    assert handle.last_kept[0].tolist() == list(range(len(small["source"])))
    assert sum(crop_counts(kept_in(handle.last_kept[1], big), big["source"])) == 40
    check_kept(handle, model, inputs, 40, budget, reference_cls_rows(eager, inputs))


# -- generate() ---------------------------------------------------------------------------------------


ONE_IMAGE_EACH = (((40, 112),), ((112, 112),))


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 4.x generate() passes pixel_values and image_sizes")
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("sizes", [SIZES, ONE_IMAGE_EACH], ids=["multi", "single"])
def test_generate_encodes_images_first_and_still_equals_the_no_cache_reference(model, eager, budget, sizes):
    """transformers 5.x generate() runs get_image_features before the prefill, pops image_sizes and passes the
    packed features as mm_encoder_outputs: vtc finds each image's crops by matching its tokens to the projector
    output. (With "single", matching by a float mat-vec key failed: the same row rounded differently.)"""
    inputs = tiny_llava_next_inputs(model, image_sizes=sizes, seed=1)
    calls = []

    def spy(module, args, kwargs):
        calls.append((kwargs.get("image_sizes"), kwargs.get("pixel_values"), kwargs.get("mm_encoder_outputs")))

    with vtc.compress(model, "fastervlm", keep=KEEP, budget=budget) as handle:
        hook = model.model.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            cached = greedy_generate(model, inputs, STEPS)
        finally:
            hook.remove()
        generated_kept = [k.clone() for k in handle.last_kept]
        check_kept(handle, model, inputs, KEEP, budget, reference_cls_rows(eager, inputs))
        reference = greedy_no_cache(model, inputs, STEPS)  # forwards with pixel_values and image_sizes
    image_sizes, pixel_values, encoded = calls[0]
    assert image_sizes is None and pixel_values is None
    assert len(encoded["image"].pooler_output) == sum(len(s) for s in sizes)
    assert torch.equal(cached, reference)
    assert all(torch.equal(a, b) for a, b in zip(generated_kept, handle.last_kept, strict=True))


MULTI_IMAGE_BEAMS = pytest.mark.skipif(
    TRANSFORMERS_4,
    reason="transformers 4.x beam search repeats the images of a multi-image sample one by one (A A B B) and so "
    "places them in the wrong rows even without vtc",
)


@pytest.mark.parametrize(
    "sizes", [ONE_IMAGE_EACH, pytest.param(SIZES, marks=MULTI_IMAGE_BEAMS)], ids=["single", "multi"]
)
@pytest.mark.parametrize("budget", BUDGETS)
def test_beam_search_repeats_images_and_signals_follow(model, budget, sizes):
    inputs = tiny_llava_next_inputs(model, image_sizes=sizes, seed=5)
    with vtc.compress(model, "fastervlm", keep=KEEP, budget=budget) as handle:
        logits(model, inputs)
        single = handle.stats["visual_tokens_after"]
        kept = [k.clone() for k in handle.last_kept]
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape[0] == 2
    assert handle.stats["images"] == [len(sizes[0])] * 2 + [len(sizes[1])] * 2
    assert handle.stats["visual_tokens_after"] == [single[0], single[0], single[1], single[1]]
    assert all(torch.equal(a, b) for a, b in zip(handle.last_kept, [kept[0], kept[0], kept[1], kept[1]], strict=True))


# -- errors -------------------------------------------------------------------------------------------


def test_unknown_budget_names_the_choices(model):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"budget must be one of \['global', 'per_crop', 'thumbnail'\].*'bogus'"):
        vtc.compress(model, "divprune", keep=8, budget="bogus")
    assert count_hooks(model) == hooks
    with vtc.compress(model, "divprune", keep=8):  # nothing left attached
        pass


def test_budget_option_is_refused_on_llava_1_5():
    llava = tiny_llava(image_size=56)
    with pytest.raises(
        ValueError,
        match=r"option\(s\) \['budget'\] do not apply to LlavaForConditionalGeneration; "
        r"budget= applies to model_types \['llava_next', 'internvl', 'llava_onevision'\]",
    ):
        vtc.compress(llava, "divprune", keep=8, budget="per_crop")
    assert count_hooks(llava) == 0


def test_thumbnail_budget_needs_cls_attention():
    embeddings_only = tiny_llava_next(vision_feature_layer=0)  # features from the embeddings: no attention layer
    with pytest.raises(ValueError, match=r"budget='thumbnail' needs the vision tower's \[CLS\] attention"):
        vtc.compress(embeddings_only, "divprune", keep=8, budget="thumbnail")
    assert count_hooks(embeddings_only) == 0
    vtc.compress(embeddings_only, "divprune", keep=8, budget="per_crop").remove()  # budgets without [CLS] attach


def test_labels_are_refused(model, batch):
    with vtc.compress(model, "random", keep=8, budget="per_crop"), pytest.raises(ValueError, match="inference"):
        model(**batch, labels=batch["input_ids"])


def test_a_forward_without_image_sizes_fails_and_leaves_vtc_usable(model, batch):
    with vtc.compress(model, "fastervlm", keep=KEEP) as handle:
        expected = logits(model, batch)
        kept = [k.clone() for k in handle.last_kept]
        no_sizes = {k: v for k, v in batch.items() if k != "image_sizes"}
        with pytest.raises((TypeError, ValueError)):  # transformers itself needs image_sizes to split the crops
            logits(model, no_sizes)
        assert torch.equal(logits(model, batch), expected)
        assert all(torch.equal(a, b) for a, b in zip(handle.last_kept, kept, strict=True))


@pytest.mark.skipif(TRANSFORMERS_4, reason="mm_encoder_outputs exists from transformers 5.0")
def test_features_computed_before_attach_need_image_sizes(model, batch):
    with torch.no_grad():
        encoded = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], return_dict=True
        )
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with vtc.compress(model, "divprune", keep=KEEP) as handle:
        with pytest.raises(ValueError, match="pass image_sizes"):
            model(**text, mm_encoder_outputs={"image": encoded})
        model(**text, image_sizes=batch["image_sizes"], mm_encoder_outputs={"image": encoded})
        precomputed = [k.clone() for k in handle.last_kept]
        logits(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(precomputed, handle.last_kept, strict=True))
    with vtc.compress(model, "fastervlm", keep=KEEP), pytest.raises(ValueError, match="vision encoder did not run"):
        model(**text, image_sizes=batch["image_sizes"], mm_encoder_outputs={"image": encoded})


def test_image_tokens_that_do_not_split_into_whole_images_are_refused(model, batch):
    """One placeholder moved from sample 1 to sample 0: transformers checks only the total."""
    ids = batch["input_ids"].clone()
    first = (ids[1] == IMAGE_TOKEN_ID).nonzero()[0, 0]
    ids[1, first] = 7
    ids[0, (ids[0] == IMAGE_TOKEN_ID).nonzero()[-1, 0] + 1] = IMAGE_TOKEN_ID
    ran = []
    spy = model.model.language_model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with vtc.compress(model, "dart", keep=8), pytest.raises(ValueError, match=r"do not split into whole images"):
            model(**{**batch, "input_ids": ids})
    finally:
        spy.remove()
    assert not ran


# -- distribute ---------------------------------------------------------------------------------------


def test_distribute_is_the_largest_remainder_split_when_no_cap_binds():
    rng = random.Random(0)
    for _ in range(300):
        parts = rng.randint(1, 6)
        weights = [rng.choice([0.0, 1.0, 2.0, rng.random() * 10]) for _ in range(parts)]
        if sum(weights) == 0:
            continue
        total = rng.randint(0, 60)
        counts = distribute(total, weights, [10**6] * parts)
        assert counts == largest_remainder(total, weights)
        exact = [total * w / sum(weights) for w in weights]
        assert all(math.floor(e) <= c <= math.ceil(e) for c, e in zip(counts, exact, strict=True))


def test_distribute_respects_caps_and_sums_to_total():
    rng = random.Random(1)
    for _ in range(300):
        parts = rng.randint(1, 6)
        weights = [rng.random() * 10 for _ in range(parts)]
        caps = [rng.randint(0, 12) for _ in range(parts)]
        total = rng.randint(0, sum(caps))
        counts = distribute(total, weights, caps)
        assert sum(counts) == total
        assert all(0 <= c <= cap for c, cap in zip(counts, caps, strict=True))
        # A part below its cap never gets less than its uncapped floor share.
        exact = [total * w / sum(weights) for w in weights]
        assert all(c >= math.floor(e) for c, e, cap in zip(counts, exact, caps, strict=True) if c < cap)


@pytest.mark.parametrize(
    "total, weights, caps, expected",
    [
        (3, [1, 1, 1, 1], [9] * 4, [1, 1, 1, 0]),  # ties: lower index first
        (2, [1, 1, 1], [9] * 3, [1, 1, 0]),
        (5, [1, 1], [9, 9], [3, 2]),
        (8, [10, 1, 1], [2, 10, 10], [2, 3, 3]),  # what a capped part cannot take goes to the others
        (10, [1, 1], [3, 100], [3, 7]),
        (6, [0, 0, 0], [5, 5, 5], [2, 2, 2]),  # no weight: even split
        (7, [3, 0], [4, 9], [4, 3]),
        (9, [1, 2, 3], [2, 3, 4], [2, 3, 4]),  # total = sum(caps)
        (0, [1, 2], [3, 3], [0, 0]),
        (20, [16, 8, 8], [16, 8, 8], [10, 5, 5]),
        (7, [16, 8, 8], [16, 8, 8], [3, 2, 2]),  # 3.5, 1.75, 1.75: the larger remainders win
    ],
)
def test_distribute_examples(total, weights, caps, expected):
    assert distribute(total, weights, caps) == expected
    assert distribute(total, weights, caps) == expected  # deterministic


def test_distribute_refuses_a_total_above_the_caps():
    with pytest.raises(ValueError, match=r"cannot split 5 into parts capped at \[2, 2\]"):
        distribute(5, [1, 1], [2, 2])  # used to loop forever


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(
    "pinpoints,size",
    [([[56, 168]], (100, 60)), ([[56, 168]], (300, 60)), (None, (400, 20)), (None, (4, 200))],
    ids=["middle-crop-only", "no-crop-tokens", "empty-rows", "no-rows"],
)
def test_unpadding_that_removes_whole_crops_or_rows(pinpoints, size, budget):
    """Unpadding can remove whole crops (a narrow image on a 1 x 3 canvas keeps only the middle one) or leave
    rows without tokens: budgets still sum to keep, and a newline is kept only when its row keeps a token."""
    options = {} if pinpoints is None else {"image_grid_pinpoints": pinpoints}
    model = tiny_llava_next(**options)
    inputs = tiny_llava_next_inputs(model, image_sizes=((size,),))
    with vtc.compress(model, "uniform", keep=6, budget=budget) as handle, torch.no_grad():
        model(**inputs)
    source = handle._adapter.packing(size).tolist()
    kept = set(handle.last_kept[0].tolist())
    assert sum(source[j] >= 0 for j in kept) == 6
    for newline, members in rows_of(source):
        assert (newline in kept) == any(j in kept for j in members)
