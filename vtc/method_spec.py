"""Method specs as both command lines take them: ``name[:key=value[:key=value...]]``, comma-separated.

``"fastervlm:signal=attention_received,pdrop:layers=(2,6)"`` names two methods; a value is read as a Python literal
when it is one (``True``, ``3``, ``(2, 6)``), else kept as a string. Commas inside brackets or quotes belong to the
value. ``"none"`` (the uncompressed model, no options) is accepted too. Each spec is checked by building the method,
so unknown names and bad options fail before any model is loaded.
"""

from __future__ import annotations

import ast
from typing import Any

from vtc.registry import get_method

_CLOSING = {"(": ")", "[": "]", "{": "}"}


def split_specs(text: str) -> list[str]:
    """``"a,b:layers=(2,6)"`` -> ``["a", "b:layers=(2,6)"]``: split at the commas outside brackets and quotes,
    stripped, empty parts dropped."""
    parts, current, closers, quote = [], [], [], None
    for char in text:
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _CLOSING:
            closers.append(_CLOSING[char])
        elif closers and char == closers[-1]:
            closers.pop()
        elif char == "," and not closers:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fastervlm:signal=attention_received"`` -> ("fastervlm", {"signal": "attention_received"}); the method and its
    options are checked now (ValueError naming the spec), before any model is loaded."""
    name, *pairs = spec.strip().split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"method option {pair!r} in {spec!r} must be key=value, e.g. 'fastv:layer=3'")
        key, value = pair.split("=", 1)
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    if name != "none":
        try:
            get_method(name, **options)  # unknown names and options fail here
        except TypeError as error:  # a value of the wrong kind that the method's checks did not expect
            raise ValueError(f"bad option value in method {spec!r}: {error}") from error
    elif options:
        raise ValueError("'none' (the uncompressed model) takes no options")
    return name, options
