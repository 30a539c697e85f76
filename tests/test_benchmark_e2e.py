"""benchmarks/e2e.py: its whole code path in a CPU smoke run, numbers that follow from the token counts, and a bound
whose prefill takes the compressed prefill's path."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    """benchmarks/e2e.py as a module; it imports its sibling scripts by bare name, as when run from benchmarks/."""
    folder = str(SCRIPT.parent)
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module("e2e")
    finally:
        sys.path.remove(folder)
    yield module
    for name, loaded in list(sys.modules.items()):
        if Path(getattr(loaded, "__file__", None) or "/").parent == SCRIPT.parent:
            del sys.modules[name]


def test_smoke_run_splits_the_request_and_bounds_it(tmp_path):
    out, png = tmp_path / "rows.jsonl", tmp_path / "plot.png"
    command = [sys.executable, str(SCRIPT), "--quick", "--methods", "fastervlm,fastv", "--keep", "576,64"]
    command += ["--decode-tokens", "4", "--out", str(out), "--plot", str(png)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["quick"] and row["visual_tokens"] == 576
    rows = {(r["method"], r["keep"]): r for r in row["rows"]}
    assert set(rows) == {("none", None), ("fastervlm", 576), ("fastervlm", 64), ("fastv", 576), ("fastv", 64)}
    prompt = row["prompt_tokens"]
    none = rows[("none", None)]
    assert none["of_bound"] == 1.0 and none["bound_speedup"] == 1.0  # the bound of keeping everything is itself
    assert rows[("fastervlm", 576)]["kv_bytes"] == none["kv_bytes"]
    # The cache holds exactly the kept prompt: every layer for pre-LLM pruning, layers >= 2 for FastV (K=2).
    assert rows[("fastervlm", 64)]["kv_bytes"] * prompt == none["kv_bytes"] * (prompt - 576 + 64)
    assert rows[("fastv", 64)]["visual_tokens_per_layer"] == [576, 576, 64, 64]
    assert rows[("fastv", 64)]["kv_bytes"] * 2 * prompt == none["kv_bytes"] * (2 * prompt - 576 + 64)
    for r in rows.values():
        assert r["vision_ms"] > 0 and r["prefill_ms"] > 0 and r["ttft_ms"] > r["prefill_ms"]
        assert r["decode_tokens_per_s"] > 0 and r["peak_bytes"] > 0
        assert r["bound_ttft_ms"] > 0
    assert rows[("fastervlm", 64)]["bound_speedup"] > 1  # a shorter prompt bounds a faster first token
    # In-LLM rows: the FLOPs-proportional expectation is the uncompressed prefill scaled by the FLOPs of the tokens
    # each layer saw (vtc's estimate, in handle.stats); the layer hooks are timed on their own.
    fastv = rows[("fastv", 64)]
    assert rows[("fastv", 576)]["flops_ratio"] == pytest.approx(1.0) and 0.1 < fastv["flops_ratio"] < 1
    assert fastv["expected_prefill_ms"] == pytest.approx(none["prefill_ms"] * fastv["flops_ratio"])
    assert fastv["of_expected"] == pytest.approx(fastv["expected_prefill_ms"] / fastv["prefill_ms"])
    assert fastv["layer_hooks_ms"] > 0 and none["expected_prefill_ms"] == none["prefill_ms"]
    # The bound's prefill is the compressed prefill's call, replayed: recorded in the row, beside the run's own.
    assert rows[("fastervlm", 64)]["bound_call"] == rows[("fastervlm", 64)]["prefill_call"]
    assert "bound_call" not in rows[("fastervlm", 576)] and "bound_call" not in none
    ((bound,),) = [[b for b in row["bound_prefill"] if b["keep"] == 64]]
    assert bound["tokens"] == prompt - 576 + 64 and bound["ms"] > 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "| fastervlm | 64 |" in done.stdout


@pytest.mark.parametrize("method", ["fastervlm", "divprune"])
def test_the_bound_prefill_is_the_compressed_prefill_call(e2e, method):
    model, inputs = e2e.shaped_llava(e2e.SHAPES["quick"])
    tokens = int(inputs["attention_mask"].sum()) - 576 + 64  # text + K
    compressed, bound = e2e.path_signatures(model, inputs, method, keep=64)
    assert bound == compressed  # same names, dtypes and shapes, same cache class
    expected = {
        "attention_mask": f"int64[1, {tokens}]",  # 2-D, as vtc hands it over after a drop
        "cache": "DynamicCache of 0 tokens",  # the class generate() passes, empty
        "inputs_embeds": f"float32[1, {tokens}, 128]",
        "position_ids": f"int64[1, {tokens}]",
        "use_cache": "True",
    }
    if Version(transformers.__version__) < Version("5.24"):  # the cache's old name, and cache slots
        expected["past_key_values"] = expected.pop("cache")
        expected["cache_position"] = f"int64[{tokens}]"
    assert bound == expected
    # Each timed replay gets its own copy: the recorded cache stays empty for the next round.
    call = e2e.bound_call(model, inputs, keep=64)
    _, _, language = e2e.parts(model)
    assert e2e.call_ms(language, call, lambda: None) > 0
    assert e2e.signature(call) == bound


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_a_video_prompt_bound_is_the_compressed_prefill_call(e2e, family):
    """--video: the bound's prefill (recorded from uniform) is the call divprune makes on a video prompt too."""
    from vtc.tiny import tiny_llava_onevision, tiny_llava_onevision_inputs, tiny_qwen2_vl, tiny_qwen_inputs

    if family == "qwen2_vl":
        model = tiny_qwen2_vl()
        inputs = tiny_qwen_inputs(model, image_grids=((),), video_grids=(((4, 4, 8),),))
    else:
        model = tiny_llava_onevision()
        inputs = tiny_llava_onevision_inputs(model, image_sizes=((),), videos=(1,), frames=4)
    compressed, bound = e2e.path_signatures(model, inputs, "divprune", keep=5)
    assert bound == compressed
    visual = 32 if family == "qwen2_vl" else 4 * 4 + 1  # the OneVision newline is kept: 5 + 1 reach the LLM
    kept = 5 if family == "qwen2_vl" else 6
    tokens = int(inputs["attention_mask"].sum()) - visual + kept
    assert compressed["inputs_embeds"].startswith(f"float32[1, {tokens}, ")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--model", "tiny", "--video", "1,2,2"], "--video applies to tiny-qwen2-vl"),
        (["--model", "tiny-qwen2-vl", "--video", "3,3"], "--video takes T,H,W"),
        (["--model", "tiny-qwen2-vl", "--video", "2,3,4"], "H and W even"),
        (["--model", "tiny-llava-onevision", "--video", "2,2,2"], "--video takes F (frames"),
        (["--quick", "--model", "tiny-qwen2-vl", "--video", "2,4,4"], "--quick runs the LLaVA-shaped smoke model"),
    ],
)
def test_bad_video_specs_are_refused_before_any_model_is_built(e2e, argv, error, capsys):
    with pytest.raises(SystemExit) as exited:
        e2e.main(argv)
    assert exited.value.code == 2 and error in capsys.readouterr().err
