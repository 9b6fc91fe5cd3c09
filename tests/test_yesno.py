"""Yes/no (POPE): how answers are read, and the confusion figures computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm.evaluation import METRICS, parse_yes_no, yes_no_metrics
from mllm.evaluation.loop import EvalOptions
from mllm.evaluation.tasks.yesno import YesNoTask, load_yesno_samples


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("Yes", "yes"),
        ("yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not there", "no"),
        ("I think yes", "yes"),
        ("There is a dog.", None),  # POPE's script would call this yes; here it is neither
        ("yes and no", "yes"),  # the first word decides
        ("maybe yes, maybe no", None),
        ("", None),
    ],
)
def test_parse_yes_no(answer: str, parsed: str | None) -> None:
    assert parse_yes_no(answer) == parsed


def test_confusion_figures_by_hand() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    parsed = ["yes", "no", None, "yes", "no", "no"]
    m = yes_no_metrics(parsed, labels)
    # TP 1; FN 2 (a "no" and a neither to yes questions); FP 1; TN 2
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 2, 1, 2)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))  # 0.4
    assert m["yes_ratio"] == pytest.approx(2 / 6) and m["num_neither"] == 1
    assert METRICS.get("pope_f1")(
        ["Yes", "No", "dunno", "yes", "no", "no"], [[y] for y in labels]
    ) == pytest.approx(0.4)


def test_pope_rows_and_records(tmp_path: Path) -> None:
    rows = [
        {"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "yes", "category": "random"},
        {"question_id": 2, "image": "a.png", "text": "Is there a cat in the image?", "label": "no", "category": "adversarial"},
        {"id": "r", "conversations": [{"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": "No."}],
         "image": "a.png"},
    ]  # fmt: skip
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = YesNoTask()
    samples = load_yesno_samples(str(tmp_path / "pope.jsonl"))
    assert [(s.id, s.references) for s in samples] == [("1", ("yes",)), ("2", ("no",)), ("r", ("no",))]
    assert (
        task.prompt_turns(samples[0], "<image>", EvalOptions())[-1].content
        == "<image>\nIs there a dog in the image?"
    )
    per_sample, metrics = task.score(samples, ["Yes", "There is a cat.", "no"], EvalOptions())
    assert [c["parsed"] for c in per_sample] == ["yes", None, "no"]
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["num_neither"] == 1
    assert metrics["by_category"]["random"]["accuracy"] == 1.0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": 1, "text": "q?", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl#1.*`yes` or `no`"):
        load_yesno_samples(str(tmp_path / "bad.jsonl"))
