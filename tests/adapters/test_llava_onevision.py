"""LLaVA-OneVision adapter on a tiny random model: SigLIP crops of 56 px (4 x 4 tokens, no [CLS]), pinpoints from 1x1 to
3x3 crops, ``vision_aspect_ratio="anyres_max_2"``: a big grid of more than 1.1^2 * 2 crops' worth of tokens (2x2, 1x3,
3x3 grids, unless unpadding shrinks them enough) is downsampled, smaller ones are not.

Every expectation is computed here from the OneVision geometry written out by hand (AnyRes grid, unpadding, the
anyres_max rule and a bilinear ``F.interpolate`` of the per-patch grid, one newline per row), checked against what the
model itself feeds its language model, from eager attention weights, or from a plain largest-remainder split, never
from the adapter's own helpers. The in-LLM bar runs on this family in test_layerwise.py.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

import vtc
from tests.helpers import case_id, count_hooks, greedy_generate, greedy_no_cache
from vtc.tiny import (
    IMAGE_TOKEN_ID,
    llava_onevision_image_tokens,
    tiny_llava_onevision,
    tiny_llava_onevision_inputs,
)

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
SIDE = 4  # tokens per crop side: 56 px crops, 14 px patches
T = SIDE * SIDE
MAX_CROPS = 2  # anyres_max_2
STEPS = 4
KEEP = 12
BUDGETS = ("global", "per_crop", "thumbnail")
# Sample 0: a 3x3 grid, unpadded then downsampled; sample 1: two images of one sample (one crop each, batch_num_images);
# sample 2: a 1x3 grid whose unpadding leaves it below the cap (not downsampled).
SIZES = (((120, 150),), ((112, 112), (40, 90)), ((30, 170),))
# (height, width) -> (what unpadding removes, whether the big grid is downsampled)
GEOMETRY = {
    (56, 56): (None, False),
    (56, 112): (None, False),
    (112, 56): (None, False),
    (40, 112): ("rows", False),
    (112, 40): ("cols", False),
    (60, 50): ("rows", False),
    (50, 60): ("cols", False),
    (30, 170): ("rows", False),
    (170, 30): ("cols", False),
    (112, 112): (None, True),
    (56, 168): (None, True),
    (168, 56): (None, True),
    (40, 150): (None, True),
    (168, 168): (None, True),
    (120, 150): ("rows", True),
    (100, 168): ("rows", True),
    (168, 100): ("cols", True),
    (150, 120): ("cols", True),
    (200, 8): ("cols", False),  # unpadding leaves no column: rows of newlines only
}
RECEIVED = {"signal": "attention_received"}


def method_cases():
    pre = [(name, {}) for name in vtc.list_methods("pre", images=True) if name not in ("fastervlm", "vtc_cls")]
    return pre + [("fastervlm", RECEIVED), ("dart", {"merge": True})]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


@pytest.fixture(scope="module")
def eager(model):
    """The same weights with eager attention, for attention weights from output_attentions."""
    copy = tiny_llava_onevision(attn_implementation="eager")
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values(), strict=True))
    return copy


@pytest.fixture(scope="module")
def batch(model):
    return tiny_llava_onevision_inputs(model, image_sizes=SIZES, seed=1)


@pytest.fixture(scope="module")
def received(eager, batch):
    return reference_received(eager, batch)


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


# -- independent references -----------------------------------------------------------------------


def grid_shape(model, size) -> tuple[int, int]:
    config = model.config
    return tuple(get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size))


def num_crops(model, size, patched=True) -> int:
    config = model.config
    if not patched:
        return 1
    return image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)


def unpadded(model, size) -> tuple[range, range]:
    """Rows and columns of the big token grid that survive unpadding (cut symmetrically)."""
    height, width = size
    grid_rows, grid_cols = grid_shape(model, size)
    big_h, big_w = grid_rows * SIDE, grid_cols * SIDE
    rows, cols = range(big_h), range(big_w)
    if width / height > big_w / big_h:
        pad = (big_h - int(round(height * (big_w / width), 7))) // 2
        rows = range(pad, big_h - pad)
    else:
        pad = (big_w - int(round(width * (big_h / height), 7))) // 2
        cols = range(pad, big_w - pad)
    return rows, cols


def downsampled_shape(height: int, width: int) -> tuple[int, int] | None:
    """The anyres_max rule: the (rows, cols) a big grid of height x width tokens is resized to, None if kept."""
    ratio = math.sqrt(height * width / (MAX_CROPS * T))
    return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else None


def pack_by_hand(model, size, values: torch.Tensor) -> torch.Tensor:
    """[crops, T, C] per-patch values (base first) -> [L, C] as LLaVA-OneVision packs an image: the base crop's tokens,
    then the crops tiled row-major into the big grid, unpadded, bilinearly resized when above the cap, each row
    followed by a newline (0 here)."""
    channels = values.shape[-1]
    if values.shape[0] == 1:
        return torch.cat([values[0], values.new_zeros(1, channels)])
    grid_rows, grid_cols = grid_shape(model, size)
    big = values[1:].view(grid_rows, grid_cols, SIDE, SIDE, channels).permute(0, 2, 1, 3, 4)
    big = big.reshape(grid_rows * SIDE, grid_cols * SIDE, channels)
    rows, cols = unpadded(model, size)
    big = big[rows.start : rows.stop, cols.start : cols.stop]
    shape = downsampled_shape(len(rows), len(cols))
    if shape is not None:
        big = F.interpolate(big.permute(2, 0, 1)[None], size=shape, mode="bilinear")[0].permute(1, 2, 0)
    newline = big.new_zeros(big.shape[0], 1, channels)
    return torch.cat([values[0], torch.cat([big, newline], dim=1).flatten(0, 1)])


def crops_by_hand(model, size, patched=True) -> list[int]:
    """Per packed token, the crop it weighs most in (0 = base; -1 = newline): one-hot crop indicators packed."""
    crops = num_crops(model, size, patched)
    onehot = torch.eye(crops, dtype=torch.float64)[:, None, :].repeat(1, T, 1)
    weights = pack_by_hand(model, size, onehot)
    return torch.where(weights.sum(-1) > 0.5, weights.argmax(-1), -1).tolist()


def images_of(model, inputs) -> list[dict]:
    """Per image in batch order: sample, start among the sample's visual tokens, size, whether it is cut into
    crops, its crop count, each packed token's crop, the row of its base crop among the crops the tower sees."""
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    counts = inputs.get("batch_num_images")
    patched = [True] * len(sizes) if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)]
    tokens = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    images, i, row = [], 0, 0
    for b, count in enumerate(tokens):
        start = 0
        while start < count:
            crop = crops_by_hand(model, sizes[i], patched[i])
            crops = num_crops(model, sizes[i], patched[i])
            images.append(
                {"sample": b, "start": start, "size": sizes[i], "patched": patched[i], "crops": crops, "crop": crop}
            )
            images[-1]["row"] = row
            start += len(crop)
            row += crops
            i += 1
        assert start == count
    return images


def crop_pixels(inputs, images) -> torch.Tensor:
    """[all crops, 3, S, S] in the order the vision tower sees them (the processor's padding crops left out)."""
    return torch.cat([inputs["pixel_values"][i, : image["crops"]] for i, image in enumerate(images)])


@torch.no_grad()
def reference_received(eager, inputs) -> torch.Tensor:
    """[all crops, T] mean eager attention each patch receives at the feature layer (over queries and heads)."""
    out = eager.model.vision_tower(crop_pixels(inputs, images_of(eager, inputs)), output_attentions=True)
    return out.attentions[-1].mean(dim=(1, 2))  # vision_feature_layer -1: the last layer's attention


def packed_received(model, image, received) -> torch.Tensor:
    rows = received[image["row"] : image["row"] + image["crops"]]
    return pack_by_hand(model, image["size"], rows.unsqueeze(-1))[:, 0]


def kept_in(kept: torch.Tensor, image: dict) -> list[int]:
    start, length = image["start"], len(image["crop"])
    return [k - start for k in kept.tolist() if start <= k < start + length]


def rows_of(crop) -> list[tuple[int, list[int]]]:
    """(newline position, positions of the tokens of its row) for every row: crop tokens, or the base's tokens for
    an image with one crop (its only newline follows the base)."""
    members = [c >= 1 for c in crop] if max(crop) >= 1 or crop.count(-1) > 1 else [c == 0 for c in crop]
    rows, current = [], []
    for j, c in enumerate(crop):
        if c == -1:
            rows.append((j, current))
            current = []
        elif members[j]:
            current.append(j)
    return rows


def crop_counts(local: list[int], crop) -> list[int]:
    counts = Counter(crop[j] for j in local if crop[j] >= 0)
    return [counts[c] for c in range(max(crop) + 1)]


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    exact = [total * (w / sum(weights)) for w in weights]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def thumbnail_counts(model, image: dict, keep: int, received: torch.Tensor) -> list[int]:
    """Base keeps its proportional share; crop j gets weight N_j (1 + s_j - 1/n), s_j the share of the base crop's
    attention received on base tokens whose centre lies in crop j's area of the UNPADDED big grid."""
    rows, cols = unpadded(model, image["size"])
    _, grid_cols = grid_shape(model, image["size"])
    sizes = crop_counts(list(range(len(image["crop"]))), image["crop"])
    present = [c for c in range(1, len(sizes)) if sizes[c]]
    base = largest_remainder(keep, sizes)[0]
    thumb = received[image["row"]].double()
    mass = [0.0] * (image["crops"] - 1)
    for y in range(SIDE):
        for x in range(SIDE):
            big_y = rows[int((y + 0.5) * len(rows) / SIDE)]
            big_x = cols[int((x + 0.5) * len(cols) / SIDE)]
            mass[(big_y // SIDE) * grid_cols + big_x // SIDE] += float(thumb[y * SIDE + x])
    share = [mass[c - 1] / sum(mass) for c in present]
    weights = [sizes[c] * (1 + s - 1 / len(present)) for c, s in zip(present, share, strict=True)]
    crops = largest_remainder(keep - base, weights)
    out = [base] + [0] * (len(sizes) - 1)
    for c, count in zip(present, crops, strict=True):
        assert count <= sizes[c]  # caps do not bind in these cases
        out[c] = count
    return out


def expected_counts(model, image: dict, budget: str, keep: int, received: torch.Tensor) -> list[int] | None:
    """Kept content tokens per crop, where the budget fixes them (None for global). With the base and at most one
    crop present, the thumbnail split is the proportional one."""
    sizes = crop_counts(list(range(len(image["crop"]))), image["crop"])
    if keep >= sum(sizes):
        return sizes
    if budget == "per_crop" or (budget == "thumbnail" and sum(n > 0 for n in sizes) <= 2):
        return largest_remainder(keep, sizes)
    if budget == "thumbnail":
        return thumbnail_counts(model, image, keep, received)
    return None


def check_kept(handle, model, inputs, keep: int, budget: str, received: torch.Tensor) -> None:
    """Exact counts per sample and per crop, and the newline rule, from last_kept and the reference packing."""
    images = images_of(model, inputs)
    after = [0] * inputs["input_ids"].shape[0]
    for image in images:
        local = kept_in(handle.last_kept[image["sample"]], image)
        crop = image["crop"]
        content = [j for j in local if crop[j] >= 0]
        assert len(content) == min(keep, sum(c >= 0 for c in crop))
        kept = set(local)
        for newline, members in rows_of(crop):
            assert (newline in kept) == any(j in kept for j in members)  # newlines follow their rows
        rows_kept = sum(any(j in kept for j in members) for _, members in rows_of(crop))
        assert len(local) == len(content) + rows_kept  # nothing else is kept
        expected = expected_counts(model, image, budget, keep, received)
        if expected is not None:
            assert crop_counts(local, crop) == expected
        after[image["sample"]] += len(local)
    tokens = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert handle.stats["visual_tokens_before"] == tokens
    assert handle.stats["visual_tokens_after"] == after == [len(k) for k in handle.last_kept]
    per_sample = Counter(image["sample"] for image in images)
    assert handle.stats["images"] == [per_sample[b] for b in range(len(tokens))]


def sample(inputs, b):
    """Sample b of a batch, unpadded, with its images."""
    keep = inputs["attention_mask"][b].bool()
    counts = inputs["batch_num_images"].tolist()
    first = sum(counts[:b])
    return {
        "input_ids": inputs["input_ids"][b][keep].unsqueeze(0),
        "attention_mask": inputs["attention_mask"][b][keep].unsqueeze(0),
        "pixel_values": inputs["pixel_values"][first : first + counts[b]],
        "image_sizes": inputs["image_sizes"][first : first + counts[b]],
        "batch_num_images": inputs["batch_num_images"][b : b + 1],
    }


# -- the reference geometry is the model's ---------------------------------------------------------


@pytest.mark.parametrize("size", list(GEOMETRY), ids=lambda size: f"{size[0]}x{size[1]}")
def test_the_hand_geometry_is_the_models(model, size):
    """What the by-hand packing says: unpadding as listed, downsampling as listed, the model's own token count, and
    each image's crop map as the adapter has it."""
    rows, cols = unpadded(model, size)
    grid_rows, grid_cols = grid_shape(model, size)
    removed = "rows" if len(rows) < grid_rows * SIDE else "cols" if len(cols) < grid_cols * SIDE else None
    assert (removed, downsampled_shape(len(rows), len(cols)) is not None) == GEOMETRY[size]
    crop = crops_by_hand(model, size)
    assert len(crop) == llava_onevision_image_tokens(model, *size)
    with vtc.compress(model, "divprune", keep=8) as handle:
        assert handle._adapter.packing(size).crop.tolist() == crop


def test_packed_embeddings_are_the_hand_packing_of_the_projector_output(model):
    """What the language model receives for each image is pack_by_hand of the projector's output for its crops
    (newlines: image_newline), for downsampled grids, unpadded ones and one-crop images alike."""
    inputs = tiny_llava_onevision_inputs(model, image_sizes=SIZES + (((168, 100),),), seed=2)
    projected, seen = [], []
    spies = [
        model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out)),
        model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True
        ),
    ]
    try:
        logits(model, inputs)
    finally:
        for spy in spies:
            spy.remove()
    (table,) = projected  # [all crops, T, D]
    downsampled = 0
    for image in images_of(model, inputs):
        b = image["sample"]
        positions = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        embeds = seen[0][b, positions[image["start"] : image["start"] + len(image["crop"])]]
        expected = pack_by_hand(model, image["size"], table[image["row"] : image["row"] + image["crops"]])
        newline = torch.tensor(image["crop"]) == -1
        expected[newline] = model.model.image_newline
        torch.testing.assert_close(embeds, expected, rtol=1e-6, atol=1e-6)
        rows, cols = unpadded(model, image["size"])
        downsampled += image["patched"] and downsampled_shape(len(rows), len(cols)) is not None
    assert downsampled == 2


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
    largest = max(sum(c >= 0 for c in image["crop"]) for image in images_of(model, batch))
    for amount in ({"keep": largest}, {"ratio": 1.0}):
        with vtc.compress(model, name, budget=budget, **amount, **options) as handle:
            after = logits(model, batch)
        assert torch.equal(after, before)
        assert [k.tolist() for k in handle.last_kept] == [list(range(n)) for n in tokens]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_generate_equals_no_cache_reference_with_exact_counts(model, batch, received, case, budget):
    """On transformers 5.x generate() encodes the images first (no image_sizes in the prefill: the packing is
    recovered); the no-cache reference forwards pixel_values and image_sizes."""
    name, options = case
    with vtc.compress(model, name, keep=KEEP, budget=budget, **options) as handle:
        cached = greedy_generate(model, batch, STEPS)
        check_kept(handle, model, batch, KEEP, budget, received)
        kept_in_generate = [k.clone() for k in handle.last_kept]
        reference = greedy_no_cache(model, batch, STEPS)
        check_kept(handle, model, batch, KEEP, budget, received)
    assert torch.equal(cached, reference)
    assert all(torch.equal(a, b) for a, b in zip(kept_in_generate, handle.last_kept, strict=True))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", [c for c in method_cases() if c[0] != "random"], ids=case_id)
def test_batch_with_left_padding_and_different_sizes_equals_each_sample_alone(model, batch, case, budget):
    """(random draws one score row per image of a shape, so its choice depends on the batch: left out.)"""
    name, options = case
    with vtc.compress(model, name, keep=KEEP, budget=budget, **options) as handle:
        batched = greedy_generate(model, batch, STEPS)
        batched_kept = handle.last_kept
        batched_last = logits(model, batch)[:, -1]
        for b in range(len(SIZES)):
            single = sample(batch, b)
            assert torch.equal(greedy_generate(model, single, STEPS), batched[b : b + 1])
            assert torch.equal(handle.last_kept[0], batched_kept[b])
            torch.testing.assert_close(logits(model, single)[:, -1], batched_last[b : b + 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", [("divprune", {}), ("fastervlm", RECEIVED), ("uniform", {})], ids=case_id)
def test_removal_with_original_positions_equals_masking_the_dropped_tokens(model, batch, case, budget):
    """Dropping tokens (kept ones keep their positions) is the uncompressed model with the dropped tokens masked out,
    newlines included."""
    name, options = case
    with vtc.compress(model, name, keep=KEEP, budget=budget, **options) as handle:
        compressed = logits(model, batch)[:, -1]
        kept = handle.last_kept
    mask = batch["attention_mask"].clone()
    for b, chosen in enumerate(kept):
        visual = (batch["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        dropped = torch.ones(len(visual), dtype=torch.bool)
        dropped[chosen] = False
        mask[b, visual[dropped]] = 0
    masked = logits(model, {**batch, "attention_mask": mask})[:, -1]
    torch.testing.assert_close(compressed, masked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(compressed, logits(model, batch)[:, -1], rtol=1e-4, atol=1e-4)  # dropping mattered


def test_sdpa_and_eager_agree(model, eager, batch):
    results = []
    for m in (model, eager):
        with vtc.compress(m, "fastervlm", keep=KEEP, budget="thumbnail", **RECEIVED) as handle:
            results.append((logits(m, batch), greedy_generate(m, batch, STEPS), handle.last_kept))
    # Fully masked (left-padding) query rows differ between implementations in transformers itself: compare the last
    # row's real tokens.
    torch.testing.assert_close(results[0][0][:, -8:], results[1][0][:, -8:], rtol=1e-4, atol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))


# -- signals packed as the features ----------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(120, 150), (168, 100), (30, 170)], ids=["rows-cut-down", "cols-cut-down", "rows-cut"]
)
def test_packed_attention_received_is_the_interpolated_patch_signal(model, eager, monkeypatch, size):
    """The signal a method receives for each packed token is the eager attention received of the crop patches,
    packed by hand: unpadded, bilinearly resized where the model resizes, newlines excluded."""
    from vtc.methods.fastervlm import FasterVLM

    seen = []
    score = FasterVLM.score
    monkeypatch.setattr(
        FasterVLM, "score", lambda self, signals, keep: seen.append(signals) or score(self, signals, keep)
    )
    inputs = tiny_llava_onevision_inputs(model, image_sizes=((size,),), seed=3)
    (image,) = images_of(model, inputs)
    with vtc.compress(model, "fastervlm", keep=KEEP, **RECEIVED) as handle:
        logits(model, inputs)
    (signals,) = seen
    expected = packed_received(model, image, reference_received(eager, inputs))
    content = torch.tensor(image["crop"]) >= 0
    torch.testing.assert_close(signals["attention_received"][0], expected[content], rtol=1e-5, atol=1e-7)
    rows, cols = unpadded(model, size)
    shape = downsampled_shape(len(rows), len(cols))
    assert (shape is not None) == (size != (30, 170))
    if shape is not None:  # not a value of any one patch: mapping each token to one patch would be wrong
        patches = reference_received(eager, inputs)[1:].flatten()
        assert (expected[content][T:].unsqueeze(1) - patches).abs().min(1).values.max() > 1e-6
    top = expected[content].topk(KEEP).indices
    local = torch.tensor(kept_in(handle.last_kept[0], image))
    chosen = local[content[local]]
    assert torch.equal(chosen, content.nonzero().squeeze(1)[top].sort().values)


def test_thumbnail_shares_the_crops_budget_by_the_base_images_attention_received(model, batch, received):
    (image,) = [i for i in images_of(model, batch) if i["size"] == (120, 150)]
    keep = 20
    with vtc.compress(model, "divprune", keep=keep, budget="thumbnail") as handle:
        logits(model, batch)
    counts = crop_counts(kept_in(handle.last_kept[0], image), image["crop"])
    assert counts == thumbnail_counts(model, image, keep, received)
    with vtc.compress(model, "divprune", keep=keep, budget="per_crop") as handle:
        logits(model, batch)
    sizes = crop_counts(list(range(len(image["crop"]))), image["crop"])
    per_crop = crop_counts(kept_in(handle.last_kept[0], image), image["crop"])
    assert per_crop == largest_remainder(keep, sizes) != counts
    assert sum(per_crop) == sum(counts) == keep


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("keep", [1, 3, 25])
def test_newlines_follow_their_rows(model, batch, received, keep, budget):
    with vtc.compress(model, "random", keep=keep, budget=budget) as handle:
        logits(model, batch)
    check_kept(handle, model, batch, keep, budget, received)


def test_without_batch_num_images_every_image_is_cut(model, eager):
    """transformers' single-image reading: each image of a multi-image sample is then cut into crops too."""
    inputs = tiny_llava_onevision_inputs(model, image_sizes=SIZES, seed=4, batch_num_images=False)
    assert all(image["crops"] > 1 for image in images_of(model, inputs))
    with vtc.compress(model, "uniform", keep=KEEP, budget="per_crop") as handle:
        cached = greedy_generate(model, inputs, STEPS)
        check_kept(handle, model, inputs, KEEP, "per_crop", reference_received(eager, inputs))
        assert torch.equal(greedy_no_cache(model, inputs, STEPS), cached)


# -- transformers 5.x: images encoded before the prefill -------------------------------------------


SIZES_TO_RECOVER = [*GEOMETRY, (200, 60), (60, 200), (45, 100)]


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 4.x generate() passes pixel_values and image_sizes")
def test_generate_recovers_the_packing_of_every_geometry(model):
    """generate() gives the prefill packed features without image_sizes: vtc finds each image's packing, which
    equals the one image_sizes gives (a forward), for every kind of grid, unpadding and downsampling."""
    sizes = tuple((size,) for size in SIZES_TO_RECOVER)
    inputs = tiny_llava_onevision_inputs(model, image_sizes=sizes, seed=5)
    calls = []
    with vtc.compress(model, "uniform", keep=5, budget="per_crop") as handle:
        logits(model, inputs)
        forward_kept = [k.clone() for k in handle.last_kept]
        hook = model.model.register_forward_pre_hook(
            lambda m, a, kw: calls.append(kw.get("image_sizes")), with_kwargs=True
        )
        try:
            greedy_generate(model, inputs, 1)
        finally:
            hook.remove()
    assert calls[0] is None
    assert all(torch.equal(a, b) for a, b in zip(forward_kept, handle.last_kept, strict=True))
    layouts = [packing.crop.tolist() for packing, _ in handle._adapter._layout]
    assert layouts == [image["crop"] for image in images_of(model, inputs)]


@pytest.mark.skipif(TRANSFORMERS_4, reason="mm_encoder_outputs exists from transformers 5.0")
def test_features_computed_before_attach_need_image_sizes(model, batch):
    with torch.no_grad():
        encoded = model.model.get_image_features(
            pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"],
            batch_num_images=batch["batch_num_images"],
            return_dict=True,
        )
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    sizes = {"image_sizes": batch["image_sizes"], "batch_num_images": batch["batch_num_images"]}
    with vtc.compress(model, "divprune", keep=KEEP) as handle:
        with pytest.raises(ValueError, match=r"pass image_sizes \(and batch_num_images\)"):
            model(**text, mm_encoder_outputs={"image": encoded})
        model(**text, **sizes, mm_encoder_outputs={"image": encoded})
        precomputed = [k.clone() for k in handle.last_kept]
        logits(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(precomputed, handle.last_kept, strict=True))
    with (
        vtc.compress(model, "fastervlm", keep=KEEP, **RECEIVED),
        pytest.raises(ValueError, match="vision encoder did not run"),
    ):
        model(**text, **sizes, mm_encoder_outputs={"image": encoded})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype):
    low = tiny_llava_onevision(dtype=dtype)
    inputs = tiny_llava_onevision_inputs(low, image_sizes=SIZES, seed=6)
    for name, options in (("fastervlm", {**RECEIVED, "budget": "thumbnail"}), ("dart", {"merge": True})):
        with vtc.compress(low, name, keep=KEEP, **options) as handle:
            cached = greedy_generate(low, inputs, STEPS)
            kept = [k.clone() for k in handle.last_kept]
            assert torch.equal(greedy_no_cache(low, inputs, STEPS), cached)
        assert all(torch.equal(a, b) for a, b in zip(kept, handle.last_kept, strict=True))


MULTI_IMAGE_BEAMS = pytest.mark.skipif(
    TRANSFORMERS_4,
    reason="transformers 4.x beam search repeats the images of a multi-image sample one by one (A A B B) and so "
    "places them in the wrong rows even without vtc",
)


@pytest.mark.parametrize(
    "sizes", [(((120, 150),), ((30, 170),)), pytest.param(SIZES, marks=MULTI_IMAGE_BEAMS)], ids=["single", "multi"]
)
@pytest.mark.parametrize("budget", BUDGETS)
def test_beam_search_repeats_images_and_signals_follow(model, budget, sizes):
    inputs = tiny_llava_onevision_inputs(model, image_sizes=sizes, seed=7)
    with vtc.compress(model, "fastervlm", keep=KEEP, budget=budget, **RECEIVED) as handle:
        logits(model, inputs)
        single = handle.stats["visual_tokens_after"]
        kept = [k.clone() for k in handle.last_kept]
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    rows = len(sizes)
    assert out.shape[0] == rows
    assert handle.stats["images"] == [len(s) for s in sizes for _ in range(2)]
    assert handle.stats["visual_tokens_after"] == [n for n in single for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(handle.last_kept, [k for k in kept for _ in range(2)], strict=True))


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [("fastervlm", {}), ("vtc_cls", {}), ("adaptive", {"protect": 0.1})],
    ids=["fastervlm", "vtc_cls", "adaptive-protect"],
)
def test_cls_methods_are_refused_with_the_substitute(model, name, options):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"has no \[CLS\] token") as error:
        vtc.compress(model, name, keep=KEEP, **options)
    assert "signal='attention_received'" in str(error.value)
    assert count_hooks(model) == hooks


def test_unknown_budget_names_the_family(model):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"budget must be one of \['global', 'per_crop', 'thumbnail'\] for "
                       r"LLaVA-OneVision, got 'bogus'"):  # fmt: skip
        vtc.compress(model, "divprune", keep=8, budget="bogus")
    assert count_hooks(model) == hooks


def test_towers_without_an_attention_layer_refuse_what_needs_attention_received():
    embeddings_only = tiny_llava_onevision(vision_feature_layer=0)  # features from the embeddings
    for method, options in (("divprune", {"budget": "thumbnail"}), ("fastervlm", RECEIVED)):
        with pytest.raises(ValueError, match="attention received|attention_received"):
            vtc.compress(embeddings_only, method, keep=8, **options)
    assert count_hooks(embeddings_only) == 0
    vtc.compress(embeddings_only, "divprune", keep=8, budget="per_crop").remove()


def test_other_feature_strategies_are_refused():
    config = tiny_llava_onevision().config
    config.vision_feature_select_strategy = "default"
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match=r"LLaVA-OneVision with vision_feature_select_strategy 'full'.*'default'"):
        vtc.compress(model, "divprune", keep=8)
    assert count_hooks(model) == 0


def test_a_tower_with_a_cls_token_is_refused():
    config = tiny_llava_onevision().config
    config.vision_config = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
    )
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match=r"LLaVA-OneVision with a vision tower without a \[CLS\] token.*CLIP"):
        vtc.compress(model, "divprune", keep=8)
    assert count_hooks(model) == 0


def test_labels_are_refused(model, batch):
    with vtc.compress(model, "random", keep=8, budget="per_crop"), pytest.raises(ValueError, match="inference"):
        model(**batch, labels=batch["input_ids"])


def test_a_forward_without_image_sizes_fails_and_leaves_vtc_usable(model, batch):
    with vtc.compress(model, "fastervlm", keep=KEEP, **RECEIVED) as handle:
        expected = logits(model, batch)
        kept = [k.clone() for k in handle.last_kept]
        no_sizes = {k: v for k, v in batch.items() if k != "image_sizes"}
        with pytest.raises((TypeError, ValueError)):  # transformers itself needs image_sizes to split the crops
            logits(model, no_sizes)
        assert torch.equal(logits(model, batch), expected)
        assert all(torch.equal(a, b) for a, b in zip(handle.last_kept, kept, strict=True))


def test_image_tokens_that_do_not_split_into_whole_images_are_refused(model, batch):
    """One placeholder moved from sample 1 to sample 0: transformers checks only the total."""
    ids = batch["input_ids"].clone()
    ids[1, (ids[1] == IMAGE_TOKEN_ID).nonzero()[0, 0]] = 7
    ids[0, (ids[0] == IMAGE_TOKEN_ID).nonzero()[-1, 0] + 1] = IMAGE_TOKEN_ID
    calls = []
    spy = model.model.language_model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with vtc.compress(model, "dart", keep=8), pytest.raises(ValueError, match=r"do not split into whole images"):
            model(**{**batch, "input_ids": ids})
    finally:
        spy.remove()
    assert not calls


@pytest.mark.parametrize("budget", BUDGETS)
def test_an_image_so_thin_that_unpadding_keeps_no_row(budget):
    """An 8 x 200 image keeps only its base crop's tokens after unpadding (no row, no newline): budgets, generate()
    (on transformers 5 the packing is recovered from the projector's output) and the boxes all handle it."""
    from vtc.geometry import image_token_boxes

    model = tiny_llava_onevision()
    inputs = tiny_llava_onevision_inputs(model, image_sizes=(((8, 200),),), seed=0)
    t = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    with vtc.compress(model, "uniform", keep=4, budget=budget) as handle:
        logits(model, inputs)
        kept = handle.last_kept[0].tolist()
        greedy_generate(model, inputs, 1)
        assert handle.last_kept[0].tolist() == kept
    assert len(kept) == 4
    boxes = image_token_boxes(model, (8, 200))
    assert boxes.shape == (t, 4) and not bool(boxes.isnan().any())
