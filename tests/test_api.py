"""Public API: registries, handles and bad input (clear errors, raised before anything is attached)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtc
from tests.helpers import count_hooks, with_grid
from vtc.tiny import tiny_llava, tiny_llava_inputs


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model)


def test_registries():
    assert vtc.list_methods("pre") == ["dart", "divprune", "evs", "fastervlm", "random", "uniform", "vtc_cls"]
    assert vtc.list_methods("llm") == ["adaptive", "dart_llm", "fastv", "pdrop"]
    assert vtc.list_methods() == sorted(vtc.list_methods("pre") + vtc.list_methods("llm"))
    assert vtc.list_models() == [
        "internvl",
        "llava",
        "llava_next",
        "llava_onevision",
        "qwen2_5_vl",
        "qwen2_vl",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen3_vl",
        "qwen3_vl_moe",
    ]
    for name in vtc.list_methods("pre"):
        method = vtc.get_method(name)
        assert method.name == name
        assert set(method.requires) <= set(vtc.SIGNALS)


BAD_CALLS = [
    ({"method": "fastervlm", "keep": 577}, ValueError, r"keep=577 exceeds the 576 visual tokens"),
    ({"method": "fastv", "keep": 577, "layer": 1}, ValueError, r"keep=577 exceeds the 576 visual tokens"),
    ({"method": ["divprune", "fastv"], "keep": [64, 65]}, ValueError, r"keep=65 exceeds the 64 visual tokens"),
    ({"method": "fastervlm", "keep": 0}, ValueError, r"keep must be an int >= 1"),
    ({"method": "fastervlm", "keep": -3}, ValueError, r"keep must be an int >= 1"),
    ({"method": "fastervlm", "keep": 6.0}, ValueError, r"keep must be an int >= 1"),
    ({"method": "fastervlm", "ratio": 0.0}, ValueError, r"ratio must be a number in \(0, 1\]"),
    ({"method": "fastervlm", "ratio": 1.5}, ValueError, r"ratio must be a number in \(0, 1\]"),
    ({"method": "fastervlm", "ratio": float("nan")}, ValueError, r"ratio must be a number in \(0, 1\]"),
    ({"method": "fastervlm", "keep": 64, "ratio": 0.1}, ValueError, r"exactly one of keep="),
    ({"method": "fastervlm"}, ValueError, r"exactly one of keep="),
    ({"method": "fastvv", "keep": 64}, ValueError, r"unknown method 'fastvv'; known methods: \['adaptive', 'dart'"),
    ({"method": "fastv", "keep": 64, "layer": 4}, ValueError, r"fastv: drop layers \[4\] must be .* within 1..1"),
    ({"method": ["fastv", "divprune"], "keep": [64, 32]}, ValueError, r"a method list is \[pre-LLM method, in-LLM"),
    ({"method": ["divprune", "fastv"], "keep": 64}, ValueError, r"keep must be a list of 2"),
    ({"method": ["divprune", "fastv", "pdrop"], "keep": [1, 2, 3]}, ValueError, r"got 3 entries"),
    ({"method": ["divprune", "fastv"], "keep": [64, 32], "merge": True}, ValueError, r"ambiguous with a method list"),
    ({"method": "dartt", "keep": 64}, ValueError, r"Did you mean 'dart'"),
    ({"method": "dart", "keep": 64, "pivots": 3}, ValueError, r"unknown option\(s\) \['pivots'\] for method 'dart'"),
    ({"method": "dart", "keep": 64, "num_pivots": 0}, ValueError, r"num_pivots must be an int >= 1"),
    ({"method": "vtc_cls", "keep": 64, "start_layer": 9}, ValueError, r"start_layer=9 is outside the 2 vision layers"),
    ({"method": vtc.get_method("dart"), "keep": 64, "merge": True}, ValueError, r"set them on the instance"),
    ({"method": 3, "keep": 64}, TypeError, r"method must be a method name"),
    ({"method": "fastervlm", "keep": 64, "signal": "cls"}, ValueError, r"signal must be one of \['cls_attention'"),
    (
        {"method": "fastervlm", "keep": 64, "budget": "global"},
        ValueError,
        r"\['budget'\] do not apply to Llava.*budget=",
    ),
    ({"method": "random", "keep": 64, "cls_model": "ViT-B-16"}, ValueError, r"cls_model= applies to model_types"),
]


@pytest.mark.parametrize("call,error,message", BAD_CALLS, ids=lambda v: str(v)[:40] if isinstance(v, dict) else "")
def test_bad_input_raises_before_attaching(model, inputs, call, error, message):
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = count_hooks(model)
    call = dict(call)
    with pytest.raises(error, match=message):
        vtc.compress(model, call.pop("method"), **call)
    assert count_hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_unsupported_model_names_its_type_and_the_supported_ones():
    llama = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    with pytest.raises(
        ValueError,
        match=r"model_type 'llama' \(LlamaForCausalLM\); supported model_types: \['internvl', 'llava', 'llava_next'",
    ):
        vtc.compress(llama, "dart", keep=8)
    assert count_hooks(llama) == 0


def test_method_needing_a_missing_signal_is_refused_at_attach():
    # vision_feature_layer 0 is the embedding output: there is no attention to read a [CLS] row from.
    model = tiny_llava(vision_feature_layer=0)
    with pytest.raises(ValueError, match=r"needs signal\(s\) \['cls_attention'\].*methods that work here: \['dart'"):
        vtc.compress(model, "fastervlm", keep=8)
    assert count_hooks(model) == 0


def test_attaching_twice_is_refused_and_reattaching_after_remove_works(model, inputs):
    handle = vtc.compress(model, "random", keep=8)
    hooks = count_hooks(model)
    try:
        with pytest.raises(RuntimeError, match="already attached"):
            vtc.compress(model, "dart", keep=8)
        assert count_hooks(model) == hooks
    finally:
        handle.remove()
    with vtc.compress(model, "dart", keep=8) as again, torch.no_grad():
        model(**inputs)
    assert again.stats["visual_tokens_after"] == [8]
    assert not again.active
    assert again.last_kept[0].shape == (8,)  # results stay readable after removal


def test_ratio_budget(model, inputs):
    with vtc.compress(model, "divprune", ratio=0.098) as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats["visual_tokens_after"] == [56]  # DivPrune's default: round(0.098 * 576)


def test_method_instance_and_handle_repr(model, inputs):
    with vtc.compress(model, vtc.get_method("random", seed=3), keep=10) as handle, torch.no_grad():
        model(**inputs)
        assert "random" in repr(handle) and "keep=10" in repr(handle) and "active" in repr(handle)
    expected = vtc.select(vtc.get_method("random", seed=3), keep=10, features=torch.zeros(1, 576, 4))
    assert torch.equal(handle.last_kept[0], expected[0])


def test_select_is_the_same_implementation_as_compress(model, inputs):
    features = {}

    def spy(module, args, kwargs):
        features.setdefault("x", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with vtc.compress(model, "divprune", keep=20) as handle, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    visual = inputs["input_ids"] == model.config.image_token_id
    picked = vtc.select("divprune", keep=20, features=features["x"][visual].view(1, 576, -1))
    assert torch.equal(picked[0], handle.last_kept[0])


def test_select_refuses_in_llm_methods():
    with pytest.raises(ValueError, match=r"'fastv' drops tokens inside the language model .* use vtc.compress"):
        vtc.select("fastv", keep=4, features=torch.randn(1, 9, 8))


def test_select_errors():
    x = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match=r"needs signal\(s\) \['cls_attention'\]"):
        vtc.select("fastervlm", keep=4, features=x)
    with pytest.raises(ValueError, match=r"unknown signal\(s\) \['seed'\].*vtc.get_method\('random'"):
        vtc.select("random", keep=4, features=x, seed=1)
    with pytest.raises(ValueError, match="disagree"):
        vtc.select("fastervlm", keep=4, features=x, cls_attention=torch.rand(2, 15))
    with pytest.raises(ValueError, match="keep=17 exceeds the 16"):
        vtc.select("dart", keep=17, features=x)
    with pytest.raises(ValueError, match="no tensor signal"):
        vtc.select("uniform", keep=4)


def test_a_model_without_llava_modules_is_refused():
    class NotLlava(torch.nn.Module):
        config = type("Config", (), {"model_type": "llava"})()

    with pytest.raises(ValueError, match="NotLlava has no vision_tower module"):
        vtc.compress(NotLlava(), "dart", keep=8)


def test_a_model_whose_handle_is_dropped_can_be_freed():
    import gc
    import weakref

    model = tiny_llava()
    ref = weakref.ref(model)
    vtc.compress(model, "dart", keep=8)  # handle dropped without remove()
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    "budget,expected",
    [
        ({"keep": np.int64(20)}, 20),
        ({"keep": np.uint8(20)}, 20),
        ({"keep": torch.tensor(20)}, 20),
        ({"ratio": np.float32(0.25)}, 144),
        ({"ratio": np.float64(0.25)}, 144),
        ({"ratio": torch.tensor(0.25)}, 144),
        ({"ratio": Fraction(1, 4)}, 144),
    ],
    ids=lambda v: type(next(iter(v.values()))).__name__ if isinstance(v, dict) else "",
)
def test_budgets_of_any_integral_or_real_type(model, inputs, budget, expected):
    with vtc.compress(model, "divprune", **budget) as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats["visual_tokens_after"] == [expected]
    assert type(handle.budget.keep if "keep" in budget else handle.budget.ratio) in (int, float)
    assert vtc.select("uniform", features=torch.randn(2, 576, 4), **budget).shape == (2, expected)


@pytest.mark.parametrize("budget", [{"keep": np.float64(6.0)}, {"keep": torch.tensor(6.0)}, {"ratio": np.bool_(True)}])
def test_budgets_of_the_wrong_kind_are_refused(budget):
    with pytest.raises(ValueError, match="keep must be an int >= 1|ratio must be a number"):
        vtc.select("uniform", features=torch.randn(1, 9, 4), **budget)


@pytest.mark.parametrize("method", vtc.list_methods("pre"))
def test_select_on_an_empty_batch_returns_an_empty_selection(method):
    signals = {"features": torch.randn(0, 16, 8), "cls_attention": torch.rand(0, 16)}
    if method == "vtc_cls":
        signals = {"features": signals["features"], "cls_attention_layers": torch.rand(0, 3, 16)}
    signals = with_grid(signals, vtc.get_method(method), keep=5)  # a temporal method needs a video's grid
    kept = vtc.select(method, keep=5, **signals)
    assert kept.shape == (0, 5) and kept.dtype == torch.long
    protected = vtc.select(method, keep=5, protected=torch.zeros(0, 16, dtype=torch.bool), **signals)
    assert protected.shape == (0, 5)


def test_temporal_method_on_an_image_only_family_is_refused_at_attach(model):
    """evs plans over a video's frames; LLaVA compresses no videos: refused before any hook is attached, naming the
    families that take videos."""
    hooks = count_hooks(model)
    message = r"method 'evs' compares each frame .* no videos on LlavaForConditionalGeneration; families with video"
    with pytest.raises(ValueError, match=message):
        vtc.compress(model, "evs", keep=16)
    assert count_hooks(model) == hooks
