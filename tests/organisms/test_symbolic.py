"""The symbolic recipe's pieces: symbolic sequences are the real prompts' sequences, the language model moves into the
VLM unchanged, the tower's regression targets, and ``python -m training.organisms`` end to end on tiny stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from training import build, organisms, pixels, symbolic
from vtc.organisms import scenes


def _arguments(family: str, *extra: str):
    options = ["--family", family, *extra] + (["--no-grid"] if family == "qwen2vl" else [])
    return symbolic.arguments().parse_args(options)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_a_symbolic_prompt_with_every_visual_token_is_the_real_prompt_with_its_positions(family):
    """Token for token and position for position (Qwen: its own M-RoPE index), except that the image span holds the
    objects' words (and nothing on background cells) instead of the image token."""
    vocab = symbolic.Vocabulary(family)
    scene = symbolic.layout("test", 3)
    conv = organisms.Conversations(family, vocab.tokenizer)
    model = build.model(family, len(vocab.words))
    for question in scene[3]:
        sym = symbolic.collate(
            [symbolic._all_tokens(symbolic.prompt(scene, question, vocab, False), vocab)], vocab.mrope
        )
        ids = torch.tensor([conv.prompt_ids(question.question, True)])
        assert sym["first"].shape == ids.shape
        image = ids == conv.image_id
        assert torch.equal(sym["first"][~image], ids[~image])
        assert torch.equal(sym["grid"][image], torch.arange(256))
        objects = {cell: first for cell, first, _ in symbolic.objects(*scene[:3], vocab)}
        assert sym["first"][image].tolist() == [objects.get(cell, 0) for cell in range(256)]
        if family == "llava":
            assert torch.equal(sym["position"], torch.arange(ids.shape[1])[None])
        else:
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            inputs.update(organisms._mm_types(conv, ids))
            real, _ = model.model.get_rope_index(image_grid_thw=torch.tensor([[1, 32, 32]]), **inputs)
            assert torch.equal(sym["position"], real)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_a_symbolic_conversation_is_the_real_training_conversation(family):
    """All six turns, in the order Conversations.example draws: the same tokens outside the image span, the same
    labels (answers and end-of-turn tokens), and for Qwen the model's own M-RoPE positions."""
    import random

    vocab = symbolic.Vocabulary(family)
    conv = organisms.Conversations(family, vocab.tokenizer)
    scene = symbolic.layout("train", 7)
    ids, labels = conv.example(scene[3], random.Random(5))
    order = list(scene[3])
    random.Random(5).shuffle(order)
    sym = symbolic.collate(
        [symbolic._all_tokens(symbolic.example(scene, order, vocab, False, True), vocab)], vocab.mrope
    )
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    assert sym["first"].shape == ids.shape
    image = ids == conv.image_id
    assert int(image.sum()) == 256
    assert torch.equal(sym["first"][~image], ids[~image])
    assert torch.equal(sym["target"][0, :-1], labels[0, 1:])  # the symbolic target is the next token's label
    if family == "qwen2vl":
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **organisms._mm_types(conv, ids)}
        model = build.model(family, len(vocab.words))
        real, _ = model.model.get_rope_index(image_grid_thw=torch.tensor([[1, 32, 32]]), **inputs)
        assert torch.equal(sym["position"], real)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_the_symbolic_language_model_moves_into_the_vlm_unchanged(family):
    """The VLM fed the symbolic vectors as input embeddings, at the same positions, gives the symbolic logits."""
    vocab = symbolic.Vocabulary(family)
    model = symbolic.symbolic_model(_arguments(family), vocab).eval()
    torch.manual_seed(1)
    for parameter in model.parameters():  # away from the zero-initialised rows and biases
        parameter.data.add_(torch.randn_like(parameter) * 0.02)
    scene = symbolic.layout("test", 0)
    batch = symbolic.collate([symbolic.example(scene, scene[3], vocab, False)], vocab.mrope)
    vlm = build.model(family, len(vocab.words)).eval()
    missing, unexpected = vlm.load_state_dict(pixels.language_model_state(model.state_dict()), strict=False)
    assert not unexpected and all(not k.startswith(("model.language_model.", "lm_head.")) for k in missing)
    with torch.no_grad():
        embeds = model.embed(batch)
        expected = model(batch)
        got = vlm(inputs_embeds=embeds, attention_mask=batch["mask"], position_ids=batch["position"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tower_targets_are_the_cell_vectors_plus_the_words_at_each_centre():
    vocab = symbolic.Vocabulary("llava")
    torch.manual_seed(0)
    width = 8
    state = {
        "lm.model.embed_tokens.weight": torch.randn(len(vocab.words), width),
        "row.weight": torch.randn(16, width),
        "column.weight": torch.randn(16, width),
    }
    targets, centres = pixels.Targets(state, vocab)("train", [5, 6])
    for row, index in enumerate([5, 6]):
        shapes, sign, sign_box, _ = symbolic.layout("train", index)
        assert int(centres[row].sum()) == len(shapes) + 1
        grid = state["row.weight"][torch.arange(256) // 16] + state["column.weight"][torch.arange(256) % 16]
        expected = grid.clone()
        words = state["lm.model.embed_tokens.weight"]
        for obj in shapes:
            expected[symbolic.cell(obj.box)] += words[vocab.id[obj.color]] + words[vocab.id[obj.shape]]
        expected[symbolic.cell(sign_box)] += words[vocab.id["sign"]] + words[vocab.id[sign]]
        torch.testing.assert_close(targets[row], expected)
    qwen = symbolic.Vocabulary("qwen2vl")
    state = {"lm.model.embed_tokens.weight": torch.randn(len(qwen.words), width)}  # no row / column: M-RoPE
    targets, centres = pixels.Targets(state, qwen)("train", [5])
    assert torch.equal(targets[0][~centres[0]], torch.zeros(int((~centres[0]).sum()), width))


def test_ring_is_the_eight_neighbours_of_each_centre_and_its_error_is_weighted():
    centres = torch.zeros(2, 256, dtype=torch.bool)
    centres[0, 0] = True  # a corner: three neighbours
    centres[0, 5 * 16 + 5] = centres[0, 5 * 16 + 6] = True  # two adjacent centres: neither is the other's ring
    centres[1, 8 * 16 + 8] = True
    ring = pixels.ring(centres)
    expected = torch.zeros(2, 16, 16, dtype=torch.bool)
    expected[0, 0:2, 0:2] = True
    expected[0, 4:7, 4:8] = True
    expected[1, 7:10, 7:10] = True
    assert torch.equal(ring, expected.view(2, 256) & ~centres)
    target = torch.zeros(2, 256, 4)
    target[centres] = 1.0
    output = target.clone()
    output[ring] = 0.5  # a tower smearing each object over its neighbours
    scale = target.pow(2).mean()
    ring_error = 0.25 / scale  # each ring token's relative squared error
    losses = pixels.regression(output, target, centres, 4.0, 2.0)
    torch.testing.assert_close(losses["centre"], torch.tensor(0.0))
    torch.testing.assert_close(losses["ring"], ring_error)
    torch.testing.assert_close(losses["all"], ring_error * ring.sum() / 512)
    torch.testing.assert_close(losses["loss"], losses["all"] + 2.0 * ring_error)
    torch.testing.assert_close(pixels.regression(output, target, centres, 4.0)["loss"], losses["all"])
    # without --ring the loss is bit for bit the one the stages before --ring trained on
    output, target = torch.randn(2, 256, 4), torch.randn(2, 256, 4)
    error = (output - target).pow(2).mean(-1) / target.pow(2).mean()
    assert torch.equal(
        pixels.regression(output, target, centres, 4.0)["loss"], error.mean() + 4.0 * error[centres].mean()
    )


def test_ring_reaches_the_regression_of_the_tower_and_the_vlm_stages(tmp_path, monkeypatch):
    args = _arguments("llava", "--span", "all")
    symbolic.save(symbolic.symbolic_model(args, symbolic.Vocabulary("llava")), args, tmp_path / "lm.pt")
    weights = []
    regression = pixels.regression

    def recording(output, target, centres, weight, ring_weight=0.0):
        weights.append((weight, ring_weight))
        return regression(output, target, centres, weight, ring_weight)

    monkeypatch.setattr(pixels, "regression", recording)
    argv = ["--init", str(tmp_path / "lm.pt"), "--steps", "1", "--batch", "2", "--vlm-steps", "1", "--vlm-batch", "2"]
    argv += ["--scenes", "4", "--eval-every", "100", "--eval-scenes", "1", "--centre", "3", "--ring", "2.5"]
    pixels.train(pixels.arguments().parse_args(argv), lambda entry: None)
    # the tower step, the VLM step, and test_error after each (which reports, unweighted)
    assert sorted(weights) == [(1.0, 0.0), (1.0, 0.0), (3.0, 2.5), (3.0, 2.5)]


def _tiny_stages(monkeypatch, b: str = "--steps 1 --span all") -> None:
    tiny = "--batch 4 --eval-scenes 6 --eval-every 2"
    stages = (("a", f"--steps 2 {tiny}"), ("b", f"{b} --aux-order 1 {tiny}"))
    monkeypatch.setitem(organisms.LANGUAGE_STAGES, "llava", stages)
    vision = (("tower", "--steps 2 --batch 4 --eval-scenes 6"), ("vlm", "--vlm-steps 2 --vlm-batch 2 --eval-scenes 6"))
    monkeypatch.setitem(organisms.VISION_STAGES, "llava", vision)


def _reused(output) -> list[bool]:
    return [s["reused"] for s in json.loads((output / "training.json").read_text())["stages"]]


def test_training_command_trains_every_stage_then_resumes_from_them(tmp_path, monkeypatch, capsys):
    """``python -m training.organisms`` on tiny stages: it trains, reports (with the text-only control) and writes the
    card; run again on the same --work, it reuses every stage and saves the same weights; a stage whose options
    changed trains again, and so does every stage after it (their input changed); a stage retrained to the same
    weights leaves the later ones valid."""
    from safetensors.torch import load_file

    _tiny_stages(monkeypatch)
    argv = ["--family", "llava", "--scenes", "8", "--eval-scenes", "6", "--work", str(tmp_path / "work")]
    organisms.main([*argv, "--output", str(tmp_path / "one")])
    first = json.loads((tmp_path / "one" / "training.json").read_text())
    assert [s["name"] for s in first["stages"]] == ["a", "b", "tower", "vlm"]
    assert not any(s["reused"] for s in first["stages"])
    assert first["stages"][1]["argv"][:2] == ["--lr", "5e-4"] and first["stages"][2]["module"] == "training.pixels"
    assert set(first["text_only"]) == {*scenes.FAMILIES, "overall"}
    card = (tmp_path / "one" / "README.md").read_text()
    assert "test, text only" in card and "--recipe symbolic" in card and "--pretrain-steps" not in card
    assert "`training.symbolic --lr 5e-4 --eval-every 500 --steps 1 --span all" in card and "--save" not in card
    assert "**Status: under-trained.**" in card
    capsys.readouterr()
    organisms.main([*argv, "--output", str(tmp_path / "two")])
    second = json.loads((tmp_path / "two" / "training.json").read_text())
    assert _reused(tmp_path / "two") == [True] * 4
    assert [s["seconds"] for s in second["stages"]] == [s["seconds"] for s in first["stages"]]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert second["test"] == first["test"]
    shutil.copytree(tmp_path / "work", tmp_path / "moved")  # paths are not options: a moved --work still resumes
    organisms.main([*argv[:-1], str(tmp_path / "moved"), "--output", str(tmp_path / "moved-out")])
    assert _reused(tmp_path / "moved-out") == [True] * 4
    (tmp_path / "moved" / "tower.json").write_text('{"module": "training.pix')  # a record cut short: no record
    organisms.main([*argv[:-1], str(tmp_path / "moved"), "--output", str(tmp_path / "moved-out")])
    assert _reused(tmp_path / "moved-out") == [True, True, False, True]  # the same tower again: vlm stays valid
    (tmp_path / "work" / "b.json").unlink()  # b trains again, to the same weights: tower and vlm stay valid
    organisms.main([*argv, "--output", str(tmp_path / "three")])
    assert _reused(tmp_path / "three") == [True, False, True, True]
    _tiny_stages(monkeypatch, b="--steps 2 --span all")  # b's options changed: b and everything after it train
    organisms.main([*argv, "--output", str(tmp_path / "four")])
    assert _reused(tmp_path / "four") == [True, False, False, False]
    three, four = (load_file(tmp_path / n / "model.safetensors") for n in ("three", "four"))
    assert not all(torch.equal(three[k], four[k]) for k in three)
    organisms.main([*argv, "--scenes", "10", "--output", str(tmp_path / "five")])  # the vision stages' data
    assert _reused(tmp_path / "five") == [True, True, False, False]


def test_an_interrupted_stage_is_trained_again_and_never_taken_for_a_finished_one(tmp_path, monkeypatch, capsys):
    """b changes and trains, the tower trains, then the run dies once the vlm stage's weights are written but before
    its record is: the rerun reuses a, b and the new tower, and trains vlm again (its record from the earlier run,
    made from the old tower, is gone, and its new weights alone do not count as a finished stage)."""
    _tiny_stages(monkeypatch)
    argv = ["--family", "llava", "--scenes", "8", "--eval-scenes", "6", "--work", str(tmp_path / "work")]
    organisms.main([*argv, "--output", str(tmp_path / "one")])
    _tiny_stages(monkeypatch, b="--steps 2 --span all")
    save = build.save

    def dies_after_saving_vlm(model, family, directory):
        save(model, family, directory)
        if Path(directory).name == "vlm":
            raise KeyboardInterrupt

    monkeypatch.setattr(build, "save", dies_after_saving_vlm)
    with pytest.raises(KeyboardInterrupt):
        organisms.main([*argv, "--output", str(tmp_path / "two")])
    assert (tmp_path / "work" / "vlm" / "model.safetensors").is_file() and not (tmp_path / "work" / "vlm.json").exists()
    monkeypatch.setattr(build, "save", save)
    organisms.main([*argv, "--output", str(tmp_path / "three")])
    assert _reused(tmp_path / "three") == [True, True, True, False]


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_the_shipped_stages_pass_the_preflight(family):
    organisms.preflight(organisms.stage_commands(family, Path("work"), 0, 16000), family)


@pytest.mark.parametrize(
    "b, message",
    [
        ("--steps 1 --span objects", "'span': 'objects'"),  # the tower's targets need every visual token
        ("--steps 1 --span all --rope-theta 100", "stage b: its \\['rope_theta'\\] differ"),
        ("--steps 1 --span all --objects split", "--span all puts one vector per visual token"),
    ],
)
def test_the_recipe_refuses_stages_that_would_fail_before_any_trains(b, message, tmp_path, monkeypatch):
    _tiny_stages(monkeypatch, b=b)
    argv = ["--family", "llava", "--scenes", "8", "--work", str(tmp_path / "work"), "--output", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=message):
        organisms.main(argv)
    assert not (tmp_path / "work").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "family, vision, message",
    [
        (
            "llava",
            (("tower", "--steps 2 --bogus 1"),),
            "stage tower: training.pixels does not accept .*--bogus 1",
        ),
        ("llava", (("tower", "--family qwen2vl --steps 2"),), "stage tower: --family qwen2vl in a llava organism"),
        ("qwen2vl", (("tower", "--family qwen2vl --contrastive 1"),), "--contrastive 1.0: a loss on LLaVA's \\[CLS\\]"),
        ("llava", (("tower", "--steps 2 --ring -1"),), "--ring -1.0: a weight of an error, 0 \\(off\\) or more"),
        ("llava", (("tower", "--steps 2 --ring nan"),), "--ring nan: a weight of an error"),
        (
            "llava",
            (("tower", "--steps 2 --ring inf"),),
            "--ring inf: a weight of an error, 0 \\(off\\) or more, finite",
        ),
    ],
)
def test_the_recipe_refuses_vision_stages_that_would_fail_before_any_trains(family, vision, message, monkeypatch):
    monkeypatch.setitem(organisms.VISION_STAGES, family, vision)
    with pytest.raises(ValueError, match=message):
        organisms.preflight(organisms.stage_commands(family, Path("work"), 0, 16), family)


def test_a_recipe_without_a_language_stage_is_refused(monkeypatch):
    monkeypatch.setitem(organisms.LANGUAGE_STAGES, "llava", ())
    with pytest.raises(ValueError, match="no training.symbolic stage: the tower needs a language model"):
        organisms.preflight(organisms.stage_commands("llava", Path("work"), 0, 16), "llava")


def test_an_output_that_cannot_be_a_directory_is_refused_before_training(tmp_path, monkeypatch):
    _tiny_stages(monkeypatch)
    (tmp_path / "file").write_text("")
    argv = ["--family", "llava", "--scenes", "8", "--work", str(tmp_path / "work")]
    for output in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ValueError, match=f"--output {output}: .*(not a directory)"):
            organisms.main([*argv, "--output", str(output)])
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("text", ["[1, 2]", '"done"', '{"module": "training.pixels", "seconds": 1}'])
def test_a_record_that_is_not_a_whole_record_is_no_record(text, tmp_path):
    (tmp_path / "tower.json").write_text(text)
    assert organisms._read_record(tmp_path / "tower.json") == {}


def test_the_captions_recipe_writes_its_organism(tmp_path):
    """--recipe captions (the earlier recipe) still trains end to end and writes weights, record and card."""
    from transformers import LlavaForConditionalGeneration

    steps = ["--pretrain-steps", "1", "--pretrain-batch", "2", "--steps", "1", "--batch", "2"]
    argv = ["--family", "llava", "--recipe", "captions", "--scenes", "8", "--eval-scenes", "6", *steps]
    organisms.main([*argv, "--output", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["stages"] == [] and record["arguments"]["pretrain_steps"] == 1
    assert "--recipe captions" in (tmp_path / "out" / "README.md").read_text()
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")


def test_a_continued_run_keeps_its_models_options(tmp_path):
    """--init from a run with another rotary base (or grid, size, family) is refused before training."""
    args = _arguments("qwen2vl", "--rope-theta", "100")
    symbolic.save(symbolic.symbolic_model(args, symbolic.Vocabulary("qwen2vl")), args, tmp_path / "lm.pt")
    symbolic.check(_arguments("qwen2vl", "--rope-theta", "100", "--init", str(tmp_path / "lm.pt")))
    with pytest.raises(
        ValueError, match=r"trained with \{'rope_theta': 100.0\}, this run asks for \{'rope_theta': 10.0\}"
    ):
        symbolic.run(_arguments("qwen2vl", "--rope-theta", "10", "--init", str(tmp_path / "lm.pt")))


def test_pixels_refuses_a_language_model_it_cannot_feed(tmp_path):
    """A symbolic run the tower's targets do not describe (objects only, another family, split words) is refused
    before any training, naming what is wrong."""
    model = symbolic.symbolic_model(_arguments("llava"), symbolic.Vocabulary("llava"))
    symbolic.save(model, _arguments("llava"), tmp_path / "objects.pt")  # --span objects
    with pytest.raises(ValueError, match="'span': 'objects'"):
        pixels.train(pixels.arguments().parse_args(["--init", str(tmp_path / "objects.pt")]), print)
    with pytest.raises(ValueError, match="'family': 'llava'"):
        pixels.train(
            pixels.arguments().parse_args(["--family", "qwen2vl", "--init", str(tmp_path / "objects.pt")]), print
        )
    args = _arguments("llava", "--span", "all", "--rope-theta", "100")
    symbolic.save(symbolic.symbolic_model(args, symbolic.Vocabulary("llava")), args, tmp_path / "theta.pt")
    with pytest.raises(ValueError, match="'rope_theta': 100.0"):
        pixels.train(pixels.arguments().parse_args(["--init", str(tmp_path / "theta.pt")]), print)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a training.symbolic --save file"):
        pixels.train(pixels.arguments().parse_args(["--init", str(tmp_path / "bare.pt")]), print)
    with pytest.raises(ValueError, match="--span all puts one vector per visual token"):
        symbolic.run(_arguments("llava", "--span", "all", "--objects", "split"))


def test_the_vlm_takes_the_language_models_rotary_base(tmp_path):
    """A symbolic run with --rope-theta gives a VLM with that base, and the same logits as the symbolic model; the
    saved organism loads back with it (both transformers versions)."""
    args = _arguments("qwen2vl", "--span", "all", "--rope-theta", "100")
    vocab = symbolic.Vocabulary("qwen2vl")
    model = symbolic.symbolic_model(args, vocab)
    symbolic.save(model, args, tmp_path / "lm.pt")
    argv = ["--family", "qwen2vl", "--init", str(tmp_path / "lm.pt"), "--steps", "0", "--eval-scenes", "1"]
    vlm = pixels.train(pixels.arguments().parse_args(argv), lambda entry: None)
    build.save(vlm, "qwen2vl", tmp_path / "vlm")
    scene = symbolic.layout("test", 0)
    batch = symbolic.collate([symbolic.example(scene, scene[3], vocab, False)], vocab.mrope)
    for loaded in (vlm, Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "vlm").eval()):
        text = loaded.config.text_config
        assert (getattr(text, "rope_parameters", None) or {"rope_theta": text.rope_theta})["rope_theta"] == 100.0
        with torch.no_grad():
            got = loaded(inputs_embeds=model.embed(batch), attention_mask=batch["mask"], position_ids=batch["position"])
            torch.testing.assert_close(got.logits, model.eval()(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "5"], "--steps: options of --recipe captions"),
        (["--init", "vtc/organisms/shapes-llava"], "--init: options of --recipe captions"),
        (["--recipe", "captions", "--work", "w"], "--work: the symbolic recipe's stage directory"),
    ],
)
def test_options_of_the_other_recipe_are_refused(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        organisms.main(["--family", "llava", "--output", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_count_weight_scales_exactly_the_count_answers(family):
    """weighted_answer_loss at weight 1 is the model's own loss; at weight w it is the same per-token losses with each
    count answer and its end-of-turn token counted w times."""
    import random

    tok = build.tokenizer(family)
    conv = organisms.Conversations(family, tok)
    chosen = [scenes.scene("train", i) for i in range(3)]
    examples = [conv.example(s.questions, random.Random(i)) for i, s in enumerate(chosen)]
    images = torch.stack([torch.from_numpy(organisms._array(s.image)) for s in chosen])
    inputs = organisms.batch_inputs(family, conv, images, examples)
    model = build.model(family, len(tok)).eval()
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(pixels.weighted_answer_loss(out.logits, inputs, conv, 1.0), out.loss)
    labels = inputs["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels, reduction="none")
    weights = torch.ones_like(losses)
    for row, scene in enumerate(chosen):  # the count answer is the label token after "how many shapes are there ?"
        ids = inputs["input_ids"][row].tolist()
        start = next(i for i in range(len(ids)) if tok.convert_ids_to_tokens(ids[i : i + 2]) == ["how", "many"])
        answer = next(i for i in range(start, len(ids) - 1) if labels[row, i] != -100)
        assert tok.convert_ids_to_tokens(labels[row, answer : answer + 2].tolist()) == [
            scene.questions[0].answer,
            "</s>",
        ]
        weights[row, answer : answer + 2] = 3.0
    mask = (labels != -100).float()
    expected = (losses * weights * mask).sum() / (weights * mask).sum()
    torch.testing.assert_close(pixels.weighted_answer_loss(out.logits, inputs, conv, 3.0), expected)
