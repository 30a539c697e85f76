"""In-LLM dropping: prefill time and KV-cache bytes at several schedules, against the uncompressed model.

    python benchmarks/layerwise.py [--device cpu|cuda] [--repeats R] [--quick] [--no-save]

A random-weight LLaVA-shaped model (vtc.tiny.tiny_llava; an 8-layer language model that dominates the
forward, 2 vision layers) gets one prompt with one 576-token image. Each configuration below runs
the same full forward with use_cache=True (vision tower + LLM prefill, vtc's hooks and selection
included); the table shows the median time, the speed-up, the KV-cache bytes after the prefill (all
layers, keys + values), the visual tokens at the input of every LLM layer, and vtc's FLOPs estimate
of the LLM prefill (handle.stats["prefill_flops"]). Candidates are timed interleaved, call by call.
A full run appends one JSON row to benchmarks/results/layerwise.jsonl. Run on an idle machine: the
share of CPU other processes took is measured and printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from selection import ForeignLoad, git_state, machine, median, time_interleaved

import vtc
from vtc.tiny import tiny_llava, tiny_llava_inputs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "layerwise.jsonl"

FULL = {
    "repeats": 15,
    "warmup": 2,
    "model": {"hidden_size": 512, "text_layers": 8, "vision_layers": 2, "heads": 8, "intermediate_size": 1376},
    "text_lengths": (35, 20),
}
QUICK = {
    "repeats": 3,
    "warmup": 1,
    "model": {"hidden_size": 128, "text_layers": 8, "vision_layers": 2, "heads": 4, "intermediate_size": 344},
    "text_lengths": (35, 20),
}
# name -> (method(s), keep): pre-LLM for reference, each in-LLM method, and a two-stage composition.
CONFIGS: dict[str, tuple[Any, Any]] = {
    "divprune 64 (pre-LLM)": ("divprune", 64),
    "fastv K=2, 192": ("fastv", 192),
    "fastv K=2, 64": ("fastv", 64),
    "pdrop 288/144/72": ("pdrop", 72),
    "dart_llm K=2, 64": ("dart_llm", 64),
    "adaptive p=0.9, floor 32": ("adaptive", 32),
    "divprune 192 -> fastv 64": (["divprune", "fastv"], [192, 64]),
}


def kv_bytes(cache: Any) -> int:
    """Bytes of all keys and values held by a DynamicCache (transformers 5.x layers or 4.x lists); a linear-attention
    layer's (Qwen3.5) convolution and recurrent states count too, as what the cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = []
        for layer in layers:
            tensors += [getattr(layer, name, None) for name in ("keys", "values")]
            for name in ("conv_states", "recurrent_states"):
                states = getattr(layer, name, None)
                tensors += list(states.values() if isinstance(states, dict) else states or [])
        tensors = [t for t in tensors if torch.is_tensor(t)]
    else:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors)


def run(cfg: dict[str, Any], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    model = tiny_llava(vocab_size=1024, **cfg["model"]).to(device)
    inputs = {k: v.to(device) for k, v in tiny_llava_inputs(model, text_lengths=(cfg["text_lengths"],)).items()}

    def forward() -> Any:
        with torch.no_grad():
            return model(**inputs, use_cache=True)

    handles: dict[str, Any] = {}
    measured: dict[str, dict[str, Any]] = {}

    def attach(name: str):
        def setup():
            if name != "none":
                method, keep = CONFIGS[name]
                handles[name] = vtc.compress(model, method, keep=keep)
            return lambda: handles.pop(name).remove() if name in handles else None

        return setup

    names = ["none", *CONFIGS]
    for name in names:  # one untimed run each, for bytes and counts
        teardown = attach(name)()
        out = forward()
        stats = handles[name].stats if name in handles else None
        measured[name] = {
            "kv_bytes": kv_bytes(out.past_key_values),
            "visual_per_layer": stats["visual_tokens_per_layer"][0] if stats else None,
            "flops_ratio": stats["prefill_flops"]["ratio"] if stats else 1.0,
        }
        teardown()
    samples = time_interleaved(
        {name: forward for name in names}, repeats, warmup, device, setup={name: attach(name) for name in names}
    )
    base = median(samples["none"])
    for name in names:
        ms = median(samples[name])
        measured[name].update({"ms": ms, "speedup": base / ms})
    return {"model": cfg["model"], "tokens": int(inputs["attention_mask"].sum()), "results": measured}


def print_table(result: dict[str, Any], info: dict[str, Any], repeats: int) -> None:
    print(
        f"\nLLaVA-shaped model {result['model']}, one image, {result['tokens']} prompt tokens; "
        f"{info['device_name']}, median of {repeats}"
    )
    none = result["results"]["none"]
    print(
        "| configuration | prefill ms | speed-up | KV cache MB | KV vs full | LLM FLOPs vs full "
        "| visual tokens per layer |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in result["results"].items():
        layers = "576 (all)" if r["visual_per_layer"] is None else "/".join(map(str, r["visual_per_layer"]))
        print(
            f"| {name} | {r['ms']:.1f} | {r['speedup']:.2f}x | {r['kv_bytes'] / 2**20:.2f} | "
            f"{r['kv_bytes'] / none['kv_bytes']:.2f} | {r['flops_ratio']:.2f} | {layers} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small model, 3 repeats, nothing saved")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    repeats = args.repeats or cfg["repeats"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    info = machine(device)
    load = ForeignLoad().start()
    started = time.perf_counter()
    result = run(cfg, device, repeats, cfg["warmup"])
    foreign = load.stop()
    print_table(result, info, repeats)
    print(
        f"\ntorch {torch.__version__}, transformers {transformers.__version__}; other processes' CPU use during the "
        f"run: {'unknown' if foreign is None else f'{foreign:.1f}%'}; took {time.perf_counter() - started:.1f} s"
    )
    if foreign is not None and foreign > 5:
        print("warning: the machine was not idle; rerun with nothing else running before trusting these numbers")
    if not args.quick and not args.no_save:
        row = {
            "benchmark": "layerwise",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": info,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "git": git_state(),
            "foreign_cpu_percent": foreign,
            "repeats": repeats,
            **result,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
