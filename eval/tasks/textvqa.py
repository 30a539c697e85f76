"""TextVQA (validation): questions that need reading text in the image, scored with the official VQA accuracy."""

from __future__ import annotations

from eval.scoring import vqa_accuracy
from eval.tasks.base import SHORT_ANSWER_PROMPT, Row, Sample, Task, check_limit, check_unique_ids, first, read_rows
from eval.tasks.vqav2 import human_answers


class TextVQATask(Task):
    """TextVQA with the one-word-answer prompt and the VQA accuracy over its 10 human answers. All samples share
    the family "all" (TextVQA has no question types).

    Differs from LLaVA-1.5's reported TextVQA numbers, which add the dataset's OCR tokens to the prompt
    ("Reference OCR token: ..."); here the model reads the text from the image alone, which is what visual-token
    compression affects. The test split has no answers and is refused.
    """

    name = "textvqa"
    data_help = (
        "the validation split of the lmms-lab/textvqa export: its directory (the validation-*.parquet files are read), "
        "a parquet file or a glob (columns question_id, question, answers, image), or a .jsonl with the same columns "
        "and image as a path relative to the .jsonl"
    )
    split = "validation"

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        rows = read_rows(self, data, ["question_id", "question", "answers"], ["image_id"])
        samples = [self._sample(row) for row in first(rows, limit)]
        check_unique_ids(self.name, samples, data)
        return samples

    def _sample(self, row: Row) -> Sample:
        values = row.values
        answers = human_answers(values["answers"])
        if not answers:
            raise ValueError(
                f"textvqa: {row.where} has no human answers: the TextVQA test split hides them; use validation"
                " (e.g. --data 'textvqa/data/validation-*.parquet')"
            )
        if row.image is None:
            raise ValueError(f"textvqa: {row.where} has no image")
        return Sample(
            id=str(values["question_id"]),
            question=str(values["question"]).strip() + SHORT_ANSWER_PROMPT,
            answer=answers,
            family="all",
            image=row.image,
            meta={"image_id": values.get("image_id")},
        )

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": vqa_accuracy(prediction, sample.answer)}
