"""TextVQA (validation): questions that need reading text in the image, scored with the official VQA accuracy."""

from __future__ import annotations

from vtc.eval.tasks.vqav2 import VQAv2Task


class TextVQATask(VQAv2Task):
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
    optional_columns = ["image_id"]
    hidden_answers = (
        "the TextVQA test split hides them; use validation (e.g. --data 'textvqa/data/validation-*.parquet')"
    )

    def _family(self, values: dict) -> str:
        return "all"

    def _meta(self, values: dict) -> dict:
        return {"image_id": values.get("image_id")}
