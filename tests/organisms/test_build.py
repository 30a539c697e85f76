"""The organisms' tokenizer, configs and processors, and the training-time fast paths that must match them exactly.

Training builds prompts with ``Conversations.prompt_ids`` and pixels with ``build.normalize`` / ``build.qwen_patches``;
evaluation goes through the processors (LlavaProcessor, or ``vtc.loading.QwenProcessor`` where Qwen2VLProcessor
cannot be built without torchvision). A model evaluated on other inputs than it was trained on is silently worse, so
the two paths are compared token for token and value for value.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch

from training import build
from training.organisms import Conversations
from vtc import loading
from vtc.organisms import scenes

TORCHVISION = importlib.util.find_spec("torchvision") is not None
FAMILIES = ("llava", "qwen2vl")
IMAGE_WORD = {"llava": "<image>", "qwen2vl": "<|image_pad|>"}
IMAGE_ID = 4  # right after <pad> <s> </s> <unk>, in both families
VISUAL_TOKENS = 256  # 128 px: 16 x 16 patches of 8 px (LLaVA), or 32 x 32 patches of 4 px merged 2 x 2 (Qwen2-VL)


@pytest.fixture(scope="module")
def tokenizers():
    return {family: build.tokenizer(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def three():
    return [scenes.scene("test", i) for i in range(3)]


def uint8(images):
    """PIL images -> [B, H, W, 3] uint8, the training pool's layout."""
    return torch.stack([torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()) for image in images])


def messages(question):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def eval_text(template_owner, question):
    """The evaluation prompt (as eval.runner.prompt builds it) from a tokenizer or a processor."""
    return template_owner.apply_chat_template(messages(question), add_generation_prompt=True, tokenize=False)


def qwen_processor(tok):
    return loading.QwenProcessor(tok, build.image_processor("qwen2vl"), build.chat_template("qwen2vl"))


def eval_processor(family, tok):
    return build.processor("llava") if family == "llava" else qwen_processor(tok)


def runs(ids, token):
    """Lengths of the maximal runs of ``token`` in ``ids``, in order."""
    out, length = [], 0
    for i in [*ids, None]:
        if i == token:
            length += 1
        elif length:
            out.append(length)
            length = 0
    return out


# Tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens(tokenizers, family):
    tok = tokenizers[family]
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(IMAGE_WORD[family]) == IMAGE_ID
    config = build.config(family, len(tok))
    assert config.image_token_id == IMAGE_ID
    if family == "qwen2vl":
        ids = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
        assert ids == [config.vision_start_token_id, config.vision_end_token_id, config.video_token_id]
        assert ids == [5, 6, 7]  # distinct from <pad> <s> </s> <unk> and the image token
    else:
        assert tok.image_token == "<image>"
        assert tok.image_token_id == IMAGE_ID


@pytest.mark.parametrize("family", FAMILIES)
def test_every_vocabulary_word_is_one_token(tokenizers, family):
    tok = tokenizers[family]
    seen = {}
    for word in [*scenes.vocabulary(), "USER", "ASSISTANT", ":"]:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] > IMAGE_ID, f"{word!r} -> {ids}"
        assert tok.convert_ids_to_tokens(ids[0]) == word
        seen[word] = ids[0]
    assert len(set(seen.values())) == len(seen), "two words share an id"
    assert max(seen.values()) < len(tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(tokenizers, family):
    tok = tokenizers[family]
    text = "what color is the triangle ?"
    ids = tok(text)["input_ids"]
    assert ids == tok.convert_tokens_to_ids(text.split())  # one id per word, no <s> or </s> added
    assert tok.decode(ids) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_words_map_to_unk(tokenizers, family):
    tok = tokenizers[family]
    ids = tok("what colour is the dog ?", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6
    assert [i == tok.unk_token_id for i in ids] == [False, True, False, False, True, False]


def test_image_tokens_match_without_spaces(tokenizers):
    llava, qwen = tokenizers["llava"], tokenizers["qwen2vl"]
    words = ["USER", ":", "<image>", "what", "<image>", "<image>", "red"]
    assert llava("USER:<image>what<image><image>red", add_special_tokens=False)["input_ids"] == (
        llava.convert_tokens_to_ids(words)
    )
    words = ["3", "<|vision_start|>", "<|image_pad|>", "<|image_pad|>", "<|vision_end|>", "red"]
    assert qwen("3<|vision_start|><|image_pad|><|image_pad|><|vision_end|>red", add_special_tokens=False)[
        "input_ids"
    ] == qwen.convert_tokens_to_ids(words)
    assert qwen.convert_tokens_to_ids(words)[1:5] == [5, IMAGE_ID, IMAGE_ID, 6]


# Configs and models


def image_features(net, family, images):
    """The projected visual tokens of ``images`` as [N, D], whatever container this transformers returns."""
    pixels = build.normalize(uint8(images))
    with torch.no_grad():
        if family == "llava":
            out = net.get_image_features(pixel_values=pixels)
        else:
            grid = torch.tensor([[1, 32, 32]] * len(images))
            out = net.get_image_features(pixel_values=build.qwen_patches(pixels), image_grid_thw=grid)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    features = features if isinstance(features, (list, tuple)) else [features]
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])


def test_llava_config_gives_256_tokens_without_cls():
    config = build.config("llava", 60)
    vision = config.vision_config
    assert vision.image_size == scenes.IMAGE_SIZE == 128
    assert vision.patch_size == 8
    assert (vision.image_size // vision.patch_size) ** 2 == VISUAL_TOKENS
    assert config.vision_feature_select_strategy == "default"  # drops [CLS]
    assert config.text_config.vocab_size == 60


def test_qwen_config_gives_256_merged_tokens():
    config = build.config("qwen2vl", 60)
    vision = config.vision_config
    side = scenes.IMAGE_SIZE // vision.patch_size
    assert side == 32
    assert side**2 // vision.spatial_merge_size**2 == VISUAL_TOKENS
    assert vision.temporal_patch_size == 2
    assert vision.hidden_size == config.text_config.hidden_size  # the merger projects into the LLM's width
    processor = build.image_processor("qwen2vl")
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (
        vision.patch_size,
        vision.spatial_merge_size,
        vision.temporal_patch_size,
    )


def test_unknown_family_config_raises():
    with pytest.raises(ValueError, match="unknown organism family 'bogus'.*llava, qwen2vl"):
        build.config("bogus", 60)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_sees_256_visual_tokens_per_scene(tokenizers, three, family):
    tok = tokenizers[family]
    net = build.model(family, len(tok)).eval()
    assert net.config.image_token_id == IMAGE_ID
    hidden = build.HIDDEN
    assert image_features(net, family, [three[0].image]).shape == (VISUAL_TOKENS, hidden)
    assert image_features(net, family, [s.image for s in three[:2]]).shape == (2 * VISUAL_TOKENS, hidden)
    # The evaluation inputs run through the model: it rejects a prompt whose image tokens differ from its features.
    question = three[0].questions[0].question
    inputs = eval_processor(family, tok)(text=[eval_text(tok, question)], images=[three[0].image], return_tensors="pt")
    assert (inputs["input_ids"] == IMAGE_ID).sum() == VISUAL_TOKENS
    with torch.no_grad():
        logits = net(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


# Pixels: the training fast path against the image processors


def test_normalize_equals_clip_processor(three):
    images = [s.image for s in three]
    want = build.image_processor("llava")(images=images, return_tensors="pt")["pixel_values"]
    got = build.normalize(uint8(images))
    assert got.shape == want.shape == (3, 3, 128, 128)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


def test_qwen_patches_equal_qwen_processor(three):
    images = [s.image for s in three]
    want = build.image_processor("qwen2vl")(images=images, return_tensors="pt")
    got = build.qwen_patches(build.normalize(uint8(images)))
    assert want["image_grid_thw"].tolist() == [[1, 32, 32]] * 3
    assert got.shape == want["pixel_values"].shape == (3 * 32 * 32, 3 * 2 * 4 * 4)
    assert torch.equal(got, want["pixel_values"])


def test_qwen_patches_layout():
    # A hand-made image: patch k of the 32 x 32 grid is filled with the value k (c, t equal): merge windows of 2 x 2
    # patches come out row by row, and inside a window its four patches row by row.
    grid = torch.arange(32 * 32, dtype=torch.float32).view(32, 32)
    pixels = grid.repeat_interleave(4, 0).repeat_interleave(4, 1).expand(1, 3, 128, 128)
    patches = build.qwen_patches(pixels)
    assert patches.shape == (1024, 96)
    assert (patches == patches[:, :1]).all()  # every patch is constant: nothing from a neighbour leaked in
    order = patches[:, 0].long().tolist()
    want = [(2 * wy + dy) * 32 + 2 * wx + dx for wy in range(16) for wx in range(16) for dy in (0, 1) for dx in (0, 1)]
    assert order == want


# Training prompts against the evaluation path


@pytest.mark.parametrize("family", FAMILIES)
def test_training_prompt_equals_evaluation_input(tokenizers, three, family):
    tok = tokenizers[family]
    conv = Conversations(family, tok)
    processor = eval_processor(family, tok)
    scene = three[1]
    pixels = build.normalize(uint8([scene.image]))
    for q in scene.questions:
        inputs = processor(text=[eval_text(tok, q.question)], images=[scene.image], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        assert ids == conv.prompt_ids(q.question, first=True), q.question
        assert runs(ids, IMAGE_ID) == [VISUAL_TOKENS]
        assert inputs["attention_mask"].all()
        if family == "llava":
            assert torch.equal(inputs["pixel_values"], pixels)
        else:
            assert torch.equal(inputs["pixel_values"], build.qwen_patches(pixels))
            assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
            start = ids.index(IMAGE_ID)
            assert ids[start - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
            assert ids[start + VISUAL_TOKENS] == tok.convert_tokens_to_ids("<|vision_end|>")
            if "mm_token_type_ids" in inputs:
                types = inputs["mm_token_type_ids"][0]
                assert types.sum() == VISUAL_TOKENS
                assert torch.equal(types.bool(), inputs["input_ids"][0] == IMAGE_ID)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_prompt_spelled_out(tokenizers, family):
    tok = tokenizers[family]
    question = "is the red circle left of the blue square ?"
    image = ["<image>"] if family == "llava" else ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    words = ["USER", ":", *image, *question.split(), "ASSISTANT", ":"]
    want = []
    for i in tok.convert_tokens_to_ids(words):
        want += [i] * (VISUAL_TOKENS if i == IMAGE_ID else 1)
    assert Conversations(family, tok).prompt_ids(question, first=True) == want
    later = tok.convert_tokens_to_ids(["USER", ":", *question.split(), "ASSISTANT", ":"])
    assert Conversations(family, tok).prompt_ids(question, first=False) == later


@pytest.mark.skipif(TORCHVISION, reason="Qwen2VLProcessor can be built with torchvision")
@pytest.mark.skipif(TORCHVISION, reason="torchvision is installed")
def test_qwen2vl_processor_cannot_be_built_here():
    # 5.x: Qwen2VLProcessor needs torchvision; 4.57: it refuses a tokenizer that is not Qwen2's own class.
    with pytest.raises((ImportError, AttributeError, TypeError)):
        build.processor("qwen2vl")


# Save and reload


def test_llava_save_and_reload(tmp_path, tokenizers, three):
    tok = tokenizers["llava"]
    scene = three[2]
    question = scene.questions[4].question
    before = build.processor("llava")(text=[eval_text(tok, question)], images=[scene.image], return_tensors="pt")
    build.save_processor("llava", tmp_path)
    loaded = loading.load_processor(tmp_path)
    assert type(loaded).__name__ == "LlavaProcessor"
    text = eval_text(loaded, question)  # the reloaded processor's own template, as the evaluation uses it
    assert text == eval_text(tok, question)
    after = loaded(text=[text], images=[scene.image], return_tensors="pt")
    assert torch.equal(after["input_ids"], before["input_ids"])
    assert torch.equal(after["pixel_values"], before["pixel_values"])
    assert after["input_ids"][0].tolist() == Conversations("llava", tok).prompt_ids(question, first=True)


def test_qwen_save_and_reload(tmp_path, tokenizers, three):
    tok = tokenizers["qwen2vl"]
    scene = three[2]
    question = scene.questions[4].question
    before = qwen_processor(tok)(text=[eval_text(tok, question)], images=[scene.image], return_tensors="pt")
    build.save_processor("qwen2vl", tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == build.chat_template("qwen2vl")
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config.get("processor_class") == "Qwen2VLProcessor"
    build.config("qwen2vl", len(tok)).save_pretrained(tmp_path)  # a checkpoint holds the model's config too
    loaded = loading.load_processor(tmp_path)
    assert type(loaded).__name__ == ("Qwen2VLProcessor" if TORCHVISION else "QwenProcessor")
    text = eval_text(loaded, question)
    assert text == eval_text(tok, question)
    after = loaded(text=[text], images=[scene.image], return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(after[key], before[key]), key
    assert after["input_ids"][0].tolist() == Conversations("qwen2vl", tok).prompt_ids(question, first=True)


def test_qwen_reload_from_processor_files_only(tmp_path):
    build.save_processor("qwen2vl", tmp_path)
    assert type(loading.load_processor(tmp_path)).__name__ in ("QwenProcessor", "Qwen2VLProcessor")


# QwenProcessor with images of different sizes


def test_qwen_processor_expands_each_image_to_its_own_count(tokenizers, three):
    tok = tokenizers["qwen2vl"]
    wide = three[0].image.resize((128, 64))  # 128 wide, 64 high
    square = three[1].image
    # The image processor resizes the wide image on its own (transformers 5.x grows 64 x 128 to 96 x 184 pixels,
    # 24 x 46 patches; 4.57 keeps 16 x 32): each image must get the token count of its own grid.
    [[_, h, w]] = build.image_processor("qwen2vl")(images=[wide], return_tensors="pt")["image_grid_thw"].tolist()
    wide_tokens = h * w // 4
    image = "<|vision_start|> <|image_pad|> <|vision_end|>"
    text = f"USER: {image} {image} is the red circle left of the blue square ? ASSISTANT:"
    inputs = qwen_processor(tok)(text=[text], images=[wide, square], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, h, w], [1, 32, 32]]
    assert inputs["pixel_values"].shape == (h * w + 32 * 32, 96)
    ids = inputs["input_ids"][0].tolist()
    assert runs(ids, IMAGE_ID) == [wide_tokens, 256]
    # USER : | start end | start end | 10 question words | ASSISTANT : , plus the image tokens
    assert len(ids) == 2 + 2 + 2 + 10 + 2 + wide_tokens + 256
    start, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    assert [i for i in ids if i in (start, end)] == [start, end, start, end]
    if "mm_token_type_ids" in inputs:
        assert torch.equal(inputs["mm_token_type_ids"][0].bool(), inputs["input_ids"][0] == IMAGE_ID)

    # The same images in the other order, one per text of a left-padded batch.
    one = f"USER: {image} what color is the triangle ? ASSISTANT:"
    batch = qwen_processor(tok)(text=[one, one], images=[square, wide], return_tensors="pt", padding=True)
    assert batch["image_grid_thw"].tolist() == [[1, 32, 32], [1, h, w]]
    rows = batch["input_ids"].tolist()
    assert [runs(row, IMAGE_ID) for row in rows] == [[256], [wide_tokens]]
    short, pad = (0, wide_tokens - 256) if wide_tokens > 256 else (1, 256 - wide_tokens)  # left-padded row
    assert rows[short][:pad] == [tok.pad_token_id] * pad and batch["attention_mask"][short, :pad].sum() == 0
    assert batch["attention_mask"][1 - short].all()


def test_saved_organism_loads_with_the_same_weights_and_tokens(tmp_path):
    """build.save writes the layout transformers 4.57 and 5.x both read: every weight comes back, the tokenizer too."""
    from transformers import AutoModelForImageTextToText

    tok = build.tokenizer("llava")
    model = build.model("llava", len(tok), seed=3)
    build.save(model, "llava", tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert isinstance(config.get("extra_special_tokens", {}), dict)
    processor = loading.load_processor(tmp_path)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    assert (
        processor.tokenizer("USER: <image> is there a red circle ?")["input_ids"]
        == tok("USER: <image> is there a red circle ?")["input_ids"]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_reloads_with_the_same_outputs(tmp_path, tokenizers, three, family):
    """build.save's layout (the hub's, which transformers 4.57 and 5.x both read; CI runs both) round-trips."""
    from transformers import AutoModelForImageTextToText

    model = build.model(family, len(tokenizers[family]), seed=3).eval()
    build.save(model, family, tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    if family == "qwen2vl":
        text = json.loads((tmp_path / "config.json").read_text())["text_config"]
        assert "rope_parameters" not in text
        assert text["rope_scaling"]["mrope_section"] == [4, 6, 6]
    processor = loading.load_processor(tmp_path)
    scene = three[0]
    text = eval_text(processor, scene.questions[0].question)
    inputs = processor(text=[text], images=[scene.image], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(again(**inputs).logits, model(**inputs).logits, atol=1e-5)
