"""The benchmarks' scoring rules on hand-checked cases."""

import pytest

from vtc.eval.scoring import (
    circular_accuracy,
    exact_match,
    extract_choice_letter,
    mme_category_scores,
    mme_totals,
    normalize_short_answer,
    normalize_vqa_answer,
    parse_yes_no,
    parse_yes_no_strict,
    pope_metrics,
    rotate_options,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("  Yes\n", "yes"),  # strip, lowercase, newline
        ("Red\tcar", "red car"),  # tab -> space
        ("2.5", "2.5"),  # a period before a digit is a decimal point: kept
        ("yes.", "yes"),  # any other period goes
        ("100,978", "100978"),  # a comma between digits is deleted, not spaced
        ("x-ray", "x ray"),  # a mark not touching a space becomes a space
        ("yes, it is", "yes it is"),  # a mark touching a space is deleted
        ("what?!", "what"),
        ("2:50", "2:50"),  # colons are kept (times)
        ("girl's", "girl's"),  # apostrophes are kept (possessives)
        ("two", "2"),  # number words -> digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("a dog", "dog"),  # articles dropped
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("isnt it", "isn't it"),
        ("well", "well"),  # a real word that looks like a contraction stays
        ("its", "its"),
        ("  many   spaces  ", "many spaces"),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    # With k of the 10 answers matching, the 10 leave-one-out subsets are: k subsets that dropped a matching
    # answer (k - 1 matches left) and 10 - k that dropped another (k matches left); each scores min(1, matches / 3).
    # k=1: (1 * 0 + 9 * 1/3) / 10 = 0.3
    # k=2: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6
    # k=3: (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9
    # k=4: every subset keeps >= 3 matches -> 1.0
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["cat"] * k + ["dog"] * (10 - k)
        assert vqa_accuracy("cat", answers) == pytest.approx(expected), k


def test_vqa_accuracy_normalizes_both_sides():
    # "Two." -> "2" and "two" -> "2": three matches in total.
    assert vqa_accuracy("Two.", ["2", "two", "2"] + ["3"] * 7) == pytest.approx(0.9)
    # "coca-cola" -> "coca cola" on both sides: all ten match.
    assert vqa_accuracy("Coca-Cola", ["coca cola"] * 4 + ["coca-cola"] * 6) == 1.0
    assert vqa_accuracy("a dog", ["dog"]) == 1.0  # a single reference is exact match
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])


def test_gqa_exact_match():
    assert normalize_short_answer("  Yes. ") == "yes"
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("left!", "left") == 1.0
    assert exact_match("The table", "table") == 0.0  # no article removal in GQA
    assert exact_match("tables", "table") == 0.0
    assert exact_match("no", "yes") == 0.0


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("yes, there is a dog.", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("NO", "no"),
        ("No, there is not.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Not really", "no"),
        ("There is no dog.", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("Nothing here", "yes"),  # "nothing" is not the word "no"
        ("", "yes"),  # LLaVA's rule: anything without no/not reads as yes
    ],
)
def test_parse_yes_no(text, parsed):
    assert parse_yes_no(text) == parsed


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No", "no"),
        ("Nope", "no"),  # "no" within the first four characters
        ("Yes, it is", "yes"),
        ("I think yes", "other"),  # neither in the first four characters
        ("Maybe", "other"),
    ],
)
def test_parse_yes_no_strict(text, parsed):
    assert parse_yes_no_strict(text) == parsed


def test_pope_metrics_on_a_confusion_table():
    # TP = 3, FP = 1, FN = 2, TN = 4 (10 questions).
    labels = ["yes"] * 5 + ["no"] * 5
    predictions = ["yes", "yes", "yes", "no", "no"] + ["yes", "no", "no", "no", "no"]
    metrics = pope_metrics(predictions, labels)
    precision, recall = 3 / 4, 3 / 5
    assert metrics["accuracy"] == pytest.approx(7 / 10)
    assert metrics["precision"] == pytest.approx(precision)
    assert metrics["recall"] == pytest.approx(recall)
    assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # = 2/3
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["yes_ratio"] == pytest.approx(4 / 10)  # share of "yes" predictions


def test_pope_metrics_without_positive_predictions():
    metrics = pope_metrics(["no", "no"], ["yes", "no"])
    assert metrics == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


def test_mme_scores_and_totals():
    results = [
        # existence: image a both right, image b one right -> acc 3/4, acc+ 1/2 -> 100 * 1.25 = 125
        ("existence", "a", True),
        ("existence", "a", True),
        ("existence", "b", True),
        ("existence", "b", False),
        # color: both images both right -> 200
        ("color", "c", True),
        ("color", "c", True),
        ("color", "d", True),
        ("color", "d", True),
        # code_reasoning (cognition): one of two right -> acc 1/2, acc+ 0 -> 50
        ("code_reasoning", "e", False),
        ("code_reasoning", "e", True),
    ]
    scores = mme_category_scores(results)
    assert scores["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "n_questions": 4, "n_images": 2}
    assert scores["color"]["score"] == 200.0
    assert scores["code_reasoning"]["score"] == 50.0
    assert mme_totals(scores) == {"perception": 325.0, "cognition": 50.0}


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B. dog", "B"),
        ("(B) dog", "B"),
        ("B: dog", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("dog", "B"),  # exact option text
        ("Dog.", "B"),
        ("E", None),  # beyond the options
        ("A cat", None),  # the article, not option A
        ("the answer is a cat", None),
        ("I am not sure", None),
        ("", None),
    ],
)
def test_extract_choice_letter(text, letter):
    assert extract_choice_letter(text, ["cat", "dog", "bird"]) == letter


def test_rotate_options_moves_the_answer():
    options = ["cat", "dog", "bird", "fish"]
    assert rotate_options(options, 2, 0) == (options, 2)
    assert rotate_options(options, 2, 1) == (["dog", "bird", "fish", "cat"], 1)
    assert rotate_options(options, 2, 3) == (["fish", "cat", "dog", "bird"], 3)
    for k in range(4):
        rotated, answer = rotate_options(options, 2, k)
        assert rotated[answer] == "bird"
    with pytest.raises(ValueError):
        rotate_options(options, 4, 0)


def test_circular_accuracy_needs_every_copy_right():
    groups = {"q1": [True, True, True, True], "q2": [True, True, False, True], "q3": [False, False]}
    assert circular_accuracy(groups) == pytest.approx(1 / 3)
    assert circular_accuracy({"q2": [True, True, False, True]}) == 0.0  # one wrong rotation sinks the question
    assert circular_accuracy({}) == 0.0
