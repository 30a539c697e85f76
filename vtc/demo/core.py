"""What the demo computes, without gradio: load a model, run one question with and without compression, time both.

    bundle = load_model("shapes-llava")
    result = compare(bundle, image, "what color is the triangle ?", "dart", keep=64, options={"merge": True})
    result.baseline_answer, result.compressed_answer, result.speedup, result.kept, result.boxes

Every problem a user can cause (no image, an empty question, a model vtc does not support or that is not there, a
budget larger than the image's visual tokens, a method the model cannot run) raises :class:`DemoError` with a
message meant for the page; the app shows it instead of a stack trace.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

import vtc
from vtc import geometry, loading
from vtc.methods.base import Budget
from vtc.methods.keep_all import KeepAll
from vtc.registry import ADAPTERS, LAYERWISE_METHODS, METHODS, get_adapter_class

CACHED_MODELS = 2  # models kept in memory at once (a hub model can take many GB)


class DemoError(Exception):
    """A problem with the user's input or choice, with a message for the page."""


@dataclass
class Bundle:
    """A loaded model and its processor; ``lock`` serialises runs (vtc attaches hooks to the shared model)."""

    name: str
    model: Any
    processor: Any
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def adapter(self) -> type:
        """The model family's adapter class: what the page asks about the family."""
        return get_adapter_class(self.model)

    @property
    def crop_budgets(self) -> bool:
        """Whether the family shares a budget over an image's crops (LLaVA-NeXT's, OneVision's ``budget=``)."""
        return "budget" in self.adapter.options

    @property
    def has_cls(self) -> bool:
        """Whether the vision tower gives [CLS] attention (else methods use ``signal="attention_received"``)."""
        return "cls_attention" in self.adapter(self.model, KeepAll(), Budget(ratio=1.0)).provides

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        config = self.model.config
        text = getattr(config, "text_config", config)
        family = self.adapter.model_types[self.model_type]
        return f"{self.name}: {family}, {text.num_hidden_layers} LLM layers"


_models: OrderedDict[tuple[str, str], Bundle] = OrderedDict()
_models_lock = threading.Lock()


def load_model(name: str, device: str = "cpu") -> Bundle:
    """The model ``name`` (a shipped organism such as "shapes-llava", a local directory or a hub id), cached."""
    name = (name or "").strip()
    if not name:
        raise DemoError("Choose a model: the shipped organism (shapes-llava), a local directory or a hub id.")
    key = (name, str(device))
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        try:
            model, processor = loading.load(name, device=device)
        except FileNotFoundError as error:
            raise DemoError(f"{name} is not available here: {error}") from None
        except ValueError as error:  # an unsupported model_type, named by vtc.loading
            raise DemoError(f"Unsupported model: {error}") from None
        except (OSError, ImportError, KeyError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DemoError(f"Could not load {name!r} (offline: only local directories and cached models load): "
                            f"{first}") from None  # fmt: skip
        if hasattr(processor, "tokenizer") and processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        _models[key] = Bundle(name, model, processor)
        while len(_models) > CACHED_MODELS:
            _models.popitem(last=False)
        return _models[key]


def prompt(processor: Any, question: str) -> str:
    """The model's chat template around one image and the question, ready for generation."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def prepare(bundle: Bundle, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
    """The processor's inputs for one image and question, on the model's device and dtype."""
    inputs = bundle.processor(images=[image], text=[prompt(bundle.processor, question)], return_tensors="pt")
    dtype = next(bundle.model.parameters()).dtype
    return {
        key: value.to(bundle.device, dtype) if value.is_floating_point() else value.to(bundle.device)
        for key, value in inputs.items()
    }


def content_tokens(boxes: torch.Tensor) -> int:
    """Visual tokens with a place in the image (LLaVA-NeXT's newline tokens do not count against the budget)."""
    return int((~boxes.isnan().any(-1)).sum())


def budget_limit(bundle: Bundle, image: Image.Image) -> int:
    """The largest budget for this image: its visual tokens (content tokens for LLaVA-NeXT)."""
    inputs = prepare(bundle, as_rgb(image), "?")
    return content_tokens(torch.cat(geometry.token_boxes(bundle.model, inputs, [image], bundle.processor)[0]))


def method_options(method: str, *, merge: bool = False, signal: str | None = None, layer: int | None = None) -> dict:
    """The options the UI sets that ``method`` takes (dart: merge; fastervlm: signal; fastv / dart_llm: layer)."""
    known = {**METHODS, **LAYERWISE_METHODS}
    if method not in known:
        raise DemoError(f"Unknown method {method!r}; choose one of {', '.join(vtc.list_methods())}.")
    accepted = set(known[method].options())
    chosen = {"merge": bool(merge), "signal": signal, "layer": None if layer is None else int(layer)}
    return {key: value for key, value in chosen.items() if key in accepted and value is not None}


def unknown_words(processor: Any, question: str) -> list[str]:
    """Words of the question the tokenizer maps to its unknown token (the organisms know only the scene words)."""
    tokenizer = getattr(processor, "tokenizer", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    return [word for word in question.split() if unk in tokenizer(word, add_special_tokens=False)["input_ids"]]


@dataclass
class Comparison:
    """One question answered with all visual tokens and with ``method`` keeping ``keep`` of them."""

    model: str
    method: str
    keep: int
    options: dict
    question: str
    image: Image.Image
    baseline_answer: str
    compressed_answer: str
    baseline_ms: float  # median prefill (vision encoder + language-model prefill) latency
    compressed_ms: float
    tokens_before: int  # visual tokens of the image
    tokens_after: int  # visual tokens that reach the last LLM layer
    tokens_per_layer: list[int]  # visual tokens at the input of every LLM layer, compressed
    boxes: torch.Tensor  # [N, 4] every visual token's rectangle in the image (NaN: no place, e.g. newline)
    kept: torch.Tensor  # [K] indices into the visual tokens of the ones that reach the last layer
    merge_into: torch.Tensor | None  # [N] for merging methods: the kept token (index into boxes) each token joins
    flops_ratio: float | None  # the LLM's prefill FLOPs, compressed / uncompressed (vtc's estimate)
    signals: dict[str, str]  # signal -> where vtc took it from
    repeats: int
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.compressed_ms

    @property
    def same_answer(self) -> bool:
        return self.baseline_answer.strip().lower() == self.compressed_answer.strip().lower()

    @property
    def area_seen(self) -> float:
        """Share of the image the kept tokens cover."""
        height, width = self.image.height, self.image.width
        return geometry.union_area(self.boxes[self.kept]) / (height * width)

    @property
    def area_visible(self) -> float:
        """Share of the image any visual token covers (a center crop cuts the rest off)."""
        return geometry.union_area(self.boxes) / (self.image.height * self.image.width)


def as_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image or an array (what gradio hands over)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        import numpy as np

        return Image.fromarray(np.asarray(image)).convert("RGB")
    except Exception as error:  # any unreadable input becomes one message
        raise DemoError(f"Could not read the image ({type(image).__name__}): {error}") from None


def _decode(bundle: Bundle, output: torch.Tensor, prompt_length: int) -> str:
    return bundle.processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0].strip()


def _sync(bundle: Bundle) -> None:
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()


def _attach(bundle: Bundle, method: str, keep: int, options: dict) -> vtc.CompressionHandle:
    try:
        return vtc.compress(bundle.model, method, keep=keep, **options)
    except (ValueError, TypeError) as error:
        raise DemoError(f"{method} cannot run on {bundle.name}: {error}") from None


def generate(bundle: Bundle, inputs: dict, max_new_tokens: int) -> str:
    """Greedy answer (what :func:`compare` reports), decoded without special tokens."""
    output = bundle.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return _decode(bundle, output, inputs["input_ids"].shape[1])


def compare(
    bundle: Bundle,
    image: Any,
    question: str,
    method: str,
    keep: int,
    *,
    options: dict | None = None,
    max_new_tokens: int = 24,
    repeats: int = 3,
) -> Comparison:
    """Answer ``question`` about ``image`` uncompressed and with ``method`` keeping ``keep`` visual tokens; time the
    prefill of both (median of ``repeats``, runs alternating, one warm-up each)."""
    if image is None:
        raise DemoError("Add an image: upload one or pick a sample.")
    if not isinstance(question, str) or not question.strip():
        raise DemoError("Type a question about the image.")
    options = dict(options or {})
    if method not in vtc.list_methods():
        raise DemoError(f"Unknown method {method!r}; choose one of {', '.join(vtc.list_methods())}.")
    if isinstance(keep, float) and keep.is_integer():
        keep = int(keep)
    _check_budget_and_repeats(keep, repeats)
    image = as_rgb(image)
    question = question.strip()
    inputs = prepare(bundle, image, question)
    boxes = torch.cat(geometry.token_boxes(bundle.model, inputs, [image], bundle.processor)[0])
    limit = content_tokens(boxes)
    if keep > limit:
        raise DemoError(
            f"The budget ({keep}) is larger than the {limit} visual tokens {bundle.name} makes of this image; "
            f"choose at most {limit}."
        )
    with bundle.lock, torch.no_grad():
        handle = _attach(bundle, method, keep, options)
        try:
            compressed_answer = generate(bundle, inputs, max_new_tokens)
            kept = handle.last_kept[0].cpu()
            stats = handle.stats
            plan = handle.last_plan
        finally:
            handle.remove()
        baseline_answer = generate(bundle, inputs, max_new_tokens)

        times = _time_prefills(bundle, inputs, method, keep, options, int(repeats))

    per_layer = stats.get("visual_tokens_per_layer")
    flops = stats.get("prefill_flops")
    notes = []
    unknown = unknown_words(bundle.processor, question)
    if unknown:
        notes.append(f"{bundle.name} does not know the word(s) {', '.join(unknown)}.")
    if bundle.adapter.layout == "grid" and geometry.union_area(boxes) < 0.999 * image.width * image.height:
        notes.append("The processor's center crop cuts the hatched part of the image off: no token sees it.")
    return Comparison(
        model=bundle.name,
        method=method,
        keep=keep,
        options=options,
        question=question,
        image=image,
        baseline_answer=baseline_answer,
        compressed_answer=compressed_answer,
        baseline_ms=statistics.median(times[False]),
        compressed_ms=statistics.median(times[True]),
        tokens_before=stats["visual_tokens_before"][0],
        tokens_after=stats["visual_tokens_after"][0],
        tokens_per_layer=list(per_layer[0]) if per_layer else [],
        boxes=boxes,
        kept=kept,
        merge_into=_merge_targets(plan, boxes),
        flops_ratio=None if not flops else float(flops["ratio"]),
        signals=dict(stats.get("signal_sources") or {}),
        repeats=int(repeats),
        notes=notes,
    )


@dataclass
class VideoComparison:
    """One question about a video answered with all visual tokens and with ``method`` keeping ``keep`` per video."""

    model: str
    method: str
    keep: int
    video_budget: str
    question: str
    frames: list[Image.Image]  # the first frame of each temporal patch, at the size the model saw it
    grid: tuple[int, int, int]  # (temporal patches, rows, columns) of the video's visual tokens
    baseline_answer: str
    compressed_answer: str
    baseline_ms: float
    compressed_ms: float
    tokens_before: int
    tokens_after: int
    kept: torch.Tensor  # [K] indices into the video's tokens (raster order, temporal patch after temporal patch)
    repeats: int

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.compressed_ms

    @property
    def kept_per_frame(self) -> list[int]:
        t, h, w = self.grid
        return torch.bincount(self.kept // (h * w), minlength=t).tolist()


def video_prompt(processor: Any, question: str) -> str:
    """The model's chat template around one video and the question, ready for generation."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def compare_video(
    bundle: Bundle,
    frames: list[Any],
    question: str,
    method: str,
    keep: int,
    *,
    video_budget: str = "per_video",
    max_new_tokens: int = 24,
    repeats: int = 3,
) -> VideoComparison:
    """:func:`compare` for a short clip (a list of frames) on a model whose family compresses videos and lays them out
    as Qwen does ((t, h, w) grids of merged tokens): both answers, prefill times, and which tokens of which frame the
    method kept."""
    if not bundle.adapter.compresses_video or "video_budget" not in bundle.adapter.options:
        families = sorted(t for t, cls in ADAPTERS.items() if cls.compresses_video)
        raise DemoError(f"{bundle.name} takes no video here; the families that do: {', '.join(families)}.")
    if not frames:
        raise DemoError("Add a clip: pick a sample video.")
    if not isinstance(question, str) or not question.strip():
        raise DemoError("Type a question about the video.")
    if method not in vtc.list_methods("pre"):
        raise DemoError(f"The video view runs pre-LLM methods; choose one of {', '.join(vtc.list_methods('pre'))}.")
    _check_budget_and_repeats(keep, repeats)
    frames = [as_rgb(frame) for frame in frames]
    question = question.strip()
    try:
        inputs = bundle.processor(videos=[frames], text=[video_prompt(bundle.processor, question)], return_tensors="pt")
    except (TypeError, ValueError) as error:
        raise DemoError(f"{bundle.name}'s processor cannot prepare this clip: {error}") from None
    if "video_grid_thw" not in inputs:
        raise DemoError(f"The video view shows the Qwen families' (t, h, w) token grids; {bundle.name} has none.")
    dtype = next(bundle.model.parameters()).dtype
    inputs = {
        key: value.to(bundle.device, dtype) if value.is_floating_point() else value.to(bundle.device)
        for key, value in inputs.items()
    }
    merge = bundle.model.config.vision_config.spatial_merge_size
    t, h, w = (int(v) for v in inputs["video_grid_thw"][0])
    grid = (t, h // merge, w // merge)
    limit = grid[0] * grid[1] * grid[2]
    if keep > limit:
        raise DemoError(
            f"The budget ({keep}) is larger than the {limit} visual tokens of this clip; choose at most {limit}."
        )
    options = {"video_budget": video_budget}
    with bundle.lock, torch.no_grad():
        handle = _attach(bundle, method, keep, options)
        try:
            compressed_answer = generate(bundle, inputs, max_new_tokens)
            kept = handle.last_kept[0].cpu()
            stats = handle.stats
        except ValueError as error:  # a refusal that depends on the clip (evs: keep below one frame)
            raise DemoError(f"{method} cannot run on this clip: {error}") from None
        finally:
            handle.remove()
        baseline_answer = generate(bundle, inputs, max_new_tokens)
        times = _time_prefills(bundle, inputs, method, keep, options, int(repeats))
    patch = bundle.model.config.vision_config.patch_size
    size = (w * patch, h * patch)
    step = max(1, len(frames) // t)  # frames per temporal patch
    shown = [frames[min(i * step, len(frames) - 1)].resize(size, Image.Resampling.BICUBIC) for i in range(t)]
    return VideoComparison(
        model=bundle.name,
        method=method,
        keep=keep,
        video_budget=video_budget,
        question=question,
        frames=shown,
        grid=grid,
        baseline_answer=baseline_answer,
        compressed_answer=compressed_answer,
        baseline_ms=statistics.median(times[False]),
        compressed_ms=statistics.median(times[True]),
        tokens_before=stats["visual_tokens_before"][0],
        tokens_after=stats["visual_tokens_after"][0],
        kept=kept,
        repeats=int(repeats),
    )


def _check_budget_and_repeats(keep: Any, repeats: Any) -> None:
    """The checks :func:`compare` and :func:`compare_video` share: a whole budget >= 1, 1..50 timing repeats."""
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise DemoError(f"The budget is the number of visual tokens to keep, at least 1; got {keep!r}.")
    if not 1 <= int(repeats) <= 50:
        raise DemoError("Timing repeats must be between 1 and 50.")


def _time_prefills(
    bundle: Bundle, inputs: dict, method: str, keep: int, options: dict, repeats: int
) -> dict[bool, list[float]]:
    """Prefill latencies in ms (vision encoder + language-model prefill), uncompressed (False) and compressed (True),
    runs alternating after one warm-up each. The caller holds the bundle's lock."""

    def prefill(compressed: bool) -> float:
        handle = _attach(bundle, method, keep, options) if compressed else None
        try:
            _sync(bundle)
            start = time.perf_counter()
            bundle.model(**inputs)
            _sync(bundle)
            return (time.perf_counter() - start) * 1e3
        finally:
            if handle is not None:
                handle.remove()

    prefill(False), prefill(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for compressed in (False, True):
            times[compressed].append(prefill(compressed))
    return times


def _merge_targets(plan: vtc.Plan | None, boxes: torch.Tensor) -> torch.Tensor | None:
    """[N] for each visual token the index (into boxes) of the kept token it was merged into, or None.

    A plan indexes the tokens it planned over: all visual tokens (LLaVA-1.5, Qwen) or, for LLaVA-NeXT's global
    budget, the content tokens (newline tokens excluded)."""
    if plan is None or plan.merge_into is None or plan.kept.shape[0] != 1:
        return None
    planned = torch.arange(len(boxes)) if plan.num_tokens == len(boxes) else (~boxes.isnan().any(-1)).nonzero()[:, 0]
    if len(planned) != plan.num_tokens:
        return None
    target = torch.full((len(boxes),), -1, dtype=torch.long)
    kept_tokens = planned[plan.kept[0].cpu()]  # slot -> visual token
    target[planned] = kept_tokens[plan.merge_into[0].cpu()]
    return target
