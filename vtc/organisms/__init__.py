"""Small VLMs trained in this project on synthetic scenes, shipped with vtc for offline accuracy measurements.

``shapes-llava`` (LlavaForConditionalGeneration, CLIP tower with [CLS]) sees a 128 px scene as 256 visual tokens.
Its model card is ``vtc/organisms/shapes-llava/README.md``; :mod:`vtc.organisms.scenes` makes the data,
:mod:`vtc.organisms.train` trains it. The Qwen2-VL organism (``--family qwen2vl``: no [CLS], M-RoPE, the same 256
tokens) builds and trains with the same code but is not shipped yet. Wherever vtc asks for a model (``python -m
vtc``, ``python -m eval``, the demo, the benchmarks) a shipped name resolves to its directory, which loads offline
with ``from_pretrained`` / ``AutoProcessor``.
"""

from __future__ import annotations

from pathlib import Path

ORGANISMS = {"shapes-llava": "llava"}  # shipped name -> build family
_ROOT = Path(__file__).parent


def path(name: str) -> Path:
    """The directory of a shipped organism."""
    if name not in ORGANISMS:
        raise ValueError(f"unknown organism {name!r}; the shipped ones are {', '.join(ORGANISMS)}")
    directory = _ROOT / name
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory} holds no model.safetensors: is this a complete vtc checkout?")
    return directory
