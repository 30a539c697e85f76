"""MME: yes/no questions in 14 perception and cognition categories, two per image."""

from __future__ import annotations

from vtc.eval.scoring import MME_COGNITION, MME_PERCEPTION, mme_category_scores, mme_totals, parse_yes_no_strict
from vtc.eval.tasks.base import (
    SHORT_ANSWER_PROMPT,
    Row,
    Sample,
    Task,
    check_limit,
    check_unique_ids,
    family_accuracy,
    mean,
    read_rows,
    take_groups,
)


class MMETask(Task):
    """MME with LLaVA-1.5's prompt (the question, which already asks "Please answer yes or no.", then the
    one-word-answer instruction). A prediction is read by :func:`vtc.eval.scoring.parse_yes_no_strict` (the official
    MME rule: an answer that is neither yes nor no is wrong) and scores 1 when it equals the label.

    Each image has two questions (one "yes", one "no"); ``limit`` keeps them together. summarize() reports
    accuracy (the plain per-question accuracy, the headline in [0, 1]), and MME's own scores: per category acc,
    acc_plus and score = 100 * (acc + acc_plus); perception, the sum over the 10 perception categories (out of 2000);
    cognition, the sum over the 4 cognition categories (out of 800). With a limit, absent categories add nothing.
    """

    name = "mme"
    data_help = (
        "the lmms-lab/MME export: its directory (the test-*.parquet files are read), a parquet file or a glob (columns "
        "question_id = image file name, question, answer Yes/No, category, image), or a .jsonl with the same columns "
        "and image as a path relative to the .jsonl"
    )
    split = "test"

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        groups: dict[tuple[str, str], list[Row]] = {}
        # All rows are read (MME is small): an image's two questions need not be adjacent in the file.
        for row in read_rows(self, data, ["question_id", "question", "answer", "category"]):
            key = (str(row.values["category"]), str(row.values["question_id"]))
            groups.setdefault(key, []).append(row)
        samples = take_groups(([self._sample(row, k) for k, row in enumerate(rows)] for rows in groups.values()), limit)
        check_unique_ids(self.name, samples, data)
        return samples

    def _sample(self, row: Row, k: int) -> Sample:
        values = row.values
        label = str(values["answer"]).strip().lower().rstrip(".")
        if label not in ("yes", "no"):
            raise ValueError(f"mme: {row.where} has answer {values['answer']!r}; MME answers are Yes or No")
        if row.image is None:
            raise ValueError(f"mme: {row.where} has no image")
        image_id = str(values["question_id"])
        return Sample(
            id=f"{image_id}-q{k}",
            question=str(values["question"]).strip() + SHORT_ANSWER_PROMPT,
            answer=label,
            family=str(values["category"]),
            image=row.image,
            meta={"image_id": image_id},
        )

    def score(self, sample: Sample, prediction: str) -> dict:
        parsed = parse_yes_no_strict(prediction)
        return {"score": float(parsed == sample.answer), "parsed": parsed}

    def summarize(self, records: list[dict]) -> dict:
        categories = mme_category_scores((r["family"], r["image_id"], r["score"] == 1.0) for r in records)
        totals = mme_totals(categories)
        known = set(MME_PERCEPTION) | set(MME_COGNITION)
        return {
            "n": len(records),
            "accuracy": mean(float(r["score"]) for r in records),
            "perception": totals["perception"],
            "cognition": totals["cognition"],
            "total": totals["perception"] + totals["cognition"],
            "families": family_accuracy(records),
            "categories": dict(sorted(categories.items())),
            "unknown_categories": sorted(set(categories) - known),
        }
