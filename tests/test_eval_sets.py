"""data_tools.eval_sets: the mcq and POPE sets derived from the synthetic test scenes are right about
each scene and load as `mllm eval --task mcq / yesno` rows."""

from __future__ import annotations

import json
from pathlib import Path

import mllm.evaluation.tasks  # noqa: F401  (registers the tasks)
from data_tools.eval_sets import main
from mllm.evaluation.loop import TASKS, EvalOptions


def test_mcq_and_pope_rows_are_true_of_their_scene_and_load_as_task_rows(synth_small: Path, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "scenes.jsonl").write_text((synth_small / "scenes.jsonl").read_text())
    assert main(["--data", str(data)]) == 0
    scenes = {
        s["image"]: s
        for s in map(json.loads, (data / "scenes.jsonl").read_text().splitlines())
        if s["split"] == "test"
    }
    mcq = [json.loads(line) for line in (data / "mcq_test.jsonl").read_text().splitlines()]
    pope = [json.loads(line) for line in (data / "pope_test.jsonl").read_text().splitlines()]
    assert len(mcq) == len(pope) == 2 * len(scenes)
    for row in mcq:
        shapes = scenes[row["image"]]["shapes"]
        right = row["options"]["ABCD".index(row["answer"])]
        if row["question_id"].endswith("-color"):
            kind = row["question"].removeprefix("What color is the ").removesuffix("?")
            assert right in {s["color"] for s in shapes if s["shape"] == kind}
            assert len(row["options"]) == 4
        else:
            color = row["question"].removeprefix("What shape is the ").removesuffix(" object?")
            assert right in {s["shape"] for s in shapes if s["color"] == color}
        assert len(set(row["options"])) == len(row["options"])
    for row in pope:
        color, kind = row["text"].removeprefix("Is there a ").removesuffix("?").split(" ")
        present = (color, kind) in {(s["color"], s["shape"]) for s in scenes[row["image"]]["shapes"]}
        assert row["label"] == ("yes" if present else "no")
    assert sum(r["label"] == "yes" for r in pope) == len(scenes)

    mcq_samples = TASKS.get("mcq").load(str(data / "mcq_test.jsonl"), None, None, EvalOptions())
    yesno_samples = TASKS.get("yesno").load(str(data / "pope_test.jsonl"), None, None, EvalOptions())
    assert len(mcq_samples) == len(mcq) and len(yesno_samples) == len(pope)
