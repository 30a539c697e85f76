"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 adapters on tiny random models: images of any size, M-RoPE, attention
received.

Every test runs on all four families. The Qwen2.5-VL model has window attention in its vision tower and its last
full-attention block is not the last block (blocks 0 and 2 of 4), so the signal block and the window order
both matter. The Qwen3-VL model adds DeepStack features after its first decoder layer (what is particular to it,
and its MoE variant, is in test_qwen3_vl.py); merging methods are refused there. The Qwen3.5 model has a hybrid
language model (linear-attention layers with a recurrent state, one full-attention layer in four; what is
particular to it is in test_qwen3_5.py); it exists from transformers 5 on and is skipped on 4.57.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import transformers
from transformers import AttentionInterface

import vtc
from tests import helpers
from tests.helpers import count_hooks, greedy_generate
from vtc.methods.uniform import lattice
from vtc.registry import METHODS
from vtc.tiny import QWEN_IMAGE_TOKEN_ID, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_5, tiny_qwen3_vl, tiny_qwen_inputs

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
QWEN3_5 = hasattr(transformers, "Qwen3_5ForConditionalGeneration")
STEPS = 5
K = 8  # visual tokens kept per image
# Sample 0: one image of 8x12 patches (24 tokens). Sample 1: 8x8 and 4x6 (16 + 6 tokens, the second below K).
GRIDS = (((8, 12),), ((8, 8), (4, 6)))
TOKENS = [[24], [16, 6]]
FAMILIES = {
    "qwen2_vl": lambda **options: tiny_qwen2_vl(**options),
    "qwen2_5_vl": lambda **options: tiny_qwen2_5_vl(vision_layers=4, fullatt_block_indexes=[0, 2], **options),
    "qwen3_vl": lambda **options: tiny_qwen3_vl(**options),
    "qwen3_5": lambda **options: tiny_qwen3_5(**options),
}
SKIPPED = {"qwen3_5": None if QWEN3_5 else f"Qwen3.5 is not in transformers {transformers.__version__}"}
DEEPSTACK = {"qwen3_vl"}  # merging is refused there (test_qwen3_vl.py)
# Qwen3-VL's vision tower: learned position embeddings (video inputs: test_qwen_video.py; Qwen3.5's refusal:
# test_qwen3_5.py).
QWEN3_VISION = {"qwen3_vl", "qwen3_5"}
RECORDING = "vtc_test_recording"
# Attention tests: two images of one size (one batched method call) between images of other sizes.
ATTENTION_GRIDS = (((8, 12), (8, 8)), ((8, 8), (4, 6)))
ATTENTION_TOKENS = [[24, 16], [16, 6]]


def uses_cls(name: str) -> bool:
    return any(signal.startswith("cls_") for signal in METHODS[name].requires)


# Every method that runs on Qwen without an auxiliary CLIP, plus fastervlm's substitute signal and DART merging.
CASES = [pytest.param(name, {}, id=name) for name in vtc.list_methods("pre", images=True) if not uses_cls(name)] + [
    pytest.param("fastervlm", {"signal": "attention_received"}, id="fastervlm-received"),
    pytest.param("dart", {"merge": True}, id="dart-merge"),
]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(f, marks=pytest.mark.skipif(bool(SKIPPED.get(f)), reason=str(SKIPPED.get(f))))
        for f in sorted(FAMILIES)
    ],
)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return FAMILIES[family]()


@pytest.fixture(autouse=True)
def _merging_is_refused_with_deepstack(request):
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("family") in DEEPSTACK and params.get("options", {}).get("merge"):
        pytest.skip("merging is refused on Qwen3-VL (DeepStack); test_qwen3_vl.py checks the refusal")


@pytest.fixture(scope="module")
def batch(model):
    """Two left-padded samples: different prompt lengths, image sizes and image counts."""
    return tiny_qwen_inputs(model, image_grids=GRIDS, seed=1)


def signal_block(model) -> int:
    """The contract: the last full-attention vision block (every block is full attention in Qwen2-VL)."""
    full = getattr(model.config.vision_config, "fullatt_block_indexes", None)
    return max(full) if full else len(model.model.visual.blocks) - 1


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def greedy_no_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    """The shared no-cache greedy reference, letting Qwen derive its M-RoPE positions itself."""
    return helpers.greedy_no_cache(model, inputs, steps, positions=False)


def sample(inputs: dict, b: int, grids=GRIDS) -> dict:
    """Sample b of a batch, unpadded, with its images' patches and grids."""
    keep = inputs["attention_mask"][b].bool()
    first = sum(len(g) for g in grids[:b])
    start = sum(h * w for g in grids[:b] for h, w in g)
    stop = start + sum(h * w for h, w in grids[b])
    out = {
        k: inputs[k][b][keep].unsqueeze(0) for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs
    }
    out["pixel_values"] = inputs["pixel_values"][start:stop]
    out["image_grid_thw"] = inputs["image_grid_thw"][first : first + len(grids[b])]
    return out


def expected_counts(tokens: list[list[int]], keep: int) -> list[int]:
    return [sum(min(keep, n) for n in row) for row in tokens]


def shortening(tokens: list[list[int]], keep: int) -> int:
    """How much shorter the batch gets: rows are re-padded to the longest, the one that dropped the least."""
    return min(sum(n - min(keep, n) for n in row) for row in tokens)


def per_image(kept: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split a sample's kept indices (into its concatenated visual tokens) by image, as indices into each image."""
    out, start = [], 0
    for n in sizes:
        out.append(kept[(kept >= start) & (kept < start + n)] - start)
        start += n
    return out


def kept_columns(inputs: dict, kept: torch.Tensor, b: int) -> torch.Tensor:
    """Original columns of row b that survive: every non-visual token (padding too) and the kept visual ones."""
    visual = inputs["input_ids"][b] == QWEN_IMAGE_TOKEN_ID
    keep = ~visual
    keep[visual.nonzero().squeeze(1)[kept]] = True
    return keep.nonzero().squeeze(1)


@contextlib.contextmanager
def recording_calls(module):
    """Record the keyword arguments of every call of ``module`` (after the hooks registered before this one)."""
    calls: list[dict] = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# -------------------------------------------------------------------------------------------- the method matrix


@pytest.mark.parametrize(("name", "options"), CASES)
def test_remove_restores_the_model_bit_for_bit(model, batch, name, options):
    before = logits(model, batch)
    hooks = count_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = vtc.compress(model, name, keep=K, **options)
    assert count_hooks(model) > hooks
    compressed = logits(model, batch)
    handle.remove()
    assert count_hooks(model) == hooks
    assert compressed.shape[1] == before.shape[1] - shortening(TOKENS, K)
    assert torch.equal(logits(model, batch), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    handle.remove()  # idempotent


@pytest.mark.parametrize("budget", [{"keep": 24}, {"ratio": 1.0}], ids=["keep-all", "ratio-1"])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_keep_all_is_the_identity(model, batch, name, options, budget):
    before = logits(model, batch)
    with vtc.compress(model, name, **budget, **options) as handle:
        after = logits(model, batch)
    assert torch.equal(after, before)
    assert [k.tolist() for k in handle.last_kept] == [list(range(24)), list(range(22))]
    assert handle.stats["visual_tokens_after"] == [24, 22]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_generate_with_cache_equals_no_cache_reference(model, batch, name, options):
    with vtc.compress(model, name, keep=K, **options) as handle:
        cached = greedy_generate(model, batch, STEPS)
        kept_in_generate = [k.clone() for k in handle.last_kept]
        reference = greedy_no_cache(model, batch, STEPS)
    assert torch.equal(cached, reference)
    assert [k.tolist() for k in handle.last_kept] == [k.tolist() for k in kept_in_generate]
    assert [len(k) for k in kept_in_generate] == expected_counts(TOKENS, K)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_batch_with_left_padding_equals_each_sample_alone(model, batch, name, options):
    with vtc.compress(model, name, keep=K, **options) as handle:
        batched = greedy_generate(model, batch, STEPS)
        batched_kept = handle.last_kept
        batched_last = logits(model, batch)[:, -1]
        for b in range(2):
            single = sample(batch, b)
            assert torch.equal(greedy_generate(model, single, STEPS), batched[b : b + 1])
            assert torch.equal(handle.last_kept[0], batched_kept[b])
            assert handle.stats["images"] == [len(GRIDS[b])]
            torch.testing.assert_close(logits(model, single)[:, -1], batched_last[b : b + 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_exact_counts_per_image_and_per_sample(model, name, options):
    """keep is a cap per image; several images per prompt, two of one size, one smaller than the cap."""
    grids = (((8, 12),), ((8, 8), (4, 6)), ((4, 4), (8, 8), (8, 8)))
    tokens = [[24], [16, 6], [4, 16, 16]]
    inputs = tiny_qwen_inputs(model, image_grids=grids, seed=2)
    for budget, expected in (({"keep": K}, lambda n: min(K, n)), ({"ratio": 0.3}, lambda n: max(1, round(0.3 * n)))):
        with vtc.compress(model, name, **budget, **options) as handle:
            out = logits(model, inputs)
        stats = handle.stats
        assert stats["images"] == [1, 2, 3]
        assert stats["visual_tokens_before"] == [24, 22, 36]
        assert stats["visual_tokens_after"] == [sum(expected(n) for n in row) for row in tokens]
        assert out.shape[1] == inputs["input_ids"].shape[1] - min(sum(n - expected(n) for n in row) for row in tokens)
        for kept, sizes in zip(handle.last_kept, tokens, strict=True):
            assert torch.equal(kept, kept.unique())  # sorted and unique
            assert [len(k) for k in per_image(kept, sizes)] == [expected(n) for n in sizes]


def test_several_images_per_prompt_generate_and_alone(model):
    grids = (((4, 6), (8, 8), (4, 6)), ((8, 12),))
    inputs = tiny_qwen_inputs(model, image_grids=grids, seed=3)
    with vtc.compress(model, "divprune", keep=4) as handle:
        batched = greedy_generate(model, inputs, STEPS)
        kept = handle.last_kept
        assert handle.stats["visual_tokens_after"] == [12, 4]
        assert [len(k) for k in per_image(kept[0], [6, 16, 6])] == [4, 4, 4]
        assert torch.equal(greedy_no_cache(model, inputs, STEPS), batched)
        for b in range(2):
            assert torch.equal(greedy_generate(model, sample(inputs, b, grids), STEPS), batched[b : b + 1])
            assert torch.equal(handle.last_kept[0], kept[b])


def test_uniform_spreads_over_each_images_own_token_grid(model):
    """Non-square images: the lattice follows each image's (h / 2) x (w / 2) grid, not a guessed one."""
    grids = (((8, 12), (12, 8)), ((4, 6),))
    with vtc.compress(model, "uniform", keep=5) as handle:
        logits(model, tiny_qwen_inputs(model, image_grids=grids, seed=8))
    for kept, images in zip(handle.last_kept, grids, strict=True):
        sizes = [h * w // 4 for h, w in images]
        for chosen, (h, w) in zip(per_image(kept, sizes), images, strict=True):
            assert torch.equal(chosen, lattice(h // 2, w // 2, 5).sort().values)


def test_merge_writes_size_weighted_means(model, family):
    if family in DEEPSTACK:
        pytest.skip("merging is refused on Qwen3-VL (DeepStack); test_qwen3_vl.py checks the refusal")
    grids = (((8, 8),), ((8, 8),))  # one image size: one plan for the batch
    inputs = tiny_qwen_inputs(model, image_grids=grids, seed=6)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    features = list(getattr(features, "pooler_output", features))  # a tuple in transformers 4.x
    with (
        vtc.compress(model, "dart", keep=K, merge=True) as handle,
        recording_calls(model.model.language_model) as calls,
    ):
        logits(model, inputs)
    plan, embeds = handle.last_plan, calls[0]["inputs_embeds"]
    assert plan.merge_into is not None and torch.equal(plan.sizes.sum(1), torch.tensor([16, 16]))
    assert (plan.sizes > 1).any()
    for b in range(2):
        cols = kept_columns(inputs, handle.last_kept[b], b)
        visual = (inputs["input_ids"][b] == QWEN_IMAGE_TOKEN_ID)[cols]
        received = embeds[b, -cols.numel() :][visual]  # [K, D]
        expected = torch.stack([features[b][plan.merge_into[b] == slot].mean(0) for slot in range(K)])
        torch.testing.assert_close(received, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(plan.kept[b], handle.last_kept[b])
    with vtc.compress(model, "dart", keep=K) as handle:
        logits(model, inputs)
    assert torch.equal(handle.last_plan.kept, plan.kept)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(family, dtype):
    model = FAMILIES[family](dtype=dtype)
    inputs = tiny_qwen_inputs(model, image_grids=GRIDS, seed=9)
    merge = family not in DEEPSTACK
    for name, options in (("fastervlm", {"signal": "attention_received"}), ("dart", {"merge": merge})):
        with vtc.compress(model, name, keep=K, **options) as handle:
            cached = greedy_generate(model, inputs, 4)
            assert handle.stats["visual_tokens_after"] == expected_counts(TOKENS, K)
            assert torch.equal(greedy_no_cache(model, inputs, 4), cached)


def test_text_only_input_passes_through(model, batch):
    text = {"input_ids": batch["input_ids"][:, -4:], "attention_mask": batch["attention_mask"][:, -4:]}
    before = logits(model, text)
    with vtc.compress(model, "fastervlm", signal="attention_received", keep=K) as handle:
        assert torch.equal(logits(model, text), before)
    assert [k.numel() for k in handle.last_kept] == [0, 0]
    assert handle.stats["visual_tokens_before"] == [0, 0]


# -------------------------------------------------------------------------------------------- M-RoPE positions


@pytest.mark.parametrize("via", ["forward", "generate"])
def test_language_model_gets_the_original_mrope_positions_of_kept_tokens(model, batch, via):
    def run():
        return logits(model, batch) if via == "forward" else greedy_generate(model, batch, 2)

    with recording_calls(model.model.language_model) as calls:
        run()
    full = calls[0]
    deltas = model.model.rope_deltas.clone()
    with (
        vtc.compress(model, "fastervlm", signal="attention_received", keep=K) as handle,
        recording_calls(model.model.language_model) as calls,
    ):
        run()
    short = calls[0]
    positions, short_positions = full["position_ids"], short["position_ids"]
    # [3, B, L] M-RoPE (t, h, w), or [4, B, L] with the text positions first when generate() builds them (Qwen2-VL
    # and Qwen2.5-VL; Qwen3-VL too on transformers 5, not on 4.57).
    assert positions.ndim == 3 and positions.shape[0] in ((3, 4) if via == "generate" else (3,))
    assert short_positions.shape[:2] == positions.shape[:2]
    assert short_positions.shape[2] == batch["input_ids"].shape[1] - shortening(TOKENS, K)
    for b in range(2):
        cols = kept_columns(batch, handle.last_kept[b], b)
        n = cols.numel()
        assert torch.equal(short_positions[:, b, -n:], positions[:, b, cols])
        assert torch.equal(short["attention_mask"][b, -n:], batch["attention_mask"][b, cols])
        assert not short["attention_mask"][b, :-n].any()
        visual = (batch["input_ids"][b] == QWEN_IMAGE_TOKEN_ID)[cols]
        assert int(visual.sum()) == sum(min(K, t) for t in TOKENS[b])
        # The kept visual tokens keep their 2-D grid positions: not a contiguous 1-D run.
        assert not torch.equal(short_positions[1, b, -n:][visual], short_positions[2, b, -n:][visual])
    assert torch.equal(model.model.rope_deltas, deltas)


def test_decoding_positions_continue_from_the_original_prompt(model, batch):
    with recording_calls(model.model.language_model) as full:
        greedy_generate(model, batch, STEPS)
    deltas = model.model.rope_deltas.clone()
    with vtc.compress(model, "divprune", keep=K), recording_calls(model.model.language_model) as short:
        greedy_generate(model, batch, STEPS)
    assert torch.equal(model.model.rope_deltas, deltas)
    assert len(short) == len(full) == STEPS
    prompt = full[0]["position_ids"]
    for step, (a, b) in enumerate(zip(full[1:], short[1:], strict=True)):
        assert b["inputs_embeds"].shape[1] == 1
        assert torch.equal(b["position_ids"], a["position_ids"])
        # The M-RoPE rows continue after the largest position of the whole uncompressed prompt.
        assert torch.equal(b["position_ids"][-3:, :, 0], prompt[-3:].amax(dim=2) + 1 + step)


# -------------------------------------------------------------------------------------------- attention received


def recording_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention that keeps the probabilities ([H, n, n] per chunk) of the module marked for recording."""
    assert attention_mask is None and dropout == 0.0
    weights = (query.float() @ key.float().transpose(-1, -2) * scaling).softmax(dim=-1)  # [1, H, n, n]
    if getattr(module, "vtc_test_weights", None) is not None:
        module.vtc_test_weights.append(weights[0])
    return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous(), weights


@pytest.fixture(scope="module")
def recording_model(family):
    """The same tiny model, with the recording attention in the vision tower only."""
    AttentionInterface.register(RECORDING, recording_attention)
    model = FAMILIES[family]()
    model.set_attn_implementation({"vision_config": RECORDING, "text_config": "sdpa"})
    assert model.config.vision_config._attn_implementation == RECORDING
    return model


@torch.no_grad()
def received_reference(model, inputs) -> list[torch.Tensor]:
    """Per image, [n] attention each merged token receives at the signal block, from the model's own weights.

    Column mean of the softmax over all queries of the image's chunk, mean over heads, per patch; Qwen2.5-VL runs
    its blocks on patches in window order, so the patches are put back in their original order (found by matching
    the first block's input rows to the patch embeddings) before the mean over each 2 x 2 merge group.
    """
    visual = model.model.visual
    attn = visual.blocks[signal_block(model)].attn
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        visual.patch_embed.register_forward_hook(lambda m, args, out: seen.__setitem__("patches", out)),
        visual.blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("block", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        ),
    ]
    attn.vtc_test_weights = []
    try:
        visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        weights = attn.vtc_test_weights
    finally:
        del attn.vtc_test_weights
        for hook in hooks:
            hook.remove()
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    assert [w.shape[-1] for w in weights] == patches  # one full-attention chunk per image
    received = torch.cat([w.mean(dim=(0, 1)) for w in weights])  # [seq] in block order
    if model.config.model_type in QWEN3_VISION:  # learned position embeddings join the patches: no rows to match, and
        order = torch.arange(len(received))  # no windows either, so block order is patch order
    else:
        same = (seen["block"].unsqueeze(1) == seen["patches"].unsqueeze(0)).all(-1)  # [seq, seq]
        assert torch.equal(same.sum(1), torch.ones(len(same), dtype=torch.long))
        order = same.float().argmax(1)  # block row j holds patch order[j]
        assert (not torch.equal(order, torch.arange(len(order)))) == (model.config.model_type == "qwen2_5_vl")
    original = torch.empty_like(received)
    original[order] = received
    merge = model.config.vision_config.spatial_merge_size**2
    return list(original.view(-1, merge).mean(dim=1).split([p // merge for p in patches]))


@dataclass
class RecordSignals(vtc.Method):
    """Keeps the first ``keep`` tokens and records the signals vtc hands over."""

    calls: list = field(default_factory=list)
    name = "record_signals"
    requires = ("attention_received",)

    def plan(self, signals: dict[str, Any], keep: int) -> vtc.Plan:
        self.calls.append(signals)
        return super().plan(signals, keep)

    def _plan(self, signals: dict[str, Any], keep: int) -> vtc.Plan:
        n = signals["attention_received"].shape[1]
        return vtc.Plan(torch.arange(keep).expand(signals["attention_received"].shape[0], keep).clone(), n)


@pytest.fixture(scope="module")
def attention_batch(recording_model):
    return tiny_qwen_inputs(recording_model, image_grids=ATTENTION_GRIDS, seed=7)


def test_attention_received_equals_the_models_attention_weights(recording_model, attention_batch):
    reference = received_reference(recording_model, attention_batch)
    method = RecordSignals()
    with vtc.compress(recording_model, method, keep=4) as handle:
        logits(recording_model, attention_batch)
    # One method call per image size, in order of first appearance: [24], [16, 16] (one per sample), [6].
    assert [tuple(call["attention_received"].shape) for call in method.calls] == [(1, 24), (2, 16), (1, 6)]
    rows = [row for call in method.calls for row in call["attention_received"]]
    for row, expected in zip(rows, reference, strict=True):
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-7)
    assert handle.stats["signals"] == ["attention_received"]


def test_fastervlm_keeps_the_top_received_tokens_per_image(recording_model, attention_batch):
    reference = received_reference(recording_model, attention_batch)
    with vtc.compress(recording_model, "fastervlm", signal="attention_received", keep=5) as handle:
        logits(recording_model, attention_batch)
    images = iter(reference)
    for b, sizes in enumerate(ATTENTION_TOKENS):
        expected, start = [], 0
        for n in sizes:
            expected.append(next(images).topk(min(5, n)).indices.sort().values + start)
            start += n
        assert torch.equal(handle.last_kept[b], torch.cat(expected))


def test_signal_sources_name_the_vision_block(model, batch):
    block = signal_block(model)
    with vtc.compress(model, "fastervlm", signal="attention_received", keep=K) as handle:
        logits(model, batch)
    sources = handle.stats["signal_sources"]
    assert list(sources) == ["attention_received"]
    assert f"vision block {block} " in sources["attention_received"]
    with vtc.compress(model, "divprune", keep=K) as handle:
        logits(model, batch)
    assert "attention_received" not in handle.stats["signal_sources"]


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", [name for name in vtc.list_methods("pre") if uses_cls(name)])
def test_cls_methods_without_a_substitute_are_refused(model, name):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"no \[CLS\] token") as error:
        vtc.compress(model, name, keep=K)
    assert "signal='attention_received'" in str(error.value)
    assert count_hooks(model) == hooks


def test_labels_are_refused(model, batch):
    with vtc.compress(model, "random", keep=K), pytest.raises(ValueError, match="inference"):
        model(**batch, labels=batch["input_ids"])


def test_cache_continuation_and_short_decode_masks_are_refused(model, batch):
    with vtc.compress(model, "divprune", keep=K), torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
        length = int(cache.get_seq_length())  # Qwen3.5's is a tensor its cache increments in place
        with recording_calls(model.model.language_model.layers[0]) as calls:
            with pytest.raises(ValueError, match="continues an existing KV cache"):
                model(**batch, past_key_values=cache)
            with pytest.raises(ValueError, match="full 2-D attention_mask of length"):
                last = {"input_ids": batch["input_ids"][:, -1:], "position_ids": torch.full((3, 2, 1), length)}
                model(**last, attention_mask=torch.ones(2, 20), past_key_values=cache)
        assert not calls
        assert cache.get_seq_length() == length


def test_a_hand_decode_loop_without_positions_over_a_shortened_cache_is_refused(model, batch):
    """Without position_ids the model numbers new tokens from the cache's length (M-RoPE from the shortened one):
    refused before anything runs (generate() passes them: position_ids, or cache_position on transformers 4.x)."""
    with vtc.compress(model, "divprune", keep=K), torch.no_grad():
        out = model(**batch, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        with (
            recording_calls(model.model.language_model.layers[0]) as calls,
            pytest.raises(ValueError, match="continues a KV cache that vtc shortened, without position_ids"),
        ):
            model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        assert not calls


def test_a_new_turn_over_a_cache_shortened_by_a_plain_forward_is_refused(model):
    """Turn 1 by model(...), turn 2 by generate() on the whole conversation with that cache (one unpadded sample: no
    mask to check): generate() would re-feed history the cache holds in compressed form (it slices at the shortened
    length). Refused."""
    batch = tiny_qwen_inputs(model, image_grids=(((8, 12),),), seed=1)
    with vtc.compress(model, "divprune", keep=K), torch.no_grad():
        out = model(**batch, use_cache=True)
        ids = torch.cat([batch["input_ids"], out.logits[:, -1:].argmax(-1), torch.full((1, 3), 20)], 1)
        turn = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": batch["image_grid_thw"]}
        if "mm_token_type_ids" in batch:
            types = torch.zeros_like(ids)
            types[:, : batch["mm_token_type_ids"].shape[1]] = batch["mm_token_type_ids"]
            turn["mm_token_type_ids"] = types
        # (transformers 4.57's Qwen3-VL passes no position_ids for it: refused as a hand loop would be)
        with pytest.raises(ValueError, match="a new turn cannot reuse a compressed cache|without position_ids"):
            model.generate(**turn, past_key_values=out.past_key_values, max_new_tokens=2, do_sample=False)


def test_budget_option_is_refused(model):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"\['budget'\] do not apply.*llava_next"):
        vtc.compress(model, "divprune", keep=K, budget="per_crop")
    assert count_hooks(model) == hooks


# -------------------------------------------------------------------------------------------- generate() paths


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 5.x encodes images before the prefill")
def test_generate_passes_encoded_images_and_equals_the_reference(model, batch):
    with vtc.compress(model, "fastervlm", signal="attention_received", keep=K) as handle:
        with recording_calls(model.model) as calls:
            cached = greedy_generate(model, batch, STEPS)
        reference = greedy_no_cache(model, batch, STEPS)
    prefill = calls[0]
    assert prefill.get("pixel_values") is None and prefill.get("image_grid_thw") is None
    assert prefill["mm_encoder_outputs"]["image"] is not None
    assert torch.equal(cached, reference)
    assert handle.stats["visual_tokens_after"] == expected_counts(TOKENS, K)


@pytest.mark.skipif(TRANSFORMERS_4, reason="mm_encoder_outputs exists from transformers 5.0")
def test_features_computed_before_attach_are_refused_for_vision_signals(model, batch):
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])}
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    with vtc.compress(model, "fastervlm", signal="attention_received", keep=K):
        logits(model, batch)  # its vision-side signals must not be reused by the next forward
        with pytest.raises(ValueError, match="not computed while vtc was attached"):
            model(**inputs, mm_encoder_outputs=encoded)
    with vtc.compress(model, "divprune", keep=K) as handle:
        model(**inputs, mm_encoder_outputs=encoded)
    assert [len(k) for k in handle.last_kept] == expected_counts(TOKENS, K)


def test_beam_search_with_a_text_only_sample(model):
    """A row without an image in a batch with images, under beam search (generate() repeats every row)."""
    inputs = tiny_qwen_inputs(model, image_grids=(((8, 8),), ()), seed=5)
    with vtc.compress(model, "divprune", keep=K) as handle:
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape[0] == 2
    assert handle.stats["images"] == [1, 1, 0, 0]
    assert handle.stats["visual_tokens_after"] == [8, 8, 0, 0]


@pytest.mark.parametrize(("name", "options"), [("fastervlm", {"signal": "attention_received"}), ("divprune", {})])
def test_beam_search_repeats_images_and_signals_follow(model, name, options):
    """Two images of one size in the batch: each beam's image must get its own image's signals."""
    inputs = tiny_qwen_inputs(model, image_grids=(((8, 8),), ((8, 8), (4, 6))), seed=5)
    with vtc.compress(model, name, keep=K, **options) as handle:
        logits(model, inputs)
        greedy_kept = handle.last_kept
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape[0] == 2
    assert handle.stats["images"] == [1, 1, 2, 2]
    assert handle.stats["visual_tokens_after"] == [8, 8, 14, 14]
    for b in range(2):
        for beam in range(2):
            assert torch.equal(handle.last_kept[2 * b + beam], greedy_kept[b])
