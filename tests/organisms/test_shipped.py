"""The shipped organisms: they load offline from their directories and reach their recorded accuracy.

``training.json`` in each directory records the accuracy of the first questions of the test split through the
evaluation path (processor + chat template + greedy generate()); the test recomputes it. The count may move by a
question or two between torch / transformers versions (a near-tie flipping), never more.
"""

from __future__ import annotations

import json

import pytest
import torch

from vtc import loading, organisms
from vtc.eval import runner
from vtc.eval.tasks import get_task
from vtc.organisms import scenes


@pytest.fixture(scope="module", params=sorted(organisms.ORGANISMS))
def organism(request):
    name = request.param
    model, processor = loading.load(name)
    return name, model, processor, json.loads((organisms.path(name) / "training.json").read_text())


def test_directory_loads_offline_with_transformers(organism):
    name, model, processor, _ = organism
    from transformers import AutoConfig, AutoModelForImageTextToText

    directory = organisms.path(name)
    config = AutoConfig.from_pretrained(directory)
    assert config.model_type == {"shapes-llava": "llava", "shapes-qwen2vl": "qwen2_vl"}[name]
    again = AutoModelForImageTextToText.from_pretrained(directory)
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    assert (directory / "README.md").read_text().startswith(f"# {name}")
    if name == "shapes-llava":
        from transformers import AutoProcessor, LlavaProcessor

        assert isinstance(AutoProcessor.from_pretrained(directory), LlavaProcessor)
    else:  # AutoProcessor where torchvision is installed, else vtc's stand-in with the same outputs
        chat = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes are there ?"}]}
        ]
        text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[scenes.scene("test", 0).image], text=[text], return_tensors="pt")
        assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256


def test_recorded_accuracy_on_a_test_subset(organism):
    name, model, processor, record = organism
    check = record["check"]
    task = get_task("shapes")
    samples = list(enumerate(task.samples("test", check["questions"])))
    records = runner.run_setting(model, processor, task, samples, runner.Setting("none", None), batch_size=24)
    correct = sum(r["score"] for r in records)
    assert abs(correct - check["correct"]) <= 2, (correct, check["correct"])
    # The model card's test accuracy (logits, 500 scenes) and this subset (generate(), 40 scenes) agree.
    assert abs(correct / len(records) - record["test"]["overall"]) < 0.1


def test_compression_runs_and_random_pruning_hurts(organism):
    """At 16 of 256 tokens random pruning loses objects and the sign: below the uncompressed model."""
    name, model, processor, record = organism
    check = record["check"]
    task = get_task("shapes")
    samples = list(enumerate(task.samples("test", check["questions"])))
    records = runner.run_setting(model, processor, task, samples, runner.Setting("random", 16), batch_size=24)
    assert all(r["visual_tokens_last_layer"] == 16 for r in records)
    correct = sum(r["score"] for r in records)
    assert abs(correct - check["correct_random_16"]) <= 2, (correct, check["correct_random_16"])
    assert correct < check["correct"] - 0.05 * len(records)


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(
        ValueError, match="unknown organism 'shapes-bogus'; the shipped ones are shapes-llava, shapes-qwen2vl"
    ):
        organisms.path("shapes-bogus")


def test_model_card_is_the_one_its_training_record_writes(organism):
    """The README.md shipped next to the weights says what training.json records (accuracy, command, stages)."""
    from training.organisms import model_card

    name, _, _, record = organism
    assert (organisms.path(name) / "README.md").read_text() == model_card(record)
