"""GQA (testdev-balanced): compositional questions about scene graphs, scored by exact match."""

from __future__ import annotations

from pathlib import Path

from vtc.eval.scoring import exact_match
from vtc.eval.tasks.base import (
    SHORT_ANSWER_PROMPT,
    ParquetImage,
    Row,
    Sample,
    Task,
    check_columns,
    check_limit,
    check_unique_ids,
    find_data_files,
    first,
    parquet_columns,
    read_jsonl_rows,
    read_parquet_rows,
    require_pyarrow,
)

_QUESTION_COLUMNS = ["question", "answer"]
_OPTIONAL = ["id", "types"]


class GQATask(Task):
    """GQA as LLaVA-1.5 evaluates it: testdev-balanced questions, a one-word-answer prompt, exact match after
    lowercasing and dropping trailing punctuation. Families are GQA's structural types (verify, query, choose,
    logical, compare) when the data have them.

    The lmms-lab/GQA export keeps questions (config testdev_balanced_instructions) and images (config
    testdev_balanced_images) in separate tables joined on imageId = id; the task sorts the parquet files it is given
    into question tables (with question and imageId) and image tables (with id and image). Given the export's
    directory, it reads only those two configs' testdev files.
    """

    name = "gqa"
    data_help = (
        "a parquet file, directory or glob of the lmms-lab/GQA export (configs testdev_balanced_instructions + "
        "testdev_balanced_images, joined on imageId), or a .jsonl with question, answer and image (a path relative to "
        "the .jsonl) per line"
    )
    split = "testdev"
    configs = ("testdev_balanced_instructions", "testdev_balanced_images")

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        check_limit(limit)
        kind, files = find_data_files(self, data)
        if kind == "jsonl":
            rows = first(read_jsonl_rows(self, files[0], _QUESTION_COLUMNS, ["imageId", *_OPTIONAL]), limit)
        else:
            rows = self._parquet_rows(files, data, limit)
        samples = [self._sample(row) for row in rows]
        check_unique_ids(self.name, samples, data)
        return samples

    def _parquet_rows(self, files: list[Path], data: str | None, limit: int | None) -> list[Row]:
        columns = {path: parquet_columns(path) for path in files}
        questions = [path for path in files if "question" in columns[path]]
        if not questions:
            raise ValueError(
                f"gqa: no question table (a parquet file with columns question, answer, imageId) in {data!r}; "
                f"expected {self.data_help}"
            )
        if all("image" in columns[path] for path in questions):
            return first(read_parquet_rows(self, questions, _QUESTION_COLUMNS, ["imageId", *_OPTIONAL], "image"), limit)
        rows = first(read_parquet_rows(self, questions, [*_QUESTION_COLUMNS, "imageId"], _OPTIONAL), limit)
        image_tables = [path for path in files if "question" not in columns[path] and "image" in columns[path]]
        if not image_tables:
            raise ValueError(
                f"gqa: {data!r} has question tables but no image table (testdev_balanced_images: columns id, image) "
                f"to join on imageId; expected {self.data_help}"
            )
        for path in image_tables:
            check_columns(self, path, columns[path], ["id", "image"])
        loaders = _image_index(image_tables, {str(row.values["imageId"]) for row in rows})
        for row in rows:
            image_id = str(row.values["imageId"])
            if image_id not in loaders:
                raise ValueError(
                    f"gqa: image {image_id!r} of {row.where} is in none of the image tables {image_tables}"
                )
            row.image = loaders[image_id]
        return rows

    def _sample(self, row: Row) -> Sample:
        values = row.values
        if row.image is None:
            raise ValueError(f"gqa: {row.where} has no image")
        types = values.get("types")
        family = types.get("structural") if isinstance(types, dict) else None
        return Sample(
            id=str(values["id"]) if values.get("id") is not None else str(row.position),
            question=str(values["question"]).strip() + SHORT_ANSWER_PROMPT,
            answer=str(values["answer"]),
            family=str(family or "all"),
            image=row.image,
            meta={"image_id": None if values.get("imageId") is None else str(values["imageId"])},
        )

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": exact_match(prediction, sample.answer)}


def _image_index(files: list[Path], wanted: set[str]) -> dict[str, ParquetImage]:
    """imageId -> loader for the wanted images, reading only the id column of the image tables."""
    pq = require_pyarrow()
    found: dict[str, ParquetImage] = {}
    for path in files:
        with pq.ParquetFile(path) as handle:
            for group in range(handle.num_row_groups):
                ids = handle.read_row_group(group, columns=["id"]).column(0).to_pylist()
                for i, image_id in enumerate(ids):
                    key = str(image_id)
                    if key in wanted and key not in found:
                        found[key] = ParquetImage(str(path), group, i, "image")
        if len(found) == len(wanted):
            break
    return found
