"""Small VLMs trained in this project on synthetic scenes, shipped with vtc for offline accuracy measurements.

``shapes-llava`` (LlavaForConditionalGeneration: a CLIP tower with [CLS], 8 px patches) and ``shapes-qwen2vl``
(Qwen2VLForConditionalGeneration: no [CLS], 4 px patches merged 2 x 2, M-RoPE) each see a 128 px scene as 256 visual
tokens. Their model cards are ``vtc/organisms/<name>/README.md``; :mod:`vtc.organisms.scenes` makes the data,
``training/organisms.py`` in the repository (not shipped) trains them. Wherever vtc asks for a model (``vtc run``,
``vtc eval``, ``vtc demo``, the benchmarks) a shipped name resolves to its directory, which loads offline with
``from_pretrained`` / ``AutoProcessor`` (:func:`vtc.loading.load_processor` where transformers needs torchvision for
Qwen's).
"""

from __future__ import annotations

from pathlib import Path

ORGANISMS = ("shapes-llava", "shapes-qwen2vl")  # the shipped ones, by name
_ROOT = Path(__file__).parent


def path(name: str) -> Path:
    """The directory of a shipped organism."""
    if name not in ORGANISMS:
        raise ValueError(f"unknown organism {name!r}; the shipped ones are {', '.join(ORGANISMS)}")
    directory = _ROOT / name
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory} holds no model.safetensors: is this a complete vtc checkout?")
    return directory
