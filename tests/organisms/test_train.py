"""The training script's targets: the dense per-token labels of the vision pretraining, and the captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training import organisms as train
from training.organisms import DENSE_CLASSES, TOKEN_PIXELS, caption, patch_labels
from vtc.organisms import scenes

SIDE = scenes.IMAGE_SIZE // TOKEN_PIXELS


@pytest.fixture(scope="module")
def rendered():
    return [scenes.scene("train", i) for i in range(40)]


def tokens_of(box) -> set[tuple[int, int]]:
    """(row, col) of every token the inclusive pixel box touches."""
    x0, y0, x1, y1 = box
    rows = range(y0 // TOKEN_PIXELS, y1 // TOKEN_PIXELS + 1)
    return {(r, c) for r in rows for c in range(x0 // TOKEN_PIXELS, x1 // TOKEN_PIXELS + 1)}


def test_every_object_and_the_sign_label_their_own_tokens(rendered):
    colors, shapes, glyphs = list(scenes.COLORS), list(scenes.SHAPES), sorted(scenes.GLYPHS)
    for scene in rendered:
        labels = patch_labels(scene).view(3, SIDE, SIDE)
        assert labels.dtype == torch.long
        for plane, classes in zip(labels, DENSE_CLASSES, strict=True):
            assert plane.min() >= 0 and plane.max() < classes
        covered = set()
        for obj in scene.shapes:
            want = torch.tensor([colors.index(obj.color) + 1, shapes.index(obj.shape) + 1, 0])
            x, y = obj.center
            centre = (int(y) // TOKEN_PIXELS, int(x) // TOKEN_PIXELS)
            assert torch.equal(labels[:, centre[0], centre[1]], want), (scene.index, obj)
            mine = {(r, c) for r, c in tokens_of(obj.box) if torch.equal(labels[:, r, c], want)}
            assert centre in mine
            covered |= tokens_of(obj.box)
        sign = {(r, c) for r, c in tokens_of(scene.sign_box) if labels[1, r, c] == len(shapes) + 1}
        assert sign and all(labels[2, r, c] == glyphs.index(scene.sign) + 1 for r, c in sign)
        covered |= tokens_of(scene.sign_box)
        # Tokens no object or sign touches are background in all three planes.
        for r in range(SIDE):
            for c in range(SIDE):
                if (r, c) not in covered:
                    assert labels[:, r, c].tolist() == [0, 0, 0], (scene.index, r, c)


def test_caption_lists_every_object_left_to_right_and_the_sign(rendered):
    for scene in rendered:
        words = caption(scene)
        assert words[:2] == [str(len(scene.shapes)), "shapes"] and words[-2:] == ["sign", scene.sign]
        named = [(words[i + 2], words[i + 3]) for i, w in enumerate(words) if w == "." and i + 3 < len(words) - 2]
        by_x = sorted(scene.shapes, key=lambda s: s.center[0])
        assert named == [(s.color, s.shape) for s in by_x]


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_curriculum_batch_keeping_everything_is_the_plain_batch(family):
    """without_background(share=1) feeds the model exactly what its own forward builds from input_ids (Qwen: with
    its M-RoPE positions); share=0 keeps the text and exactly the object / sign tokens, at their positions."""
    import random

    from training import build
    from training.organisms import Conversations, batch_inputs, without_background

    tok = build.tokenizer(family)
    model = build.model(family, len(tok)).eval()
    conv = Conversations(family, tok)
    chosen = [scenes.scene("train", i) for i in range(2)]
    rng = random.Random(0)
    examples = [conv.example(s.questions, rng) for s in chosen]
    images = torch.stack([torch.from_numpy(np.asarray(s.image).copy()) for s in chosen])
    inputs = batch_inputs(family, conv, images, examples)
    labels = torch.stack([patch_labels(s) for s in chosen])
    with torch.no_grad():
        plain = model(**inputs).loss
        same = model(**without_background(model, family, conv, inputs, labels, 1.0, rng)).loss
        pruned = without_background(model, family, conv, inputs, labels, 0.0, rng)
        model(**pruned)  # the pruned batch runs as it is
    torch.testing.assert_close(same, plain)
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != conv.image_id)).sum(1)
    objects = (labels.sum(1) > 0).sum(1)
    assert pruned["attention_mask"].sum(1).tolist() == (text + objects).tolist()
    first_image = int((inputs["input_ids"][0] == conv.image_id).nonzero()[0])
    kept = (labels[0].sum(0) > 0).nonzero().squeeze(1)
    positions = pruned["position_ids"][..., 0, first_image : first_image + len(kept)]
    if family == "llava":
        assert torch.equal(positions, first_image + kept)
    else:  # M-RoPE: temporal, row, column ids of each kept token of the 16 x 16 grid, after the text before it
        assert torch.equal(positions[1] - positions[1, 0] + kept[0] // 16, kept // 16)
        assert torch.equal(positions[2] - positions[2].min(), kept % 16 - (kept % 16).min())


def test_alignment_loss_is_zero_exactly_when_features_point_at_their_words():
    from training import build
    from training.organisms import alignment_loss, alignment_targets

    tok = build.tokenizer("llava")
    model = build.model("llava", len(tok))
    targets = alignment_targets(model, tok)
    scene = scenes.scene("train", 5)
    labels = patch_labels(scene)[None]  # [1, 3, 256]
    weight = model.get_input_embeddings().weight.detach()
    ids = tok.convert_tokens_to_ids
    features = torch.randn(1, 256, weight.shape[1])
    for obj in scene.shapes:  # the object's centre token: colour + shape words, scaled (cosine ignores scale)
        x, y = obj.center
        token = int(y) // TOKEN_PIXELS * SIDE + int(x) // TOKEN_PIXELS
        assert labels[0, :, token].tolist()[2] == 0
    aligned = features.clone()
    for token in range(256):
        color, shape, glyph = labels[0, :, token].tolist()
        if shape:
            words = (
                [targets[1][shape]] + ([targets[0][color]] if color else []) + ([targets[2][glyph]] if glyph else [])
            )
            aligned[0, token] = 3.0 * weight[torch.stack(words)].sum(0)
    assert alignment_loss(aligned, labels, targets, model.get_input_embeddings()) < 1e-5
    assert alignment_loss(features, labels, targets, model.get_input_embeddings()) > 0.5
    sign = labels[0, 1] == len(scenes.SHAPES) + 1
    assert targets[1][len(scenes.SHAPES) + 1] == ids("sign") and sign.any()


@pytest.mark.parametrize("init", [None, "vtc/organisms/shapes-llava"])
def test_model_card_command_reproduces_the_recorded_arguments(init):
    argv = [
        "--family",
        "qwen2vl",
        "--output",
        "out",
        "--steps",
        "7",
        "--lr",
        "0.002",
        "--ramp",
        "0.25",
        "--align",
        "0.5",
        "--eval-scenes",
        "40",
        "--recipe",
        "captions",
    ]
    argv += ["--init", init] if init else []
    args = vars(train.arguments().parse_args(argv))
    record = {"family": "qwen2vl", "arguments": args, "threads": 2}
    command = train.command(record)
    assert command.startswith("python -m training.organisms ")
    again = vars(train.arguments().parse_args(command.split()[3:]))
    assert {**again, "output": "out", "threads": None} == {**args, "threads": None}
    assert again["threads"] == 2
    assert ("--init" in command) == bool(init)


def test_model_card_command_of_the_symbolic_recipe_names_only_its_options():
    argv = ["--family", "llava", "--output", "out", "--work", "w", "--scenes", "300", "--eval-scenes", "40"]
    args = vars(train.arguments().parse_args(argv))
    command = train.command({"family": "llava", "arguments": args, "threads": 1})
    options = {word for word in command.split() if word.startswith("--")}
    assert options == {"--family", "--output", "--scenes", "--eval-scenes", "--threads", "--seed", "--recipe", "--work"}
    assert "--recipe symbolic" in command and "--threads 1" in command
    again = vars(train.arguments().parse_args(command.split()[3:]))
    assert {**again, "output": "out", "threads": None} == {**args, "threads": None}


def test_a_record_without_a_recipe_was_trained_by_the_captions_recipe():
    """Records from before --recipe existed (the first shapes-qwen2vl's) reproduce with --recipe captions."""
    args = vars(train.arguments().parse_args(["--family", "qwen2vl", "--output", "out", "--steps", "1200"]))
    del args["recipe"], args["work"]
    command = train.command({"family": "qwen2vl", "arguments": args, "threads": 2})
    assert "--recipe captions" in command
    again = vars(train.arguments().parse_args(command.split()[3:]))
    assert again["recipe"] == "captions" and again["steps"] == 1200


def test_the_card_names_the_rotary_base_the_language_stages_set():
    """Qwen2-VL's symbolic stages train at rotary base 100, not the config's 1e6: the card's architecture says so."""

    def stages(family):
        return [{"module": m, "argv": a} for _, m, a, _ in train.stage_commands(family, Path("w"), 0, 10)]

    assert train._rotary_base({"stages": stages("qwen2vl")}) == ", rotary base 100"
    assert train._rotary_base({"stages": stages("llava")}) == "" == train._rotary_base({})


def _shipped_record(name: str) -> dict:
    return json.loads((Path("vtc/organisms") / name / "training.json").read_text())


def test_the_card_says_which_families_are_under_the_target():
    record = _shipped_record("shapes-qwen2vl")
    record["test"] = {**record["test"], "count": 0.70, "color": 0.95, "overall": 0.92}
    assert "**Status: under-trained.** 92% on the test split" in train.model_card(record)
    assert "(under it: count 0.700)" in train.model_card(record)
    record["test"] = {**record["test"], "count": 0.80}
    assert "Status" not in train.model_card(record)


def test_the_card_names_the_contrastive_loss_only_where_the_tower_stage_used_it():
    record = _shipped_record("shapes-llava")
    assert "contrastive loss of the [CLS] output" in train.model_card(record)
    tower = next(s for s in record["stages"] if s["name"] == "tower")
    tower["argv"] = [
        w if w != "1" or tower["argv"][i - 1] != "--contrastive" else "0" for i, w in enumerate(tower["argv"])
    ]
    assert "contrastive loss of the [CLS] output" not in train.model_card(record)


def test_the_card_names_the_ring_weight_only_where_a_vision_stage_used_it():
    record = _shipped_record("shapes-llava")
    assert "`--ring`" not in train.model_card(record)
    vlm = next(s for s in record["stages"] if s["name"] == "vlm-2")
    vlm["argv"] = [*vlm["argv"], "--ring", "4"]
    assert "Stages with `--ring` weight up the regression error of the tokens around each centre" in train.model_card(
        record
    )


def test_the_card_names_the_machine_when_the_record_has_its_cores():
    assert train._machine({"cores": 2}) == "a 2-core machine" and train._machine({}) == "the build machine"
