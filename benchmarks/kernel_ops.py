"""Triton kernels against the torch reference ops on a CUDA GPU, and what selection costs next to a prefill.

    python benchmarks/kernel_ops.py             # full run (CUDA): kernel tests first, then appends a row
    python benchmarks/kernel_ops.py --quick     # fewer shapes, 4 LLM layers, nothing saved
    python benchmarks/kernel_ops.py --smoke     # CPU, Triton interpreter, tiny shapes: the script's code
                                                # paths only (timings meaningless), nothing saved

Part 1: every op of vtc.kernels, backend="triton" against backend="torch", on LLaVA-1.5 (N=576),
LLaVA-NeXT (N=2880) and Qwen2-VL-large (N=8192) shapes in fp16 (model dtype) and fp32 (the dtype the
methods pass: signals are upcast). Medians of triton.testing.do_bench (which clears L2 between calls).
The achieved memory bandwidth counts each op's minimum traffic (inputs read once, outputs written
once) against the device's measured copy bandwidth (a 1 GiB device-to-device copy). Results are
compared: selections must equal the reference's ("same" column).

Part 2: the language model of LLaVA-1.5-7B (Llama-2-7B shape, random fp16 weights, SDPA), prefill of
640 tokens (576 visual + 64 text) and of 128 (64 kept); each kernel-backed method's plan() (+ apply)
on fp16 features [1, 576, 4096], triton against torch, as a share of the prefill and of the time saved.

Without CUDA (and without --smoke) it prints why and exits with status 0, measuring nothing.
"""

from __future__ import annotations

import sys

if "--smoke" in sys.argv:  # before anything imports triton (its interpreter is chosen at import)
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "kernels.jsonl"

# (name, batch, tokens, feature dim, kept)
FULL_SHAPES = [
    ("llava-1.5", 1, 576, 4096, 64),
    ("llava-1.5 x8", 8, 576, 4096, 64),
    ("llava-next", 1, 2880, 4096, 288),
    ("qwen2-vl 8k", 1, 8192, 3584, 819),
]
QUICK_SHAPES = FULL_SHAPES[:1] + FULL_SHAPES[2:3]
SMOKE_SHAPES = [("tiny", 2, 63, 32, 8)]
# Recomputing distances per pick (maxmin materialize=False) costs k N D on one SM: only where that is seconds at most.
ON_THE_FLY_MAX_TOKENS = 2880
# LLaVA-1.5-7B's language model (Vicuna-7B = Llama-2-7B shape).
LLM_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
LLM_SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT_TOKENS = 64


# -- timing -------------------------------------------------------------------------------------------------


def make_timer(device: torch.device, smoke: bool) -> Callable[[Callable[[], Any]], float]:
    """fn -> median milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_median(fn: Callable[[], Any]) -> float:
        fn()
        samples = []
        for _ in range(3 if smoke else 10):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return cpu_median


def copy_bandwidth(device: torch.device, timer: Callable[[Callable[[], Any]], float], smoke: bool) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    nbytes = 2**22 if smoke else 2**30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


@contextlib.contextmanager
def auto_means(backend: str) -> Iterator[None]:
    """The methods call the ops with backend="auto"; time them on one backend explicitly (on CPU in a
    smoke run "triton" means the interpreter; a backend that cannot run raises instead of falling back)."""
    from vtc.kernels import ops

    real = ops.use_triton
    ops.use_triton = lambda op, be, *args, **kwargs: real(op, backend if be == "auto" else be, *args, **kwargs)
    try:
        yield
    finally:
        ops.use_triton = real


# -- part 1: ops --------------------------------------------------------------------------------------------


def same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if exact:
        return bool(torch.equal(a, b))
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2))


def op_cases(name: str, b: int, n: int, d: int, k: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Each op on one shape: callables for both backends and its minimum memory traffic in bytes."""
    from vtc import kernels
    from vtc.kernels.triton import maxmin

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=g).to(device=device, dtype=dtype)
    size = x.element_size()
    kept = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)]).to(device)
    pivots = torch.stack([torch.randperm(n, generator=g)[:8] for _ in range(b)]).to(device)
    targets = kernels.nearest_kept(x, kept, backend="torch")
    shape = f"{name} B{b} N{n} D{d} K{k}"

    def case(op: str, fn: Callable[[str], torch.Tensor], nbytes: int, exact: bool, flops: int = 0) -> dict:
        return {"op": op, "shape": shape, "fn": fn, "bytes": nbytes, "exact": exact, "flops": flops}

    cases = [
        case("cosine_similarity", lambda be: kernels.cosine_similarity(x, x, backend=be),
             x.numel() * size + b * n * n * 4, False, 2 * b * n * n * d),
        case("maxmin_select", lambda be: kernels.maxmin_select(x, k, backend=be), x.numel() * size, True,
             2 * b * n * n * d),
        case("pivot_select", lambda be: kernels.pivot_select(x, pivots, k, backend=be), x.numel() * size, True,
             2 * b * n * 8 * d),
        case("gather_rows", lambda be: kernels.gather_rows(x, kept, backend=be), 2 * b * k * d * size + b * k * 8,
             True),
        case("merge_rows", lambda be: kernels.merge_rows(x, kept, targets, backend=be),
             x.numel() * size + b * n * 8 + b * k * d * size, False),
        case("nearest_kept", lambda be: kernels.nearest_kept(x, kept, backend=be), x.numel() * size, True,
             2 * b * n * k * d),
    ]  # fmt: skip
    if n <= ON_THE_FLY_MAX_TOKENS:
        cases.append(
            case(
                "maxmin_select (on the fly)",
                lambda be: (
                    maxmin.maxmin_select(x, k, materialize=False)
                    if be == "triton"
                    else kernels.maxmin_select(x, k, backend="torch")
                ),
                x.numel() * size,
                True,
            )
        )
    return cases


def varlen_case(dtype: torch.dtype, device: torch.device, smoke: bool) -> dict:
    """Packed images of different sizes (Qwen2-VL-like), 10% kept each."""
    from vtc import kernels

    lengths = [63, 20, 1] if smoke else [576, 2880, 1200, 64, 8192]
    keeps = [max(1, n // 10) for n in lengths]
    d = 32 if smoke else 3584
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), d, generator=g).to(device=device, dtype=dtype)
    idx = torch.cat([torch.randperm(n, generator=g)[:kk].sort().values for n, kk in zip(lengths, keeps, strict=True)])
    idx = idx.to(device)
    cu = torch.tensor([0, *lengths], device=device).cumsum(0)
    cu_idx = torch.tensor([0, *keeps], device=device).cumsum(0)
    total = sum(keeps)
    return {
        "op": "gather_rows_varlen",
        "shape": f"packed N={'+'.join(map(str, lengths))} D{d} K{total}",
        "fn": lambda be: kernels.gather_rows_varlen(x, cu, idx, cu_idx, backend=be),
        "bytes": 2 * total * d * x.element_size() + total * 8,
        "exact": True,
        "flops": 0,
    }


def bench_ops(shapes: list, dtypes: list, device: torch.device, timer, copy_gbps: float, smoke: bool) -> list[dict]:
    rows = []
    for dtype in dtypes:
        cases = [c for name, b, n, d, k in shapes for c in op_cases(name, b, n, d, k, dtype, device)]
        cases.append(varlen_case(dtype, device, smoke))
        for c in cases:
            expected = c["fn"]("torch")
            got = c["fn"]("triton")
            triton_ms = timer(lambda c=c: c["fn"]("triton"))
            torch_ms = timer(lambda c=c: c["fn"]("torch"))
            gbps = c["bytes"] / triton_ms / 1e6
            rows.append(
                {
                    "op": c["op"],
                    "shape": c["shape"],
                    "dtype": str(dtype).removeprefix("torch."),
                    "triton_ms": triton_ms,
                    "torch_ms": torch_ms,
                    "speedup": torch_ms / triton_ms,
                    "min_bytes": c["bytes"],
                    "triton_gbps": gbps,
                    "fraction_of_copy_bandwidth": gbps / copy_gbps,
                    "triton_tflops": c["flops"] / triton_ms / 1e9 if c["flops"] else None,
                    "same_result": same(got, expected, c["exact"]),
                }
            )
            print_op_row(rows[-1])
            del expected, got
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def print_op_header(copy_gbps: float) -> None:
    print(f"\nPart 1: ops, triton vs torch; device copy bandwidth {copy_gbps:.0f} GB/s")
    print(
        f"{'op':<27} | {'shape':<36} | {'dtype':<8} | {'triton ms':>9} | {'torch ms':>9} | {'speed-up':>8} | "
        f"{'GB/s':>7} | {'% copy':>6} | {'TFLOP/s':>7} | same"
    )


def print_op_row(r: dict) -> None:
    tflops = "-" if r["triton_tflops"] is None else f"{r['triton_tflops']:.1f}"
    print(
        f"{r['op']:<27} | {r['shape']:<36} | {r['dtype']:<8} | {r['triton_ms']:>9.3f} | {r['torch_ms']:>9.3f} | "
        f"{r['speedup']:>7.2f}x | {r['triton_gbps']:>7.1f} | {100 * r['fraction_of_copy_bandwidth']:>5.1f}% | "
        f"{tflops:>7} | {'yes' if r['same_result'] else 'NO'}",
        flush=True,
    )


# -- part 2: selection next to a prefill ----------------------------------------------------------------------


def time_prefill(shape: dict[str, int], lengths: tuple[int, ...], device: torch.device, timer) -> list[float]:
    """Median ms of a no-cache forward of a random Llama decoder of ``shape`` on inputs_embeds of each length."""
    from transformers import LlamaConfig, LlamaModel

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    config = LlamaConfig(**shape, vocab_size=32064, max_position_embeddings=4096, attn_implementation="sdpa")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in place, in the model dtype (7B: 13.5 GB in fp16)
    try:
        with torch.device(device):
            model = LlamaModel(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    g = torch.Generator().manual_seed(0)
    times = []
    for length in lengths:
        embeds = torch.randn(1, length, shape["hidden_size"], generator=g).to(device, dtype)

        def run(embeds: torch.Tensor = embeds) -> Any:
            with torch.no_grad():
                return model(inputs_embeds=embeds, use_cache=False)

        times.append(timer(run))
    return times


def bench_prefill(device: torch.device, timer, smoke: bool, layers: int | None) -> dict[str, Any]:
    import vtc

    shape = dict(LLM_SMOKE if smoke else LLM_7B)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    n, keep = (63, 8) if smoke else (576, 64)
    full_len, kept_len = n + TEXT_TOKENS, keep + TEXT_TOKENS
    full_ms, kept_ms = time_prefill(shape, (full_len, kept_len), device, timer)
    saved_ms = full_ms - kept_ms
    if device.type == "cuda":
        torch.cuda.empty_cache()

    g = torch.Generator().manual_seed(1)
    d = 32 if smoke else 4096
    features = torch.randn(1, n, d, generator=g).to(device, dtype)
    methods = [("divprune", {}), ("dart", {}), ("dart", {"merge": True}), ("fastervlm", {})]
    cls_attention = torch.rand(1, n, generator=g).softmax(-1).to(device)
    rows = []
    for name, options in methods:
        method = vtc.get_method(name, **options)
        signals = {"cls_attention": cls_attention} if name == "fastervlm" else {"features": features}

        def select(method=method, signals=signals) -> Any:
            with torch.no_grad():
                return method.plan(signals, keep).apply(features)

        with auto_means("triton"):
            triton_ms = timer(select)
        with auto_means("torch"):
            torch_ms = timer(select)
        label = name + ("(merge=True)" if options else "")
        rows.append(
            {
                "method": label,
                "triton_ms": triton_ms,
                "torch_ms": torch_ms,
                "triton_pct_of_prefill": 100 * triton_ms / full_ms,
                "torch_pct_of_prefill": 100 * torch_ms / full_ms,
                "triton_pct_of_saved": 100 * triton_ms / saved_ms if saved_ms > 0 else None,
                "torch_pct_of_saved": 100 * torch_ms / saved_ms if saved_ms > 0 else None,
            }
        )
    return {
        "llm": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": {"uncompressed": full_len, "kept": kept_len, "visual": n, "keep": keep},
        "prefill_ms": full_ms,
        "prefill_kept_ms": kept_ms,
        "saved_ms": saved_ms,
        "selection": rows,
    }


def print_prefill(result: dict[str, Any]) -> None:
    s, t = result["llm"], result["tokens"]
    print(
        f"\nPart 2: LLaVA-1.5-7B-shaped language model ({s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
        f"{result['dtype']}, SDPA): prefill {t['uncompressed']} tokens {result['prefill_ms']:.2f} ms, "
        f"{t['kept']} tokens (keep {t['keep']} of {t['visual']}) {result['prefill_kept_ms']:.2f} ms, "
        f"saved {result['saved_ms']:.2f} ms"
    )
    print(f"{'method (plan + apply)':<24} | {'triton ms':>9} | {'torch ms':>9} | {'% prefill':>17} | {'% saved':>17}")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}%"

    for r in result["selection"]:
        print(
            f"{r['method']:<24} | {r['triton_ms']:>9.3f} | {r['torch_ms']:>9.3f} | "
            f"{pct(r['triton_pct_of_prefill']):>8} {pct(r['torch_pct_of_prefill']):>8} | "
            f"{pct(r['triton_pct_of_saved']):>8} {pct(r['torch_pct_of_saved']):>8}"
        )
    print("(% columns: triton, then torch)")


# -- run ----------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return info


def versions() -> dict[str, str]:
    import transformers
    import triton

    import vtc

    return {
        "vtc": vtc.__version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", ".", ":!benchmarks/results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def run_tests() -> bool:
    print("running tests/kernels before recording results (results are refused while tests fail) ...", flush=True)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" / "kernels")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    print("\n".join(lines[-1:] if done.returncode == 0 else lines[-30:]))
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, 4 LLM layers, nothing saved")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes, nothing saved")
    parser.add_argument("--llm-layers", type=int, default=None, help="decoder layers of the prefill model (default 32)")
    parser.add_argument("--out", type=Path, default=None, help=f"JSONL to append to (default {RESULTS})")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--skip-tests", action="store_true", help="do not run tests/kernels first (implies --no-save)")
    args = parser.parse_args(argv)

    if not args.smoke and not torch.cuda.is_available():
        print(
            "benchmarks/kernel_ops.py times the Triton kernels on a CUDA GPU, and torch sees none here "
            "(torch.cuda.is_available() is False): nothing measured, nothing written. Run it on a CUDA machine "
            "with `pip install -e '.[dev]'` (triton included), or `--smoke` to check the script on CPU."
        )
        return 0
    try:
        import triton  # noqa: F401
    except ImportError as error:
        print(f"triton is not importable ({error}): pip install -e '.[triton]'")
        return 1

    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else FULL_SHAPES
    dtypes = [torch.float32] if args.smoke else [torch.float16, torch.float32]
    layers = args.llm_layers if args.llm_layers is not None else (4 if args.quick else None)
    default_out = None if (args.quick or args.smoke) else RESULTS
    out = args.out if args.out is not None else default_out
    save = out is not None and not args.no_save and not (args.skip_tests and not args.smoke)
    if save and not args.smoke and not run_tests():
        print("tests fail: no result recorded. Fix them, or pass --no-save to only print timings.")
        return 1

    info, vers = machine(device), versions()
    print(f"{info.get('device_name', 'cpu (smoke run: interpreter timings mean nothing)')}; " + ", ".join(
        f"{k} {v}" for k, v in vers.items()))  # fmt: skip
    started = time.perf_counter()
    timer = make_timer(device, args.smoke)
    copy_gbps = copy_bandwidth(device, timer, args.smoke)
    print_op_header(copy_gbps)
    ops_rows = bench_ops(shapes, dtypes, device, timer, copy_gbps, args.smoke)
    prefill = bench_prefill(device, timer, args.smoke, layers)
    print_prefill(prefill)
    elapsed = time.perf_counter() - started
    print(f"\ntook {elapsed:.0f} s")
    mismatched = [f"{r['op']} {r['shape']} {r['dtype']}" for r in ops_rows if not r["same_result"]]
    if mismatched:
        print("warning: triton and torch results differ for: " + "; ".join(mismatched))

    row = {
        "benchmark": "kernels",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "versions": vers,
        "git": git_state(),
        "tests": "passed" if save and not args.smoke else "not run",
        "quick": args.quick,
        "smoke": args.smoke,
        "timing": "triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median",
        "seconds": elapsed,
        "copy_bandwidth_gbps": copy_gbps,
        "ops": ops_rows,
        "prefill": prefill,
    }
    if save:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"appended a row to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
