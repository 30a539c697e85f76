"""POPE: yes/no object-existence questions that measure object hallucination."""

from __future__ import annotations

from collections import defaultdict

from vtc.eval.scoring import parse_yes_no, pope_metrics
from vtc.eval.tasks.base import (
    SHORT_ANSWER_PROMPT,
    Row,
    Sample,
    Task,
    check_limit,
    check_unique_ids,
    family_accuracy,
    first,
    mean,
    read_rows,
)


class POPETask(Task):
    """POPE (COCO; random, popular and adversarial negatives) with the one-word-answer prompt. A prediction is read
    as yes/no by :func:`vtc.eval.scoring.parse_yes_no` (LLaVA's rule) and scores 1 when it equals the label.

    summarize() reports accuracy (the headline), precision, recall, F1 (positive = "yes") and yes_ratio (share of
    "yes" predictions) over all records and per category, plus f1_category_mean, the mean of the per-category F1
    scores, which is how LLaVA-1.5's tables give POPE (as a percentage).
    """

    name = "pope"
    data_help = (
        "the lmms-lab/POPE export: its directory (the default config's test-*.parquet files are read), a parquet file "
        "or a glob (columns question_id, question, answer yes/no, category, image), or a .jsonl with the same columns "
        "and image as a path relative to the .jsonl"
    )
    split = "test"

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        rows = read_rows(self, data, ["question_id", "question", "answer", "category"], ["image_source"])
        samples = [self._sample(row) for row in first(rows, limit)]
        check_unique_ids(self.name, samples, data)
        return samples

    def _sample(self, row: Row) -> Sample:
        values = row.values
        label = str(values["answer"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"pope: {row.where} has answer {values['answer']!r}; POPE answers are yes or no")
        if row.image is None:
            raise ValueError(f"pope: {row.where} has no image")
        category = str(values["category"])
        return Sample(
            # question_id restarts in every category of the original POPE files.
            id=f"{category}-{values['question_id']}",
            question=str(values["question"]).strip() + SHORT_ANSWER_PROMPT,
            answer=label,
            family=category,
            image=row.image,
            meta={"image_source": values.get("image_source")},
        )

    def score(self, sample: Sample, prediction: str) -> dict:
        parsed = parse_yes_no(prediction)
        return {"score": float(parsed == sample.answer), "parsed": parsed}

    def summarize(self, records: list[dict]) -> dict:
        by_category: dict[str, list[dict]] = defaultdict(list)
        for record in records:
            by_category[str(record["family"])].append(record)
        categories = {name: {**_metrics(group), "n": len(group)} for name, group in sorted(by_category.items())}
        return {
            "n": len(records),
            **_metrics(records),
            "f1_category_mean": mean(c["f1"] for c in categories.values()),
            "families": family_accuracy(records),
            "categories": categories,
        }


def _metrics(records: list[dict]) -> dict[str, float]:
    return pope_metrics([r["parsed"] for r in records], [r["answer"] for r in records])
