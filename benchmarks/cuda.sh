#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine with torch, triton and transformers installed (no install step, no
# network): the kernels' tests and benchmark (benchmarks/kernel_ops.py runs tests/kernels first and records nothing if
# one fails), then the end-to-end benchmark on a full-size LLaVA-1.5-7B (random bf16 weights).
#
#     bash benchmarks/cuda.sh [OUT_DIR]     # default benchmarks/results; logs and JSONL rows land there
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())" || exit 1

timeout "${KERNELS_TIMEOUT:-260}" python3 benchmarks/kernel_ops.py --out "$out/kernels.jsonl" 2>&1 \
    | tee "$out/kernel_ops.log" || status=1
timeout "${E2E_TIMEOUT:-240}" python3 benchmarks/e2e.py --model llava-1.5-7b --device cuda \
    --out "$out/e2e.jsonl" --plot "$out/e2e-cuda.png" 2>&1 | tee "$out/e2e-cuda.log" || status=1
exit $status
