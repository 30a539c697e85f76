"""vtc.demo.core without gradio: answers equal a direct generate() with and without vtc, every method runs, bad input
gives one clear message."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from PIL import Image

import vtc
from vtc import geometry, loading
from vtc.demo import core, samples
from vtc.organisms import scenes

SCENE = scenes.scene("test", 3)
QUESTION = SCENE.questions[0].question


def direct_answers(
    directory: str, image, question: str, method: str, keep: int, max_new_tokens: int = 6, **options
) -> tuple[str, str]:
    """(uncompressed, compressed) greedy answers from a model loaded here, through plain generate() calls."""
    model, processor = loading.load(directory)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    length = inputs["input_ids"].shape[1]

    def answer() -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.batch_decode(out[:, length:], skip_special_tokens=True)[0].strip()

    plain = answer()
    with vtc.compress(model, method, keep=keep, **options):
        compressed = answer()
    return plain, compressed


@pytest.mark.parametrize(
    ("family", "method", "options"),
    [("llava", "dart", {"merge": True}), ("llava", "fastv", {}), ("qwen2vl", "divprune", {})],
)
def test_answers_equal_direct_generate(request, family, method, options):
    directory = request.getfixturevalue(f"{'llava' if family == 'llava' else 'qwen'}_dir")
    bundle = core.load_model(directory)
    result = core.compare(bundle, SCENE.image, QUESTION, method, 24, options=options, max_new_tokens=6, repeats=1)
    plain, compressed = direct_answers(directory, SCENE.image, QUESTION, method, 24, **options)
    assert (result.baseline_answer, result.compressed_answer) == (plain, compressed)
    assert result.baseline_answer  # the fixture's models answer with words, not only special tokens
    assert result.tokens_before == 256 and result.tokens_after == 24
    assert result.kept.tolist() == sorted(set(result.kept.tolist())) and len(result.kept) == 24
    assert result.baseline_ms > 0 and result.compressed_ms > 0 and result.speedup > 0
    assert len(result.tokens_per_layer) == 3  # one count per LLM layer
    if method == "fastv":  # drops at the input of layer 2
        assert result.tokens_per_layer == [256, 256, 24]
        assert result.flops_ratio is not None and 0 < result.flops_ratio < 1
    else:
        assert result.tokens_per_layer == [24, 24, 24]


def test_every_method_runs_on_llava(llava_dir):
    bundle = core.load_model(llava_dir)
    for method in vtc.list_methods(images=True):
        result = core.compare(bundle, SCENE.image, QUESTION, method, 16, max_new_tokens=2, repeats=1)
        assert result.tokens_after >= 16, method  # adaptive keeps at least its floor
        assert len(result.kept) == result.tokens_after
        assert result.boxes.shape == (256, 4)


def test_merge_groups_map_to_kept_tokens(llava_dir):
    bundle = core.load_model(llava_dir)
    result = core.compare(bundle, SCENE.image, QUESTION, "dart", 20, options={"merge": True}, max_new_tokens=1)
    targets = result.merge_into
    assert targets is not None and targets.shape == (256,)
    assert set(targets.unique().tolist()) <= set(result.kept.tolist())  # every group ends in a kept token
    assert torch.equal(targets[result.kept], result.kept)  # kept tokens are their own group
    unmerged = core.compare(bundle, SCENE.image, QUESTION, "dart", 20, max_new_tokens=1)
    assert unmerged.merge_into is None


def test_qwen_budget_follows_the_image_shape(qwen_dir):
    bundle = core.load_model(qwen_dir)
    wide = Image.new("RGB", (200, 90), (120, 130, 140))
    limit = core.budget_limit(bundle, wide)
    assert limit == len(geometry.image_token_boxes(bundle.model, (90, 200), bundle.processor)) != 256
    result = core.compare(bundle, wide, "what color is the cross ?", "uniform", limit, max_new_tokens=1, repeats=1)
    assert result.tokens_after == limit  # keep == N is allowed
    with pytest.raises(core.DemoError, match=f"larger than the {limit} visual tokens"):
        core.compare(bundle, wide, "what color is the cross ?", "uniform", limit + 1)


def test_crop_note_and_area_on_llava(llava_dir):
    bundle = core.load_model(llava_dir)
    wide = SCENE.image.resize((256, 128))
    result = core.compare(bundle, wide, QUESTION, "random", 64, max_new_tokens=1, repeats=1)
    assert result.area_visible == pytest.approx(0.5)  # the center crop keeps the middle half
    assert result.area_seen == pytest.approx(0.5 * 64 / 256)
    assert any("center crop" in note for note in result.notes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": None}, "Add an image"),
        ({"question": "   "}, "Type a question"),
        ({"method": "tome"}, "Unknown method"),
        ({"keep": 0}, "at least 1"),
        ({"keep": 257}, "budget \\(257\\) is larger than the 256 visual tokens"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_input_gives_a_clear_message(llava_dir, change, message):
    bundle = core.load_model(llava_dir)
    arguments = {"image": SCENE.image, "question": QUESTION, "method": "dart", "keep": 8, "repeats": 1, **change}
    image, question, method, keep = (arguments.pop(k) for k in ("image", "question", "method", "keep"))
    with pytest.raises(core.DemoError, match=message):
        core.compare(bundle, image, question, method, keep, **arguments)


def test_methods_the_model_cannot_run(qwen_dir):
    bundle = core.load_model(qwen_dir)
    for method, options in (("vtc_cls", {}), ("fastervlm", {"signal": "cls_attention"})):
        with pytest.raises(core.DemoError, match=f"{method} cannot run on .*no \\[CLS\\] token"):
            core.compare(bundle, SCENE.image, QUESTION, method, 8, options=options)
    # The opt-in substitute runs.
    result = core.compare(
        bundle, SCENE.image, QUESTION, "fastervlm", 8, options={"signal": "attention_received"}, max_new_tokens=1
    )
    assert "attention_received" in result.signals


def test_models_that_cannot_load(tmp_path):
    with pytest.raises(core.DemoError, match="Choose a model"):
        core.load_model(" ")
    with pytest.raises(core.DemoError, match="Could not load"):
        core.load_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(core.DemoError, match="Unsupported model: .*'bert'.* vtc supports"):
        core.load_model(str(tmp_path))


def test_method_options_keep_only_what_the_method_takes():
    assert core.method_options("dart", merge=True, signal="cls_attention", layer=2) == {"merge": True}
    assert core.method_options("fastervlm", merge=True, signal="attention_received") == {"signal": "attention_received"}
    assert core.method_options("fastv", layer=3.0) == {"layer": 3}
    assert core.method_options("divprune", merge=True, layer=2) == {}
    with pytest.raises(core.DemoError, match="Unknown method"):
        core.method_options("nope")


def test_unknown_words_are_reported(llava_dir):
    bundle = core.load_model(llava_dir)
    assert core.unknown_words(bundle.processor, "What colour is the cross ?") == ["What", "colour"]
    result = core.compare(bundle, SCENE.image, "What is the cross ?", "random", 8, max_new_tokens=1, repeats=1)
    assert any("What" in note for note in result.notes)


def test_samples_are_offline_scenes_and_photos():
    listed = samples.samples()
    assert [s.answer for s in listed[: samples.SCENES]] == [
        scenes.scene("test", i).questions[i].answer for i in range(samples.SCENES)
    ]
    photos = [s for s in listed if s.label.startswith("photo")]
    if importlib.util.find_spec("gradio") is not None:
        assert photos, "gradio ships photos (gradio/media_assets/images)"
    for photo in photos[:1]:
        image = photo.load()
        assert image.mode == "RGB" and min(image.size) > 100
    assert samples.by_label(listed[1].label) is listed[1]


def test_llava_next_budgets_merges_and_newlines(tmp_path):
    """A tiny LLaVA-NeXT with a real LlavaNextProcessor: the budget counts content tokens (newlines excluded), merge
    groups map through the content tokens, and the AnyRes budget option reaches vtc."""
    import numpy as np
    from transformers import AutoTokenizer, LlavaNextProcessor

    from vtc.demo import render
    from vtc.tiny import CHAT_TEMPLATE, save_tiny_llava, tiny_llava_next

    try:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil as P
    except ImportError:
        from transformers import LlavaNextImageProcessor as P
    save_tiny_llava(str(tmp_path))  # for its word-level tokenizer
    model = tiny_llava_next(vocab_size=64)
    side = model.config.vision_config.image_size
    image_processor = P(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(tmp_path),
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )
    bundle = core.Bundle("tiny-llava-next", model, processor)
    # Noise, so that every AnyRes crop has its own features (vtc finds the crops of a generate() call by them).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 130, 3), dtype=np.uint8))
    assert core.budget_limit(bundle, image) == 56  # 60 visual tokens, 4 of them newlines
    result = core.compare(
        bundle, image, "what is in the image ?", "dart", 20, options={"merge": True}, max_new_tokens=2
    )
    assert result.tokens_before == 60 and len(result.kept) == result.tokens_after >= 20  # + the kept rows' newlines
    newline = result.boxes.isnan().any(-1)
    targets = result.merge_into
    assert targets is not None and (targets[newline] == -1).all()
    assert set(targets[~newline].unique().tolist()) <= set(result.kept.tolist())
    render.draw_overlay(result.image, result.boxes, result.kept, targets, scale=2, outline=True)
    per_crop = core.compare(bundle, image, "what is in the image ?", "random", 20, options={"budget": "per_crop"})
    assert per_crop.options == {"budget": "per_crop"} and per_crop.merge_into is None
    with pytest.raises(core.DemoError, match="larger than the 56 visual tokens"):
        core.compare(bundle, image, "what is in the image ?", "random", 57)


class OnevisionProcessor:
    """LlavaOnevisionProcessor's job for one image per prompt: its real image processor, the tokenizer, and each
    <image> expanded to the tokens the model makes of the image. (The real processor needs torchvision for its video
    processor, which these tests do without.)"""

    def __init__(self, model, image_processor, tokenizer, chat_template: str):
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        self.chat_template = chat_template

    def apply_chat_template(self, conversation, add_generation_prompt=True, tokenize=False):
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def __call__(self, images, text, return_tensors="pt", **kwargs):
        from transformers import BatchFeature

        from vtc.tiny import llava_onevision_image_tokens

        pixels = self.image_processor(images=images, return_tensors=return_tensors)
        texts = []
        for prompt, (height, width) in zip(text, pixels["image_sizes"].tolist(), strict=True):
            count = llava_onevision_image_tokens(self.model, height, width)
            texts.append(prompt.replace("<image>", " ".join(["<image>"] * count), 1))
        return BatchFeature({**self.tokenizer(texts, return_tensors=return_tensors, **kwargs), **pixels})

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def test_llava_onevision_budgets_merges_and_a_downsampled_overlay(tmp_path):
    """A tiny LLaVA-OneVision whose 3 x 3 grid of crops is downsampled: the budget counts content tokens (newlines
    excluded), the overlay's boxes tile the image, merge groups map through the content tokens, the AnyRes budget
    option reaches vtc, and fastervlm takes the attention received (no [CLS] token)."""
    import numpy as np
    from transformers import AutoTokenizer

    from vtc.demo import render
    from vtc.tiny import CHAT_TEMPLATE, save_tiny_llava, tiny_llava_onevision

    try:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as P,
        )
    except ImportError:
        from transformers import LlavaOnevisionImageProcessor as P
    save_tiny_llava(str(tmp_path))  # for its word-level tokenizer
    model = tiny_llava_onevision(vocab_size=64)
    side = model.config.vision_config.image_size
    image_processor = P(size={"height": side, "width": side}, image_grid_pinpoints=model.config.image_grid_pinpoints)
    processor = OnevisionProcessor(model, image_processor, AutoTokenizer.from_pretrained(tmp_path), CHAT_TEMPLATE)
    bundle = core.Bundle("tiny-llava-onevision", model, processor)
    assert bundle.crop_budgets and not bundle.has_cls
    # Noise, so that every crop has its own features (vtc recovers a generate() call's packing from them).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8))
    assert core.budget_limit(bundle, image) == 46  # 16 base + 5 x 6 downsampled; 5 newlines besides
    result = core.compare(
        bundle, image, "what is in the image ?", "dart", 20, options={"merge": True}, max_new_tokens=2
    )
    assert result.tokens_before == 51 and len(result.kept) == result.tokens_after >= 20  # + the kept rows' newlines
    newline = result.boxes.isnan().any(-1)
    assert int(newline.sum()) == 5
    grid = result.boxes[16:][~newline[16:]]
    areas = (grid[:, 2] - grid[:, 0]) * (grid[:, 3] - grid[:, 1])
    assert float(areas.sum()) == pytest.approx(geometry.union_area(grid))  # downsampled tokens tile, no overlap
    targets = result.merge_into
    assert targets is not None and (targets[newline] == -1).all()
    assert set(targets[~newline].unique().tolist()) <= set(result.kept.tolist())
    render.draw_overlay(result.image, result.boxes, result.kept, targets, scale=2, outline=True)
    for budget in ("per_crop", "thumbnail"):
        run = core.compare(bundle, image, "what is in the image ?", "random", 20, options={"budget": budget})
        assert run.options == {"budget": budget} and run.merge_into is None
    received = core.compare(
        bundle, image, "what is in the image ?", "fastervlm", 20, options={"signal": "attention_received"}
    )
    assert "attention_received" in received.signals
    with pytest.raises(core.DemoError, match="larger than the 46 visual tokens"):
        core.compare(bundle, image, "what is in the image ?", "random", 47)
    with pytest.raises(core.DemoError, match=r"no \[CLS\] token"):
        core.compare(bundle, image, "what is in the image ?", "fastervlm", 20)


# -- video ----------------------------------------------------------------------------------------------------------

VIDEO = pytest.mark.skipif(
    transformers.__version__.startswith("4."), reason="the organisms' QwenProcessor prepares videos on transformers 5"
)


@VIDEO
@pytest.mark.parametrize("budget", ["per_video", "per_frame"])
def test_a_clip_compared_keeps_exact_counts_and_answers_as_plain_generate(qwen_dir, budget):
    """The video view on the Qwen organism's architecture: the clip's (t, h, w) grid, exact kept counts per video or
    per frame, the frames the model saw, and the compressed answer that plain generate() gives with vtc attached."""
    bundle = core.load_model(qwen_dir)
    sample = samples.video_samples()[0]
    frames = sample.load()
    result = core.compare_video(bundle, frames, sample.question, "divprune", 40, video_budget=budget, repeats=1)
    t, h, w = result.grid
    assert t == len(frames) // 2 and result.tokens_before == t * h * w == 1024
    kept = 40 if budget == "per_video" else t * min(40, h * w)
    assert result.tokens_after == len(result.kept) == kept
    assert sum(result.kept_per_frame) == kept
    if budget == "per_frame":
        assert result.kept_per_frame == [40] * t
    vision = bundle.model.config.vision_config
    side = vision.patch_size * vision.spatial_merge_size  # pixels per merged token
    assert [frame.size for frame in result.frames] == [(w * side, h * side)] * t
    model, processor = bundle.model, bundle.processor
    inputs = processor(videos=[frames], text=[core.video_prompt(processor, sample.question)], return_tensors="pt")
    with vtc.compress(model, "divprune", keep=40, video_budget=budget), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    assert result.compressed_answer == answer


@VIDEO
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frames": []}, "Add a clip"),
        ({"question": " "}, "Type a question about the video"),
        ({"method": "fastv"}, "The video view runs pre-LLM methods"),
        ({"keep": 0}, "at least 1"),
        ({"keep": 1025}, "budget \\(1025\\) is larger than the 1024 visual tokens of this clip"),
        ({"method": "evs", "keep": 100}, "evs cannot run on this clip: .*keep >= 256"),
        ({"method": "vtc_cls"}, "vtc_cls cannot run on .*no \\[CLS\\] token"),
        ({"model": "llava"}, "takes no video here; the families that do: llava_onevision, qwen2_5_vl"),
    ],
)
def test_bad_clip_input_gives_a_clear_message(request, qwen_dir, change, message):
    directory = request.getfixturevalue("llava_dir") if change.pop("model", None) == "llava" else qwen_dir
    sample = samples.video_samples()[0]
    arguments = {"frames": sample.load(), "question": sample.question, "method": "divprune", "keep": 16, **change}
    with pytest.raises(core.DemoError, match=message):
        core.compare_video(core.load_model(directory), **arguments, repeats=1)
