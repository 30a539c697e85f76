"""Scoring rules of the standard benchmarks, as small pure functions over strings and lists.

The tasks in :mod:`vtc.eval.tasks` call these; each rule names the evaluation it follows and where it differs.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence

# The official VQA evaluation (visualqa.org/evaluation) normalises predictions and human answers alike. Its code
# handles only these marks as punctuation; periods are treated separately, and apostrophes and colons are kept
# ("girl's", "2:50").
_VQA_MARKS = ';/[]"{}()=+\\_-><@`,?!'
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
# The official table also maps "none" to "0" (a count of none).
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}


# Contractions written without their apostrophe get it back ("dont" -> "don't"): ending -> stems. Stems whose
# apostrophe-less form is itself an English word ("well", "hell", "shed", "were", "its", "lets", "id", "wed") are
# left out so that real words are never rewritten.
_CONTRACTION_STEMS = {
    "'t": (
        "ain", "aren", "can", "couldn", "didn", "doesn", "don", "hadn", "hasn", "haven", "isn", "mightn", "mustn",
        "needn", "oughtn", "shan", "shouldn", "wasn", "weren", "won", "wouldn",
    ),
    "'ve": ("could", "might", "must", "should", "would", "i", "they", "we", "you", "who", "what", "where"),
    "'ll": ("how", "it", "they", "who", "what", "why", "you", "somebody", "someone", "something"),
    "'re": ("they", "you", "what", "why", "there"),
    "'s": (
        "he", "she", "how", "that", "there", "what", "when", "where", "who", "why", "somebody", "someone", "something",
    ),
    "'d": ("he", "how", "it", "they", "who", "you", "where", "there", "somebody", "someone", "something"),
    "n't've": ("could", "should", "would", "might", "must"),
}  # fmt: skip
_CONTRACTIONS = {
    stem + ending.replace("'", ""): stem + ending for ending, stems in _CONTRACTION_STEMS.items() for stem in stems
} | {"im": "i'm", "oclock": "o'clock", "maam": "ma'am", "yall": "y'all", "twas": "'twas"}


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer the way the official VQA evaluation does, for predictions and human answers alike.

    Steps: newlines and tabs become spaces, the text is stripped and lowercased; punctuation marks become spaces,
    except that a mark touching a space is deleted, and in a text with a comma between digits every mark is deleted
    (so "100,978" -> "100978"); periods are deleted unless a digit follows ("2.5" stays); number words become digits
    ("two" -> "2"); articles (a, an, the) are dropped; contractions missing their apostrophe get it back
    ("dont" -> "don't"); words are joined by single spaces.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    number_with_comma = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in _VQA_MARKS:
        # Decided on the input text, as the official code does, then applied to the running output.
        delete = number_with_comma or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete else " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out)
    words = [_NUMBER_WORDS.get(word, word) for word in out.split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers (10 in VQAv2 and TextVQA).

    Both sides are normalised with :func:`normalize_vqa_answer`. For each annotator left out in turn, the
    prediction scores min(1, matches among the other answers / 3); the result is the mean over the leave-one-out
    sets. With a single reference answer (not a VQA dataset) this degenerates to 0, so it is exact match instead.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(answer) == pred for answer in answers]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


def normalize_short_answer(text: str) -> str:
    """Lowercase, strip, and drop trailing punctuation ("Yes." -> "yes"), as LLaVA does before GQA's evaluation."""
    return text.strip().lower().rstrip(string.punctuation + string.whitespace)


def exact_match(prediction: str, answer: str) -> float:
    """GQA accuracy: 1.0 when prediction and answer agree after :func:`normalize_short_answer`, else 0.0."""
    return float(normalize_short_answer(prediction) == normalize_short_answer(answer))


_WORD_EDGES = string.punctuation + "“”‘’"


def parse_yes_no(text: str) -> str:
    """POPE's reading of a free answer, after LLaVA's eval_pope: "no" when the first sentence contains the word
    "no" or "not", else "yes".

    The first sentence is the text before the first period. Unlike LLaVA, words are compared case-insensitively
    and with surrounding punctuation removed, so "NO", "Not quite" and "No!" read as "no". An empty or unrelated
    answer reads as "yes", as in LLaVA.
    """
    first = text.split(".", 1)[0]
    words = {word.strip(_WORD_EDGES).lower() for word in first.split()}
    return "no" if words & {"no", "not"} else "yes"


def parse_yes_no_strict(text: str) -> str:
    """MME's reading of a free answer (the official MME calculation): "yes" or "no" when the lowercased, stripped
    answer without periods is exactly that word or its first four characters contain it ("yes" is checked first),
    else "other", which never matches the reference."""
    answer = text.strip().lower().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, and yes_ratio (the share of "yes"
    predictions, as LLaVA's eval_pope reports it), from parsed predictions and reference labels ("yes"/"no").
    Precision, recall and F1 are 0.0 when undefined (no positive predictions or labels)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    n = len(labels)
    if n == 0:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    tp = sum(p == "yes" and y == "yes" for p, y in zip(predictions, labels, strict=True))
    fp = sum(p == "yes" and y != "yes" for p, y in zip(predictions, labels, strict=True))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(predictions, labels, strict=True))
    correct = sum(p == y for p, y in zip(predictions, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    yes = sum(p == "yes" for p in predictions)
    return {"accuracy": correct / n, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes / n}


MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_category_scores(results: Iterable[tuple[str, Hashable, bool]]) -> dict[str, dict[str, float]]:
    """MME scores per category from (category, image id, correct) triples, one per question.

    acc is the share of questions answered right; acc_plus the share of images whose questions (two per image in
    MME) are all right; score = 100 * (acc + acc_plus), at most 200 per category. Also gives n_questions, n_images.
    """
    by_image: dict[str, dict[Hashable, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for category, image, correct in results:
        by_image[category][image].append(bool(correct))
    scores = {}
    for category, images in by_image.items():
        answers = [c for cs in images.values() for c in cs]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(cs) for cs in images.values()) / len(images)
        scores[category] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100.0 * (acc + acc_plus),
            "n_questions": len(answers),
            "n_images": len(images),
        }
    return scores


def mme_totals(category_scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """MME's headline sums: perception over its 10 categories (at most 2000), cognition over its 4 (at most 800).
    Categories absent from ``category_scores`` add nothing; unknown categories are ignored."""
    return {
        "perception": sum(category_scores[c]["score"] for c in MME_PERCEPTION if c in category_scores),
        "cognition": sum(category_scores[c]["score"] for c in MME_COGNITION if c in category_scores),
    }


LETTERS = string.ascii_uppercase
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|[.:])")
# "answer" in any case, the letter a capital: in "the answer is a cat" the "a" is an article.
_ANSWER_IS = re.compile(r"(?i:\banswer(?:\s+is)?)\s*:?\s*\(?([A-Z])(?![\w'-])")


def _plain(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def extract_choice_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a free answer picks among ``options`` (lettered A, B, ...), or None.

    Accepted, in this order: a bare letter ("B", "b", "(B)", "B."); a leading letter followed by ")", "." or ":"
    ("B. cat", "(B) cat", "B: cat"); "answer is B" / "Answer: (B)" anywhere; and, as a fallback, the exact text of
    one option ("cat", case and a final period ignored). A letter beyond the number of options is rejected. A
    leading capital followed by a space is not a choice ("A cat" is the article, not option A).
    """
    letters = LETTERS[: len(options)]
    text = prediction.strip()
    bare = text.strip("()").rstrip(".").strip()
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    match = _LEADING_LETTER.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    match = _ANSWER_IS.search(text)
    if match and match.group(1) in letters:
        return match.group(1)
    target = _plain(text)
    hits = [letter for letter, option in zip(letters, options, strict=True) if _plain(option) == target]
    return hits[0] if len(hits) == 1 else None


def rotate_options(options: Sequence[str], answer: int, shift: int) -> tuple[list[str], int]:
    """MMBench CircularEval copy number ``shift``: the options rotated left by ``shift`` (copy 1 of A,B,C,D shows
    B,C,D,A) and the index where the correct option now sits."""
    n = len(options)
    if not 0 <= answer < n:
        raise ValueError(f"answer index {answer} out of range for {n} options")
    k = shift % n
    return list(options[k:]) + list(options[:k]), (answer - k) % n


def circular_accuracy(groups: Mapping[Hashable, Sequence[bool]]) -> float:
    """CircularEval accuracy: the share of questions whose every rotated copy was answered right."""
    if not groups:
        return 0.0
    return sum(all(copies) for copies in groups.values()) / len(groups)
