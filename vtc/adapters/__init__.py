"""Model-family adapters: one file per family, each registered by its ``@register_family`` line (vtc.registry).

A family's adapter subclasses :class:`Adapter` and declares what differs (README: "Adding a model family").
Importing this package imports every family file, which fills the registry.
"""

from vtc.adapters import (  # noqa: F401  (registration)
    internvl,
    llava,
    llava_next,
    llava_onevision,
    qwen2_vl,
    qwen3_5,
    qwen3_vl,
)
from vtc.adapters.base import Adapter, Image, Unit

__all__ = ["Adapter", "Image", "Unit"]
