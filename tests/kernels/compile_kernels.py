"""Compile vtc's Triton kernels for an NVIDIA GPU target without a GPU (ptxas ships with triton).

    python tests/kernels/compile_kernels.py [--arch 90] [--all]

The interpreter runs the kernels' Python semantics; this catches what only the compiler sees (types of
loop-carried values, constexpr branches, dot shapes, shared memory), including the fp16 / bf16
tensor-core dot that the interpreter does not run, with the tile sizes and warps the launchers use on
a GPU. Prints registers and spill stack per variant (cuobjdump); exit status 1 if one fails to compile.
Must run without TRITON_INTERPRET (tests/kernels/test_compile.py starts it in a fresh process).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels that this script compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vtc.kernels.triton import _utils, cosine, gather, maxmin, merge, pivot  # noqa: E402

I64, F32 = "*i64", "*fp32"
N, D = 2880, 4096  # LLaVA-NeXT-sized launch configurations


def variants(all_dtypes: bool) -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """(name, kernel, signature of the runtime arguments, constexprs, num_warps) to compile."""
    out = []
    dtypes = ["*fp32", "*fp16", "*bf16"] if all_dtypes else ["*fp32", "*bf16"]
    for xt in dtypes:
        native = xt != "*fp32"
        bm, bn, bd = cosine.blocks(N, N, D)
        sig = {"x_ptr": xt, "y_ptr": xt, "out_ptr": F32, "n": "i32", "m": "i32", "d": "i32", "stride_xb": "i64"}
        sig |= {"stride_xn": "i32", "stride_yb": "i64", "stride_yn": "i32"}
        consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "NATIVE_DOT": native}
        out.append((f"cosine {xt}", cosine._cosine_kernel, sig, consts, 8))
        for store in (True, False):
            cfg = maxmin.blocks(N, D, store)
            sig = {"x_ptr": xt, "sim_ptr": F32, "inv_ptr": F32, "nearest_ptr": F32, "n": "i32", "d": "i32"}
            sig |= {"stride_xb": "i64", "stride_xn": "i32"}
            consts = {"STORE_SIM": store, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
            consts |= {"BLOCK_D": cfg["BLOCK_D"], "NATIVE_DOT": native}
            out.append((f"maxmin nearest {xt}", maxmin._nearest_kernel, sig, consts, 8))
            sig = {"x_ptr": xt, "sim_ptr": F32, "inv_ptr": F32, "nearest_ptr": F32, "score_ptr": F32}
            sig |= {"protected_ptr": I64, "num_protected_ptr": I64, "order_ptr": I64, "out_ptr": I64}
            sig |= {"n": "i32", "d": "i32", "k": "i32", "stride_xb": "i64", "stride_xn": "i32"}
            consts = {"FROM_SIM": store, "HAS_PROTECTED": True, "BLOCK_N": cfg["PICK_N"], "BLOCK_D": cfg["PICK_D"]}
            out.append((f"maxmin pick {xt}", maxmin._pick_kernel, sig, consts, maxmin.pick_warps(cfg["PICK_N"])))
        cfg = pivot.blocks(N, 8, D)
        sig = {"x_ptr": xt, "pivots_ptr": I64, "sim_ptr": F32, "n": "i32", "p": "i32", "d": "i32"}
        sig |= {"stride_xb": "i64", "stride_xn": "i32", "stride_pb": "i32"}
        consts = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_P": 16, "BLOCK_D": cfg["BLOCK_D"], "NATIVE_DOT": native}
        out.append((f"pivot similarity {xt}", pivot._pivot_similarity_kernel, sig, consts, 4))
        bk, bd = gather.blocks(576, D)
        for varlen in (False, True):
            sig = {"x_ptr": xt, "idx_ptr": I64, "out_ptr": xt, "cu_x_ptr": I64, "cu_idx_ptr": I64}
            sig |= {"num_rows": "i32", "num_seqs": "i32", "d": "i32", "stride_xb": "i64", "stride_xn": "i32"}
            sig |= {"stride_ib": "i32", "stride_ob": "i64", "stride_on": "i32"}
            consts = {"VARLEN": varlen, "SEARCH_STEPS": 4, "BLOCK_K": bk, "BLOCK_D": bd}
            out.append((f"gather {xt}", gather._gather_kernel, sig, consts, 4))
        bn, bd = merge.blocks(N, D)
        sig = {"x_ptr": xt, "targets_ptr": I64, "sizes_ptr": I64, "sums_ptr": F32, "totals_ptr": F32}
        sig |= {"n": "i32", "k": "i32", "d": "i32", "stride_xb": "i64", "stride_xn": "i32"}
        sig |= {"stride_tb": "i32", "stride_sb": "i32"}
        consts = {"HAS_SIZES": True, "BLOCK_N": bn, "BLOCK_D": bd}
        out.append((f"merge scatter {xt}", merge._merge_scatter_kernel, sig, consts, 4))
        sig = {"sums_ptr": F32, "totals_ptr": F32, "out_ptr": xt, "rows_total": "i32", "d": "i32"}
        out.append((f"merge divide {xt}", merge._merge_divide_kernel, sig, {"BLOCK_K": bn, "BLOCK_D": bd}, 4))
    for tokens in (576, 8192) + ((pivot.MAX_TOKENS,) if all_dtypes else ()):
        block_n = triton.next_power_of_2(tokens)
        sig = {"sim_ptr": F32, "pivots_ptr": I64, "used_ptr": I64, "protected_ptr": "*i1", "out_ptr": I64}
        sig |= {"n": "i32", "p": "i32", "k": "i32", "stride_pb": "i32"}
        consts = {"HAS_PROTECTED": True, "BLOCK_N": block_n}
        out.append(("pivot pick", pivot._pivot_pick_kernel, sig, consts, pivot.pick_warps(block_n)))
    return out


def resource_usage(cubin: bytes) -> str:
    """'REG:n STACK:n' of a cubin (STACK > 0: registers spilled), or '' if cuobjdump is unavailable."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = next((line.split() for line in text.splitlines() if "REG:" in line), [])
    return " ".join(x for x in fields if x.startswith(("REG:", "STACK:")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 (A100), 90 (H100)")
    parser.add_argument("--all", action="store_true", help="every dtype (fp32, fp16, bf16) and the largest pivot row")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    todo = variants(args.all)
    failed = 0
    for name, kernel, signature, constexprs, warps in todo:
        source = ASTSource(kernel, signature | dict.fromkeys(constexprs, "constexpr"), constexprs=constexprs)
        start = time.perf_counter()
        try:
            options = {"num_warps": warps, "enable_fp_fusion": _utils.FP_FUSION}
            compiled = triton.compile(source, target=target, options=options)
        except Exception as error:
            failed += 1
            print(f"FAIL {name} {constexprs}: {type(error).__name__}: {error}")
            continue
        usage = resource_usage(compiled.asm["cubin"])
        took = time.perf_counter() - start
        print(f"ok   {name} {constexprs} warps={warps} shared={compiled.metadata.shared} {usage} ({took:.1f} s)")
    print(f"sm_{args.arch}: {failed} of {len(todo)} variants failed to compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
