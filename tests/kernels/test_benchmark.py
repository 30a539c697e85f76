"""benchmarks/kernel_ops.py: a clear message without CUDA, and its whole code path in a CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_ops.py"


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_measures_nothing(tmp_path):
    out = tmp_path / "rows.jsonl"
    done = run("--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "CUDA GPU" in done.stdout and "nothing measured, nothing written" in done.stdout
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the full run times the compiled kernels")
def test_smoke_run_covers_every_op_and_the_prefill(tmp_path):
    out = tmp_path / "rows.jsonl"
    done = run("--smoke", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["smoke"] and row["tests"] == "not run" and row["versions"]["triton"]
    ops = {r["op"] for r in row["ops"]}
    assert ops == {"cosine_similarity", "maxmin_select", "maxmin_select (on the fly)", "pivot_select", "gather_rows",
                   "gather_rows_varlen", "merge_rows", "nearest_kept"}  # fmt: skip
    assert all(r["same_result"] for r in row["ops"]), [r for r in row["ops"] if not r["same_result"]]
    assert {r["method"] for r in row["prefill"]["selection"]} == {"divprune", "dart", "dart(merge=True)", "fastervlm"}
    assert row["prefill"]["prefill_ms"] > 0
