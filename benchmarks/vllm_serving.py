"""vLLM with and without vtc's plugin: offline throughput and time to first token, side by side in one run.

    python benchmarks/vllm_serving.py [--shape llava-7b-shape|quick] [--methods divprune,uniform] [--keep 144,64]
                                      [--requests 24] [--rounds 5] [--no-save]

Runs in a venv with vLLM (``.ci/install_vllm VENV``). The model is e2e.py's LLaVA-1.5-7B shape scaled to a CPU: CLIP
336 px / 14 px (576 visual tokens), the vision tower about 4.6% of the language model's per-token FLOPs as in
LLaVA-1.5-7B (CLIP-L vs Vicuna-7B), random weights, saved once to ``--workdir`` with the shapes organism's word-level
tokenizer and a 336 px CLIP image processor. The language model dominates a request, as in every LLaVA-style VLM with
a 7B-or-larger language model, which is where dropping visual tokens pays. The prompt is LLaVA-1.5's length: ~60
text tokens around the 576 visual ones.

Per setting (uncompressed, then each method at each budget) one vLLM engine serves, in this process (the engine core
in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0), after a warm-up:
- throughput: ``--requests`` requests with distinct images (no encoder-cache or prefix-cache hits: prefix caching is
  off) in one ``LLM.generate`` call, ``--tokens`` greedy tokens each; requests/s, the median over ``--rounds``.
- time to first token: one request with a new image and one output token, wall time of ``LLM.generate``; the median
  over ``--rounds`` x 3 requests.
Settings run one after another (an engine each), so other load on the machine shows in the foreign-CPU column.
A full run appends one JSON row to benchmarks/results/vllm_serving.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np
import torch
from e2e import SHAPES, shaped_llava
from PIL import Image
from safetensors.torch import load_file, save_file
from selection import ForeignLoad, git_state, machine, median

from vtc import organisms

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "vllm_serving.jsonl"
SYSTEM = "a scene with shapes . " * 8  # LLaVA-1.5's system prompt is ~35 tokens: the organism's words stand in


def build(shape: str, workdir: Path) -> Path:
    """The shaped model as a checkpoint vLLM loads: random weights, the organism's tokenizer, a 336 px processor."""
    target = workdir / shape
    if (target / "config.json").exists():
        return target
    model, _ = shaped_llava(SHAPES[shape])
    source = organisms.path("shapes-llava")
    shipped = json.loads((source / "config.json").read_text())
    model.config.image_token_id = shipped.get("image_token_id", shipped.get("image_token_index"))
    model.save_pretrained(target)
    # transformers 5 saves CLIP's tower flat (vision_tower.embeddings...); vLLM 0.32 loads the hub checkpoints' nested
    # layout (vision_tower.vision_model.embeddings...), which the organisms and LLaVA-1.5's releases have.
    weights = load_file(target / "model.safetensors")
    nested = {
        re.sub(r"vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", k): v for k, v in weights.items()
    }
    save_file(nested, target / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(source / name, target / name)
    processor = json.loads((source / "processor_config.json").read_text())
    processor["image_processor"]["crop_size"] = {"height": 336, "width": 336}
    processor["image_processor"]["size"] = {"shortest_edge": 336}
    processor["patch_size"] = 14
    (target / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return target


def images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(count)]


def run_setting(path: Path, setting: dict | None, args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    from vtc import loading
    from vtc.eval.runner import prompt

    processor = loading.load_processor(path)
    text = prompt(processor, SYSTEM + "how many shapes are there ?")
    llm = LLM(
        model=str(path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=False,
        hf_overrides={"vtc": setting} if setting else None,
        seed=0,
    )
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1)
    seed = [1000]

    def batch(count: int, params) -> tuple[float, list]:
        seed[0] += 1
        requests = [{"prompt": text, "multi_modal_data": {"image": im}} for im in images(count, seed[0])]
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        return time.perf_counter() - start, outputs

    batch(4, greedy)  # warm-up
    load = ForeignLoad()
    load.start()
    throughput, ttft, prompt_tokens = [], [], None
    for _ in range(args.rounds):
        seconds, outputs = batch(args.requests, greedy)
        throughput.append(args.requests / seconds)
        prompt_tokens = len(outputs[0].prompt_token_ids)
        ttft += [batch(1, first)[0] for _ in range(3)]
    foreign = load.stop()
    llm.llm_engine.engine_core.shutdown()
    return {
        "setting": setting or "none",
        "prompt_tokens": prompt_tokens,
        "requests_per_s": median(throughput),
        "ttft_ms": median(ttft) * 1e3,
        "foreign_cpu": foreign,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llava-7b-shape", choices=["llava-7b-shape", "quick"])
    parser.add_argument("--methods", default="divprune,uniform")
    parser.add_argument("--keep", default="144,64", help="visual tokens kept of 576 (144: 25%%, 64: 11%%)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=8, help="output tokens per request in the throughput runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/vtc-vllm-bench")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    import vllm

    path = build(args.shape, Path(args.workdir))
    settings = [None] + [{"method": m, "keep": int(k)} for k in args.keep.split(",") for m in args.methods.split(",")]
    rows = []
    for setting in settings:
        rows.append(run_setting(path, setting, args))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print(f"\n{'setting':<28} {'prompt':>6} {'req/s':>7} {'x':>6} {'TTFT ms':>8} {'x':>6} {'foreign CPU':>11}")
    for row in rows:
        name = "none" if row["setting"] == "none" else f"{row['setting']['method']} keep={row['setting']['keep']}"
        print(
            f"{name:<28} {row['prompt_tokens']:>6} {row['requests_per_s']:>7.2f} "
            f"{row['requests_per_s'] / base['requests_per_s']:>5.2f}x {row['ttft_ms']:>8.0f} "
            f"{base['ttft_ms'] / row['ttft_ms']:>5.2f}x {row['foreign_cpu'] or 0:>10.1f}%"
        )
    if any((row["foreign_cpu"] or 0) > 5 for row in rows):
        print("warning: the machine was not idle; rerun with nothing else running before trusting these numbers")
    if not args.no_save:
        record = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "shape": args.shape,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "machine": machine(torch.device("cpu")),
            "git": git_state(),
            "rows": rows,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
