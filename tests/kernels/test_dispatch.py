"""Backend dispatch of vtc.kernels: auto / torch / triton, fallback reasons logged once, vtc without Triton."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vtc
from vtc import kernels
from vtc.kernels import dispatch, ops
from vtc.kernels import reference as ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_interpreter = pytest.mark.skipif(
    not HAS_TRITON or not dispatch.interpreting(), reason="needs triton with TRITON_INTERPRET=1"
)


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Each test sees the once-per-reason log from scratch."""
    monkeypatch.setattr(dispatch, "_logged", set())


def fake_cuda_tensor(dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    """What dispatch looks at, for CUDA-path decisions on a machine without CUDA."""
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype, requires_grad=False)


def calls_of_every_op(backend: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 63, 16, generator=g)
    idx = torch.randperm(63, generator=g)[:9].sort().values.expand(2, 9).contiguous()
    targets = ref.nearest_kept(x, idx)
    cu = torch.tensor([0, 63, 126])
    cu_idx = torch.tensor([0, 9, 18])
    return {
        "cosine_similarity": kernels.cosine_similarity(x, x[:, :5], backend=backend),
        "maxmin_select": kernels.maxmin_select(x, 9, backend=backend),
        "pivot_select": kernels.pivot_select(x, idx[:, :3], 12, backend=backend),
        "gather_rows": kernels.gather_rows(x, idx, backend=backend),
        "gather_rows_varlen": kernels.gather_rows_varlen(
            x.reshape(126, 16), cu, idx.reshape(-1), cu_idx, backend=backend
        ),
        "merge_rows": kernels.merge_rows(x, idx, targets, backend=backend),
        "nearest_kept": kernels.nearest_kept(x, idx, backend=backend),
    }


def test_torch_and_auto_on_cpu_are_the_reference_bit_for_bit():
    expected = calls_of_every_op("torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 63, 16, generator=g)
    assert torch.equal(expected["maxmin_select"], ref.maxmin_select(x, 9))
    for name, value in calls_of_every_op("auto").items():
        assert torch.equal(value, expected[name]), name


def test_backend_name_is_checked():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.cosine_similarity(x, x, backend="cuda")


def test_auto_on_cpu_logs_its_reason_once(caplog):
    caplog.set_level(logging.INFO, logger="vtc.kernels")
    calls_of_every_op("auto")
    calls_of_every_op("auto")
    records = [r for r in caplog.records if r.name == "vtc.kernels"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO and "tensors are on cpu" in records[0].getMessage()


def test_cuda_tensors_without_triton_fall_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    caplog.set_level(logging.INFO, logger="vtc.kernels")
    t = fake_cuda_tensor()
    assert not dispatch.use_triton("gather_rows", "auto", (t,), (t,))
    assert not dispatch.use_triton("maxmin_select", "auto", (t,), (t,))
    records = [r for r in caplog.records if r.name == "vtc.kernels"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "triton is not importable" in records[0].getMessage()
    with pytest.raises(RuntimeError, match=r"gather_rows\(backend='triton'\) cannot run: triton is not importable"):
        dispatch.use_triton("gather_rows", "triton", (t,), (t,))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_unsupported_inputs_fall_back_or_raise(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vtc.kernels")
    t = fake_cuda_tensor(torch.float64)
    assert not dispatch.use_triton("cosine_similarity", "auto", (t,), (t,))
    assert "dtype torch.float64 is not supported" in caplog.records[-1].getMessage()
    with pytest.raises(RuntimeError, match="dtype torch.float64 is not supported"):
        dispatch.use_triton("cosine_similarity", "triton", (t,), (t,))
    big = fake_cuda_tensor()
    with pytest.raises(RuntimeError, match="exceeds the triton pivot_select"):
        dispatch.use_triton("pivot_select", "triton", (big,), (big,), "N=20000 tokens exceeds the triton pivot_select")
    # CPU tensors outside the interpreter: backend="triton" says what is missing.
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    x = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        kernels.gather_rows(x, torch.zeros(1, 2, dtype=torch.long), backend="triton")
    with pytest.raises(RuntimeError, match="different devices"):
        dispatch.use_triton("gather_rows", "triton", (fake_cuda_tensor(), x), ())


@needs_interpreter
@pytest.mark.parametrize("op", ["gather_rows", "merge_rows"])
def test_inputs_that_need_a_gradient_take_the_torch_ops(op, caplog):
    """The Triton kernels have no backward: an input that requires grad (compression inside a training step or
    a saliency map) takes the torch op, which keeps the graph; backend="triton" says why it cannot."""
    caplog.set_level(logging.INFO, logger="vtc.kernels")
    x = torch.randn(2, 6, 8, requires_grad=True)
    kept = torch.tensor([[0, 2, 5], [1, 3, 4]])
    args = (x, kept) if op == "gather_rows" else (x, kept, torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]]))
    with pytest.raises(RuntimeError, match="requires grad and the triton kernels have no backward"):
        getattr(kernels, op)(*args, backend="triton")
    out = getattr(kernels, op)(*args, backend="auto")
    out.sum().backward()
    assert x.grad is not None and bool((x.grad != 0).any())
    with torch.no_grad():  # no graph wanted: the kernel runs, with the torch op's result
        assert torch.equal(getattr(kernels, op)(*args, backend="triton"), getattr(ref, op)(*args))
    assert dispatch.use_triton(op, "auto", (fake_cuda_tensor(),), (fake_cuda_tensor(),))
    needs_grad = SimpleNamespace(**{**vars(fake_cuda_tensor()), "requires_grad": True})
    assert not dispatch.use_triton(op, "auto", (needs_grad,), (needs_grad,))
    assert "requires grad" in caplog.records[-1].getMessage()


METHODS = [("divprune", {}), ("dart", {}), ("dart", {"merge": True})]


@needs_interpreter
def test_methods_run_the_kernels_through_dispatch(monkeypatch):
    """DivPrune, DART (+ merge) and Plan.apply call the dispatching ops: forced onto Triton, they give
    the torch path's plans and outputs."""
    features = torch.randn(2, 150, 24, generator=torch.Generator().manual_seed(0))
    torch_plans = [vtc.get_method(name, **kw).plan({"features": features}, 20) for name, kw in METHODS]
    torch_applied = [plan.apply(features) for plan in torch_plans]

    ran = []
    real = ops.use_triton

    def triton_for_auto(op, backend, *args, **kwargs):
        use = real(op, "triton" if backend == "auto" else backend, *args, **kwargs)
        if use:
            ran.append(op)
        return use

    monkeypatch.setattr(ops, "use_triton", triton_for_auto)
    for (name, kw), expected, applied in zip(METHODS, torch_plans, torch_applied, strict=True):
        plan = vtc.get_method(name, **kw).plan({"features": features}, 20)
        assert torch.equal(plan.kept, expected.kept), name
        assert (plan.merge_into is None) == (expected.merge_into is None)
        if plan.merge_into is not None:
            assert torch.equal(plan.merge_into, expected.merge_into)
        torch.testing.assert_close(plan.apply(features), applied, rtol=1e-5, atol=1e-5)
    assert {"maxmin_select", "pivot_select", "cosine_similarity", "gather_rows", "merge_rows"} <= set(ran)


def test_vtc_without_triton(tmp_path: Path):
    """With triton not importable, vtc imports and works, auto falls back to torch with one logged
    reason, and backend="triton" raises a clear error (a fresh process: nothing imported before)."""
    script = textwrap.dedent(
        """
        import json, logging, sys
        sys.modules["triton"] = None  # "import triton" now raises ImportError
        import torch
        import vtc
        from types import SimpleNamespace
        from vtc import kernels
        from vtc.kernels import dispatch, reference

        messages = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append((record.levelname, record.getMessage()))
        logging.getLogger("vtc.kernels").addHandler(handler)
        logging.getLogger("vtc.kernels").setLevel(logging.INFO)

        x = torch.randn(2, 63, 16)
        assert torch.equal(kernels.maxmin_select(x, 8), reference.maxmin_select(x, 8))
        assert vtc.select("dart", keep=8, features=x).shape == (2, 8)
        cuda = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float16)
        assert not dispatch.use_triton("gather_rows", "auto", (cuda,), (cuda,))
        assert not dispatch.use_triton("merge_rows", "auto", (cuda,), (cuda,))
        try:
            kernels.cosine_similarity(x, x, backend="triton")
        except RuntimeError as error:
            assert "triton is not importable" in str(error), error
        else:
            raise AssertionError("backend='triton' did not raise")
        assert sys.modules["triton"] is None
        print(json.dumps(messages))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    messages = [tuple(m) for m in json.loads(done.stdout.strip().splitlines()[-1])]
    assert [level for level, _ in messages] == ["INFO", "WARNING"], messages  # CPU reason, then CUDA without triton
    assert "tensors are on cpu" in messages[0][1]
    assert "triton is not importable" in messages[1][1] and "vtc[triton]" in messages[1][1]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_auto_takes_the_torch_op_where_it_was_measured_faster(monkeypatch, caplog):
    """fp32 cosine similarity ran at 0.15-0.23x of cuBLAS on an H200 (benchmarks/kernel_ops.py): auto takes torch
    there, logged at INFO (a choice, not a fault); backend="triton" still runs the kernel; fp16 keeps the kernel."""
    caplog.set_level(logging.INFO, logger="vtc.kernels")
    t = fake_cuda_tensor()
    assert not dispatch.use_triton("cosine_similarity", "auto", (t,), (t,), slower="cuBLAS is faster")
    assert dispatch.use_triton("cosine_similarity", "triton", (t,), (t,), slower="cuBLAS is faster")
    assert dispatch.use_triton("cosine_similarity", "auto", (t,), (t,))
    (record,) = [r for r in caplog.records if r.name == "vtc.kernels"]
    assert record.levelno == logging.INFO and "cuBLAS is faster" in record.getMessage()

    seen = {}

    def record_call(op, backend, tensors, floats=(), limit=None, slower=None):
        seen[floats[0].dtype] = slower
        return False

    monkeypatch.setattr(ops, "use_triton", record_call)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(1, 4, 8).to(dtype)
        kernels.cosine_similarity(x, x)
        kernels.nearest_kept(x, torch.tensor([[0, 2]]))
    assert seen[torch.float32] and seen[torch.float16] is None and seen[torch.bfloat16] is None
