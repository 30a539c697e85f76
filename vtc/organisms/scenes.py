"""Synthetic scene VQA: small shapes on a noisy background, and questions that need different visual evidence.

Every scene is a pure function of ``(split, index)``: the same image and questions on every machine (PIL drawing
without fonts or anti-aliasing; the sign's characters are drawn from the bitmaps below). A scene holds 2-5 shapes
(circle, square, triangle, cross) in six colours, small (9-13 px) or large (18-26 px), no two with the same colour
and shape, and one white sign with a dark digit or letter. Six question families, one question each per scene:

======== ================================================ ===========================
family   question                                         answers
======== ================================================ ===========================
count    how many shapes are there ?                      2 3 4 5
color    what color is the triangle ?                     red green blue yellow ...
shape    what shape is the red object ?                   circle square triangle cross
exists   is there a red circle ?                          yes no (half each)
position is the red circle left of the blue square ?      yes no (left/right/above/below)
read     what is written on the sign ?                    0-9 e h k p x z
======== ================================================ ===========================

Splits are disjoint by construction (the seed hashes the split name): ``train``, ``validation``, ``test``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
SPLITS = ("train", "validation", "test")
FAMILIES = ("count", "color", "shape", "exists", "position", "read")
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 190),
    "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = ("left of", "right of", "above", "below")
SMALL_SIZES = (9, 13)
LARGE_SIZES = (18, 26)
MIN_OBJECTS, MAX_OBJECTS = 2, 5

# 5x7 bitmaps, drawn at 2x: the sign is 14 x 18 px, about 2 x 3 patches of 8 px.
GLYPHS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    "e": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "h": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "k": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "p": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "x": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
    "z": ("11111", "00001", "00010", "00100", "01000", "10000", "11111"),
}
SIGN_SIZE = (14, 18)  # width, height


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive), pixels

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Question:
    family: str
    question: str
    answer: str


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    image: Image.Image
    shapes: tuple[Shape, ...]
    sign: str
    sign_box: tuple[int, int, int, int]
    questions: tuple[Question, ...]  # one per family, in FAMILIES order


def scene(split: str, index: int) -> Scene:
    """The scene ``index`` of ``split`` (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    seed = int.from_bytes(hashlib.sha256(f"vtc-shapes:{split}:{index}".encode()).digest()[:8], "little")
    rng = random.Random(seed)
    shapes, sign, sign_box = _layout(rng)
    image = _draw(shapes, sign, sign_box, np.random.default_rng(seed))
    questions = tuple(_ask(family, shapes, sign, rng) for family in FAMILIES)
    return Scene(split, index, image, tuple(shapes), sign, sign_box, questions)


def answers() -> list[str]:
    """Every answer any question can have."""
    counts = {str(n) for n in range(MIN_OBJECTS, MAX_OBJECTS + 1)}
    return sorted(counts | set(COLORS) | set(SHAPES) | set(GLYPHS) | {"yes", "no"})


def vocabulary() -> list[str]:
    """Every word (whitespace/punctuation token) of the questions and answers."""
    words = set(answers())
    for text in ("how many shapes are there ?", "what color is the", "what shape is the object ?",
                 "is there a", "is the", "what is written on the sign ?", *RELATIONS):  # fmt: skip
        words.update(text.split())
    return sorted(words)


def _layout(rng: random.Random) -> tuple[list[Shape], str, tuple[int, int, int, int]]:
    """Objects with distinct (colour, shape), at least one unique shape and one unique colour, no overlaps."""
    while True:
        count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], count)
        colors = [c for c, _ in kinds]
        shapes = [s for _, s in kinds]
        if any(shapes.count(s) == 1 for s in shapes) and any(colors.count(c) == 1 for c in colors):
            break
    width, height = SIGN_SIZE
    boxes = [_place(rng, width, height, [])]
    for _ in kinds:
        low, high = SMALL_SIZES if rng.random() < 0.5 else LARGE_SIZES
        size = rng.randint(low, high)
        boxes.append(_place(rng, size, size, boxes))
    objects = [Shape(s, c, box) for (c, s), box in zip(kinds, boxes[1:], strict=True)]
    return objects, rng.choice(sorted(GLYPHS)), boxes[0]


def _place(rng: random.Random, width: int, height: int, taken: list[tuple[int, int, int, int]]):
    for _ in range(1000):
        x0 = rng.randint(2, IMAGE_SIZE - width - 2)
        y0 = rng.randint(2, IMAGE_SIZE - height - 2)
        box = (x0, y0, x0 + width - 1, y0 + height - 1)
        gap = 3
        if all(box[2] + gap < b[0] or b[2] + gap < box[0] or box[3] + gap < b[1] or b[3] + gap < box[1] for b in taken):
            return box
    raise RuntimeError("could not place an object without overlap")  # not reached with these sizes


def background(rng: np.random.Generator) -> Image.Image:
    """The muted background: a random grey-brown tint, a smooth gradient, stripes and per-pixel noise."""
    size = IMAGE_SIZE
    base = rng.uniform(90, 170) + rng.uniform(-15, 15, size=3)
    ys, xs = np.mgrid[0:size, 0:size] / size
    gradient = rng.uniform(-30, 30) * xs + rng.uniform(-30, 30) * ys
    stripes = rng.uniform(0, 10) * np.sin(2 * np.pi * (xs * rng.uniform(2, 8) + ys * rng.uniform(2, 8)))
    noise = rng.normal(0, 12, size=(size, size, 3))
    pixels = base + (gradient + stripes)[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def jitter(color: str, rng: np.random.Generator) -> tuple[int, ...]:
    """The RGB of a named colour, each channel moved by up to 15."""
    return tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[color])


def paint(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...]) -> None:
    """Draw ``shape`` filling ``box`` (x0, y0, x1, y1 inclusive), without anti-aliasing."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross
        third = (x1 - x0 + 1) / 3
        draw.rectangle((x0 + third, y0, x1 - third, y1), fill=fill)
        draw.rectangle((x0, y0 + third, x1, y1 - third), fill=fill)


def _draw(shapes: list[Shape], sign: str, sign_box, rng: np.random.Generator) -> Image.Image:
    image = background(rng)
    draw = ImageDraw.Draw(image)
    for obj in shapes:
        paint(draw, obj.shape, obj.box, jitter(obj.color, rng))
    x0, y0, x1, y1 = sign_box
    draw.rectangle(sign_box, fill=(245, 245, 240))
    ink = (20, 20, 25)
    for row, bits in enumerate(GLYPHS[sign]):
        for col, bit in enumerate(bits):
            if bit == "1":
                px, py = x0 + 2 + 2 * col, y0 + 2 + 2 * row
                draw.rectangle((px, py, px + 1, py + 1), fill=ink)
    return image


def _ask(family: str, shapes: list[Shape], sign: str, rng: random.Random) -> Question:
    if family == "count":
        return Question(family, "how many shapes are there ?", str(len(shapes)))
    if family == "color":
        kinds = [s.shape for s in shapes]
        obj = rng.choice([s for s in shapes if kinds.count(s.shape) == 1])
        return Question(family, f"what color is the {obj.shape} ?", obj.color)
    if family == "shape":
        colors = [s.color for s in shapes]
        obj = rng.choice([s for s in shapes if colors.count(s.color) == 1])
        return Question(family, f"what shape is the {obj.color} object ?", obj.shape)
    if family == "exists":
        present = {(s.color, s.shape) for s in shapes}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return Question(family, f"is there a {color} {shape} ?", "yes")
        # Absent, and hard where possible: its colour or its shape is in the scene.
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == p[0] or s == p[1] for p in present)]
        color, shape = rng.choice(near or absent)
        return Question(family, f"is there a {color} {shape} ?", "no")
    if family == "position":
        return _position(shapes, rng)
    return Question(family, "what is written on the sign ?", sign)


def _position(shapes: list[Shape], rng: random.Random) -> Question:
    """A pair of objects whose centres differ by at least 12 px along the relation's axis; yes or no, half each."""
    pairs = [(a, b) for a in shapes for b in shapes if a is not b]
    rng.shuffle(pairs)
    relations = list(RELATIONS)
    rng.shuffle(relations)
    want = rng.random() < 0.5
    for relation in relations:
        axis = 0 if relation in ("left of", "right of") else 1
        for a, b in pairs:
            delta = a.center[axis] - b.center[axis]
            if abs(delta) < 12:
                continue
            holds = delta < 0 if relation in ("left of", "above") else delta > 0
            if holds == want:
                return Question("position", f"is the {a.name} {relation} the {b.name} ?", "yes" if want else "no")
    # All centres within 12 px on both axes cannot happen for non-overlapping objects; keep a defined answer anyway.
    a, b = pairs[0]
    holds = a.center[0] < b.center[0]
    return Question("position", f"is the {a.name} left of the {b.name} ?", "yes" if holds else "no")
