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
    """Qwen2-VL's processor for images, videos and text, built from its tokenizer and PIL image processor.

    Each ``<|image_pad|>`` in the text becomes ``t * h * w / merge_size^2`` copies, each ``<|video_pad|>`` likewise
    from ``video_grid_thw``, as Qwen2VLProcessor does, and ``mm_token_type_ids`` (1 image, 2 video) is returned where
    the model takes it (transformers 5.x).

    A video is a list of equal-sized frames (PIL images or arrays), already sampled: every frame is used.
    ``pixel_values_videos`` [sum(t * h * w), C * temporal_patch_size * patch^2] and ``video_grid_thw`` are laid out as
    Qwen2VLVideoProcessor lays them out (which needs torchvision): each frame resized (smart_resize within the video
    settings' pixel bounds), rescaled and normalised by the PIL image processor, the frames padded to a multiple of
    ``temporal_patch_size`` by repeating the last one, and the patches ordered (t, h / m, w / m, m, m) with features
    (C, temporal, patch, patch). The video settings are the checkpoint's video processor config where it has one
    (processor_config.json's ``video_processor``, else video_preprocessor_config.json), else its image processor's.
    Differences: frames that need resizing are resized by PIL's bicubic here, by torchvision's there; and no
    ``second_per_grid_ts`` is returned (Qwen2.5-VL's processor derives it from the video's fps), so Qwen2.5-VL takes
    its default of one second per temporal patch for the M-RoPE time axis.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        chat_template: str | None = None,
        image_token: str = "<|image_pad|>",
        video_processor=None,
        video_token: str = "<|video_pad|>",
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_processor = video_processor if video_processor is not None else image_processor
        self.chat_template = chat_template or tokenizer.chat_template
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token = video_token
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)

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
        settings = _video_settings(Path(source))
        video = images(**settings) if settings is not None else None
        return cls(tokenizer, images.from_pretrained(source), chat, video_processor=video)

    def apply_chat_template(self, conversation, **kwargs) -> Any:
        kwargs.setdefault("tokenize", False)
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, return_tensors: str = "pt", padding: bool = True, **kwargs):
        from transformers import BatchFeature, Qwen2VLForConditionalGeneration

        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            data = dict(self.image_processor(images=images, return_tensors="pt"))
            merge = self.image_processor.merge_size**2
            texts = _expand(texts, self.image_token, (data["image_grid_thw"].prod(-1) // merge).tolist())
        if videos is not None:
            import transformers

            if transformers.__version__.startswith("4."):
                raise ValueError(
                    f"vtc's QwenProcessor prepares videos with transformers 5's PIL image processor, whose resizing "
                    f"matches the video processor's; transformers {transformers.__version__}'s sizes them otherwise. "
                    "Use transformers >= 5 for videos, or the model's own processor (it needs torchvision)"
                )
            pixels, grids = zip(*(self._video(frames) for frames in videos), strict=True)
            data["pixel_values_videos"] = torch.cat(pixels)
            data["video_grid_thw"] = torch.tensor(grids)
            merge = self.video_processor.merge_size**2
            texts = _expand(texts, self.video_token, (data["video_grid_thw"].prod(-1) // merge).tolist())
        tokens = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs)
        data.update(tokens)
        if "mm_token_type_ids" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters:
            ids = data["input_ids"]
            data["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        return BatchFeature(data, tensor_type=return_tensors)

    def _video(self, frames) -> tuple[torch.Tensor, list[int]]:
        """One video's patches [t * h * w, C * T * P * P] and its grid [t, h, w]."""
        frames = list(frames)
        if not frames:
            raise ValueError("a video needs at least one frame")
        processor = self.video_processor
        temporal, patch, merge = processor.temporal_patch_size, processor.patch_size, processor.merge_size
        # Each frame alone, as an image of one temporal slice: patches (h / m, w / m, m, m) x (C, P, P).
        out = processor(images=frames, temporal_patch_size=1, return_tensors="pt")
        sizes = {tuple(grid) for grid in out["image_grid_thw"].tolist()}
        if len(sizes) != 1:
            raise ValueError(f"a video's frames must all have one size; these resize to grids {sorted(sizes)}")
        _, h, w = sizes.pop()
        x = out["pixel_values"].reshape(len(frames), h // merge, w // merge, merge, merge, -1, patch, patch)
        if pad := -len(frames) % temporal:  # as the video processor does: repeat the last frame
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        t = x.shape[0] // temporal
        x = x.reshape(t, temporal, *x.shape[1:]).permute(0, 2, 3, 4, 5, 6, 1, 7, 8)  # t, h/m, w/m, m, m, C, T, P, P
        return x.reshape(t * h * w, -1), [t, h, w]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _expand(texts: list[str], token: str, counts: list[int]) -> list[str]:
    """Each ``token`` in ``texts`` (in order over the batch) repeated its count of times."""
    remaining = iter(counts)
    expanded = []
    for line in texts:
        parts = line.split(token)
        out = parts[0]
        for part in parts[1:]:
            out += token * next(remaining) + part
        expanded.append(out)
    return expanded


_VIDEO_KEYS = (
    "do_resize", "size", "min_pixels", "max_pixels", "resample", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std", "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size",
)  # fmt: skip
_VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}  # Qwen2VLVideoProcessor's default


def _video_settings(source: Path) -> dict | None:
    """The image-processor arguments of the checkpoint's own video processor config, found where transformers looks
    first (processor_config.json's ``video_processor``, then video_preprocessor_config.json); None without one."""
    import json

    settings = None
    nested = source / "processor_config.json"
    if nested.is_file():
        settings = json.loads(nested.read_text()).get("video_processor")
    own = source / "video_preprocessor_config.json"
    if settings is None and own.is_file():
        settings = json.loads(own.read_text())
    if settings is None:
        return None
    out = {key: settings[key] for key in _VIDEO_KEYS if key in settings}
    # As Qwen2VLVideoProcessor.__init__: its default size, min_pixels / max_pixels overriding either edge.
    size = dict(out.pop("size", None) or _VIDEO_SIZE)
    if (low := out.pop("min_pixels", None)) is not None:
        size["shortest_edge"] = low
    if (high := out.pop("max_pixels", None)) is not None:
        size["longest_edge"] = high
    return {**out, "size": size}


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
