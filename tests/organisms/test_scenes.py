"""The synthetic scenes: deterministic, well laid out, answers that follow from the layout, pixels that show it.

Every expectation is recomputed here from the scene's ``shapes``, ``sign`` and ``sign_box`` (or from the module's
constants), never by calling the generator's private helpers.
"""

import hashlib
import re

import numpy as np
import pytest

from vtc.organisms import scenes
from vtc.organisms.scenes import COLORS, FAMILIES, GLYPHS, RELATIONS, SHAPES, SPLITS

COUNTS = {"train": 200, "validation": 200, "test": 300}  # the balance checks use the 300 test scenes
GAP = 3  # background pixels at least between two objects (or an object and the sign)
MARGIN = 12  # px between the two centres along the axis a position question asks about
JITTER = 15  # per-channel colour jitter of a shape
INK_MAX, PAPER_MIN = 60, 200  # a glyph pixel is darker than this in every channel, the sign's paper lighter

COUNT_Q = re.compile(r"how many shapes are there \?")
COLOR_Q = re.compile(r"what color is the (\w+) \?")
SHAPE_Q = re.compile(r"what shape is the (\w+) object \?")
EXISTS_Q = re.compile(r"is there a (\w+) (\w+) \?")
POSITION_Q = re.compile(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?")
READ_Q = re.compile(r"what is written on the sign \?")


@pytest.fixture(scope="module")
def rendered():
    return {split: [scenes.scene(split, i) for i in range(n)] for split, n in COUNTS.items()}


def all_scenes(rendered):
    return [s for split in SPLITS for s in rendered[split]]


def ident(scene):
    return f"{scene.split}/{scene.index}"


def digest(scene):
    return hashlib.sha256(scene.image.tobytes()).hexdigest()


def question(scene, family):
    return next(q for q in scene.questions if q.family == family)


def centre(box):
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2, (y0 + y1) / 2


def find(scene, color, shape):
    found = [s for s in scene.shapes if s.color == color and s.shape == shape]
    assert len(found) == 1, f"{ident(scene)}: {color} {shape} named but found {len(found)} times"
    return found[0]


# Determinism and errors


def test_same_split_and_index_give_the_same_scene():
    a, b = scenes.scene("train", 7), scenes.scene("train", 7)
    assert digest(a) == digest(b), "the same scene drew different pixels"
    assert a.questions == b.questions
    assert a.shapes == b.shapes
    assert (a.sign, a.sign_box) == (b.sign, b.sign_box)
    assert (a.split, a.index) == ("train", 7)


def test_image_is_an_rgb_128_px_square():
    image = scenes.scene("validation", 3).image
    assert image.mode == "RGB"
    assert image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE) == (128, 128)


@pytest.mark.parametrize("other", [("validation", 7), ("test", 7), ("train", 8), ("train", 70)])
def test_other_split_or_index_gives_another_scene(other):
    base = scenes.scene("train", 7)
    different = scenes.scene(*other)
    assert digest(base) != digest(different)


def test_splits_share_no_image(rendered):
    digests = {split: {digest(s) for s in rendered[split]} for split in SPLITS}
    for split in SPLITS:
        assert len(digests[split]) == COUNTS[split], f"repeated image within {split}"
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


def test_pixels_are_pinned(rendered):
    """The first 40 scenes of each split, byte for byte as the organisms were trained on them (recorded before
    scenes' drawing helpers were shared with vtc.organisms.clips)."""
    pinned = hashlib.sha256()
    for split in SPLITS:
        for s in rendered[split][:40]:
            pinned.update(s.image.tobytes())
    assert pinned.hexdigest() == "1d5d857ff58665aebf60acdda1e8a9fa57738f11192ca8f0bd52cb41b8815465"


@pytest.mark.parametrize("split", ["dev", "Train", "", "val"])
def test_unknown_split_raises(split):
    with pytest.raises(ValueError, match=rf"unknown split {re.escape(repr(split))}.*train, validation, test"):
        scenes.scene(split, 0)


@pytest.mark.parametrize("index", [-1, -100])
def test_negative_index_raises(index):
    with pytest.raises(ValueError, match=rf"index must be >= 0, got {index}"):
        scenes.scene("train", index)


# Layout


def test_two_to_five_shapes_of_distinct_kinds(rendered):
    for s in all_scenes(rendered):
        assert 2 <= len(s.shapes) <= 5, ident(s)
        kinds = [(o.color, o.shape) for o in s.shapes]
        assert len(set(kinds)) == len(kinds), f"{ident(s)}: repeated kind in {kinds}"
        for o in s.shapes:
            assert o.color in COLORS and o.shape in SHAPES, ident(s)
            assert o.name == f"{o.color} {o.shape}"


def test_sizes_of_shapes_and_sign(rendered):
    for s in all_scenes(rendered):
        for o in s.shapes:
            x0, y0, x1, y1 = o.box
            width, height = x1 - x0 + 1, y1 - y0 + 1
            assert width == height, f"{ident(s)}: {o}"
            assert 9 <= width <= 13 or 18 <= width <= 26, f"{ident(s)}: {o}"
        x0, y0, x1, y1 = s.sign_box
        assert (x1 - x0 + 1, y1 - y0 + 1) == (14, 18), ident(s)  # 5 x 7 cells at 2 px + a 2 px border
        assert s.sign in GLYPHS


def test_boxes_inside_the_image_and_apart(rendered):
    for s in all_scenes(rendered):
        boxes = [o.box for o in s.shapes] + [s.sign_box]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 <= x1 <= 127 and 0 <= y0 <= y1 <= 127, f"{ident(s)}: {(x0, y0, x1, y1)}"
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                # Grow a by GAP on every side: b must stay clear of it, so GAP background pixels separate them.
                grown = (a[0] - GAP, a[1] - GAP, a[2] + GAP, a[3] + GAP)
                meets_x = b[0] <= grown[2] and grown[0] <= b[2]
                meets_y = b[1] <= grown[3] and grown[1] <= b[3]
                assert not (meets_x and meets_y), f"{ident(s)}: {a} and {b} closer than {GAP} px"


# Questions and answers


def test_six_questions_in_family_order(rendered):
    assert FAMILIES == ("count", "color", "shape", "exists", "position", "read")
    for s in all_scenes(rendered):
        assert tuple(q.family for q in s.questions) == FAMILIES, ident(s)


def test_count_answer(rendered):
    for s in all_scenes(rendered):
        q = question(s, "count")
        assert COUNT_Q.fullmatch(q.question), q.question
        assert q.answer == str(len(s.shapes)), ident(s)


def test_color_answer_names_a_unique_shape(rendered):
    for s in all_scenes(rendered):
        q = question(s, "color")
        match = COLOR_Q.fullmatch(q.question)
        assert match, q.question
        named = [o for o in s.shapes if o.shape == match[1]]
        assert len(named) == 1, f"{ident(s)}: {q.question!r} is ambiguous or names nothing"
        assert q.answer == named[0].color, ident(s)


def test_shape_answer_names_a_unique_colour(rendered):
    for s in all_scenes(rendered):
        q = question(s, "shape")
        match = SHAPE_Q.fullmatch(q.question)
        assert match, q.question
        named = [o for o in s.shapes if o.color == match[1]]
        assert len(named) == 1, f"{ident(s)}: {q.question!r} is ambiguous or names nothing"
        assert q.answer == named[0].shape, ident(s)


def test_exists_answer(rendered):
    for s in all_scenes(rendered):
        q = question(s, "exists")
        match = EXISTS_Q.fullmatch(q.question)
        assert match, q.question
        color, shape = match[1], match[2]
        assert color in COLORS and shape in SHAPES, q.question
        present = any(o.color == color and o.shape == shape for o in s.shapes)
        assert q.answer == ("yes" if present else "no"), f"{ident(s)}: {q}"
        if not present:  # the absent object is a hard negative: its colour or its shape is in the scene
            assert any(o.color == color or o.shape == shape for o in s.shapes), f"{ident(s)}: {q}"


def test_position_answer(rendered):
    for s in all_scenes(rendered):
        q = question(s, "position")
        match = POSITION_Q.fullmatch(q.question)
        assert match, q.question
        a, b = find(s, match[1], match[2]), find(s, match[4], match[5])
        assert a != b, f"{ident(s)}: {q.question!r} compares an object with itself"
        relation = match[3]
        (ax, ay), (bx, by) = centre(a.box), centre(b.box)
        delta = ax - bx if relation in ("left of", "right of") else ay - by
        assert abs(delta) >= MARGIN, f"{ident(s)}: {q.question!r} centres only {abs(delta)} px apart"
        # Image y grows downwards: "above" is a smaller y.
        holds = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]
        assert q.answer == ("yes" if holds else "no"), f"{ident(s)}: {q}, centres {(ax, ay)} {(bx, by)}"


def test_read_answer(rendered):
    for s in all_scenes(rendered):
        q = question(s, "read")
        assert READ_Q.fullmatch(q.question), q.question
        assert q.answer == s.sign, ident(s)


def test_answers_and_words_are_known(rendered):
    known = set(scenes.answers())
    words = set(scenes.vocabulary())
    for s in all_scenes(rendered):
        for q in s.questions:
            if q.family in ("exists", "position"):
                assert q.answer in ("yes", "no"), f"{ident(s)}: {q}"
            else:
                assert q.answer in known, f"{ident(s)}: {q}"
            for word in [*q.question.split(), q.answer]:
                assert word in words, f"{ident(s)}: {word!r} of {q} not in vocabulary()"


def test_answers_include_yes_and_no():
    assert {"yes", "no"} <= set(scenes.answers())


def test_answers_and_vocabulary_contents():
    expected = {"2", "3", "4", "5", *COLORS, *SHAPES, *GLYPHS}
    assert expected <= set(scenes.answers())
    assert scenes.answers() == sorted(set(scenes.answers()))
    vocabulary = scenes.vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    assert {"yes", "no", "?", "how", "written", "left", "right", "of", "above", "below", "object"} <= set(vocabulary)


# Pixels


def test_shape_centre_has_its_colour(rendered):
    for s in all_scenes(rendered):
        pixels = np.asarray(s.image).astype(int)
        for o in s.shapes:
            x0, y0, x1, y1 = o.box
            x, y = (x0 + x1) // 2, (y0 + y1) // 2
            if o.shape == "triangle":  # apex up: the centre row is half as wide as the base, just below is safer
                y += 2
            got = pixels[y, x]
            want = np.array(COLORS[o.color])
            assert np.abs(got - want).max() <= JITTER, f"{ident(s)}: {o} has {got.tolist()} at {(x, y)}"


def glyph_mask(sign):
    """[18, 14] bool: where the sign's ink is (each bitmap cell 2 x 2 px, starting 2 px in from the corner)."""
    mask = np.zeros((18, 14), dtype=bool)
    for row, bits in enumerate(GLYPHS[sign]):
        for col, bit in enumerate(bits):
            mask[2 + 2 * row : 4 + 2 * row, 2 + 2 * col : 4 + 2 * col] = bit == "1"
    return mask


def test_sign_shows_its_glyph(rendered):
    for s in all_scenes(rendered):
        x0, y0, x1, y1 = s.sign_box
        crop = np.asarray(s.image)[y0 : y1 + 1, x0 : x1 + 1].astype(int)
        mask = glyph_mask(s.sign)
        assert mask.any()
        assert (crop[mask].max(-1) < INK_MAX).all(), f"{ident(s)}: a glyph pixel of {s.sign!r} is not dark"
        assert (crop[~mask].min(-1) > PAPER_MIN).all(), f"{ident(s)}: paper around {s.sign!r} is not near-white"


def test_sign_is_readable_back():
    # Read the 5 x 7 bits from the centre-left pixel of each 2 x 2 cell and look the bitmap up.
    s = scenes.scene("test", 11)
    x0, y0, _, _ = s.sign_box
    pixels = np.asarray(s.image).astype(int)
    bits = tuple(
        "".join("1" if pixels[y0 + 2 + 2 * r, x0 + 2 + 2 * c].max() < INK_MAX else "0" for c in range(5))
        for r in range(7)
    )
    assert [k for k, v in GLYPHS.items() if v == bits] == [s.sign]


# Balance over the test split


def test_balance(rendered):
    test = rendered["test"]
    n = len(test)
    for family in ("exists", "position"):
        yes = sum(question(s, family).answer == "yes" for s in test) / n
        assert 0.4 <= yes <= 0.6, f"{family}: {yes:.2f} yes"
    assert {question(s, "count").answer for s in test} == {"2", "3", "4", "5"}
    assert {s.sign for s in test} == set(GLYPHS)
    relations = {POSITION_Q.fullmatch(question(s, "position").question)[3] for s in test}
    assert relations == set(RELATIONS)
    assert {question(s, "color").answer for s in test} == set(COLORS)
    assert {question(s, "shape").answer for s in test} == set(SHAPES)


# Bitmaps


def test_glyph_bitmaps():
    assert len(GLYPHS) == 16
    for char, rows in GLYPHS.items():
        assert len(char) == 1
        assert len(rows) == 7, char
        for row in rows:
            assert len(row) == 5 and set(row) <= {"0", "1"}, (char, row)
        assert "1" in "".join(rows), char
    assert len(set(GLYPHS.values())) == len(GLYPHS)
