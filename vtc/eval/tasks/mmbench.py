"""MMBench (English, dev): multiple-choice perception and reasoning questions, scored with CircularEval."""

from __future__ import annotations

from collections import defaultdict

from vtc.eval.scoring import LETTERS, circular_accuracy, extract_choice_letter, rotate_options
from vtc.eval.tasks.base import (
    Row,
    Sample,
    Task,
    check_limit,
    check_unique_ids,
    choice_prompt,
    is_missing,
    mean,
    read_rows,
    take_groups,
)

_OPTION_COLUMNS = ["A", "B", "C", "D", "E"]


class MMBenchTask(Task):
    """MMBench-EN with CircularEval, LLaVA-1.5's multiple-choice prompt and rule-based letter extraction
    (:func:`vtc.eval.scoring.extract_choice_letter`).

    Each question with n options becomes n samples ``f"{index}-r{k}"``, copy k showing the options rotated left by
    k (the answer letter moves with them); ``limit`` counts samples and keeps a question's copies together. A
    question is right only when all its copies are. summarize() reports accuracy (circular, over questions: the
    headline), vanilla_accuracy (copy 0 alone, the plain single-pass accuracy) and both per category; in
    "families" n counts questions, not samples.

    Differs from the official evaluation, which asks an LLM to match answers it cannot parse to an option; here such
    answers are wrong. The prompt puts the hint after "Context: " like ScienceQA's. Only dev can be scored locally
    (test answers are hidden); rows without an answer are refused.
    """

    name = "mmbench"
    data_help = (
        "the English dev split of the lmms-lab/MMBench export: its directory (en/dev-*.parquet is read), a parquet "
        "file or a glob (columns index, question, hint, A, B, C, D, answer letter, category, L2-category, image), or "
        "a .jsonl with the same columns and image as a path relative to the .jsonl"
    )
    split = "dev"
    configs = ("en",)

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        rows = read_rows(
            self,
            data,
            ["index", "question", "A", "B", "answer", "category"],
            ["hint", "C", "D", "E", "L2-category", "l2-category"],
        )
        samples = take_groups((self._copies(row) for row in rows), limit)
        check_unique_ids(self.name, samples, data)
        return samples

    def _copies(self, row: Row) -> list[Sample]:
        values = row.values
        options = []
        for column in _OPTION_COLUMNS:
            if column not in values or is_missing(values[column]):
                break
            options.append(str(values[column]).strip())
        answer = values["answer"]
        if is_missing(answer):
            raise ValueError(
                f"mmbench: {row.where} has no answer: the MMBench test split hides them; use dev (en/dev-*.parquet)"
            )
        answer = str(answer).strip().upper()
        if len(options) < 2 or answer not in LETTERS[: len(options)]:
            raise ValueError(f"mmbench: {row.where} has answer {values['answer']!r} for options {options}")
        if row.image is None:
            raise ValueError(f"mmbench: {row.where} has no image")
        hint = values.get("hint")
        hint = None if is_missing(hint) else str(hint).strip()
        l2 = values.get("L2-category", values.get("l2-category"))
        index = str(values["index"])
        copies = []
        for k in range(len(options)):
            rotated, right = rotate_options(options, LETTERS.index(answer), k)
            copies.append(
                Sample(
                    id=f"{index}-r{k}",
                    question=choice_prompt(str(values["question"]).strip(), rotated, hint),
                    answer=LETTERS[right],
                    family=str(values["category"]),
                    image=row.image,
                    meta={
                        "question_index": index,
                        "rotation": k,
                        "options": rotated,
                        "l2_category": None if is_missing(l2) else str(l2),
                    },
                )
            )
        return copies

    def score(self, sample: Sample, prediction: str) -> dict:
        parsed = extract_choice_letter(prediction, sample.meta["options"])
        return {"score": float(parsed == sample.answer), "parsed": parsed}

    def summarize(self, records: list[dict]) -> dict:
        copies: dict[str, list[bool]] = defaultdict(list)
        info: dict[str, tuple[str, str | None]] = {}
        first_copy: dict[str, bool] = {}
        for record in records:
            index = str(record["question_index"])
            copies[index].append(float(record["score"]) == 1.0)
            info[index] = (str(record["family"]), record.get("l2_category"))
            if record["rotation"] == 0:
                first_copy[index] = float(record["score"]) == 1.0
        families = _breakdown(copies, first_copy, {index: family for index, (family, _) in info.items()})
        l2 = _breakdown(copies, first_copy, {index: l2 or "unknown" for index, (_, l2) in info.items()})
        return {
            "n": len(records),
            "n_questions": len(copies),
            "accuracy": circular_accuracy(copies),
            "vanilla_accuracy": mean(float(right) for right in first_copy.values()),
            "families": {name: {"accuracy": v["accuracy"], "n": v["n"]} for name, v in families.items()},
            "categories": families,
            "l2_categories": l2,
        }


def _breakdown(copies: dict[str, list[bool]], first_copy: dict[str, bool], key: dict[str, str]) -> dict:
    """{group: {accuracy (circular), vanilla_accuracy, n (questions)}} with questions grouped by ``key``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for index, name in key.items():
        groups[name].append(index)
    return {
        name: {
            "accuracy": circular_accuracy({index: copies[index] for index in indices}),
            "vanilla_accuracy": mean(float(first_copy[index]) for index in indices if index in first_copy),
            "n": len(indices),
        }
        for name, indices in sorted(groups.items())
    }
