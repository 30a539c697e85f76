"""ScienceQA-IMG (test): multiple-choice science questions with an image."""

from __future__ import annotations

from vtc.eval.scoring import LETTERS, extract_choice_letter
from vtc.eval.tasks.base import (
    Row,
    Sample,
    Task,
    check_limit,
    check_unique_ids,
    choice_prompt,
    first,
    is_missing,
    read_rows,
)


class ScienceQATask(Task):
    """ScienceQA-IMG with LLaVA-1.5's multiple-choice prompt ("Context: {hint}" when there is one, the question,
    lettered options, "Answer with the option's letter from the given choices directly."). The predicted letter is
    read by :func:`vtc.eval.scoring.extract_choice_letter`. Families are subjects (natural, social, language science).

    Rows without an image are skipped (the ScienceQA-FULL config mixes them in); ids are row positions in file
    order counted before skipping (the export has no id column), so they do not change with ``limit``.
    """

    name = "scienceqa"
    data_help = (
        "the ScienceQA-IMG test split of the lmms-lab/ScienceQA export: its directory (ScienceQA-IMG/test-*.parquet "
        "is read), a parquet file or a glob (columns question, choices, answer = index of the right choice, hint, "
        "subject, image), or a .jsonl with the same columns and image as a path relative to the .jsonl"
    )
    split = "test"
    configs = ("ScienceQA-IMG",)

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        rows = read_rows(self, data, ["question", "choices", "answer"], ["hint", "subject", "id", "grade"])
        samples = [self._sample(row) for row in first((row for row in rows if row.image is not None), limit)]
        check_unique_ids(self.name, samples, data)
        return samples

    def _sample(self, row: Row) -> Sample:
        values = row.values
        choices = [str(choice) for choice in values["choices"] or []]
        answer = values["answer"]
        if not 2 <= len(choices) <= len(LETTERS) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"scienceqa: {row.where} has answer {answer!r} for choices {choices}")
        hint = values.get("hint")
        return Sample(
            id=str(values["id"]) if values.get("id") is not None else str(row.position),
            question=choice_prompt(str(values["question"]).strip(), choices, None if is_missing(hint) else hint),
            answer=LETTERS[answer],
            family=str(values.get("subject") or "all"),
            image=row.image,
            meta={"options": choices, "grade": values.get("grade")},
        )

    def score(self, sample: Sample, prediction: str) -> dict:
        parsed = extract_choice_letter(prediction, sample.meta["options"])
        return {"score": float(parsed == sample.answer), "parsed": parsed}
