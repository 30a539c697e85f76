"""The task interface the runner drives, and the readers of the benchmarks' local data files.

A task turns local data into :class:`Sample` s, scores one prediction, and summarizes the scored records of one
(method, keep) run. Data come as the parquet exports lmms-eval loads from the Hugging Face hub (a file, a glob, or
a directory searched recursively for ``*.parquet``; images are ``Image`` features stored as a struct {bytes, path})
or as a ``.jsonl`` file with the same columns, whose image column holds a path relative to the ``.jsonl``.

Images are not held in memory: each sample carries a small picklable loader that reads its image when called,
from the file the ``.jsonl`` names or from its parquet row group (about 100 images in hub exports); the last few
row groups read stay cached, so samples taken in file order read each row group once.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtc import extras

if TYPE_CHECKING:
    from PIL import Image

SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
LETTER_PROMPT = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class Sample:
    """One question about one image or one video.

    id: unique within the task (MMBench circular copies: ``f"{index}-r{k}"``).
    question: the full text the model sees after the image, instruction included.
    answer: the reference: a string, a list of strings (VQAv2/TextVQA's human answers) or an option letter.
    family: the breakdown key (question family, category or subject).
    image: loads the RGB image when called; None for a video sample.
    meta: JSON-serialisable fields that scoring and summarize() need later; the runner copies them into the record.
    video: loads the video's RGB frames (a list of equal-sized images) when called; None for an image sample.
    """

    id: str
    question: str
    answer: Any
    family: str
    image: Callable[[], Image.Image] | None = None
    meta: dict = field(default_factory=dict)
    video: Callable[[], list[Image.Image]] | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.video is None):
            raise ValueError(f"sample {self.id!r} needs exactly one of image and video")


class Task:
    """A benchmark: where its samples come from, how one prediction scores, how a run summarizes.

    name: the registry name. needs_data: whether samples() needs ``data`` (a path). max_new_tokens: the generation
    budget. data_help: what ``data`` should be; error messages quote it. split, configs: the split and hub configs
    the task evaluates; given a directory, :func:`find_data_files` keeps their files when it holds others too.
    """

    name: str = ""
    needs_data: bool = True
    max_new_tokens: int = 16
    data_help: str = ""
    split: str | None = None
    configs: tuple[str, ...] = ()

    def samples(self, data: str | None, limit: int | None) -> list[Sample]:
        """The first ``limit`` samples in file order (all when None); raises before any work on bad data."""
        raise NotImplementedError

    def score(self, sample: Sample, prediction: str) -> dict:
        """JSON-serialisable per-sample fields, always including ``"score"``: a float in [0, 1]."""
        raise NotImplementedError

    def summarize(self, records: list[dict]) -> dict:
        """Metrics of one run from its records (any order): at least n, accuracy in [0, 1] and families."""
        return summarize_scores(records)


def mean(values: Iterable[float]) -> float:
    """The mean, 0.0 for no values."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def family_accuracy(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{family: {"accuracy": mean score, "n": records}}, families sorted by name."""
    by_family: dict[str, list[float]] = defaultdict(list)
    for record in records:
        by_family[str(record["family"])].append(float(record["score"]))
    return {name: {"accuracy": mean(scores), "n": len(scores)} for name, scores in sorted(by_family.items())}


def summarize_scores(records: Sequence[dict]) -> dict:
    """n, accuracy (the mean per-sample score) and the per-family breakdown."""
    return {
        "n": len(records),
        "accuracy": mean(float(record["score"]) for record in records),
        "families": family_accuracy(records),
    }


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def take_groups(groups: Iterable[list[Sample]], limit: int | None) -> list[Sample]:
    """Whole groups in order until the next would make more than ``limit`` samples; always at least one group."""
    taken: list[Sample] = []
    for group in groups:
        if limit is not None and taken and len(taken) + len(group) > limit:
            break
        taken.extend(group)
        if limit is not None and len(taken) >= limit:
            break
    return taken


def first(rows: Iterable[Any], limit: int | None) -> list:
    """The first ``limit`` items (all when None), consuming no more of ``rows`` than that."""
    taken = []
    for row in rows:
        taken.append(row)
        if limit is not None and len(taken) >= limit:
            break
    return taken


def check_unique_ids(task: str, samples: Sequence[Sample], data: str | None) -> None:
    counts = Counter(sample.id for sample in samples)
    repeated = [sample_id for sample_id, count in counts.items() if count > 1]
    if repeated:
        raise ValueError(
            f"{task}: sample ids repeat in {data}: {repeated[:5]}; does it hold several splits or configs? Pass the "
            "split's parquet file, or a glob of its files"
        )


def is_missing(value: Any) -> bool:
    """None, NaN, an empty string or the string "nan" (how pandas-made exports write a missing hint or option)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def choice_prompt(question: str, options: Sequence[str], hint: str | None = None) -> str:
    """LLaVA-1.5's multiple-choice prompt: an optional "Context: {hint}" line, the question, "A. ..." lines and
    the instruction to answer with the option's letter."""
    lines = [f"Context: {hint}"] if hint else []
    lines.append(question)
    lines.extend(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
    return "\n".join(lines) + LETTER_PROMPT


def require_pyarrow() -> Any:
    """pyarrow.parquet, imported on first use."""
    extras.require("eval", "pyarrow.parquet", needed_by="reading the benchmarks' parquet files")
    import pyarrow.parquet as pq

    return pq


def find_data_files(task: Task, data: str | None) -> tuple[str, list[Path]]:
    """("parquet", sorted files) or ("jsonl", [file]) for ``data``: a .parquet file, a .jsonl file, a glob of
    parquet files, or a directory searched recursively.

    Hub exports name their files ``{config}/{split}-00000-of-00001.parquet`` (``data/`` for the default config) and
    a snapshot holds every split, so from a directory only the files of the task's split (and configs) are kept,
    unless none match (a layout of one's own).
    """
    if data is None:
        raise ValueError(f"{task.name} needs --data: {task.data_help}")
    path = Path(data).expanduser()
    if not path.exists():
        if any(char in data for char in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if p.endswith(".parquet"))
            if not files:
                raise FileNotFoundError(
                    f"{task.name}: --data {data!r} matches no .parquet file; expected {task.data_help}"
                )
            return "parquet", files
        raise FileNotFoundError(f"{task.name}: --data {data!r} does not exist; expected {task.data_help}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{task.name}: no *.parquet file under {data!r}; expected {task.data_help}")
        own = [p for p in files if _in_split(task, p.relative_to(path))]
        return "parquet", own or files
    if path.suffix == ".parquet":
        return "parquet", [path]
    if path.suffix == ".jsonl":
        return "jsonl", [path]
    raise ValueError(
        f"{task.name}: --data {data!r} is not a .parquet file, a .jsonl file or a directory; expected {task.data_help}"
    )


def _in_split(task: Task, relative: Path) -> bool:
    name_ok = task.split is None or relative.stem == task.split or relative.name.startswith(f"{task.split}-")
    config_ok = not task.configs or any(part in task.configs for part in relative.parts[:-1])
    return name_ok and config_ok


def parquet_columns(path: Path) -> list[str]:
    """Top-level column names, from the file footer only."""
    return list(require_pyarrow().read_schema(path).names)


def check_columns(task: Task, where: Path | str, present: Iterable[str], required: Iterable[str]) -> None:
    present = list(present)
    missing = [name for name in required if name not in present]
    if missing:
        raise ValueError(
            f"{task.name}: {where} lacks required column(s) {missing} (it has {present}); expected {task.data_help}"
        )


@dataclass
class Row:
    """One data row: the requested columns (absent optional ones left out), its image loader (None when the row
    has no image), its position in file order over all files, and where it is, for error messages."""

    values: dict[str, Any]
    image: Callable[[], Image.Image] | None
    position: int
    where: str


def read_rows(
    task: Task, data: str | None, required: Sequence[str], optional: Sequence[str] = (), image: str | None = "image"
) -> Iterator[Row]:
    """The rows of ``data``, checked up front (path, format, required columns incl. ``image``) and then read
    lazily in file order, so that a caller stopping early reads little."""
    kind, files = find_data_files(task, data)
    if kind == "jsonl":
        return read_jsonl_rows(task, files[0], required, optional, image)
    return read_parquet_rows(task, files, required, optional, image)


def read_parquet_rows(
    task: Task, files: Sequence[Path], required: Sequence[str], optional: Sequence[str] = (), image: str | None = None
) -> Iterator[Row]:
    """Rows of parquet files (columns checked now, rows read one row group at a time when iterated)."""
    required_all = [*required, image] if image else list(required)
    for path in files:
        check_columns(task, path, parquet_columns(path), required_all)
    return _parquet_rows(files, [*required, *optional], image)


def _parquet_rows(files: Sequence[Path], columns: Sequence[str], image: str | None) -> Iterator[Row]:
    pq = require_pyarrow()
    position = 0
    for path in files:
        with pq.ParquetFile(path) as handle:
            schema = handle.schema_arrow
            wanted = [name for name in columns if name in schema.names]
            # Only the image's small path field is read here, enough to see whether the row has an image.
            probe: list[str] = []
            if image:
                kind = schema.field(image).type
                probe = [f"{image}.path"] if _is_struct(kind) and kind.get_field_index("path") >= 0 else [image]
            for group in range(handle.num_row_groups):
                table = handle.read_row_group(group, columns=wanted + probe)
                for i, values in enumerate(table.to_pylist()):
                    loader = None
                    if image:
                        cell = values.pop(image)
                        if cell is not None:
                            loader = ParquetImage(str(path), group, i, image)
                    yield Row(values, loader, position, f"{path} row {position}")
                    position += 1


def _is_struct(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(arrow_type)


def read_jsonl_rows(
    task: Task, path: Path, required: Sequence[str], optional: Sequence[str] = (), image: str | None = "image"
) -> Iterator[Row]:
    """Rows of a .jsonl file, all checked now; the image column is a path relative to the file's directory."""
    required_all = [*required, image] if image else list(required)
    parsed: list[dict] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{task.name}: {path} line {number} is not JSON ({err}); expected {task.data_help}"
                ) from err
            if not isinstance(row, dict):
                raise ValueError(f"{task.name}: {path} line {number} is not a JSON object")
            check_columns(task, f"{path} line {number}", row, required_all)
            parsed.append(row)
    return _jsonl_rows(path, parsed, [*required, *optional], image)


def _jsonl_rows(path: Path, parsed: list[dict], columns: Sequence[str], image: str | None) -> Iterator[Row]:
    for position, row in enumerate(parsed):
        values = {name: row[name] for name in columns if name in row}
        loader = None
        if image and not is_missing(row[image]):
            loader = FileImage(str(path.parent / row[image]))
        yield Row(values, loader, position, f"{path} row {position}")


@dataclass(frozen=True)
class ParquetImage:
    """Loads the image in ``column`` of row ``row`` of row group ``row_group`` of a parquet file."""

    path: str
    row_group: int
    row: int
    column: str = "image"

    def __call__(self) -> Image.Image:
        cell = _row_group_cells(self.path, self.row_group, self.column)[self.row]
        return decode_image(cell, Path(self.path).parent)


@functools.lru_cache(maxsize=8)
def _row_group_cells(path: str, row_group: int, column: str) -> list:
    with require_pyarrow().ParquetFile(path) as handle:
        return handle.read_row_group(row_group, columns=[column]).column(0).to_pylist()


@dataclass(frozen=True)
class FileImage:
    """Loads the image file at ``path``."""

    path: str

    def __call__(self) -> Image.Image:
        return decode_image(self.path, Path("."))


def decode_image(cell: Any, base: Path) -> Image.Image:
    """An RGB image from an HF ``Image`` cell ({bytes, path}), raw bytes, or a path (relative to ``base``)."""
    from PIL import Image

    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, bytes | bytearray):
        data, path = cell, None
    else:
        data, path = None, cell
    if data is not None:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    if path:
        with Image.open(base / path) as image:
            return image.convert("RGB")
    raise ValueError(f"image cell has neither bytes nor a path: {cell!r}")
