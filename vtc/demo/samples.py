"""Sample images and questions: synthetic scenes (what the shipped organisms were trained on) and real photos shipped by
installed packages (gradio's media assets; scikit-image's ``skimage.data`` when it is installed). Nothing downloads."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vtc.organisms import clips, scenes

SCENES = 6  # test scenes 0..5, one question family each


@dataclass(frozen=True)
class Sample:
    label: str
    question: str
    load: Callable[[], Image.Image]
    answer: str | None = None  # known for the synthetic scenes


def _scene_sample(index: int) -> Sample:
    scene = scenes.scene("test", index)
    question = scene.questions[index % len(scenes.FAMILIES)]
    return Sample(
        f"scene {index} ({question.family}): {question.question}",
        question.question,
        functools.partial(lambda i: scenes.scene("test", i).image, index),
        question.answer,
    )


def _gradio_photos() -> list[Sample]:
    spec = importlib.util.find_spec("gradio")
    if spec is None or spec.origin is None:
        return []
    folder = Path(spec.origin).parent / "media_assets" / "images"
    photos = [
        ("cheetah.jpg", "what animal is this ?"),
        ("lion.jpg", "what animal is this ?"),
        ("tower.jpg", "what is in the image ?"),
        ("bus.png", "what color is the bus ?"),
        ("groot.jpeg", "what is in the image ?"),
    ]
    return [
        Sample(f"photo: {name} (gradio)", question, functools.partial(_open, folder / name))
        for name, question in photos
        if (folder / name).is_file()
    ]


def _skimage_photos() -> list[Sample]:
    if importlib.util.find_spec("skimage") is None:
        return []
    photos = [("astronaut", "what is in the image ?"), ("coffee", "what is in the cup ?"), ("chelsea", "what animal?")]

    def load(name: str) -> Image.Image:
        from skimage import data

        return Image.fromarray(getattr(data, name)()).convert("RGB")

    return [Sample(f"photo: {name} (scikit-image)", q, functools.partial(load, name)) for name, q in photos]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@functools.cache
def samples() -> tuple[Sample, ...]:
    """Every sample available here, scenes first."""
    return tuple([_scene_sample(i) for i in range(SCENES)] + _gradio_photos() + _skimage_photos())


def by_label(label: str) -> Sample:
    for sample in samples():
        if sample.label == label:
            return sample
    raise KeyError(label)


CLIPS = 6  # test clips 0..5, two of each question family


@dataclass(frozen=True)
class VideoSample:
    label: str
    question: str
    load: Callable[[], list[Image.Image]]  # the frames
    answer: str


def video_samples() -> tuple[VideoSample, ...]:
    """Synthetic test clips (:mod:`vtc.organisms.clips`) with their questions."""
    out = []
    for index in range(CLIPS):
        question = clips.question("test", index)
        load = functools.partial(lambda i: list(clips.clip("test", i).frames), index)
        out.append(VideoSample(f"clip {index} ({question.family}): {question.question}", question.question, load,
                               question.answer))  # fmt: skip
    return tuple(out)


def video_by_label(label: str) -> VideoSample:
    for sample in video_samples():
        if sample.label == label:
            return sample
    raise KeyError(label)
