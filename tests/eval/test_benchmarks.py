"""Benchmark tasks on the committed fixtures (tests/eval/make_fixtures.py): loading, limits, prompts, errors, and
summaries of fixed predictions against hand-computed values."""

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vtc.eval.tasks import TASKS, Sample, Task, get_task, list_tasks
from vtc.eval.tasks.base import require_pyarrow

FIXTURES = Path(__file__).parent / "fixtures"
BENCHMARKS = ["gqa", "vqav2", "textvqa", "pope", "mme", "scienceqa", "mmbench"]
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
RED, GREEN, BLUE, YELLOW, MAGENTA, GRAY = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (128,) * 3,
)


def load(name: str, data: str, limit: int | None = None) -> tuple[Task, list[Sample]]:
    task = get_task(name)
    return task, task.samples(str(FIXTURES / data), limit)


def pixel(sample: Sample) -> tuple:
    image = sample.image()
    assert image.mode == "RGB" and image.size == (8, 8)
    return image.getpixel((0, 0))


def summarize(task: Task, samples: list[Sample], predictions: dict[str, str]) -> tuple[list[dict], dict]:
    """Score like the runner: one JSON record per sample (with runner fields), summarized in shuffled order."""
    records = []
    for sample in samples:
        prediction = predictions[sample.id]
        scored = task.score(sample, prediction)
        assert 0.0 <= scored["score"] <= 1.0
        record = {
            "id": sample.id,
            "family": sample.family,
            "question": sample.question,
            "answer": sample.answer,
            "prediction": prediction,
            **sample.meta,
            **scored,
            "method": "dart",
            "keep": 64,
            "latency": 0.1,
        }
        records.append(json.loads(json.dumps(record)))
    summary = task.summarize(records)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert task.summarize(shuffled) == summary
    assert summary["n"] == len(records) and 0.0 <= summary["accuracy"] <= 1.0
    json.dumps(summary)
    return records, summary


def test_registry_names_every_task():
    assert list_tasks() == sorted([*BENCHMARKS, "shapes", "moving_shapes"])
    assert TASKS["shapes"] == "vtc.eval.tasks.shapes:ShapesTask"
    assert TASKS["moving_shapes"] == "vtc.eval.tasks.moving_shapes:MovingShapesTask"
    for name in BENCHMARKS:
        task = get_task(name)
        assert task.name == name and task.needs_data and task.max_new_tokens == 16 and task.data_help


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'gqaa'.*'mmbench'.*Did you mean 'gqa'"):
        get_task("gqaa")


def test_task_modules_are_imported_only_when_asked_for():
    code = (
        "import sys, vtc.eval.tasks as t; before = sorted(m for m in sys.modules if m.startswith('vtc.eval.tasks.')); "
        "t.get_task('pope'); after = sorted(m for m in sys.modules if m.startswith('vtc.eval.tasks.')); "
        "print(before, after)"
    )
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['vtc.eval.tasks.base']", "['vtc.eval.tasks.base',", "'vtc.eval.tasks.pope']"]


def test_gqa_joins_questions_and_images():
    task, samples = load("gqa", "gqa")
    # The train_all_instructions table beside the testdev ones is ignored.
    assert [s.id for s in samples] == ["q1", "q2", "q3", "q4", "q5"]
    assert samples[0].question == "What color is the square?" + SHORT
    assert [s.answer for s in samples] == ["green", "yes", "blue", "no", "square"]
    assert [s.family for s in samples] == ["query", "verify", "choose", "verify", "query"]
    assert [pixel(s) for s in samples] == [GREEN, RED, BLUE, RED, BLUE]
    assert samples[0].meta == {"image_id": "n200"}
    _, summary = summarize(task, samples, {"q1": "Green.", "q2": "yes", "q3": "red", "q4": "No", "q5": "circle"})
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["families"] == {
        "choose": {"accuracy": 0.0, "n": 1},
        "query": {"accuracy": 0.5, "n": 2},
        "verify": {"accuracy": 1.0, "n": 2},
    }


def test_gqa_limit_and_jsonl():
    _, samples = load("gqa", "gqa", limit=2)
    assert [s.id for s in samples] == ["q1", "q2"]
    _, samples = load("gqa", "jsonl/gqa.jsonl", limit=3)
    assert [(s.id, s.answer, s.family) for s in samples] == [
        ("q1", "green", "all"),
        ("q2", "yes", "all"),
        ("q3", "blue", "all"),
    ]
    assert [pixel(s) for s in samples] == [GREEN, RED, BLUE]


def test_gqa_without_image_table():
    with pytest.raises(ValueError, match=r"gqa: .*no image table"):
        load("gqa", "gqa/testdev_balanced_instructions")


def test_vqav2():
    task, samples = load("vqav2", "vqav2")
    assert [s.id for s in samples] == ["1", "2", "3", "4"]
    assert samples[0].question == "How many dogs are there?" + SHORT
    assert samples[0].answer == ["2", "2", "two"] + ["3"] * 7
    assert [s.family for s in samples] == ["number", "yes/no", "other", "other"]
    assert pixel(samples[2]) == GRAY  # stored as a one-channel PNG
    predictions = {"1": "Two", "2": "Yes", "3": "Laptop.", "4": "blue"}
    records, summary = summarize(task, samples, predictions)
    # "two" matches 3 of 10 answers -> 0.9; all 10 -> 1; "laptop" matches "a laptop" twice -> 0.6; none -> 0.
    assert [r["score"] for r in records] == pytest.approx([0.9, 1.0, 0.6, 0.0])
    assert summary["accuracy"] == pytest.approx(2.5 / 4)
    assert summary["families"]["other"] == {"accuracy": pytest.approx(0.3), "n": 2}


def test_vqav2_without_answers(tmp_path):
    table = pq.read_table(FIXTURES / "vqav2/data/validation-00000-of-00001.parquet")
    index = table.schema.get_field_index("answers")
    table = table.set_column(index, "answers", pa.nulls(len(table), table.schema.field("answers").type))
    pq.write_table(table, tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"vqav2: .*test\.parquet row 0 has no human answers.*validation"):
        get_task("vqav2").samples(str(tmp_path / "test.parquet"), None)


def test_directory_reads_the_task_split_and_globs_choose(tmp_path):
    # A hub snapshot holds every split side by side: data/{split}-00000-of-00001.parquet.
    (tmp_path / "data").mkdir()
    source = FIXTURES / "vqav2/data/validation-00000-of-00001.parquet"
    (tmp_path / "data/validation-00000-of-00001.parquet").write_bytes(source.read_bytes())
    table = pq.read_table(source)
    index = table.schema.get_field_index("answers")
    table = table.set_column(index, "answers", pa.nulls(len(table), table.schema.field("answers").type))
    pq.write_table(table, tmp_path / "data/test-00000-of-00001.parquet")
    samples = get_task("vqav2").samples(str(tmp_path), None)
    assert [s.id for s in samples] == ["1", "2", "3", "4"]
    assert len(get_task("vqav2").samples(str(tmp_path / "data/valid*.parquet"), None)) == 4
    with pytest.raises(ValueError, match="no human answers"):
        get_task("vqav2").samples(str(tmp_path / "data/test-*.parquet"), None)
    with pytest.raises(FileNotFoundError, match=r"vqav2: --data '.*train-\*\.parquet' matches no \.parquet file"):
        get_task("vqav2").samples(str(tmp_path / "data/train-*.parquet"), None)


def test_textvqa():
    task, samples = load("textvqa", "textvqa")
    assert [s.id for s in samples] == ["10", "11", "12"]
    assert samples[1].question == "what number is on the jersey?" + SHORT
    assert {s.family for s in samples} == {"all"}
    assert [pixel(s) for s in samples] == [RED, (255, 255, 255), RED]
    records, summary = summarize(task, samples, {"10": "Coca-Cola", "11": "23", "12": "go"})
    assert [r["score"] for r in records] == pytest.approx([1.0, 0.3, 0.0])
    assert summary["accuracy"] == pytest.approx(1.3 / 3)


POPE_PREDICTIONS = {
    "adversarial-1": "Yes, there is.",  # label yes: TP
    "adversarial-2": "Yes",  # label no: FP
    "popular-1": "No, there is not.",  # label yes: FN
    "popular-2": "No.",  # label no: TN
    "random-1": "yes",  # TP
    "random-2": "There is no kite.",  # TN
}


@pytest.mark.parametrize("data", ["pope", "jsonl/pope.jsonl"])
def test_pope(data):
    task, samples = load("pope", data)
    assert [s.id for s in samples] == list(POPE_PREDICTIONS)
    assert samples[0].question == "Is there a dog in the image?" + SHORT
    assert [s.answer for s in samples] == ["yes", "no"] * 3
    assert [s.family for s in samples] == ["adversarial"] * 2 + ["popular"] * 2 + ["random"] * 2
    assert [pixel(s) for s in samples] == [RED, RED, GREEN, GREEN, BLUE, BLUE]
    records, summary = summarize(task, samples, POPE_PREDICTIONS)
    assert [r["parsed"] for r in records] == ["yes", "yes", "no", "no", "yes", "no"]
    # Overall TP 2, FP 1, FN 1, TN 2.
    assert summary["accuracy"] == pytest.approx(4 / 6)
    assert summary["precision"] == pytest.approx(2 / 3)
    assert summary["recall"] == pytest.approx(2 / 3)
    assert summary["f1"] == pytest.approx(2 / 3)
    assert summary["yes_ratio"] == pytest.approx(3 / 6)
    adversarial, popular, random_ = (summary["categories"][c] for c in ("adversarial", "popular", "random"))
    # adversarial: TP 1, FP 1 -> precision 1/2, recall 1, F1 2/3; popular: FN 1, TN 1 -> F1 0; random: all right.
    assert adversarial == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0, "n": 2}
    )
    assert popular == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 2}
    assert random_ == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5, "n": 2}
    assert summary["f1_category_mean"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert summary["families"]["popular"] == {"accuracy": 0.5, "n": 2}


def test_pope_limit():
    _, samples = load("pope", "pope", limit=3)
    assert [s.id for s in samples] == ["adversarial-1", "adversarial-2", "popular-1"]


MME_IDS = [
    "existence/a.jpg-q0",
    "existence/a.jpg-q1",
    "existence/b.jpg-q0",
    "existence/b.jpg-q1",
    "OCR/c.jpg-q0",
    "OCR/c.jpg-q1",
    "code_reasoning/d.png-q0",
    "code_reasoning/d.png-q1",
]


def test_mme_groups_questions_by_image():
    task, samples = load("mme", "mme")
    # b's and c's questions are interleaved in the file; each image's pair comes out together.
    assert [s.id for s in samples] == MME_IDS
    assert samples[0].question == "Is there a dog in this image? Please answer yes or no." + SHORT
    assert [s.answer for s in samples] == ["yes", "no"] * 4
    assert [s.family for s in samples] == ["existence"] * 4 + ["OCR"] * 2 + ["code_reasoning"] * 2
    assert samples[3].meta == {"image_id": "existence/b.jpg"}
    assert [pixel(s) for s in samples[::2]] == [RED, GREEN, BLUE, (0, 255, 255)]


@pytest.mark.parametrize("limit, n", [(1, 2), (2, 2), (3, 2), (4, 4), (5, 4), (7, 6), (100, 8)])
def test_mme_limit_keeps_image_pairs(limit, n):
    _, samples = load("mme", "mme", limit=limit)
    assert [s.id for s in samples] == MME_IDS[:n]


def test_mme_summary():
    task, samples = load("mme", "mme")
    predictions = dict(zip(MME_IDS, ["Yes", "No", "Yes", "Yes", "yes.", "I think no", "No", "Nope"], strict=True))
    records, summary = summarize(task, samples, predictions)
    assert [r["score"] for r in records] == [1, 1, 1, 0, 1, 0, 0, 1]
    assert records[5]["parsed"] == "other"
    # existence: acc 3/4, acc+ 1/2 (image a) -> 125; OCR: acc 1/2, acc+ 0 -> 50; code_reasoning: the same -> 50.
    assert summary["categories"]["existence"] == {
        "acc": 0.75,
        "acc_plus": 0.5,
        "score": 125.0,
        "n_questions": 4,
        "n_images": 2,
    }
    assert summary["categories"]["OCR"]["score"] == 50.0
    assert summary["categories"]["code_reasoning"]["score"] == 50.0
    assert summary["perception"] == 175.0 and summary["cognition"] == 50.0 and summary["total"] == 225.0
    assert summary["accuracy"] == pytest.approx(5 / 8)
    assert summary["families"]["existence"] == {"accuracy": 0.75, "n": 4}
    assert summary["unknown_categories"] == []


def test_scienceqa():
    task, samples = load("scienceqa", "scienceqa")
    # Row 1 has no image and is skipped; ids are row positions.
    assert [s.id for s in samples] == ["0", "2", "3"]
    assert samples[0].question == "Which animal is a mammal?\nA. frog\nB. dog\nC. snake" + LETTER
    assert samples[1].question == (
        "Context: This map shows Europe and South America.\nWhich country is highlighted?\n"
        "A. France\nB. Spain\nC. Italy\nD. Peru" + LETTER
    )
    assert [s.answer for s in samples] == ["B", "D", "B"]
    assert [s.family for s in samples] == ["natural science", "social science", "language science"]
    assert [pixel(s) for s in samples] == [GREEN, YELLOW, MAGENTA]
    _, summary = summarize(task, samples, {"0": "B", "2": "The answer is C.", "3": "receive"})
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["families"]["social science"] == {"accuracy": 0.0, "n": 1}
    assert summary["families"]["language science"] == {"accuracy": 1.0, "n": 1}
    _, samples = load("scienceqa", "scienceqa", limit=2)
    assert [s.id for s in samples] == ["0", "2"]


MMBENCH_IDS = ["101-r0", "101-r1", "101-r2", "101-r3", "102-r0", "102-r1", "103-r0", "103-r1", "103-r2"]


def test_mmbench_circular_copies():
    task, samples = load("mmbench", "mmbench")
    assert [s.id for s in samples] == MMBENCH_IDS
    by_id = {s.id: s for s in samples}
    assert by_id["101-r0"].question == "Which animal is shown?\nA. cat\nB. dog\nC. bird\nD. fish" + LETTER
    assert by_id["101-r1"].question == "Which animal is shown?\nA. dog\nB. bird\nC. fish\nD. cat" + LETTER
    # "bird" (C in copy 0) moves to B, A, D as the options rotate.
    assert [by_id[f"101-r{k}"].answer for k in range(4)] == ["C", "B", "A", "D"]
    assert by_id["102-r1"].question == (
        "Context: The picture shows a park.\nWhat is this place?\nA. beach\nB. park" + LETTER
    )
    assert [by_id["102-r0"].answer, by_id["102-r1"].answer] == ["A", "B"]
    assert [by_id[f"103-r{k}"].answer for k in range(3)] == ["B", "A", "C"]  # D is empty: three options
    assert by_id["103-r2"].meta == {
        "question_index": "103",
        "rotation": 2,
        "options": ["snowy", "rainy", "sunny"],
        "l2_category": "CP",
    }
    assert {s.family for s in samples} == {"object_localization", "image_scene"}
    assert pixel(samples[0]) == GREEN


@pytest.mark.parametrize("limit, n", [(1, 4), (4, 4), (5, 4), (6, 6), (8, 6), (9, 9), (None, 9)])
def test_mmbench_limit_keeps_copies_together(limit, n):
    _, samples = load("mmbench", "mmbench", limit=limit)
    assert [s.id for s in samples] == MMBENCH_IDS[:n]


def test_mmbench_summary():
    task, samples = load("mmbench", "mmbench")
    predictions = {
        "101-r0": "C",
        "101-r1": "B. bird",
        "101-r2": "(A)",
        "101-r3": "bird",  # option text: D in this copy
        "102-r0": "A",
        "102-r1": "A",  # wrong in one rotation: the question is wrong
        "103-r0": "C",  # wrong in copy 0
        "103-r1": "A",
        "103-r2": "sunny",
    }
    records, summary = summarize(task, samples, predictions)
    assert [r["score"] for r in records] == [1, 1, 1, 1, 1, 0, 0, 1, 1]
    assert summary["accuracy"] == pytest.approx(1 / 3)  # only question 101 has every copy right
    assert summary["vanilla_accuracy"] == pytest.approx(2 / 3)  # copy 0: 101 and 102 right
    assert summary["n"] == 9 and summary["n_questions"] == 3
    assert summary["families"] == {
        "image_scene": {"accuracy": 0.0, "n": 2},
        "object_localization": {"accuracy": 1.0, "n": 1},
    }
    assert summary["categories"]["image_scene"]["vanilla_accuracy"] == 0.5
    assert summary["l2_categories"]["FP-S"] == {"accuracy": 1.0, "vanilla_accuracy": 1.0, "n": 1}


def test_image_loaders_pickle():
    for name, data in [("pope", "pope"), ("pope", "jsonl/pope.jsonl"), ("gqa", "gqa")]:
        _, samples = load(name, data, limit=3)
        loader = pickle.loads(pickle.dumps(samples[2].image))
        assert loader().getpixel((0, 0)) == samples[2].image().getpixel((0, 0))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_data_none_says_what_to_pass(name):
    task = get_task(name)
    with pytest.raises(ValueError, match=rf"^{name} needs --data: .*parquet.*\.jsonl"):
        task.samples(None, None)


def test_gqa_data_message_names_the_configs():
    with pytest.raises(ValueError, match="testdev_balanced_instructions.*testdev_balanced_images"):
        get_task("gqa").samples(None, 10)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_path(name, tmp_path):
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(FileNotFoundError, match=rf"^{name}: --data '.*nowhere\.parquet' does not exist; expected "):
        get_task(name).samples(str(missing), None)


def test_directory_without_parquet_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pope: no \*\.parquet file under"):
        get_task("pope").samples(str(tmp_path), None)
    (tmp_path / "data.csv").write_text("question\n")
    with pytest.raises(ValueError, match=r"pope: .*data\.csv' is not a \.parquet file, a \.jsonl file or a directory"):
        get_task("pope").samples(str(tmp_path / "data.csv"), None)


def test_missing_parquet_columns_are_named(tmp_path):
    table = pq.read_table(FIXTURES / "pope/data/test-00000-of-00001.parquet").drop_columns(["category", "answer"])
    pq.write_table(table, tmp_path / "pope.parquet")
    with pytest.raises(ValueError, match=r"pope: .*pope\.parquet lacks required column\(s\) \['answer', 'category'\]"):
        get_task("pope").samples(str(tmp_path / "pope.parquet"), None)
    table = pq.read_table(FIXTURES / "mmbench/en/dev-00000-of-00001.parquet").drop_columns(["image"])
    pq.write_table(table, tmp_path / "mmbench.parquet")
    with pytest.raises(ValueError, match=r"mmbench: .*lacks required column\(s\) \['image'\]"):
        get_task("mmbench").samples(str(tmp_path / "mmbench.parquet"), None)


def test_missing_jsonl_columns_are_named(tmp_path):
    path = tmp_path / "pope.jsonl"
    path.write_text(json.dumps({"question_id": "1", "question": "Is there a dog?", "category": "random"}) + "\n")
    with pytest.raises(
        ValueError, match=r"pope: .*pope\.jsonl line 1 lacks required column\(s\) \['answer', 'image'\]"
    ):
        get_task("pope").samples(str(path), None)


def test_bad_limit():
    for limit in (0, -1, 2.5):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            get_task("pope").samples(str(FIXTURES / "pope"), limit)


def test_missing_pyarrow_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r'needs pyarrow.parquet, part of the eval extra: pip install "vtc\[eval\]"'):
        require_pyarrow()
