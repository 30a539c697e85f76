"""Run one task under a list of (method, keep) settings and collect per-sample records.

Every setting runs on the same samples with greedy decoding. Under ``accelerate launch`` each process takes every
``world``-th sample (sample i goes to process i % world), and the records are gathered on the main process, where
each sample must appear exactly once per setting.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import vtc
from vtc.eval.tasks import Sample, Task
from vtc.method_spec import parse_method


@dataclass(frozen=True)
class Setting:
    """One evaluated configuration: ``method`` is "none" (uncompressed) or a vtc method, ``keep`` its budget."""

    method: str
    keep: int | None
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.method


def settings(methods: list[str], keeps: list[int]) -> list[Setting]:
    """The uncompressed run once (if asked for), then every method at every keep."""
    out = []
    for spec in methods:
        name, options = parse_method(spec)
        if name == "none":
            out.append(Setting("none", None, label="none"))
        else:
            out.extend(Setting(name, keep, options, spec.strip()) for keep in keeps)
    return out


class FirstForwardTimer:
    """Seconds from ``start()`` to the end of the model's first forward: image encoding, selection and prefill
    (generate() in transformers 5.x encodes images before its first forward; this counts them either way)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.began = 0.0
        self.seconds: float | None = None
        self._hook = model.register_forward_hook(self._done)

    def start(self) -> None:
        _sync(self.model)
        self.seconds = None
        self.began = time.perf_counter()

    def _done(self, *_: Any) -> None:
        if self.seconds is None:
            _sync(self.model)
            self.seconds = time.perf_counter() - self.began

    def remove(self) -> None:
        self._hook.remove()


def _sync(model: torch.nn.Module) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def prompt(processor, question: str, kind: str = "image") -> str:
    """The model's chat template around one image (``kind="video"``: one video) and the question, ready for
    generation."""
    conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def image_token_id(model) -> int:
    return model.config.image_token_id


def visual_token_ids(model) -> list[int]:
    """The placeholder ids of images and, where the model has them, of videos."""
    video = getattr(model.config, "video_token_id", None)
    return [image_token_id(model)] + ([video] if video is not None else [])


def video_families() -> list[str]:
    """The model families whose videos vtc compresses, e.g. "Qwen2-VL (qwen2_vl)"."""
    from vtc.registry import ADAPTERS

    names = {
        f"{adapter.model_types.get(model_type, model_type)} ({model_type})"
        for model_type, adapter in ADAPTERS.items()
        if adapter.compresses_video
    }
    return sorted(names)


def check_video_model(task: Task, name: str) -> None:
    """Refuse, from the model's config alone, a video task on a model whose videos vtc does not compress. A model
    whose config cannot be read, or that vtc does not support at all, is left to the loader to refuse."""
    from transformers import AutoConfig

    from vtc import loading
    from vtc.registry import ADAPTERS

    try:
        config = AutoConfig.from_pretrained(loading.resolve(name))
    except (OSError, ValueError):
        return
    adapter = ADAPTERS.get(config.model_type)
    if adapter is None or adapter.compresses_video:
        return
    family = adapter.model_types.get(config.model_type, config.model_type)
    raise ValueError(
        f"{task.name} asks about videos, but {name!r} is a {family} model ({config.model_type}), whose video inputs "
        f"vtc does not compress; video tasks run on {', '.join(video_families())}"
    )


def _inputs(processor, batch: list[Sample], device: torch.device):
    """The processor's tensors for a batch of image and/or video samples."""
    images = [sample.image() for sample in batch if sample.video is None]
    videos = [sample.video() for sample in batch if sample.video is not None]
    media = {"images": images} if images else {}
    if videos:
        media["videos"] = videos
    text = [prompt(processor, sample.question, "image" if sample.video is None else "video") for sample in batch]
    return processor(**media, text=text, return_tensors="pt", padding=True).to(device)


def run_setting(
    model,
    processor,
    task: Task,
    samples: list[tuple[int, Sample]],
    setting: Setting,
    *,
    batch_size: int,
    max_new_tokens: int | None = None,
    budget: str | None = None,
    positions: str = "original",
    progress=None,
    worker: int = 0,
) -> list[dict]:
    """Records of ``samples`` (pairs of task index and sample) under one setting."""
    device = next(model.parameters()).device
    handle = None
    if setting.method != "none":
        extra = {"budget": budget} if budget else {}
        handle = vtc.compress(model, setting.method, keep=setting.keep, positions=positions, **extra, **setting.options)
    timer = FirstForwardTimer(model)
    records = []
    try:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            inputs = _inputs(processor, [sample for _, sample in batch], device)
            visual = torch.isin(inputs["input_ids"], torch.tensor(visual_token_ids(model), device=device))
            tokens_in = visual.sum(1).tolist()
            for row, (_, sample) in enumerate(batch):
                if sample.video is not None and tokens_in[row] == 0:
                    raise ValueError(
                        f"the prompt of video sample {sample.id!r} holds no video placeholder: the chat template of "
                        "this model renders no {'type': 'video'} part"
                    )
            timer.start()
            with torch.no_grad():
                output = model.generate(
                    **inputs, max_new_tokens=max_new_tokens or task.max_new_tokens, do_sample=False, num_beams=1
                )
            predictions = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            stats = handle.stats if handle is not None else None
            for row, ((index, sample), prediction) in enumerate(zip(batch, predictions, strict=True)):
                prediction = prediction.strip()
                record = {
                    "index": index,
                    "id": sample.id,
                    "family": sample.family,
                    "question": sample.question,
                    "answer": sample.answer,
                    "prediction": prediction,
                    **sample.meta,
                    **task.score(sample, prediction),
                    "method": setting.name,
                    "keep": setting.keep,
                    "visual_tokens_in": tokens_in[row],
                    "visual_tokens": tokens_in[row],
                    "visual_tokens_last_layer": tokens_in[row],
                    "prefill_ms": timer.seconds * 1e3,
                    "batch_size": len(batch),
                    "batch": f"{worker}/{start}",
                }
                if stats is not None:  # entering the language model / reaching its last layer (in-LLM methods)
                    record["visual_tokens"] = stats["visual_tokens_per_layer"][row][0]
                    record["visual_tokens_last_layer"] = stats["visual_tokens_after"][row]
                records.append(record)
            if progress is not None:
                progress.update(len(batch))
    finally:
        timer.remove()
        if handle is not None:
            handle.remove()
    return records


def summarize_setting(task: Task, setting: Setting, records: list[dict], peak_memory_mb: float) -> dict:
    """One summary row: the task's metrics plus tokens, latency and memory."""
    batches = {r["batch"]: r["prefill_ms"] / r["batch_size"] for r in records}  # records of a batch share its time
    per_sample = list(batches.values())
    return {
        "method": setting.name,
        "keep": setting.keep,
        **task.summarize(records),
        "visual_tokens": statistics.fmean(r["visual_tokens"] for r in records),
        "visual_tokens_last_layer": statistics.fmean(r["visual_tokens_last_layer"] for r in records),
        "visual_tokens_in": statistics.fmean(r["visual_tokens_in"] for r in records),
        "prefill_ms_per_sample": statistics.median(per_sample),
        "peak_memory_mb": peak_memory_mb,
    }


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set (a high-water mark over the
    whole process, so it only grows from one setting to the next)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
