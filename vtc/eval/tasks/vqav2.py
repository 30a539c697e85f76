"""VQAv2 (validation): open questions about COCO images, scored with the official VQA accuracy."""

from __future__ import annotations

from vtc.eval.scoring import vqa_accuracy
from vtc.eval.tasks.base import SHORT_ANSWER_PROMPT, Row, Sample, Task, check_limit, check_unique_ids, first, read_rows


class VQAv2Task(Task):
    """VQAv2 with LLaVA-1.5's one-word-answer prompt and the official accuracy over the 10 human answers
    (:func:`vtc.eval.scoring.vqa_accuracy`). Families are the answer types (yes/no, number, other).

    Only the validation split can be scored locally: the test and test-dev splits hide their answers (their
    ``answers`` are null), and the task refuses them rather than score every prediction 0. LLaVA-1.5's paper
    reports test-dev through the evaluation server, so its numbers are not directly comparable.
    """

    name = "vqav2"
    data_help = (
        "the validation split of the lmms-lab/VQAv2 export: its directory (the validation-*.parquet files are read), "
        "a parquet file or a glob (columns question_id, question, answers, image, answer_type), or a .jsonl with the "
        "same columns and image as a path relative to the .jsonl"
    )
    split = "validation"
    optional_columns = ["answer_type", "question_type"]
    hidden_answers = (
        "the VQAv2 test and test-dev splits hide them, so only the validation split can be scored locally "
        "(e.g. --data 'VQAv2/data/validation-*.parquet')"
    )

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        rows = read_rows(self, data, ["question_id", "question", "answers"], self.optional_columns)
        samples = [self._sample(row) for row in first(rows, limit)]
        check_unique_ids(self.name, samples, data)
        return samples

    def _sample(self, row: Row) -> Sample:
        values = row.values
        answers = human_answers(values["answers"])
        if not answers:
            raise ValueError(f"{self.name}: {row.where} has no human answers: {self.hidden_answers}")
        if row.image is None:
            raise ValueError(f"{self.name}: {row.where} has no image")
        return Sample(
            id=str(values["question_id"]),
            question=str(values["question"]).strip() + SHORT_ANSWER_PROMPT,
            answer=answers,
            family=self._family(values),
            image=row.image,
            meta=self._meta(values),
        )

    def _family(self, values: dict) -> str:
        return str(values.get("answer_type") or "all")

    def _meta(self, values: dict) -> dict:
        return {"question_type": values.get("question_type")}

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": vqa_accuracy(prediction, sample.answer)}


def human_answers(cell: object) -> list[str]:
    """The answer strings of an ``answers`` cell: VQAv2's list of {answer, answer_confidence, answer_id} or a plain
    list of strings; [] when the cell is null or empty."""
    if not isinstance(cell, list):
        return []
    return [str(item["answer"] if isinstance(item, dict) else item) for item in cell if item is not None]
