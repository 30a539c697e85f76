"""Write the tiny benchmark fixtures under tests/eval/fixtures/ in the real formats.

Parquet files mirror the lmms-lab exports on the Hugging Face hub (column names, and images as HF ``Image``
features: a struct {bytes, path} holding PNG bytes); GQA keeps questions and images in two tables joined on
imageId; the jsonl/ directory holds the .jsonl variant, whose image column is a path relative to the .jsonl.
Every image is a solid 8x8 PNG whose colour identifies it (see COLORS). Run from the repository root:

    python tests/eval/make_fixtures.py
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"

# Image name -> RGB colour. "gray" is stored as a one-channel (L) PNG to check the conversion to RGB.
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(name: str) -> bytes:
    image = Image.new("L", (8, 8), COLORS[name][0]) if name == "gray" else Image.new("RGB", (8, 8), COLORS[name])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_cell(name: str | None) -> dict | None:
    return None if name is None else {"bytes": png(name), "path": None}


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema, row_group_size: int | None = None) -> None:
    """Rows (with image names in the image column) -> parquet with embedded PNG bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    converted = [{k: image_cell(v) if k == "image" else v for k, v in row.items()} for row in rows]
    pq.write_table(pa.Table.from_pylist(converted, schema=schema), path, row_group_size=row_group_size)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rows -> .jsonl, the image column as images/<name>.png next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            name = row["image"]
            (path.parent / "images").mkdir(exist_ok=True)
            (path.parent / "images" / f"{name}.png").write_bytes(png(name))
            handle.write(json.dumps({**row, "image": f"images/{name}.png"}) + "\n")


S = pa.string()

GQA_QUESTIONS = [
    ("q1", "n200", "What color is the square?", "green", "query"),
    ("q2", "n100", "Is the square red?", "yes", "verify"),
    ("q3", "n300", "Is the square red or blue?", "blue", "choose"),
    ("q4", "n100", "Is there a circle?", "no", "verify"),
    ("q5", "n300", "What shape is this?", "square", "query"),
]
GQA_IMAGES = {"n100": "red", "n200": "green", "n300": "blue", "n999": "white"}

POPE_ROWS = [
    ("adversarial", "1", "Is there a dog in the image?", "yes", "red"),
    ("adversarial", "2", "Is there a cat in the image?", "no", "red"),
    ("popular", "1", "Is there a person in the image?", "yes", "green"),
    ("popular", "2", "Is there a car in the image?", "no", "green"),
    ("random", "1", "Is there a chair in the image?", "yes", "blue"),
    ("random", "2", "Is there a kite in the image?", "no", "blue"),
]


def gqa(root: Path) -> None:
    types = pa.struct([("structural", S), ("semantic", S), ("detailed", S)])
    schema = pa.schema(
        [("id", S), ("imageId", S), ("question", S), ("answer", S), ("fullAnswer", S), ("isBalanced", pa.bool_())]
        + [("types", types)]
    )
    rows = [
        {
            "id": qid,
            "imageId": image_id,
            "question": question,
            "answer": answer,
            "fullAnswer": f"The answer is {answer}.",
            "isBalanced": True,
            "types": {"structural": structural, "semantic": "attr", "detailed": "fixture"},
        }
        for qid, image_id, question, answer, structural in GQA_QUESTIONS
    ]
    write_parquet(root / "testdev_balanced_instructions/testdev-00000-of-00001.parquet", rows, schema, 2)
    # Another config of the export, which a directory load must ignore.
    write_parquet(root / "train_all_instructions/train-00000-of-00001.parquet", [{**rows[0], "id": "t1"}], schema)
    images = [{"id": image_id, "image": color} for image_id, color in GQA_IMAGES.items()]
    write_parquet(
        root / "testdev_balanced_images/testdev-00000-of-00001.parquet",
        images,
        pa.schema([("id", S), ("image", IMAGE_TYPE)]),
        2,
    )


def vqav2(root: Path) -> None:
    answer = pa.struct([("answer", S), ("answer_confidence", S), ("answer_id", pa.int64())])
    schema = pa.schema(
        [
            ("question_type", S),
            ("multiple_choice_answer", S),
            ("answers", pa.list_(answer)),
            ("image_id", pa.int64()),
            ("answer_type", S),
            ("question_id", pa.int64()),
            ("question", S),
            ("image", IMAGE_TYPE),
        ]
    )
    questions = [
        (1, "how many", "number", "How many dogs are there?", ["2", "2", "two"] + ["3"] * 7, "red"),
        (2, "is the", "yes/no", "Is the sky blue?", ["yes"] * 10, "blue"),
        (3, "what is", "other", "What is on the table?", ["a laptop"] * 2 + ["computer"] * 8, "gray"),
        (4, "what color", "other", "What color is the car?", ["red"] * 10, "red"),
    ]
    rows = [
        {
            "question_type": qtype,
            "multiple_choice_answer": max(set(answers), key=answers.count),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
            "image_id": 1000 + qid,
            "answer_type": atype,
            "question_id": qid,
            "question": question,
            "image": image,
        }
        for qid, qtype, atype, question, answers, image in questions
    ]
    write_parquet(root / "data/validation-00000-of-00001.parquet", rows, schema)


def textvqa(root: Path) -> None:
    schema = pa.schema(
        [
            ("image_id", S),
            ("question_id", pa.int32()),
            ("question", S),
            ("image", IMAGE_TYPE),
            ("answers", pa.list_(S)),
            ("ocr_tokens", pa.list_(S)),
            ("set_name", S),
        ]
    )
    questions = [
        (10, "what brand is this?", ["coca cola"] * 4 + ["coca-cola"] * 6, "red"),
        (11, "what number is on the jersey?", ["23"] + ["32"] * 9, "white"),
        (12, "what does the sign say?", ["stop"] * 10, "red"),
    ]
    rows = [
        {
            "image_id": f"img{qid}",
            "question_id": qid,
            "question": question,
            "image": image,
            "answers": answers,
            "ocr_tokens": ["fixture"],
            "set_name": "val",
        }
        for qid, question, answers, image in questions
    ]
    write_parquet(root / "data/validation-00000-of-00001.parquet", rows, schema)


def pope(root: Path) -> None:
    schema = pa.schema(
        [("id", S), ("question_id", S), ("question", S), ("answer", S), ("image_source", S), ("image", IMAGE_TYPE)]
        + [("category", S)]
    )
    rows = [
        {
            "id": str(i),
            "question_id": qid,
            "question": question,
            "answer": answer,
            "image_source": f"COCO_val2014_{i:012d}",
            "image": image,
            "category": category,
        }
        for i, (category, qid, question, answer, image) in enumerate(POPE_ROWS)
    ]
    write_parquet(root / "data/test-00000-of-00001.parquet", rows, schema, 2)


def mme(root: Path) -> None:
    schema = pa.schema([("question_id", S), ("image", IMAGE_TYPE), ("question", S), ("answer", S), ("category", S)])
    # The two questions of image B and C are interleaved, to check that groups are formed by image, not adjacency.
    questions = [
        ("existence/a.jpg", "Is there a dog in this image? Please answer yes or no.", "Yes", "existence", "red"),
        ("existence/a.jpg", "Is there a cat in this image? Please answer yes or no.", "No", "existence", "red"),
        ("existence/b.jpg", "Is there a tree in this image? Please answer yes or no.", "Yes", "existence", "green"),
        ("OCR/c.jpg", "Does the sign say STOP? Please answer yes or no.", "Yes", "OCR", "blue"),
        ("existence/b.jpg", "Is there a bus in this image? Please answer yes or no.", "No", "existence", "green"),
        ("OCR/c.jpg", "Does the sign say GO? Please answer yes or no.", "No", "OCR", "blue"),
        ("code_reasoning/d.png", "Does this code print 3? Please answer yes or no.", "Yes", "code_reasoning", "cyan"),
        ("code_reasoning/d.png", "Does this code print 4? Please answer yes or no.", "No", "code_reasoning", "cyan"),
    ]
    rows = [
        {"question_id": qid, "image": image, "question": question, "answer": answer, "category": category}
        for qid, question, answer, category, image in questions
    ]
    write_parquet(root / "data/test-00000-of-00001.parquet", rows, schema)


def scienceqa(root: Path) -> None:
    schema = pa.schema(
        [("image", IMAGE_TYPE), ("question", S), ("choices", pa.list_(S)), ("answer", pa.int8()), ("hint", S)]
        + [(name, S) for name in ("task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")]
    )
    questions = [
        ("Which animal is a mammal?", ["frog", "dog", "snake"], 1, "", "natural science", "green"),
        ("Which word is a noun?", ["run", "table"], 1, "", "language science", None),
        (
            "Which country is highlighted?",
            ["France", "Spain", "Italy", "Peru"],
            3,
            "This map shows Europe and South America.",
            "social science",
            "yellow",
        ),
        ("Which word is spelled correctly?", ["recieve", "receive"], 1, None, "language science", "magenta"),
    ]
    rows = [
        {
            "image": image,
            "question": question,
            "choices": choices,
            "answer": answer,
            "hint": hint,
            "task": "closed choice",
            "grade": "grade4",
            "subject": subject,
            "topic": "fixture",
            "category": "fixture",
            "skill": "fixture",
            "lecture": "",
            "solution": "",
        }
        for question, choices, answer, hint, subject, image in questions
    ]
    write_parquet(root / "ScienceQA-IMG/test-00000-of-00001.parquet", rows, schema)


def mmbench(root: Path) -> None:
    schema = pa.schema(
        [("index", pa.int64()), ("question", S), ("hint", S), ("answer", S)]
        + [(letter, S) for letter in "ABCD"]
        + [("category", S), ("image", IMAGE_TYPE), ("source", S), ("L2-category", S), ("comment", S), ("split", S)]
    )
    questions = [
        (101, "Which animal is shown?", None, "C", ["cat", "dog", "bird", "fish"], "object_localization", "FP-S"),
        (102, "What is this place?", "The picture shows a park.", "A", ["park", "beach"], "image_scene", "CP"),
        (103, "What is the weather?", None, "B", ["rainy", "sunny", "snowy"], "image_scene", "CP"),
    ]
    rows = [
        {
            "index": index,
            "question": question,
            "hint": hint,
            "answer": answer,
            **{letter: (options[i] if i < len(options) else None) for i, letter in enumerate("ABCD")},
            "category": category,
            "image": "green",
            "source": "fixture",
            "L2-category": l2,
            "comment": None,
            "split": "dev",
        }
        for index, question, hint, answer, options, category, l2 in questions
    ]
    write_parquet(root / "en/dev-00000-of-00001.parquet", rows, schema)


def jsonl(root: Path) -> None:
    pope_rows = [
        {"question_id": qid, "question": question, "answer": answer, "category": category, "image": image}
        for category, qid, question, answer, image in POPE_ROWS
    ]
    write_jsonl(root / "pope.jsonl", pope_rows)
    gqa_rows = [
        {"id": qid, "question": question, "answer": answer, "image": GQA_IMAGES[image_id]}
        for qid, image_id, question, answer, _ in GQA_QUESTIONS
    ]
    write_jsonl(root / "gqa.jsonl", gqa_rows)


def main(out: Path = FIXTURES) -> None:
    for name, write in [
        ("gqa", gqa),
        ("vqav2", vqav2),
        ("textvqa", textvqa),
        ("pope", pope),
        ("mme", mme),
        ("scienceqa", scienceqa),
        ("mmbench", mmbench),
        ("jsonl", jsonl),
    ]:
        write(out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES)
