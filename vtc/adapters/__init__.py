"""Model-family adapters: one file per family, each registered by its ``@register_family`` line (vtc.registry).

Importing this package imports every family file, which fills the registry.
"""

from vtc.adapters import llava, llava_next, qwen2_vl  # noqa: F401  (registration)
