"""The synthetic clips: deterministic, disjoint splits, answers that follow from the tracks, pixels that show them,
and a uniform answer prior per family.

Expectations are recomputed from each clip's ``tracks`` and frames (and the module's constants), never by calling
the generator's private helpers.
"""

import hashlib
import re
from collections import Counter

import numpy as np
import pytest

from vtc.organisms import clips
from vtc.organisms.clips import COLORS, DIRECTIONS, FAMILIES, FRAMES, SHAPES, SPLITS

RENDERED = 30  # clips drawn per split (10 per family)
PRIOR = 1200  # questions per split for the prior (400 per family; questions need no drawing)
GAP = 3
CLOSE, FAR = 40, 40  # max |channel| difference of a shape's pixels from its colour; min for the background's
ANSWERS = {
    "moving": {"0", "1", "2", "3"},
    "direction": {"left", "right", "up", "down"},
    "appears": set(COLORS),
}
DIRECTION_Q = re.compile(r"which way does the (\w+) (\w+) move \?")


@pytest.fixture(scope="module")
def rendered():
    return {split: [clips.clip(split, i) for i in range(RENDERED)] for split in SPLITS}


def digest(clip):
    return hashlib.sha256(b"".join(frame.tobytes() for frame in clip.frames)).hexdigest()


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def patch_mean(frame, box):
    """The mean RGB of the 3 x 3 pixels at the box's centre (inside every shape drawn 12 px or larger)."""
    x, y = (int(v) for v in centre(box))
    return np.asarray(frame, dtype=np.float64)[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)


# Determinism and errors


def test_same_split_and_index_give_the_same_clip():
    a, b = clips.clip("train", 5), clips.clip("train", 5)
    assert digest(a) == digest(b)
    assert a.tracks == b.tracks and a.question == b.question
    assert clips.question("train", 5) == a.question
    assert len(a.frames) == FRAMES == 8
    assert {(f.mode, f.size) for f in a.frames} == {("RGB", (128, 128))}


def test_splits_share_no_clip(rendered):
    digests = {split: {digest(c) for c in rendered[split]} for split in SPLITS}
    for split in SPLITS:
        assert len(digests[split]) == RENDERED, f"repeated clip within {split}"
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


def test_other_frame_counts():
    four = clips.clip("test", 3, frames=4)
    assert len(four.frames) == 4 and all(len(t.boxes) == 4 for t in four.tracks)
    assert four.question == clips.question("test", 3, frames=4)


@pytest.mark.parametrize("frames", [2, 5, 0, True, 8.0])
def test_bad_frame_counts_raise(frames):
    with pytest.raises(ValueError, match="frames must be an even integer >= 4"):
        clips.clip("test", 0, frames=frames)


@pytest.mark.parametrize(("split", "index", "message"), [("dev", 0, "unknown split"), ("test", -1, "index")])
def test_bad_split_or_index_raise(split, index, message):
    with pytest.raises(ValueError, match=message):
        clips.clip(split, index)


# Layout and answers, from the tracks


def test_tracks_and_answers(rendered):
    for c in (c for split in SPLITS for c in rendered[split]):
        where = f"{c.split}/{c.index}"
        tracks = c.tracks
        assert c.family == FAMILIES[c.index % 3], where
        assert 2 <= len(tracks) <= 4, where
        assert len({t.color for t in tracks}) == len(tracks), f"{where}: repeated colour"
        assert all(t.color in COLORS and t.shape in SHAPES for t in tracks), where
        late = [t for t in tracks if t.first > 0]
        assert len(late) == 1, f"{where}: {len(late)} shapes appear late"
        assert late[0].first % 2 == 0 and 2 <= late[0].first <= FRAMES - 2, where
        moving = [t for t in tracks if t.boxes[0] != t.boxes[-1]]
        assert [t.moves for t in tracks] == [t in moving for t in tracks], where
        assert late[0] not in moving, f"{where}: the late shape moves"
        for t in tracks:
            width = t.boxes[0][2] - t.boxes[0][0] + 1
            assert 12 <= width <= 22, where
            for box in t.boxes:
                assert 0 <= box[0] <= box[2] < 128 and 0 <= box[1] <= box[3] < 128, f"{where}: {t.name} leaves"
                assert (box[2] - box[0] + 1, box[3] - box[1] + 1) == (width, width), where
            steps = {tuple(b - a for a, b in zip(t.boxes[f], t.boxes[f + 1], strict=True)) for f in range(FRAMES - 1)}
            assert len(steps) == 1, f"{where}: {t.name} does not move at constant velocity"
            (dx, dy, _, _) = steps.pop()
            if t.moves:
                assert (dx == 0) != (dy == 0), f"{where}: {t.name} moves diagonally"
                assert 42 <= (abs(dx) + abs(dy)) * (FRAMES - 1) <= 63, f"{where}: {t.name} moves too little/much"
                assert (np.sign(dx), np.sign(dy)) == DIRECTIONS[t.direction], where
        paths = [tuple(f(b[k] for b in t.boxes) for k, f in enumerate((min, min, max, max))) for t in tracks]
        for i, a in enumerate(paths):
            for b in paths[i + 1 :]:
                apart = a[2] + GAP < b[0] or b[2] + GAP < a[0] or a[3] + GAP < b[1] or b[3] + GAP < a[1]
                assert apart, f"{where}: two paths come closer than {GAP} px"
        q = c.question
        if q.family == "moving":
            assert q.question == "how many shapes move ?" and q.answer == str(len(moving)), where
        elif q.family == "direction":
            color, shape = DIRECTION_Q.fullmatch(q.question).groups()
            [asked] = [t for t in tracks if (t.color, t.shape) == (color, shape)]
            (x0, y0), (x1, y1) = centre(asked.boxes[0]), centre(asked.boxes[-1])
            seen = {(-1, 0): "left", (1, 0): "right", (0, -1): "up", (0, 1): "down"}[
                (int(np.sign(x1 - x0)), int(np.sign(y1 - y0)))
            ]
            assert q.answer == seen, where
        else:
            assert q.question == "what color is the shape that appears last ?" and q.answer == late[0].color, where


def test_pixels_show_the_tracks(rendered):
    """A visible shape's colour at its centre in every frame; the background there before the late one appears."""
    for c in rendered["test"]:
        for f, frame in enumerate(c.frames):
            for t in c.tracks:
                distance = np.abs(patch_mean(frame, t.boxes[f]) - COLORS[t.color]).max()
                if f >= t.first:
                    assert distance <= CLOSE, f"test/{c.index} frame {f}: {t.name} not drawn"
                else:
                    assert distance >= FAR, f"test/{c.index} frame {f}: {t.name} drawn before it appears"


def test_frames_differ_by_fresh_noise():
    frames = [np.asarray(f, dtype=np.int16) for f in clips.clip("test", 0).frames]
    assert not np.array_equal(frames[0], frames[1])


# The answer prior


@pytest.mark.parametrize("split", ["train", "test"])
def test_answer_prior_is_uniform_in_each_family(split):
    questions = [clips.question(split, i) for i in range(PRIOR)]
    for family, answers in ANSWERS.items():
        counts = Counter(q.answer for q in questions if q.family == family)
        assert set(counts) == answers, family
        expected = PRIOR / 3 / len(answers)
        for answer, n in counts.items():
            assert 0.6 * expected <= n <= 1.4 * expected, f"{split} {family} {answer!r}: {n}, expected ~{expected}"
    assert set(clips.answers()) == set().union(*ANSWERS.values())
    words = set(clips.vocabulary())
    assert all(set(q.question.split()) <= words for q in questions[:30])
