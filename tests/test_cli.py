"""``python -m vtc``: the README's main command, offline, and the real-model path on a local checkpoint."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

import vtc
from tests.helpers import refused
from vtc.__main__ import main
from vtc.tiny import save_tiny_llava


def rows(output: str) -> dict[str, str]:
    return {line.split()[0]: line for line in output.splitlines() if re.match(r"^\w+ +\d+ -> \d+", line)}


def test_tiny_model_runs_every_method(capsys):
    assert main(["--model", "tiny", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    table = rows(capsys.readouterr().out)
    assert set(table) == {"none", *vtc.list_methods(images=True)}  # the temporal methods need a video
    assert "576 -> 576" in table["none"]
    assert all("576 -> 64 " in line for name, line in table.items() if name not in ("none", "adaptive"))
    assert int(re.search(r"576 -> (\d+)", table["adaptive"]).group(1)) >= 64  # adaptive: keep is the floor


def test_local_checkpoint_with_processor(tmp_path, capsys):
    save_tiny_llava(str(tmp_path / "model"))
    Image.new("RGB", (500, 380), (200, 30, 30)).save(tmp_path / "red.png")
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--image",
        str(tmp_path / "red.png"),
        "--methods",
        "fastervlm,dart",
        "--keep",
        "32",
        "--repeats",
        "1",
        "--max-new-tokens",
        "3",
        "--prompt",
        "what is in the image ?",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert set(table) == {"none", "fastervlm", "dart"}
    assert "576 -> 32" in table["fastervlm"] and "576 -> 32" in table["dart"]
    assert "LlavaForConditionalGeneration" in out


def test_other_tiny_families_and_methods_they_cannot_run(capsys):
    assert (
        main(["--model", "tiny-qwen2-vl", "--methods", "dart,fastervlm", "--repeats", "1", "--max-new-tokens", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "384 -> 64" in rows(out)["dart"]
    assert "skipped fastervlm: method 'fastervlm' needs [CLS] attention" in out
    argv = ["--model", "tiny-llava-next", "--methods", "uniform", "--budget", "per_crop", "--keep", "96"]
    assert main([*argv, "--repeats", "1", "--max-new-tokens", "2"]) == 0
    kept = int(re.search(r"uniform +2928 -> (\d+)", capsys.readouterr().out).group(1))
    assert 96 < kept <= 96 + 48  # 96 content tokens + the newlines of their rows (48 rows of 2 x 2 crops)


def test_tiny_llava_onevision_downsamples_and_refuses_cls_methods(capsys):
    """The released geometry (27 x 27 tokens per 384 px crop, anyres_max_9): a 1536 x 1536 image's 4 x 4 crops give a
    108 x 108 grid, downsampled to 81 x 81; the thumbnail budget shares it by the attention received."""
    received = "fastervlm:signal=attention_received"
    argv = ["--model", "tiny-llava-onevision", "--methods", f"fastervlm,{received}", "--budget", "thumbnail"]
    assert main([*argv, "--keep", "1800", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "7371 visual tokens in the prompt" in out  # 27 x 27 base + 81 rows of 81 tokens and a newline
    kept = int(re.search(rf"{received} +7371 -> (\d+)", out).group(1))
    assert 1800 < kept <= 1800 + 81  # 1800 content tokens + the newlines of their rows
    assert "skipped fastervlm: method 'fastervlm' needs [CLS] attention" in out


def test_default_is_the_shipped_organism_answering_a_scene(capsys):
    from vtc import loading
    from vtc.eval import runner
    from vtc.eval.tasks import get_task

    assert main(["--repeats", "1", "--methods", "fastervlm,random"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert set(table) == {"none", "fastervlm", "random"}
    assert "256 -> 256" in table["none"] and "256 -> 64" in table["fastervlm"] and "256 -> 64" in table["random"]
    assert "LlavaForConditionalGeneration (shapes-llava)" in out and "how many shapes are there ?" in out
    right = {name: int(re.search(r"\[(\d)/6 right\]", line).group(1)) for name, line in table.items()}
    # The same six questions through the evaluation's own path give the same number right.
    model, processor = loading.load("shapes-llava")
    task = get_task("shapes")
    samples = list(enumerate(task.samples("test", 6)))
    for name, keep in (("none", None), ("fastervlm", 64)):
        records = runner.run_setting(model, processor, task, samples, runner.Setting(name, keep), batch_size=6)
        assert right[name] == sum(r["score"] for r in records), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--methods", "foo"], "unknown method 'foo'"),
        (["--methods", "dart,foo"], "unknown method 'foo'"),
        (["--methods", "divprune,evs"], "'evs' plans over a video's frames, and this command asks about an image"),
        (["--methods", " , "], "--methods names no method"),
        (["--methods", "fastervlm:signal=bogus"], "signal must be one of"),
        (["--methods", "dart:merge"], "must be key=value"),
        (["--methods", "pdrop:layers=3"], "bad option value in method 'pdrop:layers=3'"),
        (["--image", "/no/such/image.png"], "--image '/no/such/image.png': [Errno 2] No such file"),
        (["--image", __file__], "cannot identify image file"),
        (["--model", "tiny", "--image", __file__], "--image needs a real model"),
        (["--keep", "0"], "--keep must be >= 1, got 0"),
        (["--keep", "-5"], "--keep must be >= 1, got -5"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--scene", "-1"], "--scene must be >= 0"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--seed", str(2**64)], "--seed must be < 2**64"),
        (["--budget", "everything"], "--budget must be one of global, per_crop, thumbnail"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--device", "cuda:99"], "--device 'cuda:99'"),
        (["--model", "tiny", "--device", "cuda:99"], "--device 'cuda:99'"),
    ],
)
def test_bad_values_are_refused_before_a_model_is_built(args, message, capsys, monkeypatch):
    import vtc.__main__ as cli

    def no_model(*_):
        raise AssertionError("a model was loaded or built before the arguments were checked")

    monkeypatch.setattr(cli, "_load", no_model)
    line = refused(main, ["--repeats", "1", *args], capsys)
    assert line.startswith("python -m vtc: error: ") and message in line


def test_a_model_that_cannot_be_loaded_is_a_clean_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--methods", "random", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "missing") in err and "Traceback" not in err


def test_tiny_models_run_on_the_device_asked_for(capsys):
    argv = ["--model", "tiny", "--methods", "random", "--repeats", "1", "--max-new-tokens", "1"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "device cpu" in capsys.readouterr().out
    if torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 0
        assert "visual tokens in the prompt, device cuda:0" in capsys.readouterr().out
    else:  # the header said "device cuda" while the model ran on the CPU
        assert "no cuda device is available" in refused(main, [*argv, "--device", "cuda"], capsys)
