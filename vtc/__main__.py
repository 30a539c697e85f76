"""``vtc run`` (or ``python -m vtc``): compress a VLM with every method and show what changes.

Offline by default: the shipped organism ``shapes-llava`` (a small LLaVA trained in this project, 256 visual tokens
per image; ``--model shapes-qwen2vl`` for the Qwen2-VL one) answers the six questions of a synthetic test scene,
uncompressed and with every method; each row shows the visual tokens before -> after, the median prefill time and
speed-up, and the answers (marked against the truth).
``--model tiny`` / ``tiny-llava-next`` / ``tiny-llava-onevision`` / ``tiny-qwen2-vl`` / ``tiny-qwen2.5-vl`` /
``tiny-qwen3-vl`` / ``tiny-qwen3-5`` / ``tiny-internvl`` use random-weight models built from configs (LLaVA-1.5's 576
tokens, AnyRes, AnyRes downsampled, M-RoPE, DeepStack, a hybrid linear-attention language model, InternVL's tiles),
whose output is token ids. ``--model DIR_OR_HUB_ID`` loads a real model (from_pretrained + AutoProcessor); with
``--image PATH`` it answers ``--prompt`` about that image, without it the scene's questions.
"""

from __future__ import annotations

import argparse
import statistics
import string
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import vtc
from vtc import loading, organisms, tiny
from vtc.adapters.llava_next import BUDGETS
from vtc.method_spec import parse_method, split_specs


def _interleaved_median_ms(fn, attachers: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median ms of ``fn()`` under each attacher (a function attaching vtc, returning a handle or None), timed round
    by round: every round times each once, so a machine that speeds up or slows down during the run (turbo, a noisy
    neighbour) shifts every row alike. One warm-up round first."""
    times: list[list[float]] = [[] for _ in attachers]
    for round_ in range(repeats + 1):
        for attach, values in zip(attachers, times, strict=True):
            handle = attach()
            try:
                start = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                elapsed = (time.perf_counter() - start) * 1e3
            finally:
                if handle is not None:
                    handle.remove()
            if round_:
                values.append(elapsed)
    return [statistics.median(values) for values in times]


def _load(args: argparse.Namespace, image):
    """(model, inputs, processor, true answers or None), on ``args.device``; ``image``: the opened ``--image``."""
    if args.model in tiny.TINY_MODELS:
        model, inputs = tiny.tiny_model(args.model, args.seed)
        inputs = {key: value.to(args.device) for key, value in inputs.items()}
        return model.to(args.device), inputs, None, None
    from vtc.organisms import scenes

    model, processor = loading.load(args.model, device=args.device)
    if image is not None:
        images, questions, truth = [image], [args.prompt], None
    else:  # the six questions of a test scene, one batch row each
        scene = scenes.scene("test", args.scene)
        images = [scene.image] * len(scene.questions)
        questions = [q.question for q in scene.questions]
        truth = [q.answer for q in scene.questions]
    texts = []
    for question in questions:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    if truth is not None:
        print(f"scene {args.scene} of the shapes test split; questions: " + " | ".join(questions))
    return model, inputs.to(args.device), processor, truth


def _checked(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """``(method specs as (label, name, options), the opened --image or None)``; every bad value ends here in
    ``parser.error`` (a one-line message, exit code 2), before any model is loaded or built."""
    for option, value, least in (
        ("--keep", args.keep, 1),
        ("--repeats", args.repeats, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--scene", args.scene, 0),
        ("--seed", args.seed, 0),
    ):
        if value < least:
            parser.error(f"{option} must be >= {least}, got {value}")
    if args.seed >= 2**64:
        parser.error(f"--seed must be < 2**64, got {args.seed}")
    if args.budget is not None and args.budget not in BUDGETS:
        parser.error(f"--budget must be one of {', '.join(BUDGETS)}, got {args.budget!r}")
    try:
        loading.available_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    specs = split_specs(args.methods)
    if not specs:
        parser.error("--methods names no method")
    methods = []
    for spec in specs:
        try:
            name, options = parse_method(spec)
        except ValueError as error:
            parser.error(f"--methods: {error}")
        if name != "none" and vtc.get_method(name).temporal:
            parser.error(f"--methods: {name!r} plans over a video's frames, and this command asks about an image")
        if name != "none":  # the uncompressed row is always shown
            methods.append((spec, name, options))
    if args.model == "tiny-qwen3-5":
        try:
            tiny.qwen3_5_classes()
        except ImportError as error:  # transformers 4.57
            parser.error(f"--model tiny-qwen3-5: {error}")
    image = None
    if args.image is not None:
        if args.model in tiny.TINY_MODELS:
            parser.error(f"--image needs a real model; {args.model!r} builds its own random inputs")
        from PIL import Image

        try:
            image = Image.open(args.image).convert("RGB")
        except OSError as error:  # missing, unreadable or not an image
            parser.error(f"--image {args.image!r}: {error}")
    return methods, image


def _shown(answers: list[str], truth: list[str] | None) -> str:
    if truth is None:
        return " | ".join(answers)
    # As the shapes task scores: the first word, lower-cased, without punctuation.
    first = [(a.split() or [""])[0].strip(string.punctuation).lower() for a in answers]
    marks = [word == t for word, t in zip(first, truth, strict=True)]
    words = " ".join(a.strip() if ok else f"{a.strip() or '-'}(x)" for a, ok in zip(answers, marks, strict=True))
    return f"{words}  [{sum(marks)}/{len(marks)} right]"


def build_parser(prog: str = "python -m vtc") -> argparse.ArgumentParser:
    """The options of ``python -m vtc`` / ``vtc run``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="shapes-llava",
        help=f"a shipped organism ({', '.join(organisms.ORGANISMS)}), one of {tiny.TINY_MODELS} (random weights), "
        "a local dir or hub id",
    )
    parser.add_argument(
        "--methods",
        default=",".join(vtc.list_methods(images=True)),
        help="comma-separated method names, options after colons (fastervlm:signal=attention_received); default: "
        "every method but the temporal ones (evs), which need a video",
    )
    parser.add_argument("--keep", type=int, default=64, help="visual tokens kept per image (default 64)")
    parser.add_argument(
        "--budget",
        help="LLaVA-NeXT, OneVision: global (default), per_crop or thumbnail; InternVL: global or per_crop",
    )
    parser.add_argument("--image", help="image file (real models)")
    parser.add_argument("--prompt", default="Describe the image briefly.", help="question about --image")
    parser.add_argument("--scene", type=int, default=0, help="without --image: the shapes test scene to ask about")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer length in tokens (default 12)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed rounds, each timing every method once (median reported)"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any, else cpu"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny models' weights and inputs (default 0)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m vtc") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    methods, image = _checked(parser, args)

    try:
        model, inputs, processor, truth = _load(args, image)
    except (ValueError, OSError) as error:  # not a supported model, or no such directory / hub id
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())  # per prompt (row 0)
    device = next(model.parameters()).device  # where it runs, as said
    print(f"model: {type(model).__name__} ({args.model}), {n_tokens} visual tokens in the prompt, device {device}")

    def prefill():
        with torch.no_grad():
            model(**inputs)

    def answer() -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        if processor is None:
            return " ".join(map(str, new[0].tolist()))
        return _shown(processor.batch_decode(new, skip_special_tokens=True), truth)

    rows = [("none", n_tokens, n_tokens, answer())]
    attachers: list[Callable[[], Any]] = [lambda: None]  # per row
    skipped = []
    for label, name, options in methods:
        try:
            handle = vtc.compress(model, name, keep=args.keep, budget=args.budget, **options)
        except ValueError as error:  # e.g. a [CLS] method on a tower without [CLS]
            skipped.append(f"{label}: {error}")
            continue
        with handle:
            text = answer()
        before, after = handle.stats["visual_tokens_before"][0], handle.stats["visual_tokens_after"][0]
        rows.append((label, before, after, text))
        attachers.append(partial(vtc.compress, model, name, keep=args.keep, budget=args.budget, **options))
    ms = _interleaved_median_ms(prefill, attachers, args.repeats)
    rows = [(*row[:3], t, ms[0] / t, row[3]) for row, t in zip(rows, ms, strict=True)]

    width = max(10, *(len(row[0]) for row in rows))
    header = f"{'method':<{width}} {'visual tokens':>14} {'prefill ms':>11} {'speed-up':>9}  " + (
        "answers" if processor is not None else "output"
    )
    print(header)
    print("-" * len(header))
    for label, before, after, ms, speedup, text in rows:
        print(f"{label:<{width}} {before:>6} -> {after:<5} {ms:>11.1f} {speedup:>8.2f}x  {text}")
    for line in skipped:
        print(f"skipped {line}")
    if processor is None:
        print("(random weights: the output is token ids, shown to prove generate() runs with a compressed cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
