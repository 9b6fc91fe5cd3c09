"""VQA normalisation and accuracy against values computed by hand from the official script."""

from __future__ import annotations

import pytest

from mllm.evaluation import METRICS, TASK_METRICS, exact_match, normalize_answer, vqa_accuracy
from mllm.evaluation.metrics import compute_metrics


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, period dropped
        ("The Red Circle", "red circle"),  # lowercase, article dropped
        ("an apple", "apple"),
        ("black/white", "black white"),  # a mark between letters becomes a space
        ("black / white", "black white"),  # a mark beside a space is deleted
        ("1,000", "1000"),  # digit-comma-digit: marks deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes!", "yes"),
        ("dont", "don't"),  # contraction restored
        ("  none  ", "0"),
        ("left\tside\n", "left side"),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_normalises_both_sides() -> None:
    assert exact_match("Two.", ["2", "two"]) == 1.0
    assert exact_match("the circle", ["Circle"]) == 1.0
    assert exact_match("square", ["circle", "triangle"]) == 0.0


def test_vqa_accuracy_official_values() -> None:
    """Official accuracy: for each of the 10 annotators left out, min(matches among the other 9 / 3, 1);
    then the mean of the 10 values.

    - 4 of 10 match: leaving out a matching one leaves 3 -> 1; otherwise 4 -> 1.  Mean 1.0.
    - 3 of 10 match: 3 subsets keep 2 -> 2/3; 7 subsets keep 3 -> 1.  (3*2/3 + 7) / 10 = 0.9.
      (The un-averaged min(3/3, 1) would say 1.0; the official averaging gives 0.9.)
    - 2 of 10 match: 2 subsets keep 1 -> 1/3; 8 subsets keep 2 -> 2/3.  (2/3 + 16/3) / 10 = 0.6.
    - 1 of 10 match: 1 subset keeps 0 -> 0; 9 subsets keep 1 -> 1/3.  (9/3) / 10 = 0.3.
    - 0 of 10: 0.
    """
    others = ["blue"] * 10
    assert vqa_accuracy("red", ["red"] * 4 + others[:6]) == pytest.approx(1.0)
    assert vqa_accuracy("red", ["red"] * 3 + others[:7]) == pytest.approx(0.9)
    assert vqa_accuracy("red", ["red"] * 2 + others[:8]) == pytest.approx(0.6)
    assert vqa_accuracy("red", ["red"] * 1 + others[:9]) == pytest.approx(0.3)
    assert vqa_accuracy("red", others) == 0.0
    assert vqa_accuracy("Red.", ["red"] * 10) == 1.0  # normalised before counting


def test_vqa_accuracy_single_reference_is_exact_match() -> None:
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_task_registry() -> None:
    assert set(TASK_METRICS["vqa"]) == {"exact_match", "vqa_accuracy"}
    scores = compute_metrics("vqa", ["red", "two"], [["red"] * 3 + ["blue"] * 7, ["2"]])
    assert scores == {"exact_match": pytest.approx(1.0), "vqa_accuracy": pytest.approx((0.9 + 1.0) / 2)}
    assert METRICS.get("exact_match")(["a"], [["b"]]) == 0.0
    with pytest.raises(ValueError, match="vqa"):
        compute_metrics("caption", [], [])
    with pytest.raises(ValueError, match="exact_match"):
        METRICS.get("cider")
