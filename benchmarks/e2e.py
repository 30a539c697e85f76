"""End to end: where the time of one VLM request goes, with and without vtc, against the Amdahl bound.

    python benchmarks/e2e.py [--model llava-7b-shape|tiny-FAMILY|shapes-llava|DIR|HUB_ID] [--device cpu|cuda]
                             [--methods M,...] [--keep 576,192,128,64] [--repeats R] [--quick] [--no-save]
                             [--video T,H,W | --video F]

``--video``: the prompt holds one video instead of the image, and ``--keep`` is tokens per video. tiny-qwen2-vl,
tiny-qwen2.5-vl, tiny-qwen3-vl: ``T,H,W``, T temporal patches (2 frames each) of H x W patches (T * H * W / 4 visual
tokens); tiny-llava-onevision: ``F`` frames at the tower's size (F * 14 * 14 tokens after the 2 x 2 pooling, and a
newline).

For each method at each budget, one ``generate()`` of ``--decode-tokens`` new tokens (greedy, no early stop) is
split by timing hooks into: vision encoder (tower + projector, vtc's signal hooks included), selection (vtc's
language-model pre-hook: planning and dropping; in-LLM methods select inside the prefill instead), LLM prefill, time
to first token (from the generate() call to the end of the first forward), and decode tokens/s. Peak memory is the
most memory allocated during the generate() call above what was live before it (CUDA: the allocator's peak; CPU:
torch's profiler, from every allocation and free); KV-cache bytes are those held after the prefill.

The Amdahl bound of keeping K visual tokens is, round by round, the uncompressed request's time to first token with its
LLM prefill replaced by the bound's prefill: TTFT(none) - LLM prefill(none) + bound prefill(K), the median over rounds.
Vision and the rest of the request (generate()'s set-up, the embedding, the last token's logits) stay as uncompressed;
selection is free. The bound's prefill is one call of the language model (decoder stack) with exactly the call vtc's
pre-LLM dropping makes at K: recorded by a forward pre-hook behind vtc's in a compressed prefill (BOUND_METHOD), it has
the same keyword arguments, dtypes and shapes (text + K tokens, vtc's 2-D attention mask and position ids, the cache
class generate() passes, empty: a fresh copy each call), and is timed in the timed rounds right before each run at K,
after the same warm-up. Each row records its prefill's call (``prefill_call``) and the bound's (``bound_call``) as
name -> dtype[shape]; they are equal for pre-LLM methods. "of bound" is bound time / achieved time: 100% = vtc costs
nothing beyond the shorter prompt; pre-LLM methods sit below it by their selection and hooks (and noise); in-LLM
methods cannot reach it, since their first layers still see every token.

Default model: a LLaVA-1.5-7B-shaped config scaled down to run on a CPU in minutes: CLIP 336 px / 14 px patches (576
visual tokens + [CLS]), the vision tower about 4.6% of the LLM's per-token FLOPs as in LLaVA-1.5-7B (CLIP-L 0.30
GFLOP vs Vicuna-7B 6.5 GFLOP per token), random weights. Settings are timed interleaved, round by round, after
warm-up rounds. A full run appends one JSON row to benchmarks/results/e2e.jsonl and draws benchmarks/results/e2e.png.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from layerwise import kv_bytes
from selection import ForeignLoad, git_state, machine, median

import vtc
from vtc.llm.prefill import output_cache
from vtc.tiny import TINY_MODELS, tiny_llava_onevision_inputs, tiny_model, tiny_qwen_inputs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "e2e.jsonl"
PLOT = ROOT / "benchmarks" / "results" / "e2e.png"
DEFAULT_METHODS = (
    "fastervlm",
    "vtc_cls",
    "divprune",
    "dart",
    "random",
    "uniform",
    "fastv",
    "pdrop",
    "dart_llm",
    "adaptive",
)
# The bound's prefill call is recorded from this method's: every pre-LLM method hands the language model the same call
# at a budget (text + K tokens, vtc's mask and position ids); uniform needs no signal, so it runs on every adapter.
BOUND_METHOD = "uniform"
# Tiny models whose prompt can hold a video, and the numbers --video takes for them.
VIDEO_MODELS = {"tiny-qwen2-vl": 3, "tiny-qwen2.5-vl": 3, "tiny-qwen3-vl": 3, "tiny-llava-onevision": 1}
# LLaVA-1.5-7B: CLIP-L/14-336 (24 x 1024) + Vicuna-7B (32 x 4096, FFN 11008). Scaled: same visual token count and
# vision / LLM FLOP ratio (4.6%), widths / 5.3, fewer layers.
SHAPES = {
    "llava-7b-shape": {
        "vision": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 4},
        "text": {"hidden_size": 768, "intermediate_size": 2064, "num_hidden_layers": 8, "num_attention_heads": 8},
        "text_lengths": (35, 25),  # LLaVA-1.5's system prompt + a short question: ~640 prompt tokens in all
    },
    # LLaVA-1.5-7B at full size (CLIP-L/14-336 + Vicuna-7B), random bf16 weights, built on the device: for a GPU.
    "llava-1.5-7b": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
        "text_lengths": (35, 25),
        "dtype": torch.bfloat16,
    },
    "quick": {
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
        "text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4},
        "text_lengths": (10, 5),
    },
}


def shaped_llava(shape: dict[str, Any], device: torch.device | str = "cpu"):
    """A random-weight LLaVA-1.5-shaped model with separate vision and text widths, built on ``device``, and a
    matching prompt."""
    from transformers import CLIPVisionConfig

    from vtc.tiny import llava_from_config, tiny_llava_config, tiny_llava_inputs

    text = shape["text"]
    config = tiny_llava_config(
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        text_layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        vocab_size=1024,
    )
    config.text_config.num_key_value_heads = text["num_attention_heads"]  # Vicuna-7B has no grouped-query attention
    config.vision_config = CLIPVisionConfig(
        image_size=336, patch_size=14, projection_dim=text["hidden_size"], **shape["vision"]
    )
    with torch.device(device):
        model = llava_from_config(config, seed=0, dtype=shape.get("dtype", torch.float32))
    return model, tiny_llava_inputs(model, text_lengths=(shape["text_lengths"],))


def loaded_model(name: str, image: str | None, prompt: str, device: torch.device):
    """A supported model by organism name, local directory or hub id, with one image + prompt from its processor."""
    from PIL import Image

    from vtc import loading
    from vtc.organisms import scenes

    model, processor = loading.load(name, device=device)
    picture = Image.open(image).convert("RGB") if image else scenes.scene("test", 0).image
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return model, dict(processor(images=[picture], text=[text], return_tensors="pt"))


def parts(model) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(vision start, vision end, language model) of a LLaVA / LLaVA-NeXT / Qwen2-VL model."""
    base = model.model
    if hasattr(base, "vision_tower"):
        return base.vision_tower, base.multi_modal_projector, base.language_model
    return base.visual, base.visual, base.language_model


class Stopwatch:
    """Timestamps from forward hooks: each top-level forward, the vision encoder, vtc's language-model pre-hook, and
    vtc's hooks on every decoder layer.

    Attach AFTER vtc.compress: each "starts" pre-hook is prepended (runs before vtc's), each "ends" one appended
    (runs after vtc's), so their difference is vtc's hook: planning and dropping before the decoder stack
    (selection), signals and dropping at a decoder layer's input (layer hooks; a layer's attention is timed in the
    layer, as are the forward hooks in-LLM methods put on its projections to keep what they compute).
    """

    def __init__(self, model, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        vision_in, vision_out, language = parts(model)
        self.marks: list[tuple[str, float]] = []
        self.prefill_over = False
        hooks = [
            model.register_forward_hook(lambda *_: self.mark("forward_end")),
            vision_in.register_forward_pre_hook(lambda *_: self.mark("vision_start")),
            vision_out.register_forward_hook(lambda *_: self.mark("vision_end")),
            language.register_forward_pre_hook(lambda *_: self.mark("select_start"), prepend=True),
            language.register_forward_pre_hook(lambda *_: self.mark("prefill_start")),
            language.register_forward_hook(lambda *_: self.language_ends()),
        ]
        for layer in language.layers:  # marked in the prefill only: a decode step is timed as a whole
            hooks.append(
                layer.register_forward_pre_hook(lambda *_: self.prefill_mark("layer_hook_start"), prepend=True)
            )
            hooks.append(layer.register_forward_pre_hook(lambda *_: self.prefill_mark("layer_hook_end")))
        self.hooks = hooks

    def mark(self, name: str) -> None:
        self.sync()
        self.marks.append((name, time.perf_counter()))

    def prefill_mark(self, name: str) -> None:
        if not self.prefill_over:
            self.mark(name)

    def language_ends(self) -> None:
        self.mark("language_end")
        self.prefill_over = True

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def split(self, began: float, ended: float) -> dict[str, float]:
        """Milliseconds of each part of one generate() call that started at ``began``."""
        first = {}
        for name, t in self.marks:
            first.setdefault(name, t)
        forwards = [t for name, t in self.marks if name == "forward_end"]
        vision_start = min(t for name, t in self.marks if name == "vision_start")
        vision_end = max(t for name, t in self.marks if name == "vision_end")
        decode_s = forwards[-1] - forwards[0]
        prefill = [(name, t) for name, t in self.marks if first["prefill_start"] <= t <= first["language_end"]]
        starts = [t for name, t in prefill if name == "layer_hook_start"]
        ends = [t for name, t in prefill if name == "layer_hook_end"]
        return {
            "vision_ms": (vision_end - vision_start) * 1e3,
            "selection_ms": (first["prefill_start"] - first["select_start"]) * 1e3,
            "prefill_ms": (first["language_end"] - first["prefill_start"]) * 1e3,
            "layer_hooks_ms": sum(end - start for start, end in zip(starts, ends, strict=True)) * 1e3,
            "ttft_ms": (forwards[0] - began) * 1e3,
            "decode_tokens_per_s": (len(forwards) - 1) / decode_s if decode_s > 0 else float("nan"),
            "total_ms": (ended - began) * 1e3,
        }


def peak_bytes(fn, device: torch.device) -> int:
    """Most bytes allocated during ``fn()`` above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are the ops' own (self) memory; frees are "[memory]" events with negative sizes.
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = top = 0
    for _, delta in deltas:
        live += delta
        top = max(top, live)
    return top


def attach(model, method: str, keep: int | None):
    """vtc's handle for ``method`` at ``keep`` (None for the uncompressed model, "none")."""
    return None if method == "none" else vtc.compress(model, method, keep=keep)


def record_prefill(model, call: Callable[[], Any]) -> dict[str, Any]:
    """A deep copy of the keyword arguments the language model (decoder stack) receives in the first forward of
    ``call()``.

    The pre-hook is registered after vtc's, so it sees what the decoder stack gets: for a pre-LLM method the prompt
    already shortened to text + K tokens, with vtc's 2-D mask and position ids. It copies before the call runs, so the
    KV cache in the copy is the one generate() passes, still empty.
    """
    _, _, language = parts(model)
    seen: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(copy.deepcopy(kwargs))

    handle = language.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen[0]


def prefill_call(model, inputs: dict, method: str, keep: int | None) -> tuple[dict[str, Any], Any]:
    """The language model's keyword arguments in the prefill of a one-token generate() with ``method`` at ``keep``
    attached (see :func:`record_prefill`), and the KV cache that prefill left."""
    handle = attach(model, method, keep)
    outputs = []
    options = {"max_new_tokens": 1, "do_sample": False, "num_beams": 1, "return_dict_in_generate": True}
    try:
        with torch.no_grad():
            kwargs = record_prefill(model, lambda: outputs.append(model.generate(**inputs, **options)))
    finally:
        if handle is not None:
            handle.remove()
    return kwargs, output_cache(outputs[0])


def bound_call(model, inputs: dict, keep: int) -> dict[str, Any]:
    """The bound's prefill at ``keep``: the language-model call a pre-LLM method makes, recorded from one
    (:data:`BOUND_METHOD`); replayed with a fresh copy of its empty cache, it costs no selection."""
    return prefill_call(model, inputs, BOUND_METHOD, keep)[0]


def signature(kwargs: dict[str, Any]) -> dict[str, str]:
    """What decides which path a language-model call takes: each argument by name with its dtype and shape (a
    tensor), class and length (a KV cache) or value (a flag). Arguments passed as None are left out (same as absent)."""
    out = {}
    for name, value in sorted(kwargs.items()):
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            out[name] = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        elif hasattr(value, "get_seq_length"):
            out[name] = f"{type(value).__name__} of {value.get_seq_length()} tokens"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = repr(value)
        else:
            out[name] = type(value).__name__
    return out


def path_signatures(model, inputs: dict, method: str, keep: int) -> tuple[dict[str, str], dict[str, str]]:
    """Signatures (:func:`signature`) of the language-model call in ``method``'s compressed prefill at ``keep`` and of
    the bound's prefill call at ``keep``: equal for every pre-LLM method."""
    return signature(prefill_call(model, inputs, method, keep)[0]), signature(bound_call(model, inputs, keep))


def call_ms(language: torch.nn.Module, kwargs: dict[str, Any], sync: Callable[[], None]) -> float:
    """Milliseconds of one language-model call with a deep copy of ``kwargs`` (a fresh, empty cache each time)."""
    call = copy.deepcopy(kwargs)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        language(**call)
    sync()
    return (time.perf_counter() - start) * 1e3


def run(model, inputs: dict, settings: list[tuple[str, int | None]], device: torch.device, args) -> dict[str, Any]:
    inputs = {k: v.to(device) for k, v in inputs.items()}
    visual_ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    visual = sum(int((inputs["input_ids"] == token).sum()) for token in visual_ids if token is not None)
    prompt = int(inputs["attention_mask"].sum())
    new = args.decode_tokens
    options = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "num_beams": 1}
    _, _, language = parts(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, **options, return_dict_in_generate=True)

    skipped, measured = [], {}
    for method, keep in settings:  # untimed: errors, memory, cache bytes, token counts, the prefill's call
        try:
            call, cache = prefill_call(model, inputs, method, keep)
        except ValueError as error:
            skipped.append({"method": method, "keep": keep, "reason": str(error)})
            continue
        handle = attach(model, method, keep)
        try:
            row = {
                "method": method,
                "keep": keep,
                "kv_bytes": kv_bytes(cache),
                "peak_bytes": peak_bytes(generate, device),
                "prefill_call": signature(call),
            }
            if handle is not None:
                row["visual_tokens_per_layer"] = handle.stats["visual_tokens_per_layer"][0]
                row["flops_ratio"] = handle.stats["prefill_flops"]["ratio"]
        finally:
            if handle is not None:
                handle.remove()
        measured[(method, keep)] = row
    full = measured[("none", None)]["prefill_call"]["inputs_embeds"]
    bounds = {}  # keep -> the bound's prefill call, for budgets that cut tokens (else the bound is "none" itself)
    for keep in sorted({k for _, k in measured if k is not None}):
        call = bound_call(model, inputs, keep)
        if signature(call)["inputs_embeds"] != full:
            bounds[keep] = call
    samples: dict[tuple, list[dict[str, float]]] = {key: [] for key in measured}
    for round_ in range(args.warmup + args.repeats):
        for method, keep in measured:
            # The bound's prefill right before the run it bounds: same round, same warm-up, same load.
            bound_ms = call_ms(language, bounds[keep], sync) if keep in bounds else None
            handle = attach(model, method, keep)
            watch = Stopwatch(model, device)
            try:
                began = time.perf_counter()
                generate()
                watch.sync()
                split = watch.split(began, time.perf_counter())
            finally:
                watch.remove()
                if handle is not None:
                    handle.remove()
            if bound_ms is not None:
                split["bound_prefill_ms"] = bound_ms
            if round_ >= args.warmup:
                samples[(method, keep)].append(split)
    none = samples[("none", None)]
    none_ttft = median([n["ttft_ms"] for n in none])
    none_prefill = median([n["prefill_ms"] for n in none])
    rows = []
    for key, row in measured.items():
        for part in samples[key][0]:
            row[part] = median([s[part] for s in samples[key]])
        if key[1] in bounds:
            # Round by round: the uncompressed request with its LLM prefill replaced by the bound's prefill.
            pairs = zip(none, samples[key], strict=True)
            per_round = [n["ttft_ms"] - n["prefill_ms"] + s["bound_prefill_ms"] for n, s in pairs]
            row["bound_ttft_ms"] = median(per_round)
            row["bound_call"] = signature(bounds[key[1]])
        else:
            row["bound_ttft_ms"] = none_ttft  # nothing cut: the bound is the uncompressed request itself
        # What the tokens each layer saw cost at the uncompressed prefill's speed: its FLOPs estimate (that of
        # vtc.methods.layerwise, in handle.stats) as a fraction of the uncompressed prefill's.
        row["expected_prefill_ms"] = none_prefill * row.get("flops_ratio", 1.0)
        row["of_expected"] = row["expected_prefill_ms"] / row["prefill_ms"]
        row["speedup"] = none_ttft / row["ttft_ms"]
        row["bound_speedup"] = none_ttft / row["bound_ttft_ms"]
        row["of_bound"] = row["bound_ttft_ms"] / row["ttft_ms"]
        rows.append(row)
    bound_prefill = [
        {
            "keep": keep,
            "tokens": call["inputs_embeds"].shape[1],
            "ms": median([s["bound_prefill_ms"] for (_, k), runs in samples.items() if k == keep for s in runs]),
            "call": signature(call),
        }
        for keep, call in bounds.items()
    ]
    return {
        "visual_tokens": visual,
        "prompt_tokens": prompt,
        "bound_prefill": bound_prefill,
        "rows": rows,
        "skipped": skipped,
    }


def print_table(result: dict[str, Any], title: str) -> None:
    print(f"\n{title}")
    print(
        "| method | keep | vision ms | selection ms | LLM prefill ms | FLOPs-expected ms | of expected "
        "| layer hooks ms | TTFT ms | speed-up | bound | of bound | decode tok/s | peak MiB | KV MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        keep = "—" if r["keep"] is None else r["keep"]
        print(
            f"| {r['method']} | {keep} | {r['vision_ms']:.1f} | {r['selection_ms']:.2f} | {r['prefill_ms']:.1f} "
            f"| {r['expected_prefill_ms']:.1f} | {100 * r['of_expected']:.0f}% | {r['layer_hooks_ms']:.2f} "
            f"| {r['ttft_ms']:.1f} | {r['speedup']:.2f}x | {r['bound_speedup']:.2f}x | {100 * r['of_bound']:.0f}% "
            f"| {r['decode_tokens_per_s']:.1f} | {r['peak_bytes'] / 2**20:.1f} | {r['kv_bytes'] / 2**20:.2f} |"
        )
    for s in result["skipped"]:
        print(f"skipped {s['method']} keep={s['keep']}: {s['reason']}")
    if result["bound_prefill"]:
        prefills = ", ".join(
            f"keep {b['keep']}: {b['tokens']} tokens, {b['ms']:.1f} ms" for b in result["bound_prefill"]
        )
        print(f"bound's LLM prefill (the compressed call, no selection): {prefills}")


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in result["rows"] if r["keep"] is not None]
    bound = sorted({(r["keep"], r["bound_speedup"]) for r in rows if r["method"] == rows[0]["method"]})
    axes.plot([k for k, _ in bound], [s for _, s in bound], "k--", label="Amdahl bound", linewidth=2)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["keep"], r["speedup"]) for r in rows if r["method"] == method)
        axes.plot([k for k, _ in points], [s for _, s in points], "o-", label=method, alpha=0.8)
    axes.set_xscale("log", base=2)
    axes.set_xlabel(f"visual tokens kept (of {result['visual_tokens']})")
    axes.set_ylabel("time-to-first-token speed-up")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shapes = ", ".join([*SHAPES, *TINY_MODELS])
    parser.add_argument("--model", default="llava-7b-shape", help=f"{shapes}, an organism, a local dir, a hub id")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated vtc method names")
    parser.add_argument("--keep", default="576,192,128,64", help="comma-separated budgets (visual tokens per image)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--decode-tokens", type=int, default=16, help="new tokens per generate()")
    parser.add_argument("--image", help="image for a loaded model (default: a shapes test scene)")
    parser.add_argument("--prompt", default="what color is the cross ?", help="question for a loaded model")
    parser.add_argument("--quick", action="store_true", help="smoke run: a small model, 1 round, saved only to --out")
    parser.add_argument("--out", type=Path, help=f"JSONL to append the row to (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--plot", type=Path, help=f"PNG of speed-up vs tokens (default {PLOT.relative_to(ROOT)})")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument(
        "--video", help=f"T,H,W (Qwen) or F (OneVision): one video instead of the image ({', '.join(VIDEO_MODELS)})"
    )
    args = parser.parse_args(argv)
    video = None
    if args.video is not None:
        if args.quick:
            parser.error(
                "--quick runs the LLaVA-shaped smoke model, which takes no video: leave out --video or --quick"
            )
        try:
            video = tuple(int(v) for v in args.video.split(","))
        except ValueError:
            video = ()
        if args.model not in VIDEO_MODELS:
            parser.error(f"--video applies to {', '.join(VIDEO_MODELS)}, not {args.model!r}")
        expected = VIDEO_MODELS[args.model]
        if len(video) != expected or min(video) < 1 or any(v % 2 for v in video[1:]):
            what = "T,H,W (positive integers, H and W even)" if expected == 3 else "F (frames, a positive integer)"
            parser.error(f"--video takes {what} for {args.model}, got {args.video!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        keeps = [int(k) for k in args.keep.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--keep takes comma-separated integers, got {args.keep!r}")
    if not keeps or min(keeps) < 1 or args.repeats < 1 or args.warmup < 0 or args.decode_tokens < 2:
        parser.error("--keep values and --repeats must be >= 1, --warmup >= 0, --decode-tokens >= 2")
    for name in methods:
        vtc.get_method(name)  # unknown names fail before a model is built
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.quick:
        args.repeats, args.warmup, args.model = 1, 1, "quick"
    if args.model in SHAPES:
        model, inputs = shaped_llava(SHAPES[args.model], device)
    elif args.model in TINY_MODELS:
        model, inputs = tiny_model(args.model)
        if video is not None and args.model == "tiny-llava-onevision":
            inputs = tiny_llava_onevision_inputs(model, image_sizes=((),), videos=(1,), frames=video[0])
        elif video is not None:
            inputs = tiny_qwen_inputs(model, image_grids=((),), video_grids=((video,),))
        model, inputs = model.to(device), {key: value.to(device) for key, value in inputs.items()}
    else:
        model, inputs = loaded_model(args.model, args.image, args.prompt, device)
    settings = [("none", None)] + [(m, k) for m in methods for k in keeps]
    info = machine(device)
    load = ForeignLoad().start()
    started = time.perf_counter()
    result = run(model, inputs, settings, device, args)
    foreign = load.stop()
    title = (
        f"{args.model}{f' (a video: {args.video})' if video else ''}: {result['visual_tokens']} visual of "
        f"{result['prompt_tokens']} prompt tokens, "
        f"{args.decode_tokens} new tokens; {info['device_name']}, {info['torch_threads']} threads, "
        f"median of {args.repeats}"
    )
    print_table(result, title)
    print(
        f"\ntorch {torch.__version__}, transformers {transformers.__version__}; other processes' CPU use during the "
        f"run: {'unknown' if foreign is None else f'{foreign:.1f}%'}; took {time.perf_counter() - started:.1f} s"
    )
    if foreign is not None and foreign > 5:
        print("warning: the machine was not idle; rerun with nothing else running before trusting these numbers")
    out = args.out or (None if args.quick else RESULTS)
    if out is None or args.no_save:
        return 0
    row = {
        "benchmark": "e2e",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "machine": info,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "git": git_state(),
        "foreign_cpu_percent": foreign,
        "quick": args.quick,
        "repeats": args.repeats,
        "decode_tokens": args.decode_tokens,
        "video": video,
        **result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    figure = args.plot or (out.with_suffix(".png") if args.out else PLOT)
    plot(result, figure, title)
    print(f"appended to {out}; plot {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
