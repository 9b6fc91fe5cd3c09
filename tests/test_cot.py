"""cot: QA records become four-stage CoT LLaVA json that formats accepts."""

from __future__ import annotations

import json
import re

from data_tools import cot
from mllm.data.formats import load_records

PATTERN = re.compile(
    r"<SUMMARY>(.+)</SUMMARY><CAPTION>(.+)</CAPTION><REASONING>(.+)</REASONING><CONCLUSION>(.+)</CONCLUSION>"
)


def test_format_cot_stage_order_and_stripping():
    text = cot.format_cot(" s ", "c", "r", "red\n")
    assert (
        text == "<SUMMARY>s</SUMMARY><CAPTION>c</CAPTION><REASONING>r</REASONING><CONCLUSION>red</CONCLUSION>"
    )


def test_templates_fill_missing_rationale_and_caption():
    stages = PATTERN.fullmatch(cot.build_cot_answer("What color?", "red")).groups()
    assert stages[1] == cot.DEFAULT_CAPTION and "What color?" in stages[2] and stages[3] == "red"
    stages = PATTERN.fullmatch(
        cot.build_cot_answer("Q?", "blue", "Because it is blue.", "A blue car.")
    ).groups()
    assert stages[1:] == ("A blue car.", "Because it is blue.", "blue")


def test_most_common_answer_handles_vqa_lists():
    assert cot.most_common_answer(["2", "two", "2", {"answer": "two"}, {"answer": "two"}]) == "two"
    assert cot.most_common_answer(["yes", "no"]) == "yes"  # tie: first seen
    assert cot.most_common_answer([]) is None and cot.most_common_answer("  ") is None


def test_cli_custom_keys_skips_incomplete_and_output_loads(tmp_path, capsys):
    rows = [
        {
            "qid": 1,
            "img": "a.png",
            "q": "What color is the car?",
            "a": "red",
            "why": "The car is painted red.",
        },
        {
            "qid": 2,
            "img": ["a.png", "b.png"],
            "q": "Same car?",
            "a": ["yes", "yes", "no"],
            "caption": "Two cars.",
        },
        {"qid": 3, "q": "What is 2+2?", "a": "4"},
        {"qid": 4, "img": "a.png", "q": "No answer here"},
    ]
    src = tmp_path / "qa.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "cot.json"
    argv = [
        str(src),
        "--output",
        str(out),
        "--question-key",
        "q",
        "--answer-key",
        "a",
        "--rationale-key",
        "why",
        "--image-key",
        "img",
        "--id-key",
        "qid",
    ]
    assert cot.main(argv) == 0
    assert "wrote 3 records" in capsys.readouterr().out
    records, skipped = load_records(out, image_folder=tmp_path, bad_data="strict")
    assert [r.id for r in records] == ["1", "2", "3"] and not skipped
    assert records[0].turns[0].content == "<image>\nWhat color is the car?"
    assert records[1].turns[0].content.count("<image>") == 2 and len(records[1].images) == 2
    assert records[2].images == ()
    first = PATTERN.fullmatch(records[0].turns[1].content).groups()
    assert first[2] == "The car is painted red." and first[3] == "red"
    second = PATTERN.fullmatch(records[1].turns[1].content).groups()
    assert second[1] == "Two cars." and second[3] == "yes"
