"""Name -> class registries for methods and model adapters (explicit, greppable)."""

from __future__ import annotations

import difflib
from typing import Any

from vtc.adapters.base import Adapter
from vtc.adapters.llava import LlavaAdapter
from vtc.adapters.llava_next import LlavaNextAdapter
from vtc.adapters.qwen2_vl import Qwen2VLAdapter
from vtc.methods.base import Method
from vtc.methods.dart import DART
from vtc.methods.divprune import DivPrune
from vtc.methods.fastervlm import FasterVLM
from vtc.methods.layerwise import DARTLLM, Adaptive, FastV, LayerwiseMethod, PDrop
from vtc.methods.random import Random
from vtc.methods.uniform import Uniform
from vtc.methods.vtc_cls import VTCCLS

METHODS: dict[str, type[Method]] = {
    "fastervlm": FasterVLM,
    "vtc_cls": VTCCLS,
    "divprune": DivPrune,
    "dart": DART,
    "random": Random,
    "uniform": Uniform,
}

# In-LLM methods: drop visual tokens between decoder layers.
LAYERWISE_METHODS: dict[str, type[LayerwiseMethod]] = {
    "fastv": FastV,
    "pdrop": PDrop,
    "dart_llm": DARTLLM,
    "adaptive": Adaptive,
}

# config.model_type -> adapter
ADAPTERS: dict[str, type[Adapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2VLAdapter,
}


def list_methods(stage: str | None = None) -> list[str]:
    """Names accepted by :func:`vtc.compress`: all, or only ``stage="pre"`` (before the language model; these
    also work with :func:`vtc.select`) or ``stage="llm"`` (between decoder layers)."""
    if stage not in (None, "pre", "llm"):
        raise ValueError(f"stage must be None, 'pre' or 'llm', got {stage!r}")
    names = ([] if stage == "llm" else list(METHODS)) + ([] if stage == "pre" else list(LAYERWISE_METHODS))
    return sorted(names)


def list_models() -> list[str]:
    """Supported ``model.config.model_type`` values."""
    return sorted(ADAPTERS)


def adapter_options() -> dict[str, list[str]]:
    """Adapter option name -> the model_types that accept it."""
    options: dict[str, list[str]] = {}
    for model_type, adapter in ADAPTERS.items():
        for name in adapter.options:
            options.setdefault(name, []).append(model_type)
    return options


def get_method(name: str, **options: Any) -> Method | LayerwiseMethod:
    """Build a method by name, e.g. ``get_method("dart", merge=True)``."""
    known = {**METHODS, **LAYERWISE_METHODS}
    if not isinstance(name, str) or name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}; known methods: {list_methods()}.{hint}")
    cls = known[name]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; its options: {cls.options() or 'none'}")
    return cls(**options)


def get_adapter_class(model: Any) -> type[Adapter]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"vtc does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported model_types: {list_models()}"
        )
    return ADAPTERS[model_type]
