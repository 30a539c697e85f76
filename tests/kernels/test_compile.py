"""The kernels compile for an H100 (sm_90) with the launchers' GPU tile sizes, without a GPU.

The interpreter tests check what the kernels compute; this checks that the compiler accepts them
(including the fp16 / bf16 tensor-core dot the interpreter does not run). A fresh process, because
the kernels in this one were decorated for the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    script = Path(__file__).with_name("compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(script), "--arch", "90"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "sm_90: 0 of" in done.stdout
