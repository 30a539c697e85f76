"""benchmarks/e2e.py: its whole code path in a CPU smoke run, and numbers that follow from the token counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"


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
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "| fastervlm | 64 |" in done.stdout
