"""Optional dependencies: a missing one is named together with the extra that installs it."""

from __future__ import annotations

import importlib.util


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip command that brings it."""


def require(extra: str, *modules: str, needed_by: str = "vtc") -> None:
    """Raise :class:`MissingExtra` for the first of ``modules`` (import names) that is not installed."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(
                f'{needed_by} needs {module}, part of the {extra} extra: pip install "vtc[{extra}]"', name=module
            )
