"""VQA normalisation and accuracy against values computed by hand from the official script
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, commit a013f00).

Reminder of what that script does per question: strip newline/tab/space from the prediction and the
answers; only if the answers are then not all identical (``len(set(gtAnswers)) > 1``), run
processPunctuation + processDigitArticle on the prediction and the answers; score = mean over each
annotator left out of min(1, #other annotators whose answer == prediction / 3).
"""

from __future__ import annotations

import pytest

from mllm.evaluation import METRICS, TASK_METRICS, exact_match, normalize_answer, vqa_accuracy
from mllm.evaluation.metrics import compute_metrics, vqa_accuracy_normalized


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, period dropped
        ("The Red Circle", "red circle"),  # lowercase, article dropped
        ("an apple", "apple"),
        ("black/white", "black white"),  # a mark between letters becomes a space
        ("black / white", "black white"),  # a mark beside a space is deleted
        ("1,000", "1000"),  # digit-comma-digit: marks deleted
        ("red-blue", "red blue"),
        ("3,000-4,000", "30004000"),  # digit,digit anywhere: *every* mark deleted, "-" included
        ("3.5", "3.5"),  # a period before a digit stays
        (".5", ".5"),
        ("5.", "5"),  # lookahead typo: the intended lookbehind (?<!\d) would have kept "5."
        ("yes!", "yes"),
        ("dont", "don't"),  # contraction restored
        ("Im", "im"),  # key "Im" never matches: processDigitArticle lowercases first
        ("  none  ", "0"),
        ("left\tside\n", "left side"),
        ("yes" + "." * 32, "yes"),  # periodStrip.sub("", t, re.UNICODE): count = 32 ...
        ("yes" + "." * 33, "yes."),  # ... so the 33rd period survives
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_normalises_both_sides() -> None:
    assert exact_match("Two.", ["2", "two"]) == 1.0
    assert exact_match("the circle", ["Circle"]) == 1.0
    assert exact_match("square", ["circle", "triangle"]) == 0.0


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        # m of 10 answers match; leaving out a matching one leaves m-1, another one leaves m:
        # score = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10.
        (0, 0.0),  # (0 + 10*0) / 10
        (1, 0.3),  # (1*0 + 9*1/3) / 10 = 3/10
        (2, 0.6),  # (2*1/3 + 8*2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3*2/3 + 7*1) / 10 = 9/10 (the un-averaged min(3/3, 1) would say 1.0)
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),  # answers all "red" -> nothing normalised, raw "red" == "red": 10*min(1, 9/3) / 10
    ],
)
def test_vqa_accuracy_partial_credit(m: int, expected: float) -> None:
    answers = ["red"] * m + ["blue"] * (10 - m)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)
    assert vqa_accuracy_normalized("red", answers) == pytest.approx(expected)


def test_vqa_accuracy_few_annotators_follow_the_official_rule() -> None:
    # ["red", "red"]: each left out leaves 1 match -> min(1, 1/3); mean 1/3.
    assert vqa_accuracy("red", ["red", "red"]) == pytest.approx(1 / 3)
    # ["red", "red", "blue"]: out red -> 1/3, out red -> 1/3, out blue -> 2/3; mean 4/9.
    assert vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx(4 / 9)


def test_vqa_accuracy_unanimous_answers_are_not_normalised() -> None:
    # Issue example. Ten identical "red one": set size 1 -> no processing; "The red one" != "red one"
    # for every annotator left out -> 0/3 each -> 0.0.  The lenient variant: "red 1" == "red 1" -> 1.0.
    assert vqa_accuracy("The red one", ["red one"] * 10) == 0.0
    assert vqa_accuracy_normalized("The red one", ["red one"] * 10) == 1.0
    # Case and the period are not normalised either: "Yes" != "yes", "Red." != "red" -> 0.0.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Red.", ["red"] * 10) == 0.0  # was 1.0 before: we normalised both sides
    assert vqa_accuracy_normalized("Red.", ["red"] * 10) == 1.0
    # Whitespace is cleaned on both sides first: "yes\n" -> "yes" == "yes" -> 9/3 capped -> 1.0.
    assert vqa_accuracy("yes\n", ["yes"] * 10) == 1.0
    # The set is taken after that cleaning: ["yes"]*9 + ["yes\t"] is unanimous, so "Yes" stays
    # "Yes" and matches nobody -> 0.0 (had the answers differed, "Yes" -> "yes" would score 1.0).
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["yes\t"]) == 0.0


def test_vqa_accuracy_number_words() -> None:
    # Ten "2": unanimous -> raw "two" != "2" -> 0.0.  Ten "two": raw "two" == "two" -> 1.0.
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    # Nine "2" + "3": not unanimous -> prediction "two" -> "2"; 9 matches: out "2" leaves 8 -> 1,
    # out "3" leaves 9 -> 1; mean 1.0.  Nine "two" + "three": answers -> "2"/"3" too -> 1.0.
    assert vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0
    assert vqa_accuracy("two", ["two"] * 9 + ["three"]) == 1.0
    assert vqa_accuracy_normalized("two", ["2"] * 10) == 1.0


def test_vqa_accuracy_punctuation_rule() -> None:
    # Unanimous: "yes!" stays "yes!" != "yes" -> 0.0.  Nine "yes" + "no": "yes!" -> "yes", 9 match -> 1.0.
    assert vqa_accuracy("yes!", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes!", ["yes"] * 9 + ["no"]) == 1.0
    # Answers differing only by punctuation (set size 2): "black/white" ("/" touches no space and
    # there is no digit,digit) -> "black white"; all ten become "black white" -> 1.0 for either form.
    answers = ["black/white"] * 5 + ["black white"] * 5
    assert vqa_accuracy("black/white", answers) == 1.0
    assert vqa_accuracy("black white", answers) == 1.0
    # The delete branch: "1,000" has digit,digit -> "," deleted -> "1000" on both sides -> 1.0;
    # but ten identical "1,000" are left raw, so "1000" != "1,000" -> 0.0.
    assert vqa_accuracy("1,000", ["1,000"] * 5 + ["1000"] * 5) == 1.0
    assert vqa_accuracy("1000", ["1,000"] * 10) == 0.0


def test_vqa_accuracy_period_rule() -> None:
    # "3.5": period before a digit kept -> "3.5" == "3.5", 9 match -> 1.0; "3 5" would not match it.
    assert vqa_accuracy("3.5", ["3.5"] * 9 + ["4"]) == 1.0
    # "yes." -> "yes", 9 match -> 1.0; "5." -> "5" (the typo'd lookahead deletes it), 9 match -> 1.0.
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("5.", ["5"] * 9 + ["6"]) == 1.0


def test_vqa_accuracy_period_substitution_limit() -> None:
    # "yes" + 33 periods: sub(..., count=re.UNICODE=32) leaves "yes." != "yes" -> 0 matches -> 0.0.
    # With 32 periods all go: "yes" matches 9 -> 1.0.  The lenient variant has the same limit.
    assert vqa_accuracy("yes" + "." * 33, ["yes"] * 9 + ["no"]) == 0.0
    assert vqa_accuracy("yes" + "." * 32, ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy_normalized("yes" + "." * 33, ["yes"] * 10) == 0.0


def test_vqa_accuracy_contractions() -> None:
    # Not unanimous: "dont" -> "don't", 9 match -> 1.0.  Unanimous: raw "dont" != "don't" -> 0.0.
    assert vqa_accuracy("dont", ["don't"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 0.0
    # "Im" -> lowercased "im", which the table (key "Im") does not map: "im" != "i'm" -> 0.0.
    assert vqa_accuracy("Im", ["i'm"] * 9 + ["no"]) == 0.0


def test_vqa_accuracy_single_reference_is_normalised_exact_match() -> None:
    # The official rule would give 0 always (no other annotator); we compare normalised strings.
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("The Red one.", ["red 1"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0
    assert vqa_accuracy_normalized("two", ["2"]) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
    with pytest.raises(ValueError):
        vqa_accuracy_normalized("x", [])


def test_task_registry() -> None:
    assert TASK_METRICS["vqa"] == ("exact_match", "vqa_accuracy", "vqa_accuracy_normalized")
    predictions = ["red", "two", "Two"]
    references = [["red"] * 3 + ["blue"] * 7, ["2"], ["2"] * 10]
    # per sample: official 0.9, 1.0 (single reference, normalised), 0.0 (unanimous, raw "Two" != "2");
    # lenient 0.9, 1.0, 1.0; exact match 1, 1, 1.
    assert compute_metrics("vqa", predictions, references) == {
        "exact_match": pytest.approx(1.0),
        "vqa_accuracy": pytest.approx((0.9 + 1.0 + 0.0) / 3),
        "vqa_accuracy_normalized": pytest.approx((0.9 + 1.0 + 1.0) / 3),
    }
    assert METRICS.get("exact_match")(["a"], [["b"]]) == 0.0
    assert METRICS.get("vqa_accuracy_normalized")(["Red."], [["red"] * 10]) == 1.0
    with pytest.raises(ValueError, match="vqa"):
        compute_metrics("retrieval", [], [])
    with pytest.raises(ValueError, match="exact_match"):
        METRICS.get("cider")
