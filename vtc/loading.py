"""Load a supported VLM and its processor by name: a shipped organism, a local directory or a hub id.

Shared by ``vtc run`` (``python -m vtc``), ``vtc eval``, ``vtc demo`` and the benchmarks. The model type is checked
against the supported families (:func:`vtc.list_models`) from the config alone, before any weights are read.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from vtc import organisms
from vtc.registry import ADAPTERS, get_adapter_class


def resolve(name: str) -> str:
    """A shipped organism's name -> its directory; anything else (a local dir, a hub id) unchanged."""
    return str(organisms.path(name)) if name in organisms.ORGANISMS else name


def load(name: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"):
    """``(model, processor)`` in eval mode on ``device``.

    ``dtype="auto"``: float32 on CPU, bfloat16 on CUDA when supported (else float16).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    source = resolve(name)
    config = AutoConfig.from_pretrained(source)
    if config.model_type not in ADAPTERS:
        raise ValueError(
            f"{name!r} is a {config.model_type!r} model; vtc supports {', '.join(sorted(ADAPTERS))} "
            f"(and the shipped organisms {', '.join(organisms.ORGANISMS)})"
        )
    device = torch.device(device)
    if dtype == "auto":
        dtype = torch.float32
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, load_processor(source)


def load_processor(source: str | Path):
    """``AutoProcessor.from_pretrained(source)``; for Qwen2-VL / Qwen2.5-VL where transformers cannot build their
    processor (5.x without torchvision; 4.57 with a tokenizer that is not Qwen2's own class, as the organisms') a
    :class:`QwenProcessor` with the same outputs for images and text."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except (ImportError, AttributeError, TypeError) as error:
        if not _is_qwen(source):
            raise
        if isinstance(error, TypeError):  # 4.57 type-checks the tokenizer's class
            return QwenProcessor.from_pretrained(source)
        try:
            import torchvision  # noqa: F401
        except ImportError:
            return QwenProcessor.from_pretrained(source)
        raise error


def _is_qwen(source: str | Path) -> bool:
    """Whether ``source`` holds a model whose processor vtc may rebuild (Qwen2-VL / 2.5-VL: its adapter's
    ``pil_processor``), by config.json, else processor_config.json."""
    import json

    from transformers import AutoConfig

    try:
        return getattr(get_adapter_class(AutoConfig.from_pretrained(source)), "pil_processor", False)
    except (OSError, ValueError):  # a directory of processor files only
        path = Path(source) / "processor_config.json"
        if not path.is_file():
            return False
        return json.loads(path.read_text()).get("processor_class") in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


class QwenProcessor:
    """Qwen2-VL's processor for images and text, built from its tokenizer and PIL image processor.

    Each ``<|image_pad|>`` in the text becomes ``t * h * w / merge_size^2`` copies, as Qwen2VLProcessor does, and
    ``mm_token_type_ids`` is returned where the model takes it (transformers 5.x). No video.
    """

    def __init__(
        self, tokenizer, image_processor, chat_template: str | None = None, image_token: str = "<|image_pad|>"
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or tokenizer.chat_template
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    @classmethod
    def from_pretrained(cls, source: str | Path) -> QwenProcessor:
        from transformers import AutoTokenizer

        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as images
        except ImportError:  # 4.x: the default processor is the PIL one
            from transformers import Qwen2VLImageProcessor as images
        template = Path(source) / "chat_template.jinja"
        tokenizer = AutoTokenizer.from_pretrained(source)
        chat = template.read_text() if template.is_file() else None
        return cls(tokenizer, images.from_pretrained(source), chat)

    def apply_chat_template(self, conversation, **kwargs) -> Any:
        kwargs.setdefault("tokenize", False)
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kwargs):
        from transformers import BatchFeature, Qwen2VLForConditionalGeneration

        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            data = dict(self.image_processor(images=images, return_tensors="pt"))
            merge = self.image_processor.merge_size**2
            counts = iter((data["image_grid_thw"].prod(-1) // merge).tolist())
            expanded = []
            for line in texts:
                parts = line.split(self.image_token)
                out = parts[0]
                for part in parts[1:]:
                    out += self.image_token * next(counts) + part
                expanded.append(out)
            texts = expanded
        tokens = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs)
        data.update(tokens)
        if "mm_token_type_ids" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters:
            data["mm_token_type_ids"] = (data["input_ids"] == self.image_token_id).long()
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def available_device(text: str) -> torch.device:
    """``torch.device(text)`` if this machine has that device, else a ValueError saying why (for ``--device``)."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--device {text!r} is not a torch device (cpu, cuda, cuda:N, mps, ...)") from error
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"--device {text!r}: no {device.type} device is available here")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {text!r}: this machine has {count} {device.type} device(s)")
    return device
