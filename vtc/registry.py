"""Name -> class registries of methods and model families, filled by the classes themselves.

A method file decorates its class with ``@register``; a family's adapter file decorates its adapter with
``@register_family``. ``vtc.methods`` and ``vtc.adapters`` import every such file, and ``import vtc`` imports
both, so the tables are complete once vtc is imported. This module imports nothing of vtc: a class's ``stage`` says
which table it goes to.
"""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

METHODS: dict[str, type] = {}  # pre-LLM methods (vtc.Method): choose visual tokens before the language model
LAYERWISE_METHODS: dict[str, type] = {}  # in-LLM methods (vtc.LayerwiseMethod): drop between decoder layers
ADAPTERS: dict[str, type] = {}  # config.model_type -> adapter class (a vtc.adapters.base.Adapter)
LAYOUTS = ("grid", "anyres", "merged_grid", "tiles")  # how an adapter's tokens tile an image (see vtc.geometry)
RESERVED = ("none",)  # the name of the identity stage of an in-LLM method alone

T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator of a method: makes it available by its ``name`` to vtc.compress, vtc.select and the CLIs."""
    tables = {"pre": METHODS, "llm": LAYERWISE_METHODS}
    table = tables.get(getattr(cls, "stage", None)) if isinstance(cls, type) else None
    if table is None:
        raise TypeError(f"@register takes a vtc.Method or vtc.LayerwiseMethod subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute name = '...' to be registered")
    if name in RESERVED:
        raise ValueError(f"the method name {name!r} is reserved; choose another")
    known = {**METHODS, **LAYERWISE_METHODS}.get(name)
    if known is not None and not _same_class(known, cls):  # the same class again: a module reloaded, a cell re-run
        raise ValueError(f"a method named {name!r} is already registered ({known.__module__}.{known.__qualname__})")
    for other in tables.values():
        other.pop(name, None)
    table[name] = cls
    return cls


def register_family(cls: T) -> T:
    """Class decorator of a model-family adapter: serves every ``config.model_type`` in its ``model_types``."""
    types = getattr(cls, "model_types", ())
    if getattr(cls, "layout", None) not in LAYOUTS:
        raise TypeError(f"{cls.__name__} needs layout = one of {list(LAYOUTS)}: how its tokens tile an image")
    if not getattr(cls, "modules", ()):
        raise TypeError(f"{cls.__name__} needs modules = ('<vision tower>', ..., 'language_model'): what it hooks")
    if not types:
        raise TypeError(
            f"{cls.__name__} needs model_types = {{'<config.model_type>': '<family name>'}}: the model types it serves"
        )
    taken = sorted(t for t in types if t in ADAPTERS and not _same_class(ADAPTERS[t], cls))
    if taken:
        raise ValueError(f"model_type(s) {taken} already have an adapter ({ADAPTERS[taken[0]].__name__})")
    for model_type in types:
        ADAPTERS[model_type] = cls
    return cls


def _same_class(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def list_methods(stage: str | None = None, *, images: bool = False) -> list[str]:
    """Names accepted by :func:`vtc.compress`: all, or only ``stage="pre"`` (before the language model; these
    also work with :func:`vtc.select`) or ``stage="llm"`` (between decoder layers). ``images=True`` leaves out the
    temporal methods (``evs``), which plan over a video's frames and refuse images."""
    if stage not in (None, "pre", "llm"):
        raise ValueError(f"stage must be None, 'pre' or 'llm', got {stage!r}")
    names = ([] if stage == "llm" else list(METHODS)) + ([] if stage == "pre" else list(LAYERWISE_METHODS))
    known = {**METHODS, **LAYERWISE_METHODS}
    return sorted(name for name in names if not (images and known[name].temporal))


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


def get_method(name: str, **options: Any) -> Any:
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


def get_adapter_class(model: Any) -> type:
    """The adapter of ``model`` (or of a config), by its ``config.model_type``; a clear error if none."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"vtc does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported model_types: {list_models()}"
        )
    return ADAPTERS[model_type]
