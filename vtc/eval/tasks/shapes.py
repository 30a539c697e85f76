"""The synthetic scene VQA of :mod:`vtc.organisms.scenes`: generated, so it needs no data files.

``--data`` may name the split (``test``, the default, or ``validation``). Samples run scene by scene (the six
questions of scene 0, then of scene 1, ...), so any ``--limit`` keeps the families balanced. Questions are asked
as the organisms were trained (no instruction suffix); answers are one word, scored by exact match after
lower-casing and stripping punctuation, so a real model's "Red." counts as "red".
"""

from __future__ import annotations

import math
import string

from vtc.eval.tasks.base import Sample, Task, check_limit
from vtc.organisms import scenes

_NUMBERS = {"two": "2", "three": "3", "four": "4", "five": "5"}


def normalize(text: str) -> str:
    words = text.strip().lower().split()
    word = words[0].strip(string.punctuation) if words else ""
    return _NUMBERS.get(word, word)


class ShapesTask(Task):
    name = "shapes"
    needs_data = False
    max_new_tokens = 4
    scenes_per_split = 500  # 3000 questions

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        split = data or "test"
        if split not in ("test", "validation"):
            raise ValueError(f"shapes: --data names the split, 'test' (default) or 'validation'; got {split!r}")
        count = self.scenes_per_split if limit is None else min(self.scenes_per_split, math.ceil(limit / 6))
        out = []
        for index in range(count):
            for family, question in zip(scenes.FAMILIES, _questions(split, index), strict=True):
                out.append(
                    Sample(
                        id=f"{split}-{index}-{family}",
                        question=question.question,
                        answer=question.answer,
                        family=family,
                        image=_Image(split, index),
                        meta={"scene": index},
                    )
                )
        return out[:limit] if limit is not None else out

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": float(normalize(prediction) == sample.answer)}


def _questions(split: str, index: int):
    return scenes.scene(split, index).questions


class _Image:
    """Renders the scene on call (scenes are cheap to draw; nothing is held in memory)."""

    def __init__(self, split: str, index: int):
        self.split, self.index = split, index

    def __call__(self):
        return scenes.scene(self.split, self.index).image
