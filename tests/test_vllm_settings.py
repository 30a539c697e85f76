"""The vLLM plugin's setting (hf_overrides={"vtc": {...}}), checked without vLLM: what runs, and what is refused with a
message that names the alternative. The plugin inside vLLM is tested by tests_vllm/ (its own CI job)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from vtc import organisms
from vtc.vllm_plugin import settings


def config(name: str, setting=None):
    loaded = AutoConfig.from_pretrained(organisms.path(name))
    # transformers 4.57's Qwen2VLConfig drops the file's architectures; vLLM (transformers 5.16-5.19) keeps them.
    loaded.architectures = json.loads((organisms.path(name) / "config.json").read_text())["architectures"]
    if setting is not None:
        loaded.vtc = setting
    return loaded


def test_no_setting_means_vllms_own_model():
    assert settings(config("shapes-llava")) is None


def test_a_setting_is_the_method_its_budget_and_the_familys_positions():
    llava = settings(config("shapes-llava", {"method": "dart", "keep": 64, "merge": True}))
    assert (llava.method.name, llava.method.merge, llava.budget.keep, llava.positions) == ("dart", True, 64, "compact")
    assert llava.count(256) == 64
    qwen = settings(config("shapes-qwen2vl", {"method": "divprune", "ratio": 0.25}))
    assert (qwen.budget.ratio, qwen.positions, qwen.count(100), qwen.count(3)) == (0.25, "original", 25, 1)
    capped = settings(config("shapes-qwen2vl", {"method": "random", "keep": 64}))
    assert (capped.count(256), capped.count(40)) == (64, 40)  # a smaller image is kept whole, as vtc.compress does


@pytest.mark.parametrize(
    ("name", "setting", "message"),
    [
        ("shapes-llava", {"method": "fastv", "keep": 8}, r"'fastv' drops tokens inside the language model.*pre-LLM"),
        ("shapes-llava", {"method": "nope", "keep": 8}, r"nope"),
        ("shapes-qwen2vl", {"method": "evs", "keep": 8}, r"'evs' plans over a video's frames.*images only.*'divprune'"),
        ("shapes-llava", {"keep": 8}, r"needs a method name, one of the pre-LLM methods \["),
        ("shapes-llava", {"method": "divprune"}, r"give exactly one of keep= .* or ratio="),
        ("shapes-llava", {"method": "divprune", "keep": 8, "ratio": 0.5}, r"give exactly one of keep="),
        ("shapes-llava", {"method": "divprune", "keep": 300}, r"keep=300 exceeds the 256 visual tokens per image"),
        ("shapes-llava", {"method": "dart", "keep": 8, "bogus": 1}, r"bogus"),
        ("shapes-llava", "divprune", r"must be a dict such as"),
        (
            "shapes-llava",
            {"method": "divprune", "keep": 8, "positions": "original"},
            r"positions='original' is not possible for LlavaForConditionalGeneration in vLLM, only 'compact'",
        ),
        (
            "shapes-qwen2vl",
            {"method": "divprune", "keep": 8, "positions": "compact"},
            r"only 'original': M-RoPE gives the kept tokens their \(t, h, w\) grid positions",
        ),
        (
            "shapes-qwen2vl",
            {"method": "fastervlm", "keep": 8},
            r"'fastervlm' needs \['cls_attention'\].*methods that run there: \[.*'divprune'",
        ),
    ],
)
def test_bad_settings_are_refused_naming_what_is_allowed(name, setting, message):
    with pytest.raises(ValueError, match=message):
        settings(config(name, setting))


def test_a_family_the_plugin_does_not_cover_is_refused():
    from vtc.tiny import tiny_model

    model, _ = tiny_model("tiny-internvl")
    model.config.vtc = {"method": "divprune", "keep": 8}
    model.config.architectures = ["InternVLForConditionalGeneration"]
    with pytest.raises(ValueError, match=r"does not cover \['InternVLForConditionalGeneration'\]; it covers \["):
        settings(model.config)
