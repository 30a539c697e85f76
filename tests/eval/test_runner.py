"""vtc eval end to end: settings, files, records, errors, and a 2-process accelerate run equal to 1 process.

The model is an untrained organism-shaped checkpoint (real LlavaForConditionalGeneration + LlavaProcessor, saved
to a temporary directory), so these tests do not depend on the shipped weights; tests/organisms checks those.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import refused
from training import build
from vtc.eval import runner
from vtc.eval.__main__ import main
from vtc.eval.scoring import parse_yes_no
from vtc.eval.tasks import get_task
from vtc.eval.tasks.shapes import normalize as shapes_normalize
from vtc.organisms import scenes

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"


def untrained_organism(tmp_path_factory, family: str) -> str:
    """An untrained checkpoint of the organism ``family`` ("llava", "qwen2vl") with its processor, saved to a temp
    directory: the real loading path, on random weights."""
    directory = tmp_path_factory.mktemp(f"shapes-{family}-untrained")
    tokenizer = build.tokenizer(family)
    build.model(family, len(tokenizer), seed=0).save_pretrained(directory)
    build.save_processor(family, directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return untrained_organism(tmp_path_factory, "llava")


def _run(tmp_path: Path, *args: str) -> tuple[dict, list[dict]]:
    output = tmp_path / "out"
    assert main([*args, "--output", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    records = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    return summary, records


def test_settings_and_method_options():
    plan = runner.settings(["none", "divprune", "fastervlm:signal=attention_received"], [64, 16])
    assert [(s.name, s.keep) for s in plan] == [
        ("none", None),
        ("divprune", 64),
        ("divprune", 16),
        ("fastervlm:signal=attention_received", 64),
        ("fastervlm:signal=attention_received", 16),
    ]
    assert plan[3].method == "fastervlm" and plan[3].options == {"signal": "attention_received"}
    assert runner.parse_method("dart:merge=True") == ("dart", {"merge": True})
    with pytest.raises(ValueError, match="unknown method"):
        runner.parse_method("nope")
    with pytest.raises(ValueError, match="key=value"):
        runner.parse_method("dart:merge")
    with pytest.raises(ValueError, match="no options"):
        runner.parse_method("none:x=1")


def test_shapes_task_order_and_limit():
    task = get_task("shapes")
    samples = task.samples(None, 14)
    assert len(samples) == 14
    assert [s.family for s in samples[:6]] == list(scenes.FAMILIES)
    assert samples[6].id == "test-1-count" and samples[13].id == "test-2-color"
    first = scenes.scene("test", 0)
    assert [s.answer for s in samples[:6]] == [q.answer for q in first.questions]
    assert samples[0].image().tobytes() == first.image.tobytes()
    assert task.samples("validation", 6)[0].id == "validation-0-count"
    assert task.score(samples[1], " Red.")["score"] == float(samples[1].answer == "red")
    assert task.score(samples[0], "three")["score"] == float(samples[0].answer == "3")
    with pytest.raises(ValueError, match="split"):
        task.samples("train", 6)


def test_end_to_end_files_and_records(checkpoint, tmp_path):
    summary, records = _run(
        tmp_path, "--model", checkpoint, "--methods", "none,divprune,fastv", "--keep", "64,8",
        "--task", "shapes", "--limit", "12", "--batch-size", "5",
    )  # fmt: skip
    runs = [(r["method"], r["keep"]) for r in summary["runs"]]
    assert runs == [("none", None), ("divprune", 64), ("divprune", 8), ("fastv", 64), ("fastv", 8)]
    assert len(records) == 5 * 12
    expected = {q.answer for i in range(2) for q in scenes.scene("test", i).questions}
    assert {r["answer"] for r in records} == expected
    for run in summary["runs"]:
        mine = [r for r in records if (r["method"], r["keep"]) == (run["method"], run["keep"])]
        assert [r["index"] for r in mine] == list(range(12))
        right = [shapes_normalize(r["prediction"]) == r["answer"] for r in mine]
        assert [r["score"] for r in mine] == [float(x) for x in right]
        assert run["accuracy"] == pytest.approx(sum(right) / 12)
        assert run["families"]["exists"]["n"] == 2
        assert run["visual_tokens_in"] == 256
        kept = 256 if run["method"] == "none" else run["keep"]
        assert run["visual_tokens_last_layer"] == kept
        # fastv drops inside the LLM: all 256 tokens enter it, `keep` reach the last layer
        assert run["visual_tokens"] == (256 if run["method"] in ("none", "fastv") else run["keep"])
        assert run["prefill_ms_per_sample"] > 0 and run["peak_memory_mb"] > 0
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert [(r["method"], r["keep"]) for r in rows] == [(m, "" if k is None else str(k)) for m, k in runs]
    assert {"accuracy_count", "accuracy_read", "prefill_ms_per_sample"} <= set(rows[0])
    png = (tmp_path / "out" / "accuracy_vs_tokens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["questions"] == 12 and summary["skipped"] == []


def test_a_benchmark_fixture_runs_through_the_model(checkpoint, tmp_path):
    summary, records = _run(
        tmp_path, "--model", checkpoint, "--methods", "none,random", "--keep", "32", "--task", "pope",
        "--data", str(FIXTURES / "pope"),
    )  # fmt: skip
    samples = get_task("pope").samples(str(FIXTURES / "pope"), None)
    assert len(records) == 2 * len(samples)
    for run in summary["runs"]:
        mine = [r for r in records if r["method"] == run["method"]]
        said = [parse_yes_no(r["prediction"]) for r in mine]
        assert run["yes_ratio"] == pytest.approx(said.count("yes") / len(said))
        right = [p == r["answer"] for p, r in zip(said, mine, strict=True)]
        assert run["accuracy"] == pytest.approx(sum(right) / len(right))


def test_skipped_settings_are_reported(checkpoint, tmp_path):
    summary, records = _run(
        tmp_path, "--model", checkpoint, "--methods", "none,divprune", "--keep", "300,16", "--task", "shapes",
        "--limit", "3",
    )  # fmt: skip
    assert [(r["method"], r["keep"]) for r in summary["runs"]] == [("none", None), ("divprune", 16)]
    [skipped] = summary["skipped"]
    assert skipped["keep"] == 300 and "exceeds the 256 visual tokens" in skipped["reason"]
    assert len(records) == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--methods", "none,nope"], "unknown method"),
        (["--task", "gqa"], "gqa needs --data"),
        (["--task", "pope", "--data", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_bad_requests_fail_before_loading_a_model(args, message, capsys):
    # The model does not exist: reaching the loader would fail differently.
    assert main(["--model", "/no/such/model", "--output", "/tmp/unused", *args]) == 2
    assert message in capsys.readouterr().err


def test_unsupported_model_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--output", str(tmp_path / "out"), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "'llama' model" in err and "llava" in err and "qwen2_vl" in err
    assert not (tmp_path / "out").exists()


def test_two_processes_equal_one(checkpoint, tmp_path):
    """accelerate launch with 2 CPU processes: every record exactly once, equal to the single-process run."""
    pytest.importorskip("accelerate")
    args = ["--model", checkpoint, "--methods", "none,divprune", "--keep", "16", "--task", "shapes", "--limit", "7"]
    args += ["--batch-size", "1"]  # the same batches in both runs, so logits match bit for bit
    _, single = _run(tmp_path / "one", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", env["MASTER_PORT"], "-m", "vtc.eval", *args, "--output", str(tmp_path / "two")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    double = [json.loads(line) for line in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    volatile = ("prefill_ms", "batch")
    strip = [{k: v for k, v in r.items() if k not in volatile} for r in double]
    assert strip == [{k: v for k, v in r.items() if k not in volatile} for r in single]
    assert {r["batch"].split("/")[0] for r in double} == {"0", "1"}  # both processes did work


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "float99"], "--dtype must be auto or a floating dtype"),
        (["--dtype", "int8"], "--dtype must be auto or a floating dtype"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--device", "cuda:99"], "--device 'cuda:99'"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (["--budget", "everything"], "--budget must be one of global, per_crop, thumbnail"),
        (["--methods", " , "], "--methods names no method"),
        (["--methods", "pdrop:layers=3"], "bad option value in method 'pdrop:layers=3'"),
        (["--output", __file__], "is a file, not a directory"),
        (["--output", f"{__file__}/out"], "cannot create a directory under"),
    ],
)
def test_bad_values_are_refused_before_a_model_is_loaded(args, message, capsys, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("vtc.loading.load", no_model)
    line = refused(main, ["--model", "shapes-llava", "--output", "/tmp/unused", "--limit", "1", *args], capsys)
    assert message in line


def test_method_options_may_hold_commas():
    from vtc.eval.__main__ import parse_args

    methods = " none, pdrop:layers=(2,6) ,adaptive:layers=[2, 6]:mass=0.8,,fastv"
    args = parse_args(["--model", "m", "--output", "/tmp/unused", "--methods", methods])
    assert args.method_specs == ["none", "pdrop:layers=(2,6)", "adaptive:layers=[2, 6]:mass=0.8", "fastv"]
    plan = runner.settings(args.method_specs, [16])
    assert [(s.method, s.options) for s in plan] == [
        ("none", {}),
        ("pdrop", {"layers": (2, 6)}),
        ("adaptive", {"layers": [2, 6], "mass": 0.8}),
        ("fastv", {}),
    ]
