"""Qwen2-VL and Qwen2.5-VL with an auxiliary CLIP (``cls_model=...``): [CLS]-attention methods on towers without [CLS].

The auxiliary tower is ``tests/open_clip_layout.py``'s torch-only stand-in of an open_clip ViT, so every test runs
without open_clip. Its patch grid (5 x 7) matches no Qwen token grid, so every map is really resampled.

The reference is independent of vtc's image path: the images are drawn first and flattened into pixel_values the
way Qwen's image processor lays them out, so the reference reads the images themselves (vtc has to un-flatten
them); it resizes each one to the tower's input, runs the tower eagerly asking every block's attention for its
weights, takes the [CLS] -> patch rows and resamples them onto the image's (h / 2, w / 2) token grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vtc
from tests import helpers
from tests.adapters.test_qwen2_vl import recording_calls
from tests.helpers import count_hooks, greedy_generate
from tests.open_clip_layout import VisionTransformer, eager_attention
from vtc.aux_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AuxiliaryCLIP
from vtc.tiny import tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen_inputs

FAMILIES = {
    "qwen2_vl": lambda: tiny_qwen2_vl(),
    "qwen2_5_vl": lambda: tiny_qwen2_5_vl(vision_layers=4, fullatt_block_indexes=[0, 2]),
}
TOWER = {"image_size": (40, 56), "patch_size": 8, "width": 32, "layers": 4, "heads": 2, "output_dim": 16}
LAYERS = TOWER["layers"]
K = 5  # visual tokens kept per image
STEPS = 4
# Sample 0: one image of 8 x 12 patches (24 tokens). Sample 1: 8 x 8 and 4 x 6 (16 + 6 tokens).
GRIDS = (((8, 12),), ((8, 8), (4, 6)))
TOKENS = [[24], [16, 6]]
START = 1  # vtc_cls start_layer: the sum of blocks 1..3 differs from fastervlm's block 3 alone
CASES = [
    pytest.param("fastervlm", {}, id="fastervlm"),
    pytest.param("vtc_cls", {"start_layer": START}, id="vtc_cls"),
]


class Holder(nn.Module):
    """A model holding its image tower as ``.visual``, as open_clip's CLIP does."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


SPECS = {
    "auxiliary": lambda tower: AuxiliaryCLIP(tower, name="stand-in ViT"),
    "holder": Holder,
    "tower": lambda tower: tower,
}
NAMES = {"auxiliary": "stand-in ViT", "holder": "Holder", "tower": "VisionTransformer"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return FAMILIES[request.param]()


@pytest.fixture(scope="module")
def tower():
    return VisionTransformer(**TOWER, seed=0).eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.rand(3, 14 * h, 14 * w, generator=generator) for grids in GRIDS for h, w in grids]


@pytest.fixture(scope="module")
def batch(model, images):
    inputs = tiny_qwen_inputs(model, image_grids=GRIDS, seed=1)
    inputs["pixel_values"] = qwen_pixel_values(images).to(inputs["pixel_values"].dtype)
    return inputs


@pytest.fixture(scope="module")
def reference(tower, images) -> list[torch.Tensor]:
    return [reference_rows(tower, image) for image in images]


def qwen_pixel_values(images: list[torch.Tensor], patch: int = 14, temporal: int = 2, merge: int = 2) -> torch.Tensor:
    """pixel_values as Qwen2-VL's image processor makes them (its layout is checked against transformers in
    tests/test_aux_clip.py): normalised, the image repeated over ``temporal`` frames, one row per patch in the
    order (h / merge, w / merge, merge, merge), each row flattened as (channel, frame, patch row, patch column)."""
    rows = []
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    for image in images:
        x = (image - mean) / std
        gh, gw = x.shape[1] // patch, x.shape[2] // patch
        x = x.reshape(3, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, P, P]
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1)  # [..., C, T, P, P]
        rows.append(x.reshape(gh * gw, 3 * temporal * patch * patch))
    return torch.cat(rows)


@torch.no_grad()
def reference_rows(tower: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """[V, n] [CLS] -> patch attention of every tower block, on the image's (h / 2, w / 2) Qwen token grid."""
    pixels = F.interpolate(image[None], size=tower.image_size, mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    weights, pooled = eager_attention(tower, (pixels - mean) / std)
    torch.testing.assert_close(pooled, tower((pixels - mean) / std), atol=1e-5, rtol=0)
    maps = torch.stack([w[:, 0, 1:] for w in weights], dim=1).view(1, LAYERS, *tower.grid_size)  # [1, V, gh, gw]
    h, w = image.shape[1] // 28, image.shape[2] // 28
    return AuxiliaryCLIP.resample(maps, (h, w))[0]


def expected_kept(reference: list[torch.Tensor], name: str, keep: int = K) -> list[torch.Tensor]:
    """Per sample, the top-``keep`` tokens of each image by the reference score, as indices into the sample's
    concatenated visual tokens."""
    images, out = iter(reference), []
    for sizes in TOKENS:
        chosen, start = [], 0
        for n in sizes:
            rows = next(images)
            score = rows[-1] if name == "fastervlm" else rows[START:].sum(dim=0)
            chosen.append(score.topk(min(keep, n)).indices.sort().values + start)
            start += n
        out.append(torch.cat(chosen))
    return out


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def greedy_no_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    """The shared no-cache greedy reference, letting Qwen derive its M-RoPE positions itself."""
    return helpers.greedy_no_cache(model, inputs, steps, positions=False)


def attn_pre_hooks(tower: nn.Module) -> int:
    return sum(len(block.attn._forward_pre_hooks) for block in tower.transformer.resblocks)


@dataclass
class RecordSignals(vtc.Method):
    """Keeps the first ``keep`` tokens and records the signals vtc hands over."""

    calls: list = field(default_factory=list)
    name = "record_cls_signals"
    requires = ("cls_attention", "cls_attention_layers")

    def plan(self, signals: dict[str, Any], keep: int) -> vtc.Plan:
        self.calls.append(signals)
        return super().plan(signals, keep)

    def _plan(self, signals: dict[str, Any], keep: int) -> vtc.Plan:
        b, n = signals["cls_attention"].shape
        return vtc.Plan(torch.arange(keep).expand(b, keep).clone(), n)


# ----------------------------------------------------------------------------------------------------- signals


def test_pixel_values_have_the_processor_layout(model, batch, images):
    """The stand-in processor: each row holds one patch of the right image, each merge group is consecutive."""
    x = batch["pixel_values"].float().view(-1, 3, 2, 14, 14)
    assert torch.equal(x[:, :, 0], x[:, :, 1])
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    first = images[0]  # 8 x 12 patches; rows (h/2, w/2, 2, 2): row 3 is patch (1, 1), row 4 is patch (0, 2)
    for row, (r, c) in ((0, (0, 0)), (3, (1, 1)), (4, (0, 2)), (95, (7, 11))):
        patch = first[:, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14]
        torch.testing.assert_close(x[row, :, 0] * std + mean, patch, atol=1e-6, rtol=0)


def test_signals_equal_the_reference(model, batch, tower, reference):
    method = RecordSignals()
    with vtc.compress(model, method, keep=3, cls_model=AuxiliaryCLIP(tower)) as handle:
        logits(model, batch)
    # One method call per token count, in order of first appearance: 24, then 16 and 6 (sample 1).
    assert [tuple(call["cls_attention_layers"].shape) for call in method.calls] == [(1, 4, 24), (1, 4, 16), (1, 4, 6)]
    for call, expected in zip(method.calls, reference, strict=True):
        torch.testing.assert_close(call["cls_attention_layers"][0], expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(call["cls_attention"][0], call["cls_attention_layers"][0, -1])
    assert handle.stats["signals"] == ["cls_attention", "cls_attention_layers"]
    assert min(row.std() for row in reference) > 1e-3  # the maps are not flat: the top-k below means something


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize(("name", "options"), CASES)
def test_keeps_the_top_k_of_the_reference(model, batch, tower, reference, name, options, spec):
    with vtc.compress(model, name, keep=K, cls_model=SPECS[spec](tower), **options) as handle:
        logits(model, batch)
    expected = expected_kept(reference, name)
    assert [k.tolist() for k in handle.last_kept] == [k.tolist() for k in expected]
    assert handle.stats["visual_tokens_after"] == [K, 2 * K]
    signal = "cls_attention" if name == "fastervlm" else "cls_attention_layers"
    assert handle.stats["signals"] == [signal]
    source = handle.stats["signal_sources"][signal]
    assert "auxiliary" in source and NAMES[spec] in source
    assert not tower.training and attn_pre_hooks(tower) == 0


def test_the_methods_disagree_on_this_tower(reference):
    """Otherwise the two cases above would test one thing twice."""
    fastervlm, vtc_cls = expected_kept(reference, "fastervlm"), expected_kept(reference, "vtc_cls")
    assert [k.tolist() for k in fastervlm] != [k.tolist() for k in vtc_cls]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_generate_with_cache_equals_no_cache_reference(model, batch, tower, reference, name, options):
    with vtc.compress(model, name, keep=K, cls_model=Holder(tower), **options) as handle:
        cached = greedy_generate(model, batch, STEPS)
        kept_in_generate = [k.clone() for k in handle.last_kept]
        no_cache = greedy_no_cache(model, batch, STEPS)
    assert torch.equal(cached, no_cache)
    assert [k.tolist() for k in kept_in_generate] == [k.tolist() for k in expected_kept(reference, name)]
    assert [k.tolist() for k in handle.last_kept] == [k.tolist() for k in kept_in_generate]


def test_each_sample_alone_keeps_what_it_kept_in_the_batch(model, batch, tower, reference):
    """Images of three sizes in one batch, two in one prompt: each image is scored on its own grid."""
    aux = AuxiliaryCLIP(tower)
    with vtc.compress(model, "fastervlm", keep=K, cls_model=aux) as handle:
        batched = greedy_generate(model, batch, STEPS)
        for b, (grids, sizes) in enumerate(zip(GRIDS, TOKENS, strict=True)):
            keep = batch["attention_mask"][b].bool()
            first = sum(len(g) for g in GRIDS[:b])
            start = sum(h * w for g in GRIDS[:b] for h, w in g)
            single = {
                k: batch[k][b][keep][None] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch
            }
            single["pixel_values"] = batch["pixel_values"][start : start + sum(h * w for h, w in grids)]
            single["image_grid_thw"] = batch["image_grid_thw"][first : first + len(grids)]
            assert torch.equal(greedy_generate(model, single, STEPS), batched[b : b + 1])
            assert handle.last_kept[0].tolist() == expected_kept(reference, "fastervlm")[b].tolist()
            assert handle.stats["visual_tokens_before"] == [sum(sizes)]


def test_beam_search_keeps_each_images_own_tokens(model, batch, tower, reference):
    with vtc.compress(model, "fastervlm", keep=K, cls_model=AuxiliaryCLIP(tower)) as handle:
        out = model.generate(**batch, max_new_tokens=2, num_beams=2, do_sample=False)
    assert out.shape[0] == 2
    expected = expected_kept(reference, "fastervlm")
    assert [k.tolist() for k in handle.last_kept] == [expected[b].tolist() for b in (0, 0, 1, 1)]


# ----------------------------------------------------------------------------------------------------- detaching


@pytest.mark.parametrize(("name", "options"), CASES)
def test_remove_restores_the_model_bit_for_bit(model, batch, tower, name, options):
    before = logits(model, batch)
    hooks = count_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tower_state = {k: v.clone() for k, v in tower.state_dict().items()}
    handle = vtc.compress(model, name, keep=K, cls_model=AuxiliaryCLIP(tower), **options)
    assert count_hooks(model) > hooks
    compressed = logits(model, batch)
    handle.remove()
    assert count_hooks(model) == hooks and count_hooks(tower) == 0
    assert compressed.shape[1] == before.shape[1] - min(sum(n - min(K, n) for n in row) for row in TOKENS)
    assert torch.equal(logits(model, batch), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, tower_state[k]) for k, v in tower.state_dict().items())
    handle.remove()  # idempotent


@pytest.mark.parametrize(("name", "options"), CASES)
def test_keep_all_is_the_identity(model, batch, tower, name, options):
    before = logits(model, batch)
    with vtc.compress(model, name, keep=24, cls_model=AuxiliaryCLIP(tower), **options) as handle:
        after = logits(model, batch)
    assert torch.equal(after, before)
    assert [k.tolist() for k in handle.last_kept] == [list(range(24)), list(range(22))]


def test_methods_without_cls_signals_never_run_the_tower(model, batch, tower):
    calls = []
    hook = tower.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with vtc.compress(model, "divprune", keep=K, cls_model=AuxiliaryCLIP(tower)) as handle:
            logits(model, batch)
    finally:
        hook.remove()
    assert calls == []
    assert "cls_attention" not in handle.stats["signal_sources"]


def test_vtc_cls_start_layer_is_checked_against_the_auxiliary_tower_at_attach(model, tower):
    hooks = count_hooks(model)
    with pytest.raises(ValueError, match=r"start_layer=10 is outside the 4 vision layers"):
        vtc.compress(model, "vtc_cls", keep=K, start_layer=10, cls_model=AuxiliaryCLIP(tower))
    assert count_hooks(model) == hooks
    with vtc.compress(model, "vtc_cls", keep=K, start_layer=-4, cls_model=AuxiliaryCLIP(tower)):
        pass


@pytest.mark.parametrize("via", ["forward", "generate"])
def test_videos_are_refused_with_the_auxiliary_clip_before_the_language_model_runs(model, tower, via):
    """The auxiliary CLIP maps images only: a video input is refused, in forward() before anything runs and in
    transformers 5's generate() when its vision pass starts; the attachment keeps working."""
    video = tiny_qwen_inputs(model, image_grids=(((8, 8),),), video_grids=(((2, 4, 4),),), seed=4)
    before = logits(model, video)
    with vtc.compress(model, "fastervlm", keep=K, cls_model=AuxiliaryCLIP(tower)) as handle:
        with (
            recording_calls(model.model.language_model) as calls,
            pytest.raises(ValueError, match=r"auxiliary CLIP \(cls_model=\) maps images only"),
        ):
            if via == "forward":
                logits(model, video)
            else:
                model.generate(**video, max_new_tokens=2, do_sample=False)
        assert not calls
        image_only = tiny_qwen_inputs(model, image_grids=(((8, 8),),), seed=4)
        logits(model, image_only)
        assert handle.stats["visual_tokens_after"] == [K]
    assert torch.equal(logits(model, video), before)
