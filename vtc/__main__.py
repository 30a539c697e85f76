"""``python -m vtc``: compress a VLM with every method and show what changes.

Offline by default: a LLaVA-1.5-shaped model (576 visual tokens per image) with random weights is
built from a config, so nothing is downloaded. With ``--model DIR_OR_HUB_ID --image PATH`` the same
run uses a real model through from_pretrained + AutoProcessor and prints its answers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import vtc


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _load(args: argparse.Namespace):
    if args.model == "tiny":
        from vtc.tiny import tiny_llava, tiny_llava_inputs

        model = tiny_llava(hidden_size=256, text_layers=4, vision_layers=6, heads=8, vocab_size=1024)
        return model, tiny_llava_inputs(model, seed=args.seed), None
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if args.image is None:
        sys.exit("--image PATH is required with a real --model")
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").to(args.device).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=Image.open(args.image).convert("RGB"), text=text, return_tensors="pt")
    return model, inputs.to(args.device), processor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (offline, random weights), a local dir or a hub id")
    parser.add_argument("--methods", default=",".join(vtc.list_methods()), help="comma-separated method names")
    parser.add_argument("--keep", type=int, default=64, help="visual tokens kept per image (default 64)")
    parser.add_argument("--image", help="image file (real models)")
    parser.add_argument("--prompt", default="Describe the image briefly.", help="question (real models)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills per method (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        vtc.get_method(name)  # unknown names fail here, before any model is built

    model, inputs, processor = _load(args)
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"model: {type(model).__name__} ({args.model}), {n_tokens} visual tokens in the prompt, device {args.device}")

    def prefill():
        with torch.no_grad():
            model(**inputs)

    def answer() -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        return processor.decode(new, skip_special_tokens=True) if processor else " ".join(map(str, new.tolist()))

    baseline_ms = _median_ms(prefill, args.repeats)
    rows = [("none", n_tokens, n_tokens, baseline_ms, 1.0, answer())]
    for name in methods:
        with vtc.compress(model, name, keep=args.keep) as handle:
            ms = _median_ms(prefill, args.repeats)
            text = answer()
        before, after = sum(handle.stats["visual_tokens_before"]), sum(handle.stats["visual_tokens_after"])
        rows.append((name, before, after, ms, baseline_ms / ms, text))

    header = f"{'method':<10} {'visual tokens':>14} {'prefill ms':>11} {'speed-up':>9}  output"
    print(header)
    print("-" * len(header))
    for name, before, after, ms, speedup, text in rows:
        print(f"{name:<10} {before:>6} -> {after:<5} {ms:>11.1f} {speedup:>8.2f}x  {text}")
    if processor is None:
        print("(random weights: the output is token ids, shown to prove generate() runs with a compressed cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
