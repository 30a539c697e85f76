"""The synthetic video QA of :mod:`vtc.organisms.clips`: 8-frame clips of moving shapes, generated, no data files.

``--data`` may name the split (``test``, the default, or ``validation``). Clip i asks one question, its family cycling
(moving, direction, appears), so any ``--limit`` keeps the families balanced within one. Each sample carries a video
(a loader returning the clip's frames) and no image. Answers are one word, scored by exact match after lower-casing
and stripping punctuation; number words count as digits ("Two." is "2", "none" is "0").
"""

from __future__ import annotations

from vtc.eval.tasks.base import Sample, Task, check_limit
from vtc.eval.tasks.shapes import normalize as _normalize
from vtc.organisms import clips

_NUMBERS = {"zero": "0", "none": "0", "one": "1"}


def normalize(text: str) -> str:
    word = _normalize(text)
    return _NUMBERS.get(word, word)


class MovingShapesTask(Task):
    name = "moving_shapes"
    needs_data = False
    max_new_tokens = 4
    clips_per_split = 600  # 200 questions per family

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        split = data or "test"
        if split not in ("test", "validation"):
            raise ValueError(f"moving_shapes: --data names the split, 'test' (default) or 'validation'; got {split!r}")
        count = self.clips_per_split if limit is None else min(self.clips_per_split, limit)
        out = []
        for index in range(count):
            question = clips.question(split, index)
            out.append(
                Sample(
                    id=f"{split}-{index}-{question.family}",
                    question=question.question,
                    answer=question.answer,
                    family=question.family,
                    video=_Video(split, index),
                    meta={"clip": index},
                )
            )
        return out

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": float(normalize(prediction) == sample.answer)}


class _Video:
    """Renders the clip's frames on call (nothing is held in memory)."""

    def __init__(self, split: str, index: int):
        self.split, self.index = split, index

    def __call__(self):
        return list(clips.clip(self.split, self.index).frames)
