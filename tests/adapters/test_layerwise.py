"""In-LLM methods (dropping between decoder layers) on tiny LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL
and Qwen3-VL.

Every model has 6 text layers, so the schedules are written out here for that depth (FastV / DART at layer 2,
PyramidDrop's 8/16/24 of 32 at 2/3/4, the adaptive method's 2/6/10/14 of 32 at 1/2/3). Expectations come from
the model itself (its KV cache, the position ids and rotary embeddings of an uncompressed run, eager attention
weights), from those schedules, or from a FLOPs formula written here, never from vtc's helpers (the composition
["divprune", "fastv"] starts from what divprune alone keeps). Each batch has two left-padded samples with different
image counts, so rows keep different counts and are re-padded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import StaticCache

import vtc
from tests import helpers
from tests.helpers import Replay, count_hooks
from vtc.methods import DARTLLM, Adaptive, FastV, PDrop
from vtc.tiny import (
    IMAGE_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    llava_next_image_tokens,
    llava_onevision_image_tokens,
    tiny_internvl,
    tiny_internvl_inputs,
    tiny_llava,
    tiny_llava_inputs,
    tiny_llava_next,
    tiny_llava_next_inputs,
    tiny_llava_onevision,
    tiny_llava_onevision_inputs,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
    tiny_qwen_inputs,
)

DEPTH = 6
STEPS = 4
LAST = DEPTH - 1  # a layer after every schedule's last drop layer
LAYERWISE = {"fastv": FastV, "pdrop": PDrop, "dart_llm": DARTLLM, "adaptive": Adaptive}
COMPOSED = "divprune+fastv"
CASES = [*LAYERWISE, COMPOSED]
# Drop layers of a 6-layer model: the papers' layers of a 32-layer model at the same relative depth.
SCHEDULES = {"fastv": [2], "pdrop": [2, 3, 4], "dart_llm": [2], "adaptive": [1, 2, 3], COMPOSED: [2]}


@dataclass(frozen=True)
class Family:
    build: Callable[..., torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict]
    image_token: int
    keep: int  # in-LLM budget per image
    composed: tuple[int, int]  # keep=[pre-LLM, in-LLM] for ["divprune", "fastv"]


NEXT_SIZES = (((56, 112),), ((112, 112), (56, 56)))
INTERNVL_TILES = ((3,), (1, 5))  # 48 | 16 + 80 tokens (16 per tile): the 1-tile image is at the in-LLM budget
# A downsampled AnyRes image alone; two images of one sample (batch_num_images), one crop each.
ONEVISION_SIZES = (((168, 168),), ((112, 112), (56, 56)))
ANYRES = ("llava_next", "llava_onevision")
QWEN_GRIDS = (((8, 12),), ((8, 8), (4, 6)))  # 24 | 16 + 6 tokens: the last image is below the budget
FAMILIES = {
    "llava": Family(
        lambda **kw: tiny_llava(text_layers=DEPTH, **kw),
        lambda model: tiny_llava_inputs(model, images_per_sample=(2, 1), seed=1),
        IMAGE_TOKEN_ID,
        40,
        (100, 40),
    ),
    "llava_next": Family(
        lambda **kw: tiny_llava_next(text_layers=DEPTH, **kw),
        lambda model: tiny_llava_next_inputs(model, image_sizes=NEXT_SIZES, seed=1),
        IMAGE_TOKEN_ID,
        12,
        (24, 12),
    ),
    "llava_onevision": Family(
        lambda **kw: tiny_llava_onevision(text_layers=DEPTH, **kw),
        lambda model: tiny_llava_onevision_inputs(model, image_sizes=ONEVISION_SIZES, seed=1),
        IMAGE_TOKEN_ID,
        12,
        (24, 12),
    ),
    "qwen2_vl": Family(
        lambda **kw: tiny_qwen2_vl(text_layers=DEPTH, **kw),
        lambda model: tiny_qwen_inputs(model, image_grids=QWEN_GRIDS, seed=1),
        QWEN_IMAGE_TOKEN_ID,
        8,
        (12, 8),
    ),
    "qwen2_5_vl": Family(
        lambda **kw: tiny_qwen2_5_vl(text_layers=DEPTH, vision_layers=4, fullatt_block_indexes=[0, 2], **kw),
        lambda model: tiny_qwen_inputs(model, image_grids=QWEN_GRIDS, seed=1),
        QWEN_IMAGE_TOKEN_ID,
        8,
        (12, 8),
    ),
    "internvl": Family(
        lambda **kw: tiny_internvl(text_layers=DEPTH, **kw),
        lambda model: tiny_internvl_inputs(model, tiles=INTERNVL_TILES, seed=1),
        IMAGE_TOKEN_ID,
        12,
        (24, 12),
    ),
    # DeepStack features are added after decoder layer 0 only, so every schedule above (from layer 1) applies.
    "qwen3_vl": Family(
        lambda **kw: tiny_qwen3_vl(text_layers=DEPTH, **kw),
        lambda model: tiny_qwen_inputs(model, image_grids=QWEN_GRIDS, seed=1),
        QWEN_IMAGE_TOKEN_ID,
        8,
        (12, 8),
    ),
}


# -- fixtures and helpers ------------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    family: Family
    model: torch.nn.Module
    batch: dict
    tokens: list[list[int]]  # visual tokens of each image, per sample


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request) -> Setup:
    family = FAMILIES[request.param]
    model = family.build()
    batch = family.inputs(model)
    return Setup(request.param, family, model, batch, image_tokens(request.param, model))


@pytest.fixture(scope="module", params=CASES)
def case(request) -> str:
    return request.param


def image_tokens(name: str, model) -> list[list[int]]:
    if name == "llava":
        return [[576, 576], [576]]
    if name == "llava_next":
        return [[llava_next_image_tokens(model, h, w) for h, w in sizes] for sizes in NEXT_SIZES]
    if name == "internvl":
        return [[16 * k for k in tiles] for tiles in INTERNVL_TILES]
    if name == "llava_onevision":
        return [
            [llava_onevision_image_tokens(model, h, w, len(sizes) == 1) for h, w in sizes] for sizes in ONEVISION_SIZES
        ]
    return [[h * w // 4 for h, w in grids] for grids in QWEN_GRIDS]


def is_qwen(setup: Setup) -> bool:
    return setup.name.startswith("qwen")


def make(case: str, **options):
    """(the method argument of vtc.compress, the in-LLM method instance)."""
    if case == COMPOSED:
        llm = FastV(**options)
        return ["divprune", llm], llm
    llm = LAYERWISE[case](**options)
    return llm, llm


def budget(setup: Setup, case: str) -> dict:
    return {"keep": list(setup.family.composed)} if case == COMPOSED else {"keep": setup.family.keep}


def attach(setup: Setup, case: str):
    method, _ = make(case)
    return vtc.compress(setup.model, method, **budget(setup, case))


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def generate(model, inputs: dict, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generate(): (new tokens [B, steps], logits of the prompt's last position [B, V])."""
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, -steps:], out.logits[0]


def greedy_no_cache(setup: Setup, inputs: dict, steps: int = STEPS) -> torch.Tensor:
    """The shared no-cache greedy reference; Qwen derives its M-RoPE positions itself."""
    return helpers.greedy_no_cache(setup.model, inputs, steps, positions=not is_qwen(setup))


def alone(setup: Setup, b: int) -> dict:
    """Sample b of the batch, unpadded, with its own images."""
    inputs = setup.batch
    keep = inputs["attention_mask"][b].bool()
    out = {
        k: inputs[k][b][keep].unsqueeze(0) for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs
    }
    counts = [len(t) for t in setup.tokens]
    first = sum(counts[:b])
    if setup.name == "llava":
        out["pixel_values"] = inputs["pixel_values"][first : first + counts[b]]
    elif setup.name == "internvl":
        tiles = [sum(t) for t in INTERNVL_TILES]
        out["pixel_values"] = inputs["pixel_values"][sum(tiles[:b]) : sum(tiles[: b + 1])]
    elif setup.name in ANYRES:
        out["pixel_values"] = inputs["pixel_values"][first : first + counts[b]]
        out["image_sizes"] = inputs["image_sizes"][first : first + counts[b]]
        if "batch_num_images" in inputs:
            out["batch_num_images"] = inputs["batch_num_images"][b : b + 1]
    else:
        grids = inputs["image_grid_thw"]
        patches = grids.prod(-1).tolist()
        start = sum(patches[:first])
        out["pixel_values"] = inputs["pixel_values"][start : start + sum(patches[first : first + counts[b]])]
        out["image_grid_thw"] = grids[first : first + counts[b]]
    return out


def per_image(kept: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """A sample's kept indices (into its concatenated visual tokens) split by image, as indices into each image."""
    out, start = [], 0
    for n in sizes:
        out.append(kept[(kept >= start) & (kept < start + n)] - start)
        start += n
    return out


def text_tokens(setup: Setup) -> list[int]:
    """Valid non-visual tokens per sample of the batch."""
    mask = setup.batch["attention_mask"].bool()
    return (mask & (setup.batch["input_ids"] != setup.family.image_token)).sum(1).tolist()


def expected_visual(schedule: list[int], lm_tokens: list[list[int]], keep: int, lam: float | None = None):
    """Per sample, visual tokens at the input of each layer for the fixed-count methods: an image of n tokens at
    the language model's input keeps them up to the first drop layer and min(keep, n) after the last one; with
    PyramidDrop's ``lam``, stage s of S keeps min(keep, n) / lam^(S-1-s) (rounded, at most n)."""
    out = []
    for sizes in lm_tokens:
        per_layer = []
        for layer in range(DEPTH):
            stages = [s for s, first in enumerate(schedule) if first <= layer]
            total = 0
            for n in sizes:
                if not stages:
                    total += n
                elif lam is not None:
                    total += min(n, round(min(keep, n) / lam ** (len(schedule) - 1 - stages[-1])))
                else:
                    total += min(keep, n)
            per_layer.append(total)
        out.append(per_layer)
    return out


def language_model_tokens(setup: Setup, case: str) -> list[list[int]]:
    """Visual tokens of each image at the language model's input: all of them, or what divprune alone keeps
    (LLaVA-NeXT, OneVision: the budget counts content tokens and row newlines follow, see test_llava_next)."""
    if case != COMPOSED:
        return setup.tokens
    with vtc.compress(setup.model, "divprune", keep=setup.family.composed[0]) as handle:
        logits(setup.model, setup.batch)
    counts = [
        [len(k) for k in per_image(kept, sizes)] for kept, sizes in zip(handle.last_kept, setup.tokens, strict=True)
    ]
    if setup.name not in ANYRES:
        assert counts == [[min(setup.family.composed[0], n) for n in sizes] for sizes in setup.tokens]
    return counts


def layer_flops(config, tokens: int) -> float:
    """Prefill FLOPs of one Llama/Qwen2 decoder layer over ``tokens`` tokens, a multiply-add counted as 2:
    per token the q, k, v, o projections (GQA: k and v have fewer heads) and the gated MLP's three matrices,
    plus causal attention, where each query meets ~tokens / 2 keys for QK^T and again for AV."""
    d = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = d // heads
    q_and_o = 2 * d * heads * head_dim
    k_and_v = 2 * d * kv_heads * head_dim
    mlp = 3 * d * config.intermediate_size
    attention = 2 * heads * head_dim * (tokens / 2)
    return 2 * tokens * (q_and_o + k_and_v + mlp + attention)


def text_config(model):
    return model.config.get_text_config()


def decoder(model):
    return model.model.language_model


def row_of(values: torch.Tensor, b: int, tail: int) -> torch.Tensor:
    """Row b of [..., B or 1, L, *tail dims]."""
    dim = values.ndim - 2 - tail
    return values.select(dim, min(b, values.shape[dim] - 1))


def survivors(setup: Setup, inputs: dict, kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """Original columns that reach the last layers: valid text and the kept visual tokens, in order."""
    out = []
    for b, chosen in enumerate(kept):
        visual = inputs["input_ids"][b] == setup.family.image_token
        keep = inputs["attention_mask"][b].bool() & ~visual
        keep[visual.nonzero().squeeze(1)[chosen]] = True
        out.append(keep.nonzero().squeeze(1))
    return out


class LayerInputs:
    """Records the keyword arguments (and hidden states) that reach a decoder layer, after the hooks before it."""

    def __init__(self, layer: torch.nn.Module):
        self.calls: list[dict] = []
        self._handle = layer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append({**kwargs, "hidden_states": args[0] if args else kwargs["hidden_states"]})

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def plain(setup):
    """The uncompressed model: logits of the batch and what reaches the last decoder layer."""
    spy = LayerInputs(decoder(setup.model).layers[LAST])
    try:
        out = logits(setup.model, setup.batch)
    finally:
        spy.remove()
    return {"logits": out, "last_layer": spy.calls[0]}


@dataclass
class Outcome:
    generated: torch.Tensor
    first_logits: torch.Tensor
    reference: torch.Tensor
    kept: list[torch.Tensor]
    stats: dict
    cache_lengths: list[list[int]]  # per forward of generate(), per layer
    input_lengths: list[int]  # per forward, the decoder's input length


@pytest.fixture(scope="module")
def outcome(setup, case) -> Outcome:
    """generate() with the KV cache, recording every layer's cache length after each forward, then the no-cache
    greedy reference replaying the prefill's choices."""
    method, llm = make(case)
    replay = Replay(llm)
    lengths, inputs = [], []

    def record(module, args, kwargs, output):
        cache = output.past_key_values
        lengths.append([cache.get_seq_length(layer) for layer in range(DEPTH)])
        inputs.append(kwargs["inputs_embeds"].shape[1])

    with vtc.compress(setup.model, method, **budget(setup, case)) as handle:
        hook = decoder(setup.model).register_forward_hook(record, with_kwargs=True)
        try:
            generated, first = generate(setup.model, setup.batch)
        finally:
            hook.remove()
        kept = [k.clone() for k in handle.last_kept]
        stats = copy.deepcopy(handle.stats)
        replay.replay()
        reference = greedy_no_cache(setup, setup.batch)
    return Outcome(generated, first, reference, kept, stats, lengths, inputs)


# -- generate(), batches, the KV cache --------------------------------------------------------------------------


def test_generate_with_cache_equals_no_cache_reference(setup, case, outcome):
    assert torch.equal(outcome.generated, outcome.reference)
    assert outcome.stats["images"] == [len(sizes) for sizes in setup.tokens]
    assert outcome.stats["visual_tokens_before"] == [sum(sizes) for sizes in setup.tokens]


def test_batch_with_left_padding_equals_each_sample_alone(setup, case, outcome):
    assert outcome.stats["visual_tokens_after"][0] != outcome.stats["visual_tokens_after"][1]  # rows re-padded
    handle = attach(setup, case)
    with handle:
        for b in range(2):
            generated, first = generate(setup.model, alone(setup, b))
            assert torch.equal(generated, outcome.generated[b : b + 1])
            assert torch.equal(handle.last_kept[0], outcome.kept[b])
            torch.testing.assert_close(first, outcome.first_logits[b : b + 1], rtol=1e-4, atol=1e-4)


def right_padded(batch: dict) -> dict:
    """The batch with each row's padding moved from the left to the right (as a scoring batch may come)."""
    out = dict(batch)
    pads = (1 - batch["attention_mask"]).sum(dim=1).tolist()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            out[key] = torch.stack([row.roll(-pad) for row, pad in zip(batch[key], pads, strict=True)])
    return out


def test_batch_with_right_padding_equals_each_sample_alone(setup, case):
    """Scores come from each row's last real token, not from the pad at position -1. After the drop the rows hold
    only their valid tokens, right-aligned, so position -1 is each row's last real token."""
    batch = right_padded(setup.batch)
    with attach(setup, case) as handle:
        out = logits(setup.model, batch)
        kept = handle.last_kept
        for b in range(2):
            expected = logits(setup.model, alone(setup, b))
            assert torch.equal(handle.last_kept[0], kept[b])
            torch.testing.assert_close(out[b, -1], expected[0, -1], rtol=1e-4, atol=1e-4)


def test_a_plain_forward_of_a_left_padded_batch_keeps_what_each_sample_alone_keeps(setup, case):
    """Without position_ids a forward numbers the pads too (LLaVA), so a row's positions start at its padding;
    the choices depend on relative positions only (dart_llm's key norms are taken from the row's first token)."""
    with attach(setup, case) as handle:
        logits(setup.model, setup.batch)
        kept = handle.last_kept
        for b in range(2):
            logits(setup.model, alone(setup, b))
            assert torch.equal(handle.last_kept[0], kept[b])


def test_cache_lengths_per_layer_are_the_reported_token_counts(setup, case, outcome):
    """After the prefill, layer l caches the tokens at its input: from the first drop layer on, the widest row's
    visual + text tokens (rows are re-padded on the left, padding removed); before it, the language model's input,
    where a row also carries its original left padding. Each decode step adds one token to every layer."""
    per_layer = outcome.stats["visual_tokens_per_layer"]
    text = text_tokens(setup)
    padding = (1 - setup.batch["attention_mask"]).sum(1).tolist()
    first_drop = SCHEDULES[case][0]
    expected = []
    for layer in range(DEPTH):
        pad = padding if layer < first_drop else [0] * len(padding)
        expected.append(max(v[layer] + t + p for v, t, p in zip(per_layer, text, pad, strict=True)))
    prefill = outcome.cache_lengths[0]
    assert prefill == expected
    assert prefill[:first_drop] == [outcome.input_lengths[0]] * first_drop
    if case != COMPOSED:
        assert outcome.input_lengths[0] == setup.batch["input_ids"].shape[1]
    assert prefill[LAST] < prefill[0]
    assert len(outcome.cache_lengths) == STEPS  # the last new token is not fed back
    for step, lengths in enumerate(outcome.cache_lengths):
        assert lengths == [n + step for n in prefill]
        assert step == 0 or outcome.input_lengths[step] == 1


# -- counts and FLOPs ---------------------------------------------------------------------------------------------


def test_schedules_for_six_layers(case):
    _, llm = make(case)
    assert llm.schedule(DEPTH) == SCHEDULES[case]


def test_counts_per_layer_and_per_image(setup, case, outcome):
    per_layer = outcome.stats["visual_tokens_per_layer"]
    schedule = SCHEDULES[case]
    for sample, kept in zip(per_layer, outcome.kept, strict=True):
        assert len(sample) == DEPTH
        assert all(a >= b for a, b in zip(sample, sample[1:], strict=False))  # non-increasing
        assert all(sample[layer] == sample[layer - 1] for layer in range(1, DEPTH) if layer not in schedule)
        assert sample[-1] == len(kept)
        assert torch.equal(kept, kept.unique())
    if case == "adaptive":
        floor = setup.family.keep
        for kept, sizes in zip(outcome.kept, setup.tokens, strict=True):
            assert all(len(k) >= min(floor, n) for k, n in zip(per_image(kept, sizes), sizes, strict=True))
        return
    final = setup.family.composed[1] if case == COMPOSED else setup.family.keep
    lm_tokens = language_model_tokens(setup, case)
    assert per_layer == expected_visual(schedule, lm_tokens, final, 0.5 if case == "pdrop" else None)
    for kept, sizes, lm_sizes in zip(outcome.kept, setup.tokens, lm_tokens, strict=True):
        assert [len(k) for k in per_image(kept, sizes)] == [min(final, n) for n in lm_sizes]
    assert outcome.stats["visual_tokens_after"] == [len(k) for k in outcome.kept]


def test_prefill_flops_follow_the_per_layer_counts(setup, case, outcome):
    config = text_config(setup.model)
    text = text_tokens(setup)
    per_layer = outcome.stats["visual_tokens_per_layer"]
    compressed = math.fsum(
        layer_flops(config, visual[layer] + t)
        for visual, t in zip(per_layer, text, strict=True)
        for layer in range(DEPTH)
    )
    original = setup.batch["attention_mask"].sum(1).tolist()
    uncompressed = DEPTH * math.fsum(layer_flops(config, n) for n in original)
    flops = outcome.stats["prefill_flops"]
    assert flops["compressed"] == pytest.approx(compressed, rel=1e-12)
    assert flops["uncompressed"] == pytest.approx(uncompressed, rel=1e-12)
    assert flops["ratio"] == pytest.approx(compressed / uncompressed, rel=1e-12)
    assert flops["ratio"] < 1


@pytest.mark.parametrize(
    ("name", "options", "amount", "schedule"),
    [
        ("pdrop", {"lam": 0.4}, {"keep": 40}, [2, 3, 4]),
        ("pdrop", {}, {"ratio": 0.1}, [2, 3, 4]),
        ("pdrop", {"layers": (4, 20), "lam": 0.25}, {"keep": 30}, [1, 4]),
        ("fastv", {"layer": 4}, {"ratio": 0.25}, [4]),
        ("fastv", {"layer": 1}, {"keep": 7}, [1]),
        ("dart_llm", {"layer": 1}, {"keep": 3}, [1]),
        ("dart_llm", {"layer": 5}, {"keep": 1}, [5]),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_counts_with_other_options_and_ratios(llava, name, options, amount, schedule):
    """LLaVA-1.5 (576 tokens per image): PyramidDrop's stage s of S keeps final / lam^(S-1-s), its layers given for
    a 32-layer model; ratio r keeps round(r * 576) per image; drops at layer 1 use signals of layer 0."""
    model, inputs = llava.model, llava.batch
    final = amount.get("keep") or round(amount["ratio"] * 576)
    with vtc.compress(model, name, **amount, **options) as handle:
        logits(model, inputs)
    lam = options.get("lam", 0.5) if name == "pdrop" else None
    assert handle.stats["visual_tokens_per_layer"] == expected_visual(schedule, llava.tokens, final, lam)
    kept = [
        [len(k) for k in per_image(kept, sizes)] for kept, sizes in zip(handle.last_kept, llava.tokens, strict=True)
    ]
    assert kept == [[final, final], [final]]


def test_adaptive_keeps_at_least_the_floor_and_more_for_a_higher_mass(setup):
    floor = 2
    counts = {}
    for mass in (0.3, 0.95):
        with vtc.compress(setup.model, "adaptive", keep=floor, mass=mass) as handle:
            logits(setup.model, setup.batch)
        per_layer = handle.stats["visual_tokens_per_layer"]
        for sample, kept, sizes in zip(per_layer, handle.last_kept, setup.tokens, strict=True):
            assert all(a >= b for a, b in zip(sample, sample[1:], strict=False))
            assert all(len(k) >= min(floor, n) for k, n in zip(per_image(kept, sizes), sizes, strict=True))
        counts[mass] = [sample[-1] for sample in per_layer]
    assert all(a <= b for a, b in zip(counts[0.3], counts[0.95], strict=True))
    assert counts[0.3] != counts[0.95]


def text_only(setup: Setup) -> dict:
    """The batch's last sample without its image tokens: the text after its last image (a follow-up turn)."""
    ids, mask = setup.batch["input_ids"][-1:], setup.batch["attention_mask"][-1:]
    last_image = int((ids[0] == setup.family.image_token).nonzero().max())
    return {"input_ids": ids[:, last_image + 1 :], "attention_mask": mask[:, last_image + 1 :]}


def test_a_text_only_call_after_generate_is_the_plain_model(setup, case):
    """Nothing of the image turn's generation (its drop maps, its decoding state) leaks into a text-only forward
    or generate(), which have nothing to compress."""
    text = text_only(setup)
    expected, expected_tokens = logits(setup.model, text), generate(setup.model, text)[0]
    with attach(setup, case):
        generate(setup.model, setup.batch)
        assert torch.equal(logits(setup.model, text), expected)
        generate(setup.model, setup.batch)
        assert torch.equal(generate(setup.model, text)[0], expected_tokens)
        assert torch.equal(logits(setup.model, text), expected)


# -- identity, detaching, positions -----------------------------------------------------------------------------


@pytest.mark.parametrize("amount", ["keep-all", "keep-more", "ratio-1"])
def test_keeping_every_token_is_the_identity(setup, plain, case, amount):
    """Keeping every token (or, where images differ in size, a cap above every image) changes nothing."""
    largest = max(n for sizes in setup.tokens for n in sizes)
    value = {"keep-all": {"keep": largest}, "keep-more": {"keep": 10_000}, "ratio-1": {"ratio": 1.0}}[amount]
    if case == COMPOSED:  # a pre-LLM keep above the image size is refused on LLaVA-1.5: keep it at the largest
        value = {name: [largest if v == 10_000 else v, v] for name, v in value.items()}
    method, _ = make(case)
    if amount == "keep-more" and setup.name == "llava":  # every image has 576 tokens: refused as pre-LLM is
        n = largest if case == COMPOSED else 576
        with pytest.raises(ValueError, match=rf"keep=10000 exceeds the {n} visual tokens per image"):
            vtc.compress(setup.model, method, **value)
        return
    with vtc.compress(setup.model, method, **value) as handle:
        out = logits(setup.model, setup.batch)
    assert torch.equal(out, plain["logits"])
    assert [k.tolist() for k in handle.last_kept] == [list(range(sum(sizes))) for sizes in setup.tokens]
    assert handle.stats["visual_tokens_per_layer"] == [[sum(sizes)] * DEPTH for sizes in setup.tokens]
    assert abs(handle.stats["prefill_flops"]["ratio"] - 1) <= 1e-9


def test_remove_restores_the_model_bit_for_bit(setup, plain, case):
    hooks = count_hooks(setup.model)
    state = {k: v.clone() for k, v in setup.model.state_dict().items()}
    handle = attach(setup, case)
    assert count_hooks(setup.model) > hooks
    compressed = logits(setup.model, setup.batch)
    handle.remove()
    assert count_hooks(setup.model) == hooks
    assert compressed.shape[1] < plain["logits"].shape[1]
    assert torch.equal(logits(setup.model, setup.batch), plain["logits"])
    assert all(torch.equal(v, state[k]) for k, v in setup.model.state_dict().items())
    handle.remove()  # idempotent
    handle = attach(setup, case)  # attaching again works
    handle.remove()


def test_layers_after_the_drop_get_the_original_positions_of_the_survivors(setup, plain, case):
    """Position ids and rotary embeddings that reach the last layer are the uncompressed run's, gathered at the
    surviving tokens; the rows' padding is on the left."""
    handle = attach(setup, case)
    with handle:
        spy = LayerInputs(decoder(setup.model).layers[LAST])
        try:
            logits(setup.model, setup.batch)
        finally:
            spy.remove()
    short, full = spy.calls[0], plain["last_layer"]
    cols = survivors(setup, setup.batch, handle.last_kept)
    width = short["hidden_states"].shape[1]
    assert width == max(c.numel() for c in cols)
    full_positions, short_positions = full.get("position_ids"), short.get("position_ids")
    assert (full_positions is None) == (short_positions is None)
    for b, col in enumerate(cols):
        n = col.numel()
        if full_positions is not None:
            assert torch.equal(row_of(short_positions, b, 0)[..., -n:], row_of(full_positions, b, 0)[..., col])
        for short_part, full_part in zip(short["position_embeddings"], full["position_embeddings"], strict=True):
            assert torch.equal(row_of(short_part, b, 1)[..., -n:, :], row_of(full_part, b, 1)[..., col, :])
        mask = short["attention_mask"]  # [B, 1, L, L]: the last query sees its row's tokens, not the padding
        allowed = mask[b, 0, -1] if mask.dtype == torch.bool else mask[b, 0, -1] == 0
        assert allowed.tolist() == [False] * (width - n) + [True] * n


# -- attention implementations and signals ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava():
    model = FAMILIES["llava"].build()
    return Setup("llava", FAMILIES["llava"], model, FAMILIES["llava"].inputs(model), image_tokens("llava", model))


@pytest.fixture(scope="module")
def llava_eager(llava):
    model = FAMILIES["llava"].build(attn_implementation="eager")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), llava.model.state_dict().values(), strict=True)
    )
    return Setup("llava", FAMILIES["llava"], model, llava.batch, llava.tokens)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def sdpa_and_eager(request, llava, llava_eager) -> tuple[Setup, Setup]:
    if request.param == "llava":
        return llava, llava_eager
    family = FAMILIES[request.param]
    sdpa, eager = family.build(), family.build(attn_implementation="eager")
    batch, tokens = family.inputs(sdpa), image_tokens(request.param, sdpa)
    return Setup(request.param, family, sdpa, batch, tokens), Setup(request.param, family, eager, batch, tokens)


@pytest.mark.parametrize("case", CASES)
def test_sdpa_and_eager_agree(sdpa_and_eager, case):
    results = []
    for setup in sdpa_and_eager:
        handle = attach(setup, case)
        with handle:
            results.append((logits(setup.model, setup.batch), generate(setup.model, setup.batch)[0], handle.last_kept))
    (sdpa, sdpa_generated, sdpa_kept), (eager, eager_generated, eager_kept) = results
    assert all(torch.equal(a, b) for a, b in zip(sdpa_kept, eager_kept, strict=True))
    assert torch.equal(sdpa_generated, eager_generated)
    # Padding queries are treated differently by the two implementations in transformers itself: real tokens only.
    setup = sdpa_and_eager[0]
    for b, col in enumerate(survivors(setup, setup.batch, sdpa_kept)):
        n = col.numel()
        torch.testing.assert_close(sdpa[b, -n:], eager[b, -n:], rtol=1e-4, atol=1e-4)


def test_fastv_keeps_the_top_tokens_of_the_last_rows_eager_attention(llava, llava_eager):
    """FastV at layer K keeps, per image, the top-k visual tokens of layer K-1's attention weights (last query,
    mean over heads), from the eager model's own output_attentions."""
    keep = 50
    with torch.no_grad():
        attentions = llava_eager.model(**llava.batch, output_attentions=True).attentions
    row = attentions[1][:, :, -1].mean(1)  # [B, L], layer K-1 = 1
    with vtc.compress(llava.model, "fastv", keep=keep) as handle:
        logits(llava.model, llava.batch)
    for b, sizes in enumerate(llava.tokens):
        visual = (llava.batch["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        expected = [
            row[b, visual[576 * i : 576 * (i + 1)]].topk(keep).indices.sort().values + 576 * i
            for i in range(len(sizes))
        ]
        assert torch.equal(handle.last_kept[b], torch.cat(expected))


# -- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["generate", "forward"])
def test_static_cache_is_refused_before_any_layer_runs(llava, via):
    model, batch = llava.model, llava.batch
    with vtc.compress(model, "fastv", keep=40):
        expected = logits(model, batch)
        spy = LayerInputs(decoder(model).layers[0])
        try:
            with pytest.raises(ValueError, match="StaticCache.*DynamicCache"):
                if via == "generate":
                    model.generate(**batch, max_new_tokens=2, cache_implementation="static")
                else:
                    cache = StaticCache(config=model.config, max_cache_len=batch["input_ids"].shape[1] + 4)
                    with torch.no_grad():
                        model(**batch, past_key_values=cache, use_cache=True)
        finally:
            spy.remove()
        assert not spy.calls
        assert torch.equal(logits(model, batch), expected)  # still attached and working
        generated, _ = generate(model, batch, 2)
    assert generated.shape == (2, 2)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("fastv", {"layer": 0}, r"layer must be an int >= 1, got 0"),
        ("dart_llm", {"layer": 0}, r"layer must be an int >= 1"),
        ("dart_llm", {"visual_pivots": 0}, r"visual_pivots must be an int >= 1"),
        ("pdrop", {"lam": 1}, r"lam must be a number in \(0, 1\)"),
        ("pdrop", {"lam": 0.0}, r"lam must be a number in \(0, 1\)"),
        ("pdrop", {"layers": (0, 3)}, r"every entry of layers must be an int >= 1"),
        ("adaptive", {"mass": 0}, r"mass must be a number in \(0, 1\]"),
        ("adaptive", {"mass": 1.5}, r"mass must be a number in \(0, 1\]"),
        ("adaptive", {"layers": (2, 0)}, r"every entry of layers must be an int >= 1"),
    ],
)
def test_bad_options_are_refused(llava, method, options, message):
    hooks = count_hooks(llava.model)
    with pytest.raises(ValueError, match=message):
        vtc.compress(llava.model, method, keep=40, **options)
    assert count_hooks(llava.model) == hooks


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("fastv", {"layer": DEPTH}, r"fastv: drop layers \[6\] must be .* within 1..5 \(the language model has 6"),
        ("dart_llm", {"layer": 9}, r"dart_llm: drop layers \[9\]"),
        (["divprune", "fastv"], {"layer": DEPTH}, r"fastv: drop layers \[6\]"),
    ],
    ids=["fastv", "dart_llm", "composed"],
)
def test_schedules_beyond_the_depth_are_refused_at_attach(llava, method, options, message):
    """Raised by vtc.compress before any hook is attached: the model is untouched and can be attached again."""
    model = llava.model
    before = logits(model, llava.batch)
    hooks = count_hooks(model)
    if isinstance(method, list):
        method, amount = [method[0], FastV(**options)], {"keep": [100, 40]}
    else:
        method, amount = LAYERWISE[method](**options), {"keep": 40}
    with pytest.raises(ValueError, match=message):
        vtc.compress(model, method, **amount)
    assert count_hooks(model) == hooks
    assert torch.equal(logits(model, llava.batch), before)
    with vtc.compress(model, "fastv", keep=40) as handle:
        logits(model, llava.batch)
    assert handle.stats["visual_tokens_after"] == [80, 40]


# -- adaptive's key set (MustDrop): protected by vision-side [CLS] attention ------------------------------


def test_adaptive_key_set_survives_every_stage_and_generate_matches_the_reference():
    from tests.helpers import greedy_generate, greedy_no_cache
    from vtc.tiny import tiny_llava, tiny_llava_inputs

    model = tiny_llava(vision_layers=4, text_layers=6)
    batch = tiny_llava_inputs(model, images_per_sample=(1, 2), seed=1)
    key_set = math.ceil(0.08 * 576)
    with vtc.compress(model, "fastervlm", keep=key_set) as handle, torch.no_grad():
        model(**batch)
    top = [set(kept.tolist()) for kept in handle.last_kept]  # per image: the top 8% by [CLS] attention
    method = vtc.get_method("adaptive", protect=0.08, mass=0.05)  # a tiny mass: only the floor and the key set
    replay = Replay(method)
    with vtc.compress(model, method, keep=4) as handle:
        generated = greedy_generate(model, batch, 3)
        replay.replay()
        reference = greedy_no_cache(model, batch, 3)
    assert torch.equal(generated, reference)
    assert all(t <= set(kept.tolist()) for t, kept in zip(top, handle.last_kept, strict=True))
    assert handle.stats["visual_tokens_after"][0] >= key_set and handle.stats["signals"] == ["cls_attention"]


def test_adaptive_key_set_in_choose_and_its_errors():
    from vtc.methods.layerwise import Stage
    from vtc.tiny import tiny_qwen2_vl

    scores = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    protected = torch.tensor([False, False, False, True, False])
    stage = Stage(0, 1, torch.arange(5), torch.empty(0, dtype=torch.long), {"last_row": scores}, torch.zeros(5, 2))
    assert Adaptive(mass=0.4).choose(stage).tolist() == [0]
    stage.protected = protected
    # The key set comes first, then the most-attended tokens until the mass is covered: 0.05 + 0.5 >= 0.4.
    assert Adaptive(mass=0.4).choose(stage).tolist() == [0, 3]
    stage.protected = torch.tensor([False, True, True, True, True])
    assert Adaptive(mass=0.1).choose(stage).tolist() == [1, 2, 3, 4]  # never fewer than the key set
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match=r"protect must be a number in \[0, 1\)"):
            Adaptive(protect=bad)
    model = tiny_qwen2_vl()
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"method 'adaptive' needs \[CLS\] attention.*cls_model="):
        vtc.compress(model, "adaptive", keep=4, protect=0.1)
    assert count_hooks(model) == hooks


# -- the costs issue 20 removed must not change what is chosen -------------------------------------------------


@pytest.mark.parametrize("parent", [FastV, PDrop, DARTLLM], ids=lambda cls: cls.name)
def test_a_subclass_choose_is_not_bypassed_by_its_parents_batching(parent):
    """FastV, PDrop and DART-LLM choose for a whole batch at once (choose_all); a subclass that overrides only choose
    (the per-image rule) still gets its rule applied to every image."""

    @dataclass
    class FirstTokens(parent):
        def choose(self, stage):
            return torch.arange(min(stage.keep, stage.visual.numel()))

    model = tiny_llava(text_layers=DEPTH)
    with vtc.compress(model, FirstTokens(), keep=16) as handle, torch.no_grad():
        model(**tiny_llava_inputs(model, images_per_sample=(1, 1), seed=1))
        assert [kept.tolist() for kept in handle.last_kept] == [list(range(16))] * 2


def test_projections_replaced_after_attach_are_refused_before_the_language_model_runs():
    """A signal layer's scores come from hooks on its k_proj / q_proj: if those modules are swapped after attaching
    (quantisation, LoRA), the prefill is refused with what to do, and nothing of it stays behind."""
    model = tiny_llava(text_layers=DEPTH)
    inputs = tiny_llava_inputs(model, seed=1)
    attn = decoder(model).layers[1].self_attn  # FastV at layer 2 scores at layer 1
    with vtc.compress(model, "fastv", keep=16):
        original = attn.k_proj
        attn.k_proj = torch.nn.Linear(original.in_features, original.out_features, bias=original.bias is not None)
        attn.k_proj.load_state_dict(original.state_dict())
        layer_calls = []
        spy = decoder(model).layers[0].register_forward_pre_hook(lambda *args: layer_calls.append(1))
        try:
            refused = pytest.raises(ValueError, match=r"decoder layer 1's attention projections .* were replaced")
            with refused, torch.no_grad():
                model(**inputs)
        finally:
            spy.remove()
        assert not layer_calls  # refused before any decoder layer ran
        attn.k_proj = original
        with torch.no_grad():
            compressed = model(**inputs).logits
    with vtc.compress(model, "fastv", keep=16), torch.no_grad():
        assert torch.equal(model(**inputs).logits, compressed)  # the refused call left nothing behind


def test_other_calls_of_a_scoring_layers_projections_do_not_change_the_scores():
    """A user's hook that calls a scoring layer's q_proj / k_proj on something else (one row, as attribution tools
    do) is not what vtc scores with: the choice is the one made without that hook."""
    model = tiny_llava(text_layers=DEPTH)
    inputs = tiny_llava_inputs(model, images_per_sample=(2, 1), seed=1)
    layer = decoder(model).layers[1]

    def probe_one_row(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        module.self_attn.q_proj(hidden[:, -1:])
        module.self_attn.k_proj(hidden[:, :1])

    for method in ("fastv", "dart_llm"):
        with vtc.compress(model, method, keep=16) as handle, torch.no_grad():
            model(**inputs)
            alone = [kept.clone() for kept in handle.last_kept]
            hook = layer.register_forward_pre_hook(probe_one_row, with_kwargs=True)
            try:
                model(**inputs)
            finally:
                hook.remove()
            assert all(torch.equal(a, b) for a, b in zip(alone, handle.last_kept, strict=True))
