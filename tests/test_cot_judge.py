"""data_tools.cot_judge: judge records ask exactly what the search's judge asks, about this record's
own stage text against another record's, and their answer names the record's own text."""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.cot_judge import judge_records, main
from mllm.inference.stage_beam import DEFAULT_STAGES, judge_prompt, parse_verdict, stage_text


def test_judge_records_ask_the_search_prompt_and_name_the_records_own_text(
    synth_small: Path, tmp_path
) -> None:
    records = json.loads((synth_small / "cot_train.json").read_text())
    judges = judge_records(records, fraction=1.0, seed=0)
    assert len(judges) >= 0.9 * len(records)
    by_id = {r["id"]: r for r in records}
    stages = {s.name.lower(): s for s in DEFAULT_STAGES}
    rights = []
    for judge in judges:
        base_id, _, stage_name = judge["id"].rpartition("-judge-")
        record, stage = by_id[base_id], stages[stage_name]
        answer = record["conversations"][-1]["value"]
        asked, said = (t["value"] for t in judge["conversations"])
        right = parse_verdict(said)
        assert right is not None
        rights.append(right)
        own = stage_text(answer, stage)
        assert f"Response {right + 1}: {own}\n" in asked
        other = asked.split(f"Response {2 - right}: ")[1].split("\n")[0]
        assert other != own
        question = record["conversations"][-2]["value"].replace("<image>", "").strip()
        hint = " ".join(stage_text(answer, s) for s in DEFAULT_STAGES if s.name in stage.hint_from)
        texts = [own, other] if right == 0 else [other, own]
        assert asked == "<image>\n" + judge_prompt(stage.judge, stage.recall, question, hint, texts)
        assert judge["image"] == record["image"]
    assert 0.3 < sum(rights) / len(rights) < 0.7  # the right response is first about as often as second

    data = tmp_path / "data"
    data.mkdir()
    (data / "cot_train.json").write_text(json.dumps(records))
    assert main(["--data", str(data), "--fraction", "0.5"]) == 0
    merged = json.loads((data / "cot_train_with_judge.json").read_text())
    assert len(merged) == len(records) + len(json.loads((data / "cot_judge_train.json").read_text()))
