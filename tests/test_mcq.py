"""Multiple choice: the matching rule (letter, then text, then an option inside the answer), options in
every accepted form, and MMBench circular evaluation scored by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm.evaluation import match_choice, parse_inline_options
from mllm.evaluation.loop import EvalOptions
from mllm.evaluation.tasks.mcq import McqTask, load_mcq_samples

OPTIONS = ["cat", "dog", "dark red", "red"]


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),  # 1. the letter alone, bare or marked
        ("(C)", "C"),
        ("C.", "C"),
        ("D)", "D"),
        ("B. dog", "B"),  # a lettered option
        ("(B) dog", "B"),
        ("The answer is D.", "D"),
        ("answer: A", "A"),
        ("E", None),  # not an option's letter
        ("Cat.", "A"),  # 2. the option text, case and punctuation aside
        ("dark red", "C"),
        ("It is a dog.", "B"),  # 3. one option inside the answer
        ("it is dark red", "C"),  # "red" is part of "dark red"
        ("A cat", "A"),  # the article, not the letter: matched by the text "cat"
        ("a red dog", None),  # two options inside: unmatched
        ("I don't know", None),
        ("", None),
    ],
)
def test_match_choice(prediction: str, letter: str | None) -> None:
    assert match_choice(prediction, OPTIONS) == letter


def test_parse_inline_options() -> None:
    assert parse_inline_options("What is it?\nA. cat\nB. dog\nC. Dark red") == (
        "What is it?",
        ["cat", "dog", "Dark red"],
    )
    assert parse_inline_options("Colour? (A) red (B) blue") == ("Colour?", ["red", "blue"])
    assert parse_inline_options("Is A. bigger? A. yes B. no") == ("Is A. bigger?", ["yes", "no"])
    assert parse_inline_options("How many?") is None


def _write(tmp_path: Path, rows: list[dict], name: str = "mcq.jsonl") -> str:
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / name)


def test_options_as_list_mapping_columns_inline_and_llava(tmp_path: Path) -> None:
    rows = [
        {"id": "list", "question": "Which?", "options": ["cat", "dog"], "answer": "B"},
        {"id": "map", "question": "Which?", "options": {"A": "cat", "B": "dog"}, "answer": "cat"},
        {"index": 7, "question": "Which?", "A": "cat", "B": "dog", "C": float("nan"), "answer": "B",
         "hint": "A pet."},  # MMBench columns, a NaN column ends the options
        {"id": "inline", "question": "Which?\nA. cat\nB. dog", "answer": 1},
        {"id": "llava", "conversations": [{"from": "human", "value": "Which?\nA. cat\nB. dog"},
                                          {"from": "gpt", "value": "B"}]},
    ]  # fmt: skip
    samples = load_mcq_samples(_write(tmp_path, rows))
    assert [(s.id, s.meta["options"], s.meta["answer"]) for s in samples] == [
        ("list", ["cat", "dog"], "B"),
        ("map", ["cat", "dog"], "A"),
        ("7", ["cat", "dog"], "B"),
        ("inline", ["cat", "dog"], "B"),
        ("llava", ["cat", "dog"], "B"),
    ]
    # options given apart are shown as MMBench's LLaVA prompt shows them; inline ones as written
    assert samples[0].question == "Which?\nA. cat\nB. dog"
    assert samples[2].question == "A pet.\nWhich?\nA. cat\nB. dog"
    assert samples[3].question == "Which?\nA. cat\nB. dog"
    with pytest.raises(ValueError, match=r"mcq.jsonl#1.*answer 'Z'"):
        load_mcq_samples(_write(tmp_path, [{"question": "Which?", "options": ["cat", "dog"], "answer": "Z"}]))
    with pytest.raises(ValueError, match="needs `options`"):
        load_mcq_samples(_write(tmp_path, [{"question": "Which?", "answer": "A"}]))


def test_circular_evaluation_by_hand(tmp_path: Path) -> None:
    """Two questions of three options, asked in 3 rotations each. A model that always says "A" is right
    on the unrotated questions whose answer is A, but never right in every rotation."""
    rows = [
        {"id": "q1", "question": "Which is a pet?", "options": ["cat", "rock", "cloud"], "answer": "A"},
        {"id": "q2", "question": "Which is red?", "options": ["grass", "blood", "sky"], "answer": "B"},
    ]
    task, options = McqTask(), EvalOptions(circular=True)
    samples = task.load(_write(tmp_path, rows), None, None, options)
    assert [s.id for s in samples] == ["q1", "q1@rot1", "q1@rot2", "q2", "q2@rot1", "q2@rot2"]
    assert (
        samples[1].question == "Which is a pet?\nA. rock\nB. cloud\nC. cat"
        and samples[1].meta["answer"] == "C"
    )
    assert samples[5].meta["options"] == ["sky", "grass", "blood"] and samples[5].meta["answer"] == "C"

    _, always_a = task.score(samples, ["A"] * 6, options)
    assert always_a["accuracy"] == 0.5  # q1 right unrotated, q2 wrong
    assert always_a["circular_accuracy"] == 0.0 and always_a["num_questions"] == 2

    right_text = [s.meta["options"][ord(s.meta["answer"]) - 65] for s in samples]  # the right option's text
    per_sample, knows = task.score(samples, right_text, options)
    assert knows["accuracy"] == 1.0 and knows["circular_accuracy"] == 1.0
    assert [c["choice"] for c in per_sample] == [s.meta["answer"] for s in samples]

    one_slip = [*right_text[:4], "B", right_text[5]]  # q2 wrong in one rotation only (its answer is A)
    _, slipped = task.score(samples, one_slip, options)
    assert slipped["accuracy"] == 1.0 and slipped["circular_accuracy"] == 0.5
    assert task.score(samples[:1], ["no idea"], EvalOptions())[1] == {"accuracy": 0.0, "num_unmatched": 1}
