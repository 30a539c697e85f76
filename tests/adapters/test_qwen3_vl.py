"""What is particular to Qwen3-VL (and Qwen3-VL-MoE): DeepStack features that follow the kept tokens, and the refusals.

The shared Qwen bar (remove, keep-all, generate == no-cache reference, batch == alone, M-RoPE positions, attention
received, beams, ...) runs on Qwen3-VL in test_qwen2_vl.py, the in-LLM bar in test_layerwise.py; the MoE variant
differs only in its MLPs, so it gets the end-to-end checks here.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from tests.helpers import count_hooks, greedy_generate
from tests.helpers import greedy_no_cache as shared_greedy_no_cache
from vtc.tiny import QWEN_IMAGE_TOKEN_ID, tiny_qwen3_vl, tiny_qwen_inputs

GRIDS = (((8, 12),), ((8, 8), (4, 6)))  # 24 | 16 + 6 visual tokens, left-padded
K = 8
CASES = [("divprune", {}), ("fastervlm", {"signal": "attention_received"}), ("uniform", {}), ("dart", {})]


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def model(request):
    return tiny_qwen3_vl(moe=request.param, text_layers=4, deepstack_visual_indexes=[0, 1])


@pytest.fixture(scope="module")
def batch(model):
    return tiny_qwen_inputs(model, image_grids=GRIDS, seed=1)


def language_calls(model, inputs) -> list[dict]:
    """The language model's keyword arguments of one forward (as it receives them, after vtc's hook)."""
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize(("name", "options"), CASES)
def test_deepstack_features_follow_the_kept_tokens(model, batch, name, options):
    """Every DeepStack level keeps exactly the rows of the surviving visual tokens, in sequence order, and
    visual_pos_masks marks exactly their positions in the shortened, re-padded prompt."""
    (full,) = language_calls(model, batch)
    with vtc.compress(model, name, keep=K, **options) as handle:
        (short,) = language_calls(model, batch)
        kept = handle.last_kept
    assert len(full["deepstack_visual_embeds"]) == len(short["deepstack_visual_embeds"]) == 2
    offsets = [0, int((batch["input_ids"][0] == QWEN_IMAGE_TOKEN_ID).sum())]  # row 0's visual tokens come first
    rows = torch.cat([kept[b] + offsets[b] for b in range(2)])
    for level_full, level_short in zip(full["deepstack_visual_embeds"], short["deepstack_visual_embeds"], strict=True):
        assert torch.equal(level_short, level_full[rows])
    mask = short["visual_pos_masks"]
    assert mask.shape == short["inputs_embeds"].shape[:2]
    assert mask.sum(dim=1).tolist() == [len(k) for k in kept] == [8, 14]
    # The marked positions hold exactly the kept visual tokens' embeddings (in order).
    for b in range(2):
        visual = full["inputs_embeds"][b][batch["input_ids"][b] == QWEN_IMAGE_TOKEN_ID]
        assert torch.equal(short["inputs_embeds"][b][mask[b]], visual[kept[b]])


@pytest.mark.parametrize(("name", "options"), [*CASES, ("fastv", {"layer": 2}), ("pdrop", {"layers": (16, 24)})])
def test_generate_equals_no_cache_reference_and_each_sample_alone(model, batch, name, options):
    with vtc.compress(model, name, keep=K, **options) as handle:
        cached = greedy_generate(model, batch, 4)
        reference = shared_greedy_no_cache(model, batch, 4, positions=False) if name not in ("fastv", "pdrop") else None
        counts = handle.stats["visual_tokens_after"]
        for b in range(2):
            keep = batch["attention_mask"][b].bool()
            first = sum(len(g) for g in GRIDS[:b])
            start = sum(h * w for g in GRIDS[:b] for h, w in g)
            texts = [k for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch]
            alone = {k: batch[k][b][keep].unsqueeze(0) for k in texts}
            alone["pixel_values"] = batch["pixel_values"][start : start + sum(h * w for h, w in GRIDS[b])]
            alone["image_grid_thw"] = batch["image_grid_thw"][first : first + len(GRIDS[b])]
            assert torch.equal(greedy_generate(model, alone, 4), cached[b : b + 1])
    if reference is not None:  # in-LLM methods choose from the last token: their reference is test_layerwise's
        assert torch.equal(cached, reference)
    assert counts == [8, 14]


def test_remove_restores_the_model_bit_for_bit(model, batch):
    with torch.no_grad():
        before = model(**batch).logits
    hooks = count_hooks(model)
    for name, options in [*CASES, ("fastv", {"layer": 2})]:
        with vtc.compress(model, name, keep=K, **options), torch.no_grad():
            model(**batch)
    assert count_hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


@pytest.mark.parametrize(("method", "options"), [("fastv", {"layer": 1}), ("adaptive", {})])
def test_in_llm_drops_before_the_last_deepstack_layer_are_refused(model, method, options):
    """DeepStack features are added after decoder layers 0 and 1 with the decoder stack's own full-length mask:
    a drop at layer 1 (FastV layer=1, or the adaptive schedule's 1/2/3 on 4 layers) is refused at attach time,
    with the first layer allowed; hooks untouched."""
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"must start at layer 2 or later: fastv / dart_llm take layer=2"):
        vtc.compress(model, method, keep=K, **options)
    assert count_hooks(model) == hooks


def test_merging_and_cls_methods_are_refused_with_the_alternative(model):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"merge=True cannot run on Qwen3VL.*Use merge=False"):
        vtc.compress(model, "dart", keep=K, merge=True)
    with pytest.raises(ValueError, match=r"no \[CLS\] token.*signal='attention_received'"):
        vtc.compress(model, "fastervlm", keep=K)
    with pytest.raises(ValueError, match=r"\['cls_model'\] do not apply"):
        vtc.compress(model, "fastervlm", keep=K, cls_model="ViT-B-16")
    assert count_hooks(model) == hooks


def test_a_custom_merging_method_is_refused_before_the_language_model_runs(model, batch):
    """A user's method whose plan merges (not dart's merge=True, which attach refuses) is refused once it plans."""

    class MergeFirstTwo(vtc.Method):
        name = "merge_first_two"
        requires = ("features",)

        def _plan(self, signals, keep):
            features = signals["features"]
            b, n = features.shape[:2]
            kept = torch.arange(keep).expand(b, keep).clone()
            merge_into = torch.arange(n).clamp(max=keep - 1).expand(b, n).clone()
            return vtc.Plan(kept, n, merge_into)

    calls = []
    with vtc.compress(model, MergeFirstTwo(), keep=K):
        spy = model.model.language_model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            with pytest.raises(ValueError, match=r"merges tokens.*deepstack_visual_embeds"), torch.no_grad():
                model(**batch)
        finally:
            spy.remove()
    assert not calls


def test_both_variants_are_listed_and_run_from_the_command_line(capsys):
    assert {"qwen3_vl", "qwen3_vl_moe"} <= set(vtc.list_models())
    from vtc.__main__ import main

    assert (
        main(["--model", "tiny-qwen3-vl", "--methods", "divprune,fastv", "--repeats", "1", "--max-new-tokens", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "Qwen3VLForConditionalGeneration" in out and "384 -> 64" in out


@pytest.mark.parametrize(("name", "options"), [("divprune", {}), ("fastv", {"layer": 2})])
def test_sdpa_and_eager_attention_agree(name, options):
    """The same weights with SDPA and with eager attention keep the same tokens and give the same logits."""
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = tiny_qwen3_vl(text_layers=4, deepstack_visual_indexes=[0, 1], attn_implementation=implementation)
        inputs = tiny_qwen_inputs(model, image_grids=GRIDS, seed=1)
        with vtc.compress(model, name, keep=K, **options) as handle, torch.no_grad():
            outputs.append((model(**inputs).logits, [k.clone() for k in handle.last_kept]))
    (sdpa_logits, sdpa_kept), (eager_logits, eager_kept) = outputs
    assert all(torch.equal(a, b) for a, b in zip(sdpa_kept, eager_kept, strict=True))
    assert sdpa_logits.shape == eager_logits.shape
    torch.testing.assert_close(sdpa_logits[:, -1], eager_logits[:, -1], rtol=1e-4, atol=1e-5)  # each row's last token
