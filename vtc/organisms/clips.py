"""Synthetic video QA: shapes moving in straight lines on a noisy background, and questions that need the frames.

Every clip is a pure function of ``(split, index)`` (and the frame count): the same frames and question on every
machine, drawn with :mod:`vtc.organisms.scenes`' colours, shapes and drawing helpers. A clip is ``FRAMES`` (8)
frames of 128 x 128 px holding 2-4 shapes of distinct colours, 12-22 px wide. Some move at constant velocity left,
right, up or down, 6-9 px a frame (42-63 px over 8 frames: 1.5-2.25 of the 28 px tokens a real Qwen2-VL merges from
2 x 2 patches of 14 px, 5-8 tokens of the shipped organism's 8 px ones); the others stay still. Exactly one still
shape appears late, at an even frame (2, 4 or 6 of 8: a temporal-patch boundary, as Qwen encodes frames in pairs).
No two shapes' paths come within 3 px of each other. The background (scenes' tint, gradient, stripes and noise) is
the same in every frame, plus fresh noise per frame (sigma 4), as a camera adds.

Each clip asks one question; its family cycles with the index (moving, direction, appears, moving, ...). The answer
is drawn first, uniformly, and the clip is built around it, so the answer prior is uniform in each family:

========= ============================================ ======================================== =========
family    question                                     answers                                  prior
========= ============================================ ======================================== =========
moving    how many shapes move ?                       0 1 2 3                                  1/4 each
direction which way does the red circle move ?         left right up down                       1/4 each
appears   what color is the shape that appears last ?  red green blue yellow purple cyan        1/6 each
========= ============================================ ======================================== =========

No single frame answers any of them: a frame shows where a shape is, not whether or where it goes, and whichever
shape appears late is absent from the first frames and indistinguishable from the others in the last ones.
Splits are disjoint by construction (the seed hashes the split name): ``train``, ``validation``, ``test``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vtc.organisms.scenes import COLORS, IMAGE_SIZE, SHAPES, SPLITS, Question, background, jitter, paint

__all__ = ["FAMILIES", "FRAMES", "IMAGE_SIZE", "SPLITS", "Clip", "Track", "answers", "clip", "question", "vocabulary"]

FRAMES = 8
FAMILIES = ("moving", "direction", "appears")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVING_COUNTS = (0, 1, 2, 3)
MIN_SHAPES, MAX_SHAPES = 2, 4
SIZES = (12, 22)
TRAVEL = (42, 63)  # px over the whole clip; the per-frame step is a whole number of px within it
GAP = 3  # px between any two shapes' paths
FRAME_NOISE = 4.0  # sigma of the per-frame noise


@dataclass(frozen=True)
class Track:
    """One shape over the clip: ``boxes[f]`` is its box (x0, y0, x1, y1, inclusive) at frame f, drawn from frame
    ``first`` on; ``direction`` is None for a still shape."""

    shape: str
    color: str
    boxes: tuple[tuple[int, int, int, int], ...]
    first: int
    direction: str | None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def moves(self) -> bool:
        return self.direction is not None


@dataclass(frozen=True)
class Clip:
    split: str
    index: int
    frames: tuple[Image.Image, ...]
    tracks: tuple[Track, ...]
    question: Question

    @property
    def family(self) -> str:
        return self.question.family


def clip(split: str, index: int, frames: int = FRAMES) -> Clip:
    """The clip ``index`` of ``split`` (deterministic); ``frames`` even and >= 4."""
    seed, tracks, asked = _planned(split, index, frames)
    images = _draw(tracks, frames, np.random.default_rng(seed))
    return Clip(split, index, images, tuple(tracks), asked)


def question(split: str, index: int, frames: int = FRAMES) -> Question:
    """The question of clip ``index`` of ``split``, without drawing its frames."""
    return _planned(split, index, frames)[2]


def _planned(split: str, index: int, frames: int) -> tuple[int, list[Track], Question]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"clip index must be an integer >= 0, got {index!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 4 or frames % 2:
        raise ValueError(f"frames must be an even integer >= 4 (Qwen encodes frames in pairs), got {frames!r}")
    seed = int.from_bytes(hashlib.sha256(f"vtc-clips:{split}:{index}".encode()).digest()[:8], "little")
    tracks, asked = _plan(FAMILIES[index % len(FAMILIES)], frames, random.Random(seed))
    return seed, tracks, asked


def answers() -> list[str]:
    """Every answer any question can have."""
    return sorted({str(n) for n in MOVING_COUNTS} | set(DIRECTIONS) | set(COLORS))


def vocabulary() -> list[str]:
    """Every word of the questions and answers."""
    words = set(answers()) | set(SHAPES)
    for text in ("how many shapes move ?", "which way does the", "what color is the shape that appears last ?"):
        words.update(text.split())
    return sorted(words)


def _plan(family: str, frames: int, rng: random.Random) -> tuple[list[Track], Question]:
    """The answer first, uniformly within the family, then a layout that has it."""
    want_direction = want_color = None
    if family == "direction":
        moving = rng.randint(1, max(MOVING_COUNTS))
        want_direction = rng.choice(sorted(DIRECTIONS))
    else:
        moving = rng.choice(MOVING_COUNTS)
        if family == "appears":
            want_color = rng.choice(sorted(COLORS))
    count = rng.randint(max(MIN_SHAPES, moving + 1), MAX_SHAPES)  # + the shape that appears late
    others = [c for c in COLORS if c != want_color]
    colors = ([want_color] if want_color else []) + rng.sample(others, count - (1 if want_color else 0))
    # colors[0] appears late; colors[1 : 1 + moving] move, the first of them in the asked direction.
    directions = [rng.choice(sorted(DIRECTIONS)) for _ in range(moving)]
    if want_direction:
        directions[0] = want_direction
    appear = 2 * rng.randint(1, frames // 2 - 1)
    low = -(-TRAVEL[0] // (frames - 1))
    high = max(low, TRAVEL[1] // (frames - 1))
    while True:
        tracks: list[Track] = []
        for i, color in enumerate(colors):
            direction = directions[i - 1] if 1 <= i <= moving else None
            step = rng.randint(low, high) if direction else 0
            size = rng.randint(*SIZES)
            track = _place(rng, rng.choice(SHAPES), color, size, direction, step, frames, 0 if i else appear, tracks)
            if track is None:
                break
            tracks.append(track)
        else:
            break
    if family == "moving":
        asked = Question(family, "how many shapes move ?", str(moving))
    elif family == "direction":
        mover = tracks[1]
        asked = Question(family, f"which way does the {mover.name} move ?", mover.direction)
    else:
        asked = Question(family, "what color is the shape that appears last ?", tracks[0].color)
    rng.shuffle(tracks)
    return tracks, asked


def _place(rng, shape, color, size, direction, step, frames, first, taken: list[Track]) -> Track | None:
    dx, dy = DIRECTIONS[direction] if direction else (0, 0)
    travel_x, travel_y = dx * step * (frames - 1), dy * step * (frames - 1)
    width, height = size + abs(travel_x), size + abs(travel_y)  # the path's bounding box
    for _ in range(200):
        px = rng.randint(2, IMAGE_SIZE - width - 2)
        py = rng.randint(2, IMAGE_SIZE - height - 2)
        path = (px, py, px + width - 1, py + height - 1)
        if all(_apart(path, _path(t)) for t in taken):
            x0 = px - min(travel_x, 0)
            y0 = py - min(travel_y, 0)
            boxes = tuple(
                (x0 + dx * step * f, y0 + dy * step * f, x0 + dx * step * f + size - 1, y0 + dy * step * f + size - 1)
                for f in range(frames)
            )
            return Track(shape, color, boxes, first, direction)
    return None


def _path(track: Track) -> tuple[int, int, int, int]:
    boxes = track.boxes
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _apart(a, b) -> bool:
    return a[2] + GAP < b[0] or b[2] + GAP < a[0] or a[3] + GAP < b[1] or b[3] + GAP < a[1]


def _draw(tracks: list[Track], frames: int, rng: np.random.Generator) -> tuple[Image.Image, ...]:
    still = background(rng)
    fills = [jitter(track.color, rng) for track in tracks]
    out = []
    for f in range(frames):
        image = still.copy()
        draw = ImageDraw.Draw(image)
        for track, fill in zip(tracks, fills, strict=True):
            if f >= track.first:
                paint(draw, track.shape, track.boxes[f], fill)
        pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, FRAME_NOISE, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"))
    return tuple(out)
